"""``lmforge sft``: supervised fine-tuning on conversations, with the loss on assistant tokens only.

    checkpoint dir + chat data ({"messages"} or {"prompt","completion"}) -> render each conversation with the
    chat template -> tokens + assistant mask -> packed padding-free rows -> the training loop -> model dir

Full fine-tuning by default; ``lora.enabled=true`` trains LoRA adapters instead (saved in PEFT's format under
out_dir/adapter and, with ``lora.merge=true``, merged into an ordinary checkpoint under out_dir/model). The
saved tokenizer carries the chat template the model was trained with.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_model as save_weights

from lmforge.config import parse_cli
from lmforge.data.chat import encode_chat_prompt, read_sft_rows, tokenize_conversation
from lmforge.data.packing import Examples, PackingStats, SFTBatches, iter_rows, make_rows, prepare_examples
from lmforge.data.shards import is_val_doc
from lmforge.errors import DataError
from lmforge.generation import SamplingParams, generate
from lmforge.lora import LoraOptions, apply_lora, merge_lora, save_adapter, trainable_parameters
from lmforge.modelio import check_context, load_model_dir, load_tokenizer, save_model_dir, write_model_files
from lmforge.tokenizer import CHATML_TEMPLATE
from lmforge.train.dist import all_reduce_sum
from lmforge.train.lm import sft_loss
from lmforge.train.loop import TrainConfig, train
from lmforge.train.metrics import ProgressDisplay
from lmforge.train.runs import finish_run, start_run


@dataclass
class SFTConfig:
    model: str = "runs/tiny/pretrain/model"  # the checkpoint to start from (directory or hub id)
    tokenizer: str = ""  # default: the model directory's tokenizer
    chat_template: str = ""  # a jinja file to use instead of the tokenizer's (ChatML when it has none)
    data: str = "builtin:tinyworld/sft"  # jsonl / json / parquet / dir / glob / builtin:NAME / hf:NAME[:CFG][@SPLIT]
    eval_data: str = ""  # held-out conversations; empty: split val_fraction off data
    val_fraction: float = 0.05
    max_examples: int = 0  # use only the first N conversations (0 = all)
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    out_dir: str = "runs/tiny/sft"
    seq_len: int = 512  # tokens per row
    packing: bool = True  # several conversations per row (attention kept apart); false: one per row
    truncation: Literal["truncate", "drop"] = "truncate"  # conversations longer than seq_len
    epochs: float = 0.0  # > 0: train this many passes over the rows (sets train.max_steps)
    gradient_checkpointing: bool = False
    lora: LoraOptions = field(default_factory=LoraOptions)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5, warmup_steps=10, max_steps=200,
                                                                   batch_size=16, micro_batch_size=16,
                                                                   weight_decay=0.0, eval_every=50))
    sample_prompt: str = ""  # after training, print the model's reply to this user message

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs < 0 or self.max_examples < 0:
            raise ValueError("epochs and max_examples must be >= 0")


def load_conversations(spec: str, cfg: SFTConfig) -> list[tuple[list[dict], str]]:
    rows = []
    for messages, where in read_sft_rows(spec, cfg.messages_field, cfg.prompt_field, cfg.completion_field,
                                         with_where=True):
        rows.append((messages, where))
        if cfg.max_examples and len(rows) >= cfg.max_examples:
            break
    return rows


def split_conversations(rows: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) by a hash of each conversation's text: stable whatever the order or size of the data."""
    if val_fraction <= 0:
        return rows, []
    keys = [json.dumps(m, sort_keys=True, ensure_ascii=False) for m, _ in rows]
    is_val = [is_val_doc(k, val_fraction, seed) for k in keys]
    if len(rows) >= 2 and (all(is_val) or not any(is_val)):
        is_val[0 if not any(is_val) else -1] = not is_val[0 if not any(is_val) else -1]
    return [r for r, v in zip(rows, is_val) if not v], [r for r, v in zip(rows, is_val) if v]


