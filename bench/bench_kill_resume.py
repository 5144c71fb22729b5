"""Crash safety under kill -9: a micro `lmforge pretrain` killed at random points, resumed, vs an unbroken run.

    python bench/bench_kill_resume.py [--kills 30] [--steps 24] [--seed 0]

Both sides run in one process: the uninterrupted run, then the same command killed with SIGKILL (no chance to
clean up) over and over at random points (a quarter within 0.6 s of the start: data preparation, model build;
the rest after a random number of logged steps plus up to 0.4 s: mid-step, mid-checkpoint, mid-evaluation) and rerun until it finishes.
Printed: the kills that landed, where, and whether the final model's bytes, every metric row (wall-clock fields
aside) and the checkpoints match the unbroken run's. Each run is a forked child running lmforge.cli.main (no
interpreter start per run). POSIX only. The model: 28k parameters, vocab 300, 2 layers; data: a generated corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge import cli

WALL_CLOCK = ("time", "step_time", "tokens_per_sec", "tflops_per_device", "mfu", "seconds")


def micro(steps: int) -> list[str]:
    return ["seq_len=32", "vocab_size=300", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=1",
            f"train.max_steps={steps}", "train.batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=2",
            f"train.eval_every={steps // 2}", "train.eval_batches=1", "train.save_every=2", "train.log_every=1",
            "train.lr=1e-2", "train.num_threads=1", "sample_tokens=4", "data.mix=[]"]


def spawn(args: list[str], log: Path) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        rc = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)
            rc = cli.main(args)
        finally:
            os._exit(rc)
    return pid


def exit_code(pid: int, block: bool = True) -> int | None:
    done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    if not done:
        return None
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def rows_logged(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def killed_run(args: list[str], out: Path, log: Path, rows: int, delay: float) -> int:
    """The exit code of a run sent SIGKILL ``delay`` s after metrics.jsonl has ``rows`` lines (a resumed run's
    file holds the earlier attempts' rows until it drops them)."""
    pid = spawn(args, log)
    while rows_logged(out) < rows:
        rc = exit_code(pid, block=False)
        if rc is not None:
            return rc
        time.sleep(0.005)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return exit_code(pid)


def steady(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(opts.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        words = "the king rode to a castle while the queen spoke of rain and sun over the green hills".split()
        corpus = tmp / "corpus.txt"
        corpus.write_text("".join(" ".join(rng.choice(words) for _ in range(30)) + "\n\n" for _ in range(300)))
        args = lambda out: ["pretrain", f"out_dir={out}", f"data.source={corpus}", *micro(opts.steps)]  # noqa: E731
        t0 = time.time()
        assert exit_code(spawn(args(tmp / "full"), tmp / "full.log")) == 0, (tmp / "full.log").read_text()
        print(f"uninterrupted run: {opts.steps} steps, {time.time() - t0:.1f} s")
        cut, landed, attempts, phases, rounds = tmp / "cut", 0, 0, {"early": 0, "later": 0}, []
        while landed < opts.kills:
            attempts += 1
            early = rng.random() < 0.25  # a quarter of the kills aimed before the first step is logged
            rows, delay = (0, rng.uniform(0, 0.6)) if early else (rng.randint(1, opts.steps), rng.uniform(0, 0.4))
            rc = killed_run(args(cut), cut, tmp / "cut.log", rows, delay)
            if rc == 128 + signal.SIGKILL:
                landed += 1
                phases["early" if early else "later"] += 1
            elif rc == 0:  # it finished before the kill came: compare, then start a fresh round
                rounds.append(compare(cut, tmp / "full"))
                shutil.rmtree(cut)
            else:
                raise SystemExit(f"exit {rc}:\n" + (tmp / "cut.log").read_text()[-3000:])
        assert exit_code(spawn(args(cut), tmp / "cut.log")) == 0, (tmp / "cut.log").read_text()[-3000:]
        rounds.append(compare(cut, tmp / "full"))
        print(f"killed -9: {landed} times ({phases['early']} in a run's first 0.6 s: data prep or the resume itself; "
              f"{phases['later']} after a random number of logged rows) in {attempts} runs, {len(rounds)} resumed "
              "run(s) to the end; "
              f"load average {os.getloadavg()[0]:.1f}")
        for name in rounds[0]:
            print(f"  {name}: {' '.join(str(r[name]) for r in rounds)}")


def compare(cut: Path, full: Path) -> dict:
    """What must equal the unbroken run's, bit for bit."""
    last = sorted((full / "checkpoints").glob("step_*"))[-1].name
    return {
        "final model.safetensors identical": (cut / "model" / "model.safetensors").read_bytes()
        == (full / "model" / "model.safetensors").read_bytes(),
        "metrics.jsonl rows identical (wall-clock fields aside), none twice": steady(cut) == steady(full),
        "last checkpoint's weights, AdamW state and RNG identical": all(
            (cut / "checkpoints" / last / f).read_bytes() == (full / "checkpoints" / last / f).read_bytes()
            for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors")),
    }

if __name__ == "__main__":
    main()
