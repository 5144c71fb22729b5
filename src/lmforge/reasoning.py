"""How much thinking buys: budget sweeps and an adaptive thinking controller, per difficulty level.

    budget_sweep        answer held-out problems at each thinking budget (budget forcing, lmforge.thinking) and
                        with "Wait" extensions; accuracy and thinking tokens per level, one row per (setting, level)
    adaptive_thinking   think one step (a line) at a time; at each step boundary probe the answer (close the block,
                        answer greedily) and stop once the probe's probability reaches ``threshold`` (or
                        ``probes`` sampled probes agree), or the budget is spent; a close the model writes while
                        unsure becomes "Wait"
    plot_budget_sweep   accuracy_vs_thinking_tokens.png: one curve per level, adaptive thinking as stars

A problem row is {"prompt", "answer", "level"?}; rows without a level count as level 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lmforge.answers import answers_match, extract_answer
from lmforge.data.chat import encode_prompt
from lmforge.evaluation import generate_all, rate, task_accuracy
from lmforge.figures import save_figure
from lmforge.generation import SamplingParams, think_tags
from lmforge.inference_scaling import majority
from lmforge.modelio import eos_ids


def _level(row: dict) -> int:
    return int(row.get("level", 0))


def level_rows(rows: Sequence[dict], setting: str, per_problem: Sequence[float], thinking: Sequence[float],
               generated: Sequence[float], n_boot: int, seed: int, **extra) -> list[dict]:
    """One table row per level (and "all"): accuracy with its 95% interval, mean thinking and generated tokens."""
    out = []
    for level in sorted({_level(r) for r in rows}) + ["all"]:
        idx = [i for i, r in enumerate(rows) if level == "all" or _level(r) == level]
        acc = rate([per_problem[i] for i in idx], n_boot, seed)
        out.append({"setting": setting, "level": level, "accuracy": acc["value"], "ci": acc["ci"], "n": acc["n"],
                    "mean_thinking_tokens": float(np.mean([thinking[i] for i in idx])),
                    "mean_generated_tokens": float(np.mean([generated[i] for i in idx])), **extra})
    return out


def budget_sweep(model, tokenizer, rows: Sequence[dict], budgets: Sequence[int | None], *,
                 wait_minimums: Sequence[int] = (), wait_counts: Sequence[int] = (), max_new_tokens: int = 256,
                 batch_size: int = 64, n_boot: int = 1000, seed: int = 0) -> tuple[list[dict], dict]:
    """Greedy answers at each thinking budget (None = no budget) and, for each of ``wait_minimums``, with no
    budget but "Wait" forced until that many thinking tokens (s1's extension), and for each k of ``wait_counts``,
    with no budget and the model's first k closes replaced by "Wait" (s1's "ignore the end of thinking k times").

    Returns (table, per_problem): table rows {"setting", "budget", "min_thinking", "waits", "level", "accuracy",
    "ci", "n", "mean_thinking_tokens", "mean_generated_tokens"}; per_problem[setting] = the 0/1 outcomes in row order (for
    paired comparisons between settings).
    """
    settings = [(f"budget={b}" if b is not None else "no budget", b, 0, 0) for b in budgets]
    settings += [(f"wait>={m}", None, m, 0) for m in wait_minimums]
    settings += [(f"wait x{k}", None, 0, k) for k in wait_counts]
    table, per_problem = [], {}
    for name, budget, minimum, waits in settings:
        res = task_accuracy(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            n_boot=0, seed=seed, thinking_budget=budget, min_thinking_tokens=minimum,
                            num_waits=waits)
        flat = [row[0] for row in res["completions"]]
        per_problem[name] = res["per_problem"]
        table += level_rows(rows, name, res["per_problem"], [c.thinking_tokens or 0 for c in flat],
                            [len(c.token_ids) for c in flat], n_boot, seed, budget=budget, min_thinking=minimum,
                            waits=waits)
    return table, per_problem


def paired_gains(rows: Sequence[dict], outcomes: dict[str, Sequence[float]], baseline: str, n_boot: int = 1000,
                 seed: int = 0) -> list[dict]:
    """Accuracy of each setting minus ``baseline``'s on the same problems, per level, with a paired 95% bootstrap
    interval: {"setting", "level", "gain", "ci", "n"}."""
    out = []
    base = outcomes[baseline]
    for name, values in outcomes.items():
        if name == baseline:
            continue
        for level in sorted({_level(r) for r in rows}):
            idx = [i for i, r in enumerate(rows) if _level(r) == level]
            g = rate([values[i] - base[i] for i in idx], n_boot, seed)
            out.append({"setting": name, "level": level, "gain": g["value"], "ci": g["ci"], "n": g["n"]})
    return out


# ---- adaptive thinking ----

@dataclass
class AdaptiveConfig:
    budget: int = 192  # most thinking tokens per problem
    threshold: float = 0.9  # stop once the probed answer's probability (or the probes' agreement) reaches this
    probes: int = 0  # 0: the greedy probe's probability; k > 0: k sampled probes, stop when their top answer
    #                  holds `threshold` of them
    probe_tokens: int = 16  # tokens a probe may spend on its answer
    step_tokens: int = 24  # most tokens one thinking step (a line) may take
    max_waits: int = 2  # an unsure close of the think block becomes "Wait" at most this often


@dataclass
class AdaptiveResult:
    answer: str | None
    confidence: float
    thinking_tokens: int  # tokens of thinking kept before the answer
    generated_tokens: int  # everything generated, probes included
    steps: int
    text: str  # the thinking and the final answer


def _probe(model, tokenizer, prefixes: list[list[int]], close: list[int], cfg: AdaptiveConfig, seed: int):
    """Close each prefix's think block and answer: (answer, confidence, tokens spent, text) per prefix."""
    n = max(cfg.probes, 1)
    params = SamplingParams(max_new_tokens=cfg.probe_tokens, temperature=1.0 if cfg.probes else 0.0, n=n,
                            seed=seed, return_logprobs=True)
    results = generate_all(model, [p + close for p in prefixes], params, tokenizer, batch_size=64, label="probe")
    out = []
    for row in results:
        answers = [extract_answer(c.text or "") for c in row]
        spent = sum(len(c.token_ids) for c in row)
        if cfg.probes:
            top, share, _ = majority(answers)
            out.append((top, share, spent, row[0].text or ""))
        else:
            c = row[0]
            out.append((answers[0], math.exp(sum(c.logprobs)), spent, c.text or ""))
    return out