def tokenize_rows(rows: list, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, assistant mask) per conversation; a template failure is a DataError naming the row."""
    out = []
    with ProgressDisplay(len(rows), 0, "tokenize", enabled=len(rows) > 2000) as progress:
        for i, (messages, where) in enumerate(rows, 1):
            try:
                out.append(tokenize_conversation(tokenizer, messages))
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            if i % 500 == 0:
                progress.update(i)
    return out


def prepare_tokenizer(cfg: SFTConfig):
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    if cfg.chat_template:
        tokenizer.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
    elif not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE  # written into the checkpoint, so chat clients agree with us
    return tokenizer


def assistant_loss(model, batches, device) -> tuple[float, int]:
    """Token-weighted mean loss over the assistant tokens of every batch, and how many tokens that was."""
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["labels"] != -100).sum())
        docs = batch.get("document_ids")
        loss = model(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                     document_ids=docs.to(device) if docs is not None else None)
        total += float(loss) * n
        count += n
    total, count = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64)).tolist()
    return (total / count if count else float("nan")), int(count)


@dataclass
class SFTData:
    """The tokenized, packed conversations of a run: examples, the rows they pack into, and their counts."""
    train: Examples
    val: Examples
    train_rows: list[list[int]]  # example indices per packed row
    val_rows: list[list[int]]
    stats: PackingStats
    val_stats: PackingStats
    conversations: tuple[int, int]  # (train, val)


def prepare_data(cfg: SFTConfig, tokenizer) -> SFTData:
    """Read, split, tokenize and pack the conversations; every failure is one DataError naming the row."""
    rows = load_conversations(cfg.data, cfg)
    if not rows:
        raise DataError(f"{cfg.data}: no conversations")
    if cfg.eval_data:
        train_rows, val_rows = rows, load_conversations(cfg.eval_data, cfg)
    else:
        train_rows, val_rows = split_conversations(rows, cfg.val_fraction, cfg.train.seed)
    train_ex, stats = prepare_examples(tokenize_rows(train_rows, tokenizer), cfg.seq_len, cfg.truncation)
    val_ex, val_stats = prepare_examples(tokenize_rows(val_rows, tokenizer), cfg.seq_len, cfg.truncation)
    train_idx, val_idx = make_rows(train_ex, cfg.seq_len, cfg.packing), make_rows(val_ex, cfg.seq_len, cfg.packing)
    stats.rows, stats.capacity = len(train_idx), len(train_idx) * cfg.seq_len
    if not train_idx:
        raise DataError(f"{cfg.data}: every conversation was dropped ({stats.as_dict()}); raise seq_len or use "
                        "truncation=truncate")
    return SFTData(train_ex, val_ex, train_idx, val_idx, stats, val_stats, (len(train_rows), len(val_rows)))


def steps_config(cfg: SFTConfig, data: SFTData, verbose: bool) -> TrainConfig:
    """cfg.train, or with ``epochs`` > 0 its max_steps set to epochs x (rows / rows per step)."""
    if cfg.epochs <= 0:
        return cfg.train
    steps = max(1, math.ceil(cfg.epochs * len(data.train_rows) / cfg.train.batch_size))
    if verbose:
        print(f"epochs={cfg.epochs:g}: {steps} optimizer steps over {len(data.train_rows):,} rows "
              f"(train.max_steps={cfg.train.max_steps} is not used; set epochs=0 to use it)")
    return replace(cfg.train, max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps))


def build_model(cfg: SFTConfig, tokenizer, device, data: SFTData):
    """The model to fine-tune: the checkpoint itself, or LoRA adapters around it (lora.enabled). Its context must
    hold the longest example (packed positions restart per example)."""
    base = load_model_dir(cfg.model)
    longest = max(int(e.lengths().max(initial=0)) for e in (data.train, data.val))
    check_context(base, longest, "seq_len", cfg.seq_len)
    if base.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model {cfg.model}: vocab {base.config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size}")
    base.gradient_checkpointing = cfg.gradient_checkpointing  # honoured by Transformer.forward when training
    model = apply_lora(base, cfg.lora, base_path=str(cfg.model)) if cfg.lora.enabled else base
    return model.to(device)


def save_result(cfg: SFTConfig, model, tokenizer, out_dir: Path) -> tuple[Path | None, Path | None]:
    """(model dir, adapter dir): out_dir/model for full fine-tuning; with LoRA out_dir/adapter (PEFT's format)
    and, with lora.merge, the merged model as out_dir/model."""
    if not cfg.lora.enabled:
        return save_model_dir(out_dir / "model", model, tokenizer), None
    adapter_dir, tmp = out_dir / "adapter", out_dir / "adapter.tmp"
    save_adapter(model, tmp)
    tokenizer.save(tmp)
    _replace(tmp, adapter_dir)
    model_dir = save_model_dir(out_dir / "model", merge_lora(model), tokenizer) if cfg.lora.merge else None
    return model_dir, adapter_dir


def run_sft(cfg: SFTConfig) -> dict:
    """Fine-tune and return a summary: val_loss before/after (assistant tokens), packing counts, tokens/s."""
    run = start_run(cfg)
    dist = run.dist
    tokenizer = prepare_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    micro_rows = cfg.train.micro_batch_size * dist.world_size
    batches = SFTBatches(data.train, data.train_rows, micro_rows, pad_id=tokenizer.pad_id, packed=cfg.packing,
                         seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size)
    train_cfg = steps_config(cfg, data, dist.is_main)
    model = build_model(cfg, tokenizer, dist.device, data)
    n_trainable, n_total = trainable_parameters(model)

    def eval_fn(m):
        batches = iter_rows(data.val, data.val_rows, micro_rows, tokenizer.pad_id, cfg.packing,
                            train_cfg.eval_batches, dist.rank, dist.world_size)
        return {"val_loss": assistant_loss(m, batches, dist.device)[0]}

    val_before = float("nan")
    if data.val_rows:
        model.eval()
        with torch.no_grad():
            val_before = eval_fn(model)["val_loss"]
        model.train()

    def save_model(path: Path):
        if cfg.lora.enabled:  # resume needs every weight; the adapter files are what users load
            save_adapter(model, path)
            save_weights(model, str(path / "model.safetensors"))
            tokenizer.save(path)
        else:
            write_model_files(path, model, tokenizer)

    result = train(model, sft_loss, batches, train_cfg, run.out_dir, save_model=save_model,
                   eval_fn=eval_fn if data.val_rows else None, dist=dist,
                   tokens_per_batch_fn=lambda b: int(b["num_tokens"]), run_config=cfg, description="sft")
    if not dist.is_main:
        return {}
    model_dir, adapter_dir = save_result(cfg, model, tokenizer, run.out_dir)
    summary = {
        "val_loss_before": val_before,
        "val_loss": result.eval_metrics.get("val_loss", float("nan")),
        "train_loss": result.metrics.get("loss", float("nan")),
        "tokens_per_sec": result.metrics.get("tokens_per_sec"),
        "steps": result.step,
        "tokens": result.tokens,
        "epochs": round(result.step * cfg.train.batch_size / len(data.train_rows), 3),
        "packing": data.stats.as_dict(),
        "val_packing": data.val_stats.as_dict(),
        "train_conversations": data.conversations[0],
        "val_conversations": data.conversations[1],
        "trainable_params": n_trainable,
        "total_params": n_total,
        "lora": cfg.lora.enabled,
        "model_dir": str(model_dir) if model_dir else None,
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "seconds": round(time.time() - run.t0, 1),
    }
    if cfg.sample_prompt and model_dir is not None:
        summary["sample"] = sample_reply(model_dir, cfg.sample_prompt, train_cfg.seed)
    return finish_run(run, summary)


def _replace(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def sample_reply(model_dir: Path, prompt: str, seed: int, max_new_tokens: int = 64) -> str:
    """The saved model's greedy reply to one user message, through its own chat template."""
    model, tok = load_model_dir(model_dir).eval(), load_tokenizer(model_dir)
    ids = encode_chat_prompt(tok, [{"role": "user", "content": prompt}])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    return generate(model, [ids], params, tokenizer=tok)[0][0].text


def print_summary(summary: dict) -> None:
    p = summary["packing"]
    table = Table(title="sft", show_header=False)
    table.add_row("val loss (assistant tokens)", f"{summary['val_loss_before']:.3f} -> {summary['val_loss']:.3f}")
    table.add_row("train loss (last log)", f"{summary['train_loss']:.3f}")
    table.add_row("conversations", f"{summary['train_conversations']:,} train, {summary['val_conversations']:,} val")
    table.add_row("packed", f"{p['kept']:,} examples in {p['rows']:,} rows ({p['fill']:.0%} full), "
                            f"{p['target_tokens']:,} assistant tokens")
    table.add_row("too long", f"{p['truncated']:,} truncated, {p['dropped_too_long']:,} dropped, "
                              f"{p['dropped_no_target']:,} left with no assistant token")
    speed = f", {summary['tokens_per_sec']:,.0f} tokens/s" if summary.get("tokens_per_sec") else ""
    table.add_row("trained", f"{summary['tokens']:,} tokens in {summary['steps']} steps "
                             f"({summary['epochs']} epochs), {summary['seconds']} s{speed}")
    table.add_row("parameters", f"{summary['trainable_params']:,} trainable of {summary['total_params']:,}"
                                + (" (LoRA)" if summary["lora"] else ""))
    if summary["adapter_dir"]:
        table.add_row("adapter", summary["adapter_dir"])
    if summary["model_dir"]:
        table.add_row("model", summary["model_dir"])
    console = Console()
    console.print(table)
    if "sample" in summary:
        console.print(f"[bold]sample reply[/bold]\n{summary['sample']}")


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, SFTConfig, prog="lmforge sft", description=__doc__, default_recipe="tiny", section="sft")
    summary = run_sft(cfg)
    if summary:
        print_summary(summary)
    return 0
