"""Spending samples with a process reward model: PRM-ranked best-of-N and PRM-guided step-level beam search.

    compute_sweep   draw N samples per problem once; for n = 1, 2, 4, ... N compare majority voting, best-of-n
                    ranked by the PRM (min / prod / last step aggregation), PRM-weighted voting (each sample votes
                    for its answer with its min step score), by an outcome reward model, and pass@n, each at its
                    mean generated tokens per problem
    beam_search     expand each of ``width`` beams by ``expand`` sampled next steps (one line of thinking), score
                    every candidate with the PRM, keep the best ``width``; a candidate that closes its think block
                    writes its answer and stays in the beam; the best finished one is the answer
    plot_compute    accuracy_vs_compute.png: accuracy against generated tokens per problem, one line per method

Tokens are counted as generated, every sample and every beam candidate, so methods compare at equal compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lmforge.answers import answers_match, extract_answer
from lmforge.evaluation import generate_all, rate
from lmforge.figures import save_figure
from lmforge.generation import SamplingParams, think_tags
from lmforge.inference_scaling import majority, weighted_majority
from lmforge.objectives.prm import aggregate_steps
from lmforge.prm import PRMScorer
from lmforge.reasoning import eos_list
from lmforge.thinking import split_steps

AGGREGATIONS = ("min", "prod", "last")


def _correct(answer: str | None, gold) -> float:
    return float(answer is not None and answers_match(answer, str(gold)))


def compute_sweep(model, tokenizer, prompts: list[list[int]], golds: Sequence, ns: Sequence[int], *,
                  prm: PRMScorer | None = None, orm: PRMScorer | None = None, aggregations=AGGREGATIONS,
                  max_new_tokens: int = 256, temperature: float = 1.0, seed: int = 0, n_boot: int = 1000,
                  batch_size: int = 32) -> tuple[list[dict], dict]:
    """One row per (method, n): {"method", "n", "accuracy", "ci", "mean_generated_tokens"}, and per-problem
    outcomes per (method, n) for paired comparisons. The first n of the same N samples serve every n."""
    ns = sorted(set(ns))
    top = ns[-1]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=top, seed=seed)
    results = generate_all(model.eval(), prompts, params, tokenizer, batch_size, label="samples")
    texts = [[c.text or "" for c in row] for row in results]
    lengths = [[len(c.token_ids) for c in row] for row in results]
    answers = [[extract_answer(t) for t in row] for row in texts]
    right = [[_correct(a, g) for a in row] for row, g in zip(answers, golds)]
    step_probs = orm_probs = None
    if prm is not None:
        flat = prm.step_probs([p for p, row in zip(prompts, texts) for _ in row], [split_steps(t) for row in texts
                                                                                   for t in row])
        step_probs = [flat[i * top:(i + 1) * top] for i in range(len(prompts))]
    if orm is not None:
        flat = orm.step_probs([p for p, row in zip(prompts, texts) for _ in row], [split_steps(t) for row in texts
                                                                                   for t in row])
        orm_probs = [[aggregate_steps(s, "last") for s in flat[i * top:(i + 1) * top]] for i in range(len(prompts))]
    table, outcomes = [], {}

    def add(method: str, n: int, correct: list[float]):
        acc = rate(correct, n_boot, seed)
        spent = float(np.mean([sum(row[:n]) for row in lengths]))
        table.append({"method": method, "n": n, "accuracy": acc["value"], "ci": acc["ci"], "problems": acc["n"],
                      "mean_generated_tokens": spent})
        outcomes[(method, n)] = correct

    for n in ns:
        add("majority", n, [_correct(majority(a[:n])[0], g) for a, g in zip(answers, golds)])
        if step_probs is not None:
            for how in aggregations:
                picks = [int(np.argmax([aggregate_steps(s, how) for s in probs[:n]])) for probs in step_probs]
                add(f"prm_{how}", n, [r[k] for r, k in zip(right, picks)])
            votes = [weighted_majority(a[:n], [aggregate_steps(s, "min") for s in probs[:n]])
                     for a, probs in zip(answers, step_probs)]
            add("prm_vote", n, [_correct(v, g) for v, g in zip(votes, golds)])
        if orm_probs is not None:
            add("orm", n, [r[int(np.argmax(s[:n]))] for r, s in zip(right, orm_probs)])
        add("pass@n", n, [float(any(r[:n])) for r in right])
    return table, outcomes


# ---- beam search ----

@dataclass
class Beam:
    ids: list[int]  # everything after the prompt, as token ids
    text: str  # the same as text
    score: float = 0.0
    finished: bool = False


def beam_search(model, tokenizer, prompts: list[list[int]], prm: PRMScorer, *, width: int = 4, expand: int = 4,
                max_steps: int = 16, step_tokens: int = 24, answer_tokens: int = 16, temperature: float = 1.0,
                aggregation: str = "min", seed: int = 0) -> list[dict]:
    """PRM-guided step-level beam search (module docstring). Returns per prompt {"answer", "text", "score",
    "generated_tokens"}; candidates are scored by ``aggregation`` over their steps so far."""
    tags = think_tags(tokenizer)
    enders = set(eos_list(tokenizer))
    start = list(tags.open) + tokenizer.encode("\n")
    beams = [[Beam(list(start), tokenizer.decode(start))] for _ in prompts]
    spent = [0] * len(prompts)
    step = SamplingParams(max_new_tokens=step_tokens, temperature=temperature, n=expand, stop_strings=["\n"])
    for k in range(max_steps):
        todo = [(i, b) for i, bs in enumerate(beams) for b in bs if not b.finished]
        if not todo:
            break
        results = generate_all(model, [prompts[i] + b.ids for i, b in todo], replace(step, seed=seed + k),
                               tokenizer, label="beam step")
        candidates: list[list[Beam]] = [[b for b in bs if b.finished] for bs in beams]
        to_answer = []
        for (i, b), row in zip(todo, results):
            for c in row:
                spent[i] += len(c.token_ids)
                new = Beam(b.ids + c.token_ids, b.text + tokenizer.decode(c.token_ids, skip_special_tokens=True))
                if tags.close[0] in c.token_ids:
                    to_answer.append((i, new))
                elif c.token_ids and c.token_ids[-1] in enders:  # the turn ended inside the think block
                    new.finished = True
                candidates[i].append(new)
        _finish_answers(model, tokenizer, prompts, to_answer, answer_tokens, seed + k, spent)
        _score(prm, prompts, candidates, aggregation)
        beams = [sorted(cs, key=lambda b: -b.score)[:width] for cs in candidates]
    out = []
    for i, bs in enumerate(beams):
        done = [b for b in bs if b.finished] or bs
        best = max(done, key=lambda b: b.score)
        out.append({"answer": extract_answer(best.text), "text": best.text, "score": best.score,
                    "generated_tokens": spent[i]})
    return out


def _finish_answers(model, tokenizer, prompts, to_answer: list[tuple[int, Beam]], answer_tokens: int, seed: int,
                    spent: list[int]) -> None:
    """Candidates that closed their think block write the answer greedily and are finished."""
    if not to_answer:
        return
    params = SamplingParams(max_new_tokens=answer_tokens, temperature=0.0, seed=seed)
    rows = generate_all(model, [prompts[i] + b.ids for i, b in to_answer], params, tokenizer, label="beam answer")
    for (i, b), row in zip(to_answer, rows):
        c = row[0]
        spent[i] += len(c.token_ids)
        b.ids += c.token_ids
        b.text += c.text or ""
        b.finished = True


def _score(prm: PRMScorer, prompts, candidates: list[list[Beam]], aggregation: str) -> None:
    flat = [(i, b) for i, cs in enumerate(candidates) for b in cs]
    probs = prm.step_probs([prompts[i] for i, _ in flat], [split_steps(b.text) for _, b in flat])
    for (_, b), p in zip(flat, probs):
        b.score = aggregate_steps(p, aggregation)


def beam_rows(model, tokenizer, prompts, golds, prm: PRMScorer, settings: Sequence[tuple[int, int]], *,
              n_boot: int = 1000, seed: int = 0, **kw) -> tuple[list[dict], dict]:
    """beam_search at each (width, expand): table rows like compute_sweep's (method "beam", n = width x expand)."""
    table, outcomes = [], {}
    for width, expand in settings:
        res = beam_search(model, tokenizer, prompts, prm, width=width, expand=expand, seed=seed, **kw)
        correct = [_correct(r["answer"], g) for r, g in zip(res, golds)]
        acc = rate(correct, n_boot, seed)
        table.append({"method": "beam", "n": width * expand, "width": width, "expand": expand,
                      "accuracy": acc["value"], "ci": acc["ci"], "problems": acc["n"],
                      "mean_generated_tokens": float(np.mean([r["generated_tokens"] for r in res]))})
        outcomes[("beam", width * expand)] = correct
    return table, outcomes


