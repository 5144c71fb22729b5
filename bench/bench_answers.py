"""The answer checker against math-verify: agreement on real gold answers, and the cost of one check.

    python bench/bench_answers.py [--data /work/shared/data] [--limit 0] [--calls 2000] [--examples 3]

Agreement. For every gold answer of GSM8K test, SVAMP and MATH-500 it builds completions in several styles and
grades each two ways: lmforge's ``answers.is_correct(completion, gold)``, and math-verify the way TRL's accuracy
reward and open-r1 call it, ``verify(parse(gold), parse(completion))`` (gold parsed from the dataset's gold answer:
``$gold$`` for MATH-500, the number for GSM8K and SVAMP). Styles: the dataset's own reference solution (GSM8K
``#### N``, MATH-500's worked solution with its box), ``\\boxed{gold}``, "The answer is gold.", the next row's
gold boxed (almost always wrong), a hedge "The answer is gold or other.", and for numbers gold + 1. Columns: how
often each grader says right, how often they agree, and the disagreements each way; the first few disagreements
are printed so that they can be judged.

Pre-check. lmforge rejects two constants more than 0.01% apart before math-verify's (slow) verify; the bench checks
on MATH-500 gold pairs that this never changes a verdict.

Cost. Seconds per call of ``is_correct`` on the fast path (a tinyworld-style completion against a number), of
lmforge's symbolic path (MATH-500 answers with its caches cleared before every call, so each call parses), and
of math-verify's parse + parse + verify on the same inputs, all in this process, one after the other.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import time
from pathlib import Path

from lmforge import answers
from lmforge.answers import is_correct, normalize_answer


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gold_sets(data: Path, limit: int) -> dict[str, list[tuple[str, str | None]]]:
    """dataset -> [(gold answer, reference solution or None)]"""
    gsm = read_jsonl(data / "gsm8k" / "test.jsonl.gz")
    svamp = read_jsonl(data / "svamp" / "test.jsonl")
    math500 = read_jsonl(data / "math500" / "test.jsonl.gz")
    out = {"gsm8k": [(r["answer"].rsplit("####", 1)[1].strip().replace(",", ""), r["answer"]) for r in gsm],
           "svamp": [(normalize_answer(str(r["Answer"])), None) for r in svamp],
           "math500": [(r["answer"], r["solution"]) for r in math500]}
    return {k: v[:limit] if limit else v for k, v in out.items()}


def completions(rows: list[tuple[str, str | None]]) -> dict[str, list[tuple[str, str]]]:
    """style -> [(completion, gold)]"""
    styles: dict[str, list[tuple[str, str]]] = {"reference": [], "boxed": [], "phrase": [], "other row": [],
                                                "hedge": [], "gold + 1": []}
    for i, (gold, solution) in enumerate(rows):
        other = rows[(i + 1) % len(rows)][0]
        if solution is not None:
            styles["reference"].append((solution, gold))
        styles["boxed"].append((f"So the final answer is $\\boxed{{{gold}}}$.", gold))
        styles["phrase"].append((f"The answer is {gold}.", gold))
        styles["other row"].append((f"So the final answer is $\\boxed{{{other}}}$.", gold))
        styles["hedge"].append((f"The answer is {gold} or {other}.", gold))
        value = answers.parse_number(gold)
        if value is not None:
            styles["gold + 1"].append((f"The answer is {answers.normalize_number(str(value + 1))}.", gold))
    return {k: v for k, v in styles.items() if v}


def math_verify_says(mv, completion: str, gold: str) -> bool:
    return bool(mv.verify(mv.parse(f"${gold}$"), mv.parse(completion)))


def agreement(sets, mv, examples: int) -> None:
    print("| data | style | n | lmforge right | math-verify right | agree | only lmforge | only math-verify |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    shown, totals = [], {}
    for name, rows in [*sets.items(), ("all", None)]:
        for style, pairs in (completions(rows).items() if rows is not None else totals.items()):
            if rows is not None:
                verdicts = [(is_correct(c, g), math_verify_says(mv, c, g)) for c, g in pairs]
                totals.setdefault(style, []).extend(zip(pairs, verdicts))
            else:
                pairs, verdicts = [p for p, _ in pairs], [v for _, v in pairs]
            only_ours = [p for p, (a, b) in zip(pairs, verdicts) if a and not b]
            only_theirs = [p for p, (a, b) in zip(pairs, verdicts) if b and not a]
            n = len(pairs)
            print(f"| {name} | {style} | {n} | {sum(a for a, _ in verdicts) / n:.1%} | "
                  f"{sum(b for _, b in verdicts) / n:.1%} | {1 - (len(only_ours) + len(only_theirs)) / n:.1%} | "
                  f"{len(only_ours)} | {len(only_theirs)} |")
            if rows is not None:
                shown += [(name, style, "only lmforge", p) for p in only_ours[:examples]]
                shown += [(name, style, "only math-verify", p) for p in only_theirs[:examples]]
    print("\nDisagreements (first few per row):")
    for name, style, who, (completion, gold) in shown:
        print(f"  {name}/{style} [{who} says right] gold={gold!r} completion={completion[-120:]!r}")


def precheck(sets, mv, shifts: int = 4) -> None:
    """math_verify_equal rejects two constants more than 0.01% apart before math-verify's verify runs: check on
    MATH-500 gold pairs (each against the next few golds, and against itself written as a decimal when it is a
    constant) that the verdicts are math-verify's."""
    golds = [g for g, _ in sets["math500"]]
    pairs = [(g, golds[(i + k) % len(golds)]) for i, g in enumerate(golds) for k in range(1, shifts + 1)]
    for g in golds:
        parsed = answers._mv_parse(g)
        if parsed and getattr(parsed[0], "is_number", False) is True:
            pairs.append((g, f"{complex(parsed[0].evalf(20)).real:.6f}"))
    same = early = 0
    for gold, predicted in pairs:
        full = bool(mv.verify(answers._mv_parse(gold), answers._mv_parse(predicted)))
        early += answers._clearly_different(answers._mv_parse(gold), answers._mv_parse(predicted))
        same += full == answers.math_verify_equal(gold, predicted)
    print(f"\nPre-check: the same verdict as math-verify's verify on {same} of {len(pairs)} MATH-500 pairs "
          f"({early} rejected before verify)")