def adaptive_thinking(model, tokenizer, prompts: list[list[int]], cfg: AdaptiveConfig | None = None,
                      seed: int = 0) -> list[AdaptiveResult]:
    """Think step by step, probing the answer at every step boundary; stop when confident (module docstring).

    prompts: chat prompts with the assistant turn opened; the controller opens the think block itself. Each
    round costs one probe per open problem and one short generation (the next line of thinking). A problem
    never thinks more than ``cfg.budget`` tokens.
    """
    cfg = cfg or AdaptiveConfig()
    tags = think_tags(tokenizer)
    close, wait, newline = list(tags.close), list(tags.wait), tokenizer.encode("\n")
    enders = {tags.close[0], *eos_list(tokenizer)}
    n = len(prompts)
    prefixes = [list(p) + list(tags.open) + newline for p in prompts]
    thinking, generated, waits, steps = [0] * n, [0] * n, [0] * n, [0] * n
    spent_all = [False] * n  # no budget or extension left: answer at the next probe
    done: dict[int, AdaptiveResult] = {}
    active = list(range(n))
    step_params = SamplingParams(max_new_tokens=cfg.step_tokens, temperature=0.0, stop_strings=["\n"])
    for round_ in range(cfg.budget + 1):
        still = []
        for i, (answer, conf, spent, text) in zip(active, _probe(model, tokenizer, [prefixes[i] for i in active],
                                                                  close, cfg, seed + round_)):
            generated[i] += spent
            if (answer is not None and conf >= cfg.threshold) or spent_all[i] or thinking[i] >= cfg.budget:
                body = tokenizer.decode(prefixes[i][len(prompts[i]):], skip_special_tokens=True)
                done[i] = AdaptiveResult(answer, conf, thinking[i], generated[i], steps[i],
                                         body + tokenizer.decode(close) + text)
            else:
                still.append(i)
        if not still:
            break
        room = [min(cfg.step_tokens, cfg.budget - thinking[i]) for i in still]
        results = generate_all(model, [prefixes[i] for i in still], replace(step_params, max_new_tokens=max(room)),
                               tokenizer, batch_size=64, label="think step")
        for i, r, cap in zip(still, results, room):
            out = r[0].token_ids
            ids = out[:cap]
            end = next((k for k, t in enumerate(ids) if t in enders), None)
            if end is not None:  # the model closes its thinking (or the turn) while the probe is unsure
                ids = ids[:end]
                if waits[i] < cfg.max_waits and thinking[i] + len(ids) + len(wait) + len(newline) <= cfg.budget:
                    waits[i] += 1
                    ids = ids + wait + newline
                else:
                    spent_all[i] = True
            prefixes[i] += ids
            thinking[i] += len(ids)
            generated[i] += len(out)
            steps[i] += 1
        active = still
    return [done[i] for i in range(n)]