def paired_vs_majority(table: list[dict], outcomes: dict, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Each method's accuracy minus majority voting's at the closest generated-token budget (majority's row with
    the least |tokens difference|), paired over the same problems: {"method", "n", "vs_majority_n", "gain", "ci"}."""
    majority_rows = [r for r in table if r["method"] == "majority"]
    out = []
    for r in table:
        if r["method"] in ("majority", "pass@n"):
            continue
        m = min(majority_rows, key=lambda x: abs(x["mean_generated_tokens"] - r["mean_generated_tokens"]))
        a, b = outcomes[(r["method"], r["n"])], outcomes[("majority", m["n"])]
        g = rate([x - y for x, y in zip(a, b)], n_boot, seed)
        out.append({"method": r["method"], "n": r["n"], "tokens": r["mean_generated_tokens"], "vs_majority_n": m["n"],
                    "majority_tokens": m["mean_generated_tokens"], "gain": g["value"], "ci": g["ci"]})
    return out


def compute_tables(table: list[dict], paired: list[dict]) -> list[dict]:
    """The search comparison as report tables: accuracy and tokens per (method, N), and gains over majority
    voting at the closest token budget, paired over the same problems."""
    main = {"title": "accuracy [95% CI] at generated tokens per problem",
            "headers": ["method", "N", "accuracy", "generated tokens"],
            "rows": [[r["method"], str(r["n"]), f"{r['accuracy']:.1%} [{r['ci'][0]:.1%}, {r['ci'][1]:.1%}]",
                      f"{r['mean_generated_tokens']:.0f}"] for r in table]}
    gains = {"title": "gain over majority voting at the closest token budget (paired, 95% bootstrap CI)",
             "headers": ["method", "N", "tokens", "majority N (tokens)", "gain"],
             "rows": [[g["method"], str(g["n"]), f"{g['tokens']:.0f}",
                       f"{g['vs_majority_n']} ({g['majority_tokens']:.0f})",
                       f"{g['gain']:+.1%} [{g['ci'][0]:+.1%}, {g['ci'][1]:+.1%}]"] for g in paired]}
    return [main, gains]


def plot_compute(table: list[dict], path: str | Path, title: str = "accuracy vs compute") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in table):
        rows = sorted((r for r in table if r["method"] == method), key=lambda r: r["mean_generated_tokens"])
        style = {"linestyle": "--", "color": "grey"} if method == "pass@n" else {}
        ax.plot([r["mean_generated_tokens"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                label=method, **style)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (mean, all samples / beam candidates)")
    ax.set_ylabel("accuracy (held-out)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)
