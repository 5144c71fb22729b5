"""``lmforge pretrain``: raw text -> tokenizer -> token shards -> next-token prediction -> a model directory.

Stages it chains (each skipped when its output is already complete, so a rerun resumes):
  1. tokenizer: load ``tokenizer`` dir, or train byte-level BPE on the corpus;
  2. data: clean, filter and dedup documents, tokenize into uint16/uint32 shards with a train/val split;
  3. train: the one training loop on packed fixed-length batches; periodic val loss; checkpoints; exact resume;
  4. report: val loss vs the unigram baseline (what a model that ignores context could reach), a sample.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmforge.data.mix import MixSource
from lmforge.data.sources import FilterConfig
from lmforge.model import ModelConfig
from lmforge.train.loop import TrainConfig


@dataclass
class DataConfig:
    source: str = "builtin:tinyshakespeare"  # file, dir, glob, builtin:NAME or hf:NAME[:CONFIG][@SPLIT]
    text_field: str = "text"
    val_fraction: float = 0.05
    filters: FilterConfig = field(default_factory=FilterConfig)
    # Weighted sources (weights = shares of tokens; see data/mix.py). When set, the training documents come from
    # the mix; `source` still trains the tokenizer when none is given.
    mix: list[MixSource] = field(default_factory=list)
    mix_tokens: int = 0  # the mixture's size; 0 = as large as it gets without repeating any source


@dataclass
class PretrainConfig:
    out_dir: str = "runs/tiny/pretrain"
    tokenizer: str = ""  # an existing tokenizer/model dir; empty: train one into out_dir/tokenizer
    vocab_size: int = 2048  # for a tokenizer trained here
    think_tokens: bool = False  # ... with <think> and </think> as single tokens and the thinking chat template
    init_from: str = ""  # continue from a model directory instead of a random init
    seq_len: int = 256
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 80

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ValueError("seq_len must be at least 2")


def prepare_tokenizer(cfg: PretrainConfig, out_dir: Path, dist):
    """The run's tokenizer: the configured one, or train one on this corpus (main rank; the others wait)."""
    from lmforge.modelio import load_tokenizer
    from lmforge.stages.tokenizer import TokenizerStageConfig, run_tokenizer
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.dist import barrier

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    tok_dir = out_dir / "tokenizer"
    if dist.is_main:  # reused when trained with the same settings on unchanged data; retrained otherwise
        run_tokenizer(TokenizerStageConfig(data=cfg.data.source, text_field=cfg.data.text_field,
                                           vocab_size=cfg.vocab_size, out_dir=str(tok_dir),
                                           think_tokens=cfg.think_tokens))
    barrier()
    return Tokenizer.load(tok_dir)


def prepare_shards(cfg: PretrainConfig, tokenizer, data_dir: Path, dist) -> dict:
    """Token shards for the corpus, built once (a complete meta.json with the same fingerprint = done)."""
    from lmforge.data.mix import mix_documents, mix_name
    from lmforge.data.shards import build_shards
    from lmforge.data.sources import filter_documents, read_documents
    from lmforge.train.dist import barrier

    if dist.is_main:
        if cfg.data.mix:
            kept, stats, _ = mix_documents(cfg.data.mix, tokenizer, cfg.data.filters, cfg.train.seed,
                                           cfg.data.mix_tokens)
        else:
            kept, stats = filter_documents(read_documents(cfg.data.source, text_field=cfg.data.text_field),
                                           cfg.data.filters)
        build_shards(kept, tokenizer, data_dir, val_fraction=cfg.data.val_fraction, seed=cfg.train.seed,
                     filter_stats=stats, source=mix_name(cfg.data.mix) if cfg.data.mix else cfg.data.source)
    barrier()
    return json.loads((data_dir / "meta.json").read_text())


