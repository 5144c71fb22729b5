"""``lmforge think``: inference-time scaling on a file of problems with known answers.

Input rows: ``{"prompt": str, "answer": ...}`` or ``{"messages": [...], "answer": ...}``. Methods:

    sweep             accuracy and tokens spent for N = 1, 2, 4, ... n samples per problem (majority vote,
                      best-of-N with a scorer, the pass@N ceiling, adaptive budgets), a table and a plot
    self_consistency  majority vote over n samples
    best_of_n         the completion a reward model (reward_model=DIR) or the DPO implicit reward against
                      reference_model=DIR likes best
    adaptive          sample round_size at a time; stop a problem when its top answer holds `threshold` of votes
    budget_sweep      thinking budgets (budget forcing): accuracy and thinking tokens per difficulty level for
                      each of `budgets`, "Wait" until each of `wait_minimums`, "Wait" instead of the first k
                      closes for each k of `wait_counts` (s1's "ignore the end of thinking"), and adaptive
                      thinking (think a step at a time, stop when the probed answer's probability reaches
                      `adaptive_threshold`)
    prm_best_of_n     majority voting vs best-of-N ranked by a PRM (prm=DIR; min / prod / last step) and by an
                      outcome RM (orm=DIR), N = 1, 2, 4, ... n, at their generated tokens
    beam              the same, plus PRM-guided step-level beam search at each of `beams` (width x expand)
    overoptimisation  reward-model over-optimisation (Gao et al. 2022): best-of-N against the reward model
                      (reward_model=DIR, the proxy) judged by the answer checker (the gold reward), N = 1, 2, 4,
                      ... n at temperature 1, against sqrt(KL); with rl_run=DIR also an RL run trained against that
                      reward model (PPO), read from its metrics.jsonl

Writes results.jsonl (per problem) or sweep.json + accuracy_vs_samples.png into out_dir; budget_sweep writes
budget_sweep.json + accuracy_vs_thinking_tokens.png, prm_best_of_n / beam compute.json + accuracy_vs_compute.png,
overoptimisation overoptimisation.json + overoptimisation.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lmforge import inference_scaling as scaling
from lmforge import reasoning, step_search
from lmforge.answers import answers_match, extract_answer
from lmforge.atomic import write_atomic
from lmforge.config import parse_cli
from lmforge.data.chat import check_messages, encode_prompt
from lmforge.data.rows import read_rows
from lmforge.errors import DataError
from lmforge.generation import sampling_params_from
from lmforge.modelio import DTYPES, load_model_and_tokenizer, load_model_dir
from lmforge.prm import PRMScorer
from lmforge.train.metrics import read_metrics

METHODS = ("sweep", "self_consistency", "best_of_n", "adaptive", "budget_sweep", "prm_best_of_n", "beam",
           "overoptimisation")


@dataclass
class ThinkConfig:
    model: str = ""  # the policy that samples
    input: str = ""  # .jsonl problems with an "answer" field
    out_dir: str = "runs/think"
    method: str = "sweep"  # sweep | self_consistency | best_of_n | adaptive
    n: int = 8  # samples per problem (the largest N of a sweep, the budget of adaptive)
    reward_model: str = ""  # scorer for best_of_n: a reward model directory (score head) ...
    reference_model: str = ""  # ... or the DPO implicit reward beta * (log pi - log pi_ref) against this model
    rl_run: str = ""  # overoptimisation: an RL run directory trained against reward_model (its metrics.jsonl)
    beta: float = 0.1
    threshold: float = 0.75  # adaptive: vote share that closes a problem
    round_size: int = 2  # adaptive: samples per round
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 0
    thinking_budget: int | None = None  # budget forcing for sweep / self_consistency / best_of_n / adaptive
    min_thinking_tokens: int = 0
    num_waits: int = 0  # the first num_waits closes of the think block become "Wait" (s1)
    budgets: list[int] = field(default_factory=lambda: [0, 4, 8, 16, 24, 32, 48])  # budget_sweep (+ no budget)
    wait_minimums: list[int] = field(default_factory=list)  # budget_sweep: "Wait" until this many thinking tokens
    wait_counts: list[int] = field(default_factory=list)  # budget_sweep: the first k closes become "Wait", each k
    adaptive_threshold: float = 0.9  # budget_sweep: adaptive thinking stops at this answer probability; 0 = off
    adaptive_budget: int = 96
    prm: str = ""  # prm_best_of_n / beam: a process reward model (lmforge prm)
    orm: str = ""  # ... and an outcome reward model (lmforge prm target=outcome)
    prm_prefix: str = "<think>\n"  # what the PRM reads before the first step (as it trained)
    beams: list[list[int]] = field(default_factory=lambda: [[2, 2], [2, 4], [4, 4]])  # beam: [width, expand]
    levels: list[int] = field(default_factory=list)  # only problems of these levels (rows with "level")
    per_level: int = 0  # only the first this many problems of each level (0 = all)
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
        if self.method in ("prm_best_of_n", "beam") and not self.prm:
            raise ValueError(f"{self.method} needs prm=DIR (a process reward model: lmforge prm)")
        if any(len(b) != 2 or min(b) < 1 for b in self.beams):
            raise ValueError(f"beams must be [width, expand] pairs of positive integers, got {self.beams}")
        if self.method == "overoptimisation" and not self.reward_model:
            raise ValueError("overoptimisation needs reward_model=DIR (the proxy reward)")
        if self.method == "best_of_n" and not (self.reward_model or self.reference_model):
            raise ValueError("best_of_n needs a scorer: reward_model=DIR or reference_model=DIR")
        if self.reward_model and self.reference_model:
            raise ValueError("give reward_model or reference_model, not both")
        if self.n < 1 or not 1 <= self.round_size <= self.n:
            raise ValueError(f"need n >= 1 and 1 <= round_size <= n, got n={self.n}, round_size={self.round_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def read_problems(path: str, limit: int = 0, levels=(), per_level: int = 0) -> list[dict]:
    """Problem rows with an answer, {"prompt": str | messages, "answer"} or {"messages", "answer"}, from a file
    (.jsonl / .json / .parquet) or builtin:tinyworld/NAME; a bad row names file:line and the field."""
    if not path.startswith("builtin:") and not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for row, where in read_rows(path):
        prompt = row.get("messages", row.get("prompt"))
        if isinstance(prompt, list):
            check_messages(prompt, where, "messages" if "messages" in row else "prompt", need_assistant=False)
        elif not isinstance(prompt, str):
            raise DataError(f"{where}: a problem needs a 'prompt' (string or messages) or 'messages' "
                            f"(fields: {', '.join(row) or 'none'})")
        if "answer" not in row:
            raise DataError(f"{where}: a problem needs an 'answer' field (fields: {', '.join(row)})")
        if not levels or row.get("level") in levels:
            rows.append(row)
    if per_level:
        kept, counts = [], {}
        for r in rows:
            counts[r.get("level")] = counts.get(r.get("level"), 0) + 1
            if counts[r.get("level")] <= per_level:
                kept.append(r)
        rows = kept
    rows = rows[:limit] if limit else rows
    if not rows:
        raise DataError(f"{path}: no problems" + (f" at levels {list(levels)}" if levels else ""))
    return rows


def problem_prompt(tok, row: dict, add_bos: bool = True) -> list[int]:
    """A problem's prompt ids: "messages" or a message-list "prompt" through the chat template, a string
    "prompt" as raw text after the document-start token (as `lmforge generate` reads rows)."""
    prompt = row["messages"] if "messages" in row else row["prompt"]
    if isinstance(prompt, list):
        return encode_prompt(tok, prompt)
    return encode_prompt(tok, prompt, chat=False, add_bos=add_bos)


def run_think(cfg: ThinkConfig) -> dict:
    problems = read_problems(cfg.input, cfg.limit, cfg.levels, cfg.per_level)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    if cfg.method == "budget_sweep":
        return run_budget_sweep(cfg, model, tok, problems)
    if cfg.method in ("prm_best_of_n", "beam"):
        return run_compute_sweep(cfg, model, tok, problems)
    prompts = [problem_prompt(tok, row, cfg.add_bos) for row in problems]
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

    if cfg.method == "overoptimisation":
        return run_overoptimisation(cfg, model, tok, prompts, golds, scorer, params)

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


def run_overoptimisation(cfg: ThinkConfig, model, tok, prompts, golds, scorer, params) -> dict:
    """Best-of-N's proxy and gold rewards vs sqrt(KL), and an RL run's (rl_run); overoptimisation.json, its
    tables and overoptimisation.png."""
    out_dir = Path(cfg.out_dir)
    proxy, gold = scaling.proxy_and_gold(model, prompts, golds, cfg.n, scorer, params, tokenizer=tok)
    ns = [2 ** i for i in range(cfg.n.bit_length()) if 2 ** i <= cfg.n]
    best_of = scaling.overoptimisation(proxy, gold, ns)
    if cfg.rl_run and not (Path(cfg.rl_run) / "metrics.jsonl").is_file():
        raise DataError(f"{cfg.rl_run}: no metrics.jsonl (rl_run must be a PPO run's out_dir)")
    rl = scaling.rl_overoptimisation(read_metrics(cfg.rl_run)) if cfg.rl_run else []
    if cfg.rl_run and not rl:
        raise DataError(f"{Path(cfg.rl_run) / 'metrics.jsonl'}: no evaluated steps with objective/scores and "
                        "objective/kl (rl_run must be a finished PPO run against the reward model)")
    peak = max(best_of, key=lambda r: r["gold"]["value"])
    summary = {"method": "overoptimisation", "problems": len(prompts), "samples_per_problem": cfg.n,
               "best_of_n": best_of, "rl": rl, "gold_peak_n": peak["n"], "gold_at_peak": peak["gold"]["value"],
               "gold_at_max_n": best_of[-1]["gold"]["value"], "proxy_at_max_n": best_of[-1]["proxy"]["value"]}
    write_atomic(out_dir / "overoptimisation.json", json.dumps(summary, indent=2) + "\n")
    cell = lambda v: f"{v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"  # noqa: E731
    tables = [{"title": f"best-of-N against the reward model, {len(prompts)} problems x {cfg.n} samples",
               "headers": ["N", "sqrt KL", "proxy (RM score)", "gold (accuracy)"],
               "rows": [[str(r["n"]), f"{r['sqrt_kl']:.3f}", cell(r["proxy"]), cell(r["gold"])] for r in best_of]}]
    if rl:
        tables.append({"title": "PPO against the reward model (rollout KL and RM score, held-out accuracy)",
                       "headers": ["step", "KL (nats / sequence)", "proxy (RM score)", "gold (accuracy)"],
                       "rows": [[str(r["step"]), f"{r['kl']:.3f}", f"{r['proxy']:.3f}", f"{r['gold']:.3f}"]
                                for r in rl]})
    write_atomic(out_dir / "tables.json", json.dumps(tables, indent=2) + "\n")
    summary["plot"] = str(scaling.plot_overoptimisation(best_of, rl, out_dir / "overoptimisation.png"))
    return summary


def print_summary(summary: dict) -> None:
    if summary["method"] == "overoptimisation":
        for t in json.loads((Path(summary["plot"]).parent / "tables.json").read_text()):
            table = Table(title=t["title"])
            for h in t["headers"]:
                table.add_column(h, justify="right")
            for row in t["rows"]:
                table.add_row(*row)
            Console().print(table)
        return print(summary["plot"])
    if summary["method"] in ("budget_sweep", "prm_best_of_n", "beam"):
        return print_reasoning(summary)
    table = Table(title=f"lmforge think: {summary['method']} on {summary['problems']} problems")
    for column in ("method", "N", "accuracy", "samples / problem", "tokens / problem"):
        table.add_column(column, justify="left" if column == "method" else "right")
    rows = summary.get("table") or [{"method": summary["method"], "n": "", **summary}]
    for r in rows:
        table.add_row(r["method"], str(r.get("n", "")), f"{r['accuracy']:.3f}", f"{r['mean_samples']:.1f}",
                      f"{r['mean_tokens']:.0f}")
    Console().print(table)
    print(summary.get("plot") or summary.get("results"))


# ---- thinking budgets and PRM search ----

def run_budget_sweep(cfg: ThinkConfig, model, tok, problems: list[dict]) -> dict:
    """Accuracy and thinking tokens per level at each budget, with "Wait" minimums and adaptive thinking;
    budget_sweep.json, accuracy_vs_thinking_tokens.png, and paired gains (same problems) per level."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budgets = [*cfg.budgets, None]
    table, outcomes = reasoning.budget_sweep(model, tok, problems, budgets, wait_minimums=cfg.wait_minimums,
                                             wait_counts=cfg.wait_counts, max_new_tokens=cfg.max_new_tokens,
                                             seed=cfg.seed)
    if cfg.adaptive_threshold > 0:
        adaptive = reasoning.AdaptiveConfig(budget=cfg.adaptive_budget, threshold=cfg.adaptive_threshold)
        rows, correct, _ = reasoning.adaptive_rows(model, tok, problems, adaptive, seed=cfg.seed)
        table += rows
        outcomes[rows[0]["setting"]] = correct
    paired = reasoning.paired_gains(problems, outcomes, "no budget", seed=cfg.seed)
    summary = {"method": "budget_sweep", "problems": len(problems), "table": table, "paired_vs_no_budget": paired}
    (out_dir / "budget_sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "tables.json").write_text(json.dumps(reasoning.sweep_tables(table, paired), indent=2) + "\n")
    summary["plot"] = str(reasoning.plot_budget_sweep(table, out_dir / "accuracy_vs_thinking_tokens.png",
                                                      title=f"{Path(cfg.model).parent.name}: held-out problems"))
    return summary


def run_compute_sweep(cfg: ThinkConfig, model, tok, problems: list[dict]) -> dict:
    """Majority voting vs PRM / ORM best-of-N (and beam search) at equal generated tokens; compute.json and
    accuracy_vs_compute.png."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [problem_prompt(tok, row, cfg.add_bos) for row in problems]
    golds = [str(row["answer"]) for row in problems]
    device = model.lm_head.weight.device

    def scorer(path):
        return PRMScorer(load_model_dir(path, device=device, num_labels=1).eval(), tok, prefix=cfg.prm_prefix)

    prm, orm = scorer(cfg.prm), (scorer(cfg.orm) if cfg.orm else None)
    ns = [2 ** i for i in range(cfg.n.bit_length()) if 2 ** i <= cfg.n]
    table, outcomes = step_search.compute_sweep(model, tok, prompts, golds, ns, prm=prm, orm=orm,
                                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                seed=cfg.seed)
    if cfg.method == "beam":
        rows, beam_outcomes = step_search.beam_rows(model, tok, prompts, golds, prm, [tuple(b) for b in cfg.beams],
                                                    seed=cfg.seed, temperature=cfg.temperature)
        table += rows
        outcomes |= beam_outcomes
    paired = step_search.paired_vs_majority(table, outcomes, seed=cfg.seed)
    summary = {"method": cfg.method, "problems": len(problems), "table": table, "paired_vs_majority": paired}
    (out_dir / "compute.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "tables.json").write_text(json.dumps(step_search.compute_tables(table, paired), indent=2) + "\n")
    summary["plot"] = str(step_search.plot_compute(table, out_dir / "accuracy_vs_compute.png",
                                                   title=f"{len(problems)} held-out problems"))
    return summary


def print_reasoning(summary: dict) -> None:
    console = Console()
    if summary["method"] == "budget_sweep":
        table = Table(title=f"lmforge think: thinking budgets on {summary['problems']} problems")
        for column in ("setting", "level", "accuracy", "95% CI", "thinking tokens", "generated tokens"):
            table.add_column(column, justify="left" if column == "setting" else "right")
        for r in summary["table"]:
            table.add_row(r["setting"], str(r["level"]), f"{r['accuracy']:.1%}",
                          f"[{r['ci'][0]:.1%}, {r['ci'][1]:.1%}]", f"{r['mean_thinking_tokens']:.1f}",
                          f"{r['mean_generated_tokens']:.1f}")
    else:
        table = Table(title=f"lmforge think: {summary['method']} on {summary['problems']} problems")
        for column in ("method", "N", "accuracy", "95% CI", "generated tokens"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for r in summary["table"]:
            table.add_row(r["method"], str(r["n"]), f"{r['accuracy']:.1%}", f"[{r['ci'][0]:.1%}, {r['ci'][1]:.1%}]",
                          f"{r['mean_generated_tokens']:.0f}")
    console.print(table)
    print(summary.get("plot"))


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, ThinkConfig, prog="lmforge think", description=__doc__)
    print_summary(run_think(cfg))
    return 0
