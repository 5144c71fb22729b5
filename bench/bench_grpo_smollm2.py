"""GRPO on a real model: `lmforge grpo`'s code path vs TRL's GRPOTrainer (no vLLM) on SmolLM2-135M-Instruct.

    lmforge import smollm2 out_dir=runs/smollm2
    python bench/bench_grpo_smollm2.py --model runs/smollm2 [--steps 2] [--warmup 1] [--threads 2] [--no-ckpt]
                                       [--dtype float32|bfloat16|both]

The same model directory, prompts, lengths and settings for both (bench_grpo.py's: 4 prompts x 4 generations,
exactly 64 new tokens, beta 0.04 so both score a frozen reference, one optimizer step per rollout, fp32 on CPU),
each side in its own subprocess so that its peak memory (the process's resident-set high-water mark, getrusage)
is its own; "train peak" subtracts the resident set just before training (after imports and loading). Prints
prompts/s, s/step and peak memory side by side, and the ratios. The row "lmforge + gradient_checkpointing" (skipped
with --no-ckpt) is lmforge with grpo's gradient_checkpointing=true (same losses and weights, less memory); the row
"lmforge + checkpointing + ref_offload" (also skipped with --no-ckpt) adds ref_offload=true (the reference read
from its directory for each rollout's reference forward, not resident otherwise; the same log-probs).
``--dtype bfloat16`` runs every side with bf16 matmuls: TRL with ``bf16=True`` (autocast), lmforge with
``train.dtype=bfloat16`` (autocast in training and scoring, bf16 rollouts: rollout.sample_as_trained); weights,
gradients and AdamW state stay fp32 on both. ``both`` runs every side at each precision and compares each lmforge
row with TRL at the same precision and with TRL's faster precision.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_grpo import bench_lmforge, bench_trl

CKPT = "lmforge + gradient_checkpointing"
OFFLOAD = "lmforge + checkpointing + ref_offload"


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_side(side: str, model: Path, steps: int, warmup: int, dtype: str) -> dict:
    before = rss_now_mb()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        if side == "trl":
            prompts_per_s = bench_trl(model, Path(d) / side, steps, warmup, bf16=dtype == "bfloat16")
        else:
            prompts_per_s = bench_lmforge(model, Path(d) / "lmforge", steps, warmup,
                                          gradient_checkpointing=side in (CKPT, OFFLOAD), ref_offload=side == OFFLOAD,
                                          dtype=dtype)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"prompts_per_s": prompts_per_s, "peak_mb": peak, "train_peak_mb": peak - before, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model directory (lmforge import smollm2 out_dir=...)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ckpt", action="store_true", help="skip the gradient_checkpointing rows")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="float32")
    ap.add_argument("--side", choices=["lmforge", CKPT, OFFLOAD, "trl"], help=argparse.SUPPRESS)  # one side, in a subprocess
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.model), args.steps, args.warmup, args.dtype)))
        return
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    results = {}
    for dtype in dtypes:
        for side in ("lmforge", *([] if args.no_ckpt else [CKPT, OFFLOAD]), "trl"):
            proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--side", side,
                                   "--dtype", dtype], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{side} ({dtype}) failed:\n{proc.stderr[-3000:]}")
            results[side, dtype] = json.loads(proc.stdout.strip().splitlines()[-1])
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"GRPO on {args.model}: 4 prompts x 4 generations x 64 new tokens, beta 0.04, CPU, {args.threads} "
          f"threads, {args.steps} timed steps after {args.warmup} warm-up; load average {load}")
    print(f"{'implementation':<38} {'dtype':<9} {'prompts/s':>10} {'s/step':>8} {'peak MiB':>9} {'train peak':>11}")
    for (side, dtype), r in results.items():
        print(f"{side:<38} {dtype:<9} {r['prompts_per_s']:>10.3f} {4 / r['prompts_per_s']:>8.1f} {r['peak_mb']:>9.0f} "
              f"{r['train_peak_mb']:>11.0f}")
    fastest_trl = max((r for (side, _), r in results.items() if side == "trl"), key=lambda r: r["prompts_per_s"])
    fastest = [("TRL's fastest", fastest_trl)] if len(dtypes) > 1 else []
    for (side, dtype), ours in results.items():
        if side == "trl":
            continue
        for label, trl in [("TRL, same dtype", results["trl", dtype]), *fastest]:
            print(f"{side} ({dtype}) / {label}: {ours['prompts_per_s'] / trl['prompts_per_s']:.2f}x step throughput, "
                  f"{ours['peak_mb'] / trl['peak_mb']:.2f}x peak memory "
                  f"({ours['train_peak_mb'] / trl['train_peak_mb']:.2f}x train peak)")


if __name__ == "__main__":
    main()
