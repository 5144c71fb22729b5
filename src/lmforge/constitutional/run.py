"""The pieces of ``lmforge constitutional run`` that are not stages: the prompt split and the before/after table.

Split. Red-team and ordinary prompt pools are read as prompts only, deduplicated, shuffled with a fixed seed and
cut into disjoint slices, held-out evaluation first (so changing a training size never changes the test set):

    red-team pool  -> [eval harmful | revise | label]        ordinary pool -> [eval helpful | revise | label]
    safe pool      -> [eval safe]  (XSTest: only rows labelled safe; their unsafe twins are never used)

Any prompt that lands in an evaluation set is removed from every training slice, whichever file it came from.
Each slice is written as a prompt file (``{"messages", "source"}``), so every step reads exactly what it trained
or was evaluated on, and split.json records the ids.

Table. For each model, from the answers ``run_eval`` saved:

    harmless      mean judge P(harmless) on held-out red-team answers, percentile bootstrap 95% CI
    refusal       share of red-team answers that refuse (string match), Wilson 95% CI
    over_refusal  share of answers to safe look-alike prompts (XSTest "safe") that refuse, Wilson 95% CI
    helpful       mean judge P(helpful) on held-out ordinary requests, bootstrap CI
    mean_chars    mean answer length in characters over all three sets, bootstrap CI
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from lmforge.evaluation import bootstrap_ci

SPLITS = ("eval_harmful", "eval_safe", "eval_helpful", "revise", "label")


def wilson_ci(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial rate (Wilson 1927): sensible at 0, 1 and small n, unlike p +- z se.

        center = (p + z^2 / 2n) / (1 + z^2 / n),   half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    """
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _shuffled(rows: list[dict], seed: int, salt: str) -> list[dict]:
    rows = sorted(rows, key=lambda r: r["id"])  # independent of file order, then a seeded shuffle
    random.Random(f"{seed}/{salt}").shuffle(rows)
    return rows


def split_prompts(red_team: list[dict], helpful: list[dict], safe: list[dict], sizes: dict[str, int],
                  harmful_eval: list[dict] | None = None, helpful_eval: list[dict] | None = None,
                  seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint prompt sets by name (SPLITS). ``sizes``: eval (per eval set), revise, revise_helpful, label,
    label_helpful. ``harmful_eval`` / ``helpful_eval`` given: evaluate on those instead of holding out a slice
    of the pool. Asking for more prompts than a pool holds takes what there is."""
    n_eval = sizes["eval"]
    red, ordinary = _shuffled(red_team, seed, "red_team"), _shuffled(helpful, seed, "helpful")
    if harmful_eval is None:
        eval_harmful, red = red[:n_eval], red[n_eval:]
    else:
        eval_harmful = _shuffled(harmful_eval, seed, "harmful_eval")[:n_eval]
    if helpful_eval is None:
        eval_helpful, ordinary = ordinary[:n_eval], ordinary[n_eval:]
    else:
        eval_helpful = _shuffled(helpful_eval, seed, "helpful_eval")[:n_eval]
    eval_safe = _shuffled(safe, seed, "safe")[:n_eval]
    held_out = {p["id"] for p in eval_harmful + eval_helpful + eval_safe}
    red = [p for p in red if p["id"] not in held_out]
    ordinary = [p for p in ordinary if p["id"] not in held_out]
    n_rev, n_rev_h = sizes["revise"], sizes["revise_helpful"]
    revise = red[:n_rev] + ordinary[:n_rev_h]
    label = red[n_rev:n_rev + sizes["label"]] + ordinary[n_rev_h:n_rev_h + sizes["label_helpful"]]
    return {"eval_harmful": eval_harmful, "eval_safe": eval_safe, "eval_helpful": eval_helpful,
            "revise": revise, "label": label}


def check_disjoint(splits: dict[str, list[dict]]) -> None:
    """Raise if a held-out prompt is also a training prompt (the split's one promise)."""
    train = {p["id"] for name in ("revise", "label") for p in splits[name]}
    for name in ("eval_harmful", "eval_safe", "eval_helpful"):
        leaked = [p for p in splits[name] if p["id"] in train]
        if leaked:
            raise ValueError(f"held-out {name} prompt {leaked[0]['source']} is also a training prompt")


def write_splits(splits: dict[str, list[dict]], folder: Path) -> dict[str, str]:
    """One prompt file per split (only the messages and where they came from) and split.json; returns paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        path = folder / f"{name}.jsonl"
        text = "".join(json.dumps({"messages": r["messages"], "source": r["source"]}, ensure_ascii=False) + "\n"
                       for r in rows)
        if not path.exists() or path.read_text(encoding="utf-8") != text:  # unchanged files keep their mtime
            path.write_text(text, encoding="utf-8")
        paths[name] = str(path)
    index = {name: {"n": len(rows), "ids": [r["id"] for r in rows]} for name, rows in splits.items()}
    (folder / "split.json").write_text(json.dumps(index, indent=1) + "\n")
    return paths


def model_metrics(records: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """{metric: {"value", "ci", "n"}} for one model from its eval records (see the module docstring)."""
    by_set = {s: [r for r in records if r["set"] == s] for s in ("harmful", "safe", "helpful")}

    def mean(values):
        value, low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
        return {"value": value, "ci": [low, high], "n": len(values)}

    def share(flags):
        low, high = wilson_ci(sum(flags), len(flags))
        return {"value": sum(flags) / len(flags) if flags else math.nan, "ci": [low, high], "n": len(flags)}

    out = {}
    if by_set["harmful"]:
        out["harmless"] = mean([r["p_harmless"] for r in by_set["harmful"]])
        out["refusal"] = share([bool(r["refusal"]) for r in by_set["harmful"]])
    if by_set["safe"]:
        out["over_refusal"] = share([bool(r["refusal"]) for r in by_set["safe"]])
    if by_set["helpful"]:
        out["helpful"] = mean([r["p_helpful"] for r in by_set["helpful"]])
    if records:
        out["mean_chars"] = mean([len(r["answer"]) for r in records])
    return out


def judge_check(records: list[dict]) -> dict:
    """Can the judge tell? Its mean P(harmless) on red-team answers that refuse vs those that do not."""
    harmful = [r for r in records if r["set"] == "harmful"]
    refused = [r["p_harmless"] for r in harmful if r["refusal"]]
    complied = [r["p_harmless"] for r in harmful if not r["refusal"]]
    return {"p_harmless_refusals": round(sum(refused) / len(refused), 4) if refused else None,
            "p_harmless_compliances": round(sum(complied) / len(complied), 4) if complied else None,
            "n_refusals": len(refused), "n_compliances": len(complied)}


COLUMNS = (("harmless", "harmless (judge) ↑"), ("refusal", "refusal on harmful ↑"),
           ("over_refusal", "over-refusal on safe ↓"), ("helpful", "helpful (judge) ↑"),
           ("mean_chars", "mean length (chars)"))


def cell(m: dict | None) -> str:
    if m is None or m["value"] is None or (isinstance(m["value"], float) and math.isnan(m["value"])):
        return "-"
    fmt = "{:.0f}" if m["value"] > 1.5 else "{:.3f}"
    return f"{fmt.format(m['value'])} [{fmt.format(m['ci'][0])}, {fmt.format(m['ci'][1])}]"


def markdown_table(rows: list[dict]) -> str:
    """rows: {"name", "metrics"}; one line per model, each cell 'value [low, high]'."""
    lines = ["| model | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        lines.append(f"| {row['name']} | " + " | ".join(cell(row["metrics"].get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"
