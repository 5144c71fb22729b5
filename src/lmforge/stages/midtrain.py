"""``lmforge midtrain``: continued pre-training of a base model on a curated, weighted data mix.

Mid-training (OLMo 2's "mid-training", Llama 3's "annealing") takes a pre-trained checkpoint a little further,
at a lower learning rate that decays to zero, on a mixture upweighted towards what later stages need (in the
tiny recipe: arithmetic quiz pages over Shakespeare). It is ``lmforge pretrain`` started from ``model=DIR`` with
that model's tokenizer: the same data path (data.mix, see data/mix.py), the same loop, the same checkpoints and
resume. The summary adds the validation loss on each source before and after, i.e. what the mix bought on the
upweighted data and what it cost on the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from lmforge.config import parse_cli
from lmforge.data.mix import MixSource, mix_documents, source_overrides_mix
from lmforge.data.shards import is_val_doc
from lmforge.errors import ConfigError
from lmforge.modelio import load_model_dir, load_tokenizer, resolve_model_dir, save_model_dir
from lmforge.train.lm import DataConfig, PretrainConfig, pretrain
from lmforge.train.loop import TrainConfig
from lmforge.train.runs import finish_run, start_run


def _default_mix() -> DataConfig:
    return DataConfig(mix=[MixSource("builtin:tinyshakespeare", 0.2), MixSource("builtin:tinyworld/quiz", 0.8)])


@dataclass
class MidtrainConfig:
    model: str = "runs/tiny/pretrain/model"  # the base model directory to continue from
    out_dir: str = "runs/tiny/midtrain"
    seq_len: int = 128
    data: DataConfig = field(default_factory=_default_mix)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-3, min_lr_ratio=0.0, schedule="linear", warmup_steps=10, max_steps=100, eval_every=50,
        save_every=100))
    sample_prompt: str = "What is 57 + 68?"
    sample_tokens: int = 60

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model is required: the base model directory to continue from (model=DIR)")
        if self.seq_len < 2:
            raise ValueError("seq_len must be at least 2")


def run_midtrain(cfg: MidtrainConfig) -> dict:
    """Continue training ``cfg.model`` on ``cfg.data``; the pretrain summary plus val_loss_by_source before/after."""
    try:
        base = str(resolve_model_dir(cfg.model))
    except FileNotFoundError as e:
        raise ConfigError(f"model: {e} (train one first: lmforge pretrain)") from None
    run = start_run(cfg)  # config.yaml: the midtrain config, not the pretrain one it runs through
    dist = run.dist
    tokenizer = load_tokenizer(base)
    val_docs = source_val_documents(cfg.data, tokenizer, cfg.train.seed)
    rows = cfg.train.micro_batch_size

    def per_source(model_dir) -> dict:
        model = load_model_dir(model_dir, device=dist.device)
        return val_loss_by_source(model, tokenizer, val_docs, cfg.seq_len, rows, cfg.train.eval_batches)

    before = per_source(base) if dist.is_main else {}
    summary, model, tokenizer = pretrain(PretrainConfig(
        out_dir=cfg.out_dir, tokenizer=base, init_from=base, seq_len=cfg.seq_len, data=cfg.data, train=cfg.train,
        sample_prompt=cfg.sample_prompt, sample_tokens=cfg.sample_tokens), dist)
    if not dist.is_main:
        return {}
    summary["model_dir"] = str(save_model_dir(run.out_dir / "model", model, tokenizer))
    after = per_source(summary["model_dir"])  # the saved model, as users load it
    summary["base_model"] = base
    summary["val_loss_by_source"] = {s: {"before": before[s], "after": after[s]} for s in val_docs}
    return finish_run(run, summary)


def source_val_documents(data: DataConfig, tokenizer, seed: int) -> dict[str, list[str]]:
    """Each source's share of the val split: the documents the mix draws from it that fall in val (by hash),
    exactly the ones build_shards keeps out of training."""
    mix = data.mix or [MixSource(data.source, 1.0, data.text_field)]
    _, _, report = mix_documents(mix, tokenizer, data.filters, seed, data.mix_tokens)
    return {source: list(dict.fromkeys(d for d in info["documents"] if is_val_doc(d, data.val_fraction, seed)))
            for source, info in report.items()}


def val_loss_by_source(model, tokenizer, docs_by_source: dict[str, list[str]], seq_len: int, batch_size: int,
                       max_batches: int = 0) -> dict[str, float]:
    """Mean next-token loss (nats/token) on each source's documents, packed as in pretraining ([bos] + tokens,
    cut into seq_len + 1 windows); at most ``max_batches`` batches per source (0 = all). NaN for no documents."""
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    losses = {}
    for source, docs in docs_by_source.items():
        stream = [t for ids in tokenizer.encode_batch(docs, add_bos=True) for t in ids] if docs else []
        n_rows = (len(stream) - 1) // seq_len
        if max_batches:
            n_rows = min(n_rows, max_batches * batch_size)
        if n_rows == 0:
            losses[source] = math.nan
            continue
        data = torch.tensor(stream[:n_rows * seq_len + 1])
        total = 0.0
        with torch.no_grad():
            for start in range(0, n_rows, batch_size):
                idx = torch.arange(start, min(start + batch_size, n_rows))[:, None] * seq_len
                x = data[idx + torch.arange(seq_len)].to(device)
                y = data[idx + torch.arange(1, seq_len + 1)].to(device)
                total += model(x, labels=y).item() * len(idx)
        losses[source] = total / n_rows
    model.train(was_training)
    return losses


def print_summary(summary: dict) -> None:
    console = Console()
    table = Table(title=f"midtrain from {summary['base_model']}")
    for column in ("validation loss (nats/token)", "before", "after", "change"):
        table.add_column(column, justify="left" if column.startswith("validation") else "right")
    for source, loss in summary["val_loss_by_source"].items():
        table.add_row(source, f"{loss['before']:.3f}", f"{loss['after']:.3f}", f"{loss['after'] - loss['before']:+.3f}")
    table.add_row("whole mix", "", f"{summary['val_loss']:.3f}", "")
    console.print(table)
    console.print(f"{summary['tokens']:,} tokens in {summary['steps']} steps, {summary['seconds']} s -> "
                  f"{summary['model_dir']}")
    console.print("[bold]sample[/bold]\n" + summary["sample"])


def main(argv: list[str]) -> int:
    cfg = parse_cli(source_overrides_mix(argv), MidtrainConfig, prog="lmforge midtrain", description=__doc__,
                    default_recipe="tiny", section="midtrain")
    summary = run_midtrain(cfg)
    if summary:
        print_summary(summary)
    return 0
