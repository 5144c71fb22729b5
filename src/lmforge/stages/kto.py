"""``lmforge kto``: Kahneman-Tversky optimisation on unpaired examples, each marked good or bad.

    rows     {"prompt", "completion", "label": true|false} (TRL's unpaired format); preference pairs are
             unpaired on the fly (chosen -> true, rejected -> false)
    loss     r = log pi(y|x) - log pi_ref(y|x);  z0 = KL estimate from mismatched (prompt, other completion) rows
             good: lambda_D (1 - sigma(beta (r - z0))),   bad: lambda_U (1 - sigma(beta (z0 - r)))

Reference log-probs, of the examples and of their mismatched KL rows, are precomputed in one pass as for DPO;
the policy's KL rows run under no_grad (z0 gets no gradient). Metrics: rewards/chosen, rewards/rejected, kl,
logps/chosen, logps/rejected, and eval_* on held-out examples.

    lmforge kto model=runs/tiny/sft/model data.source=unpaired.jsonl beta=0.1
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from lmforge.config import parse_cli
from lmforge.data.preference import (
    Batches,
    PreferenceDataConfig,
    collate_examples,
    example_length,
    read_unpaired,
    split_eval,
    tokenize_unpaired,
)
from lmforge.errors import DataError
from lmforge.modelio import check_context, load_model_and_tokenizer, write_model_files
from lmforge.objectives import kto_loss
from lmforge.scoring import completion_logps, evaluate_pairs, precompute_reference
from lmforge.train.loop import TrainConfig, autocast_context, train
from lmforge.train.runs import finish_run, round_metrics, start_run


@dataclass
class KTOConfig:
    model: str = "runs/tiny/sft/model"
    ref_model: str = ""  # empty: the starting policy
    out_dir: str = "runs/tiny/kto"
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D; TRL suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3]
    undesirable_weight: float = 1.0  # lambda_U
    logprob_chunk_size: int = 1024
    group_by_length: bool = True
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-7, warmup_steps=10, max_steps=200,
                                                                   batch_size=16, micro_batch_size=8,
                                                                   weight_decay=0.0, eval_every=50))

    def validate(self) -> None:
        if self.beta <= 0 or self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("beta must be positive and the weights non-negative")
        if self.train.micro_batch_size < 2:
            raise ValueError("KTO's KL estimate pairs each prompt with another row's completion: "
                             "train.micro_batch_size must be at least 2")


def kto_loss_fn(cfg: KTOConfig):
    def loss_fn(model, batch):
        logps, _ = completion_logps(model, batch, cfg.logprob_chunk_size)
        with torch.no_grad():
            kl_batch = {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}
            kl_logps, _ = completion_logps(model, kl_batch, cfg.logprob_chunk_size)
            kl = (kl_logps - batch["ref_kl_logps"]).mean()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(kl)
                kl /= torch.distributed.get_world_size()
        labels = batch["label"]
        loss, metrics = kto_loss(logps, batch["ref_logps"], labels, kl, cfg.beta, cfg.desirable_weight,
                                 cfg.undesirable_weight)
        good, bad = labels.sum().clamp(min=1), (~labels).sum().clamp(min=1)
        metrics["logps/chosen"] = torch.where(labels, logps.detach(), 0).sum() / good
        metrics["logps/rejected"] = torch.where(labels, 0, logps.detach()).sum() / bad
        return loss, metrics
    return loss_fn


def store_example_logps(chunk: list, values: dict) -> None:
    for j, example in enumerate(chunk):
        example.ref, example.ref_kl = values[""][j], values["kl_"][j]


def run_kto(cfg: KTOConfig) -> dict:
    run = start_run(cfg)
    dist = run.dist
    model, tokenizer = load_model_and_tokenizer(cfg.model, dist.device)
    if not cfg.data.source:
        raise DataError("data.source is empty: give unpaired rows {prompt, completion, label} or preference pairs")
    counts: Counter = Counter()
    examples = tokenize_unpaired(read_unpaired(cfg.data.source, counts), tokenizer, cfg.data, cfg.train.seed,
                                 counts)
    if cfg.data.eval_source:
        held = tokenize_unpaired(read_unpaired(cfg.data.eval_source), tokenizer, cfg.data, cfg.train.seed)
    else:
        examples, held = split_eval(examples, cfg.data.eval_fraction, cfg.train.seed)
    check_context(model, max(map(example_length, examples + held), default=0), "data.max_length",
                  cfg.data.max_length)
    stats = {**dict(counts), "train_examples": len(examples), "eval_examples": len(held),
             "desirable": sum(e.label for e in examples), "undesirable": sum(not e.label for e in examples)}
    pad = tokenizer.pad_id

    def collate(items):
        return collate_examples(items, pad)

    ref = model if not cfg.ref_model else load_model_and_tokenizer(cfg.ref_model, dist.device)[0]
    autocast = autocast_context(cfg.train, dist.device)
    precompute_reference(ref, examples, collate, store_example_logps, example_length, cfg.train.micro_batch_size * 2,
                         dist.device, cfg.logprob_chunk_size, autocast)
    precompute_reference(ref, held, collate, store_example_logps, None, cfg.train.micro_batch_size, dist.device,
                         cfg.logprob_chunk_size, autocast, "reference log-probs (eval)")
    del ref
    loss_fn = kto_loss_fn(cfg)
    batches = Batches(examples, cfg.train.micro_batch_size, collate, cfg.train.seed, dist.rank, dist.world_size,
                      length=example_length, group_by_length=cfg.group_by_length)

    def eval_fn(m):
        return evaluate_pairs(m, loss_fn, held, collate, cfg.train.micro_batch_size, dist.device,
                              cfg.train.eval_batches) if len(held) >= 2 else {}

    model.eval()
    with torch.no_grad(), autocast_context(cfg.train, dist.device):
        initial = eval_fn(model)
    model.train()
    result = train(model, loss_fn, batches, cfg.train, run.out_dir, dist=dist, eval_fn=eval_fn,
                   save_model=lambda path: write_model_files(path, model, tokenizer), run_config=cfg,
                   tokens_per_batch_fn=lambda b: int(b["attention_mask"].sum()), description="kto")
    summary = {"beta": cfg.beta, "steps": result.step, "initial": round_metrics(initial),
               **round_metrics(result.eval_metrics), "data": stats}
    return finish_run(run, summary, model, tokenizer)


def print_summary(summary: dict) -> None:
    table = Table(title=f"kto (beta {summary['beta']:g}): held-out examples")
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name in ("loss", "rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected"):
        key = f"eval_{name}"
        if key in summary:
            before = summary["initial"].get(key)
            table.add_row(name, "" if before is None else f"{before:.4f}", f"{summary[key]:.4f}")
    console = Console()
    console.print(table)
    console.print(f"{summary['steps']} steps in {summary['seconds']} s; data: "
                  + ", ".join(f"{k} {v}" for k, v in summary["data"].items()))
    console.print(summary["model_dir"])


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, KTOConfig, prog="lmforge kto", description=__doc__, default_recipe="tiny", section="kto")
    summary = run_kto(cfg)
    if summary:
        print_summary(summary)
    return 0