def eos_list(tokenizer) -> list[int]:
    ids = eos_ids(tokenizer)
    return ids if isinstance(ids, list) else [ids]


def adaptive_rows(model, tokenizer, rows: Sequence[dict], cfg: AdaptiveConfig, n_boot: int = 1000,
                  seed: int = 0) -> tuple[list[dict], list[float], list[AdaptiveResult]]:
    """adaptive_thinking on problem rows: (table rows per level, per-problem outcomes, the results)."""
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    was_training = model.training
    results = adaptive_thinking(model.eval(), tokenizer, prompts, cfg, seed)
    model.train(was_training)
    correct = [float(r.answer is not None and answers_match(r.answer, str(row["answer"])))
               for r, row in zip(results, rows)]
    name = f"adaptive (p>={cfg.threshold:g})" if not cfg.probes else f"adaptive ({cfg.probes} probes)"
    table = level_rows(rows, name, correct, [r.thinking_tokens for r in results],
                       [r.generated_tokens for r in results], n_boot, seed, budget=cfg.budget, min_thinking=0,
                       waits=0)
    return table, correct, results


def sweep_tables(table: list[dict], paired: list[dict]) -> list[dict]:
    """The budget sweep as report tables (report.py's tables.json): accuracy [95% CI] and mean thinking tokens
    per level for every setting, and each setting's paired gain over "no budget" per level."""
    levels = list(dict.fromkeys(r["level"] for r in table))
    settings = list(dict.fromkeys(r["setting"] for r in table))
    cell = {(r["setting"], r["level"]): r for r in table}

    def fmt(r):
        return f"{r['accuracy']:.0%} [{r['ci'][0]:.0%}, {r['ci'][1]:.0%}] · {r['mean_thinking_tokens']:.1f} tok"

    acc = {"title": "accuracy [95% CI] · mean thinking tokens, per difficulty level (held-out, greedy)",
           "headers": ["setting"] + [f"level {lv}" for lv in levels],
           "rows": [[s] + [fmt(cell[s, lv]) if (s, lv) in cell else "—" for lv in levels] for s in settings]}
    gains = {(g["setting"], g["level"]): g for g in paired}
    glevels = list(dict.fromkeys(g["level"] for g in paired))
    gain = {"title": "paired gain over no budget, same problems (accuracy points, 95% bootstrap CI)",
            "headers": ["setting"] + [f"level {lv}" for lv in glevels],
            "rows": [[s] + [f"{gains[s, lv]['gain']:+.0%} [{gains[s, lv]['ci'][0]:+.0%}, {gains[s, lv]['ci'][1]:+.0%}]"
                            for lv in glevels] for s in dict.fromkeys(g["setting"] for g in paired)]}
    return [acc, gain]


# ---- the plot ----

def plot_budget_sweep(table: list[dict], path: str | Path, title: str = "accuracy vs thinking tokens") -> Path:
    """Accuracy against mean thinking tokens, one line per difficulty level over the budgets; "Wait" settings
    as squares and adaptive thinking as stars in the level's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    levels = [lv for lv in dict.fromkeys(r["level"] for r in table) if lv != "all"]
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(levels), 1)))
    for level, color in zip(levels, colors):
        rows = [r for r in table if r["level"] == level]
        curve = sorted((r for r in rows if r["setting"].startswith(("budget=", "no budget"))),
                       key=lambda r: r["mean_thinking_tokens"])
        ax.plot([r["mean_thinking_tokens"] for r in curve], [r["accuracy"] for r in curve], marker="o",
                color=color, label=f"level {level}")
        for r in rows:
            if r["setting"].startswith("wait"):
                ax.scatter(r["mean_thinking_tokens"], r["accuracy"], marker="s", color=color, s=50)
            elif r["setting"].startswith("adaptive"):
                ax.scatter(r["mean_thinking_tokens"], r["accuracy"], marker="*", color=color, s=180,
                           edgecolors="black", linewidths=0.5)
    ax.plot([], [], "s", color="grey", label='"Wait" (until a minimum, or k times)')
    ax.plot([], [], "*", color="grey", markersize=12, label="adaptive thinking")
    ax.set_xlabel("thinking tokens per problem (mean)")
    ax.set_ylabel("accuracy (held-out)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    return save_figure(fig, path)