def build_model(cfg: PretrainConfig, tokenizer):
    from lmforge.model import Transformer
    from lmforge.modelio import load_model_dir

    if cfg.init_from:
        model = load_model_dir(cfg.init_from)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"init_from {cfg.init_from}: vocab {model.config.vocab_size} is smaller than the "
                             f"tokenizer's {tokenizer.vocab_size}")
        return model
    model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size,
                        max_position_embeddings=max(cfg.model.max_position_embeddings, cfg.seq_len))
    return Transformer(model_cfg)


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) and return a summary: val_loss, unigram_baseline, n_params, tokens, flops, sample."""
    import torch

    from lmforge.data.shards import PackedBatches, TokenDataset, iter_eval, unigram_baseline_loss
    from lmforge.modelio import save_model_dir
    from lmforge.train.dist import all_reduce_mean, start_run
    from lmforge.train.loop import train

    dist, out_dir = start_run(cfg)
    t0 = time.time()
    tokenizer = prepare_tokenizer(cfg, out_dir, dist)
    meta = prepare_shards(cfg, tokenizer, out_dir / "data", dist)
    train_ds, val_ds = TokenDataset(out_dir / "data", "train"), TokenDataset(out_dir / "data", "val")

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, tokenizer).to(dist.device)
    micro_rows = cfg.train.micro_batch_size * dist.world_size
    batches = PackedBatches(train_ds, batch_size=micro_rows, seq_len=cfg.seq_len, seed=cfg.train.seed,
                            rank=dist.rank, world_size=dist.world_size)

    def loss_fn(model, batch):
        x, y = batch  # the loop has moved it to the device
        return model(x, labels=y), {}

    def eval_fn(model):
        losses = [model(x.to(dist.device), labels=y.to(dist.device)).item()
                  for x, y in iter_eval(val_ds, micro_rows, cfg.seq_len, cfg.train.eval_batches,
                                        dist.rank, dist.world_size)]
        return {"val_loss": all_reduce_mean(sum(losses) / max(len(losses), 1))}

    def save_model(path: Path):
        from lmforge.modelio import write_model_files

        write_model_files(path, model, tokenizer)

    result = train(model, loss_fn, batches, cfg.train, out_dir, save_model=save_model, eval_fn=eval_fn,
                   dist=dist, tokens_per_batch_fn=lambda batch: batch[0].numel(),
                   run_config=cfg)
    summary = {}
    if dist.is_main:
        raw = getattr(model, "module", model)
        save_model_dir(out_dir / "model", raw, tokenizer)
        baseline = unigram_baseline_loss(train_ds, val_ds, tokenizer.vocab_size)
        val_loss = result.eval_metrics.get("val_loss", float("nan"))
        summary = {
            "val_loss": val_loss,
            "unigram_baseline": baseline,
            "n_params": raw.num_params(),
            "n_params_non_embedding": raw.num_params(non_embedding=True),
            "tokens": result.tokens,
            "flops": 6 * raw.num_params(non_embedding=True) * result.tokens,
            "flops_with_attention": raw.flops_per_token(cfg.seq_len) * result.tokens,
            "steps": result.step,
            "train_tokens_in_corpus": meta.get("train_tokens"),
            "seconds": round(time.time() - t0, 1),
            "model_dir": str(out_dir / "model"),
            "sample": sample_text(raw, tokenizer, cfg.sample_prompt, cfg.sample_tokens, cfg.train.seed),
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    from lmforge.generation import SamplingParams, generate

    if max_new_tokens <= 0:
        return ""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed)
    ids = tokenizer.encode(prompt, add_bos=True)
    completion = generate(model.eval(), [ids], params, tokenizer=tokenizer)[0][0]
    return prompt + tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="pretrain", show_header=False)
    gap = summary["unigram_baseline"] - summary["val_loss"]
    verdict = f"model is {gap:.3f} below it" if gap > 0 else f"model is {-gap:.3f} ABOVE it: train longer"
    table.add_row("validation loss", f"{summary['val_loss']:.3f} nats/token")
    table.add_row("unigram baseline", f"{summary['unigram_baseline']:.3f} ({verdict})")
    table.add_row("parameters", f"{summary['n_params']:,} ({summary['n_params_non_embedding']:,} non-embedding)")
    table.add_row("tokens trained", f"{summary['tokens']:,} in {summary['steps']} steps, {summary['seconds']} s")
    table.add_row("model", summary["model_dir"])
    console.print(table)
    console.print("[bold]sample[/bold]\n" + summary["sample"])


def main(argv: list[str]) -> int:
    from lmforge.config import parse_cli

    cfg = parse_cli(argv, PretrainConfig, prog="lmforge pretrain", description=__doc__,
                    default_recipe="tiny", section="pretrain")
    summary = run_pretrain(cfg)
    if summary:
        print_summary(summary)
    return 0
