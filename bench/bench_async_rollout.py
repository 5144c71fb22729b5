"""Asynchronous rollouts vs the synchronous loop: the tiny recipe's GRPO stage, both ways, in one run.

    python bench/bench_async_rollout.py --sft runs/tiny/sft/model [--steps 40] [--out /tmp/bench_async]

The asynchronous side: rollout_staleness=1 (a worker process with 1 thread generates rollout k+1 while the
trainer, with 1 thread, trains on rollout k). The synchronous sides: rollout_staleness=0 (generate, then train, in
one process) with train.num_threads=2 and with 1. Same recipe otherwise (recipes/tiny.yaml's grpo section,
evaluations only at the start and the end so every side times the same work). Prints wall time per side and each final model's greedy accuracy on the
200 held-out problems (builtin:tinyworld/eval), with the paired difference async - sync (95% bootstrap interval),
and where each side's time went, from its metrics.jsonl (timing_s/gen: the generate calls, or the wait for the
worker; timing_s/ref: packing and the reference forwards): the synchronous side's generation time bounds what any
overlap can save there.
"""

from __future__ import annotations

import argparse
import time

from lmforge.answers import is_correct
from lmforge.apps.pipeline import stage_config
from lmforge.data.prompts import render_prompt
from lmforge.data.tinyworld import eval_rows
from lmforge.evaluation import generate_all, rate
from lmforge.generation import SamplingParams
from lmforge.modelio import load_model_and_tokenizer
from lmforge.stages.grpo import run_grpo
from lmforge.train.metrics import read_metrics


def accuracy(model_dir: str, rows: list[dict]) -> list[float]:
    model, tok = load_model_and_tokenizer(model_dir, "cpu")
    outs = generate_all(model.eval(), [render_prompt(tok, r["prompt"]) for r in rows],
                        SamplingParams(max_new_tokens=48, temperature=0.0), tok)
    return [float(is_correct(o[0].text, r["answer"])) for o, r in zip(outs, rows)]


def phase_seconds(run_dir: str) -> dict[str, float]:
    """timing_s/gen and timing_s/ref summed over the run's rollouts (each logged with every step it feeds)."""
    per_rollout = {r["rollout"]: r for r in read_metrics(run_dir) if "timing_s/gen" in r}
    return {k: sum(r[f"timing_s/{k}"] for r in per_rollout.values()) for k in ("gen", "ref")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="/tmp/bench_async")
    args = ap.parse_args()
    sides = {"async (staleness 1, 1 + 1 threads)": ["rollout_staleness=1", "rollout_threads=1",
                                                    "train.num_threads=1"],
             "sync (staleness 0, 2 threads)": ["rollout_staleness=0", "train.num_threads=2"],
             "sync (staleness 0, 1 thread)": ["rollout_staleness=0", "train.num_threads=1"]}
    rows = eval_rows(200)
    results = {}
    for i, (name, extra) in enumerate(sides.items()):
        cfg = stage_config("grpo", "tiny", [f"model={args.sft}", f"out_dir={args.out}/side{i}", "train.resume=false",
                                            f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                                            f"train.save_every={args.steps}", *extra])
        t0 = time.time()
        run_grpo(cfg)
        results[name] = (time.time() - t0, accuracy(f"{args.out}/side{i}/model", rows),
                         phase_seconds(f"{args.out}/side{i}"))
    print(f"\nGRPO, tiny recipe, {args.steps} steps (one rollout of 8 x 8 each), from {args.sft}")
    print(f"{'side':<36} {'wall s':>8} {'gen s':>7} {'ref s':>7} {'held-out accuracy (200, greedy)':>34}")
    for name, (seconds, correct, phases) in results.items():
        r = rate(correct)
        print(f"{name:<36} {seconds:>8.1f} {phases['gen']:>7.1f} {phases['ref']:>7.1f} {r['value']:>14.1%} "
              f"[{r['ci'][0]:.1%}, {r['ci'][1]:.1%}]")
    (name_a, (ta, a, _)), *others = results.items()
    for name, (tb, b, phases) in others:
        diff = rate([x - y for x, y in zip(a, b)])
        print(f"async vs {name}: {tb / ta:.2f}x faster; accuracy {diff['value']:+.1%} "
              f"[{diff['ci'][0]:+.1%}, {diff['ci'][1]:+.1%}] (paired, same problems); generation is "
              f"{phases['gen'] / tb:.0%} of its wall time, so a free overlap would make it at most "
              f"{tb / (tb - phases['gen']):.2f}x faster")


if __name__ == "__main__":
    main()
