"""``lmforge pretrain``: raw text -> tokenizer -> token shards -> next-token prediction -> a model directory.

Stages it chains (each skipped when its output is already complete, so a rerun resumes):
  1. tokenizer: load ``tokenizer`` dir, or train byte-level BPE on the corpus;
  2. data: clean, filter and dedup documents, tokenize into uint16/uint32 shards with a train/val split;
  3. train: the one training loop on packed fixed-length batches; periodic val loss; checkpoints; exact resume;
  4. report: val loss vs the unigram baseline (what a model that ignores context could reach), a sample.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lmforge.config import parse_cli
from lmforge.data.mix import source_overrides_mix
from lmforge.train.lm import DataConfig, PretrainConfig, run_pretraining

__all__ = ["DataConfig", "PretrainConfig", "run_pretrain", "main"]  # the configs live in train/lm.py


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) and return a summary: val_loss, unigram_baseline, n_params, tokens, flops, sample."""
    return run_pretraining(cfg)


def print_summary(summary: dict) -> None:
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
    cfg = parse_cli(source_overrides_mix(argv), PretrainConfig, prog="lmforge pretrain", description=__doc__,
                    default_recipe="tiny", section="pretrain")
    summary = run_pretrain(cfg)
    if summary:
        print_summary(summary)
    return 0
