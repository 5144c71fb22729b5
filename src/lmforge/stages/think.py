"""``lmforge think``: inference-time scaling on a file of problems with known answers.

Input rows: ``{"prompt": str, "answer": ...}`` or ``{"messages": [...], "answer": ...}``. Methods:

    sweep             accuracy and tokens spent for N = 1, 2, 4, ... n samples per problem (majority vote,
                      best-of-N with a scorer, the pass@N ceiling, adaptive budgets), a table and a plot
    self_consistency  majority vote over n samples
    best_of_n         the completion a reward model (reward_model=DIR) or the DPO implicit reward against
                      reference_model=DIR likes best
    adaptive          sample round_size at a time; stop a problem when its top answer holds `threshold` of votes

Writes results.jsonl (per problem) or sweep.json + accuracy_vs_samples.png into out_dir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lmforge import inference_scaling as scaling
from lmforge.answers import answers_match, extract_answer
from lmforge.config import parse_cli
from lmforge.data.prompts import encode_prompt_row, read_prompt_rows
from lmforge.errors import DataError
from lmforge.generation import sampling_params_from
from lmforge.modelio import DTYPES, load_model_and_tokenizer, load_model_dir

METHODS = ("sweep", "self_consistency", "best_of_n", "adaptive")


@dataclass
class ThinkConfig:
    model: str = ""  # the policy that samples
    input: str = ""  # .jsonl problems with an "answer" field
    out_dir: str = "runs/think"
    method: str = "sweep"  # sweep | self_consistency | best_of_n | adaptive
    n: int = 8  # samples per problem (the largest N of a sweep, the budget of adaptive)
    reward_model: str = ""  # scorer for best_of_n: a reward model directory (score head) ...
    reference_model: str = ""  # ... or the DPO implicit reward beta * (log pi - log pi_ref) against this model
    beta: float = 0.1
    threshold: float = 0.75  # adaptive: vote share that closes a problem
    round_size: int = 2  # adaptive: samples per round
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 0
    limit: int = 0  # only the first `limit` problems (0 = all)
    add_bos: bool = True
    device: str = "auto"
    dtype: str = "float32"

    def validate(self) -> None:
        for key in ("model", "input"):
            if not getattr(self, key):
                raise ValueError(f"{key}=... is required")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "best_of_n" and not (self.reward_model or self.reference_model):
            raise ValueError("best_of_n needs a scorer: reward_model=DIR or reference_model=DIR")
        if self.reward_model and self.reference_model:
            raise ValueError("give reward_model or reference_model, not both")
        if self.n < 1 or not 1 <= self.round_size <= self.n:
            raise ValueError(f"need n >= 1 and 1 <= round_size <= n, got n={self.n}, round_size={self.round_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def read_problems(path: str, limit: int = 0) -> list[dict]:
    rows = read_prompt_rows(path)
    for where, row in rows:
        if "answer" not in row:
            raise DataError(f"{where}: a problem needs an 'answer' field (fields: {', '.join(row)})")
    rows = rows[:limit] if limit else rows
    return [row for _, row in rows]


def run_think(cfg: ThinkConfig) -> dict:
    problems = read_problems(cfg.input, cfg.limit)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    prompts = [encode_prompt_row(tok, row, cfg.add_bos) for row in problems]
    golds = [str(row["answer"]) for row in problems]
    params = sampling_params_from(cfg, n=1)  # cfg.n is the budget: each method asks for its own n
    scorer = None
    device, dtype = model.lm_head.weight.device, getattr(torch, cfg.dtype)
    if cfg.reward_model:
        rm = load_model_dir(cfg.reward_model, device=device, dtype=dtype, num_labels=1).eval()
        scorer = scaling.reward_model_scorer(rm, pad_id=tok.pad_id)
    elif cfg.reference_model:
        ref = load_model_dir(cfg.reference_model, device=device, dtype=dtype).eval()
        scorer = scaling.dpo_reward_scorer(model, ref, beta=cfg.beta, pad_id=tok.pad_id)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if cfg.method == "sweep":
        ns = [2 ** i for i in range(cfg.n.bit_length()) if 2 ** i <= cfg.n]
        table = scaling.accuracy_vs_samples(model, prompts, golds, ns, params=params, tokenizer=tok, scorer=scorer,
                                            thresholds=(0.5, cfg.threshold, 1.0), round_size=cfg.round_size)
        (out_dir / "sweep.json").write_text(json.dumps(table, indent=2) + "\n")
        plot = scaling.plot_accuracy(table, out_dir / "accuracy_vs_samples.png",
                                     title=f"{Path(cfg.model).name}: {len(problems)} problems")
        return {"method": "sweep", "problems": len(problems), "table": table, "plot": str(plot)}

    if cfg.method == "best_of_n":
        picks = scaling.best_of_n(model, prompts, cfg.n, scorer, params, tokenizer=tok)
        predicted = [extract_answer(p.completion.text or "") for p in picks]
        extra = [{"text": p.completion.text, "score": p.score, "tokens": p.tokens, "samples": cfg.n} for p in picks]
    else:
        if cfg.method == "adaptive":
            votes = scaling.adaptive_budget(model, prompts, max_samples=cfg.n, round_size=cfg.round_size,
                                            threshold=cfg.threshold, params=params, tokenizer=tok)
        else:
            votes = scaling.self_consistency(model, prompts, cfg.n, params=params, tokenizer=tok)
        predicted = [v.answer for v in votes]
        extra = [{"votes": v.votes, "share": round(v.share, 3), "tokens": v.tokens, "samples": len(v.completions)}
                 for v in votes]
    correct = [p is not None and answers_match(p, g) for p, g in zip(predicted, golds)]
    with (out_dir / "results.jsonl").open("w", encoding="utf-8") as f:
        for row, p, ok, e in zip(problems, predicted, correct, extra):
            f.write(json.dumps({**row, "predicted": p, "correct": ok, **e}, ensure_ascii=False) + "\n")
    return {"method": cfg.method, "problems": len(problems), "accuracy": sum(correct) / len(correct),
            "mean_samples": sum(e["samples"] for e in extra) / len(extra),
            "mean_tokens": sum(e["tokens"] for e in extra) / len(extra), "results": str(out_dir / "results.jsonl")}


def print_summary(summary: dict) -> None:
    table = Table(title=f"lmforge think: {summary['method']} on {summary['problems']} problems")
    for column in ("method", "N", "accuracy", "samples / problem", "tokens / problem"):
        table.add_column(column, justify="left" if column == "method" else "right")
    rows = summary.get("table") or [{"method": summary["method"], "n": "", **summary}]
    for r in rows:
        table.add_row(r["method"], str(r.get("n", "")), f"{r['accuracy']:.3f}", f"{r['mean_samples']:.1f}",
                      f"{r['mean_tokens']:.0f}")
    Console().print(table)
    print(summary.get("plot") or summary.get("results"))


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, ThinkConfig, prog="lmforge think", description=__doc__)
    print_summary(run_think(cfg))
    return 0