def per_call(fn, args_list, repeat_until: float = 1.0) -> float:
    """Mean seconds per call over the list, cycled until ``repeat_until`` seconds have passed."""
    calls, t0 = 0, time.perf_counter()
    while True:
        for args in args_list:
            fn(*args)
            calls += 1
        if time.perf_counter() - t0 >= repeat_until:
            return (time.perf_counter() - t0) / calls


def costs(sets, mv, calls: int) -> None:
    rng = random.Random(0)
    fast = [(f"{a} + {b}: the sum. The answer is {a + b}.", str(a + b + rng.choice((0, 1))))
            for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(calls))]
    symbolic_golds = [g for g, _ in sets["math500"] if answers.parse_number(g) is None][:100]
    symbolic = [(f"\\boxed{{{g}}}", h) for g, h in zip(symbolic_golds, symbolic_golds[1:] + symbolic_golds[:1])]
    symbolic += [(f"\\boxed{{{g}}}", g.replace(" ", "")) for g in symbolic_golds]

    def uncached(completion, gold):
        answers._symbolic_equal.cache_clear()
        answers._mv_parse.cache_clear()
        return is_correct(completion, gold)

    rows = [("fast path: 'The answer is 97.' vs a number", is_correct, fast),
            ("math-verify on the same", lambda c, g: math_verify_says(mv, c, g), fast[:200]),
            ("symbolic: MATH-500 answers, caches cleared", uncached, symbolic),
            ("symbolic, verdict cached (same pair again)", is_correct, symbolic),
            ("math-verify on the same", lambda c, g: math_verify_says(mv, c, g), symbolic)]
    print("\n| check | per call |")
    print("|---|---:|")
    for label, fn, args in rows:
        if "cached" in label and "cleared" not in label:
            per_call(fn, args, repeat_until=0.0)  # one pass fills the caches
        s = per_call(fn, args)
        print(f"| {label} | {s * 1e6:,.1f} us |" if s < 1e-3 else f"| {label} | {s * 1e3:,.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/work/shared/data")
    parser.add_argument("--limit", type=int, default=0, help="rows per dataset (0 = all)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=3)
    args = parser.parse_args()
    import math_verify as mv

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    answers._math_verify()  # imports and warms sympy up, as the first symbolic check would
    sets = gold_sets(Path(args.data), args.limit)
    agreement(sets, mv, args.examples)
    precheck(sets, mv)
    costs(sets, mv, args.calls)


if __name__ == "__main__":
    main()
