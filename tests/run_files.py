"""Reading a run directory's files the way the reliability tests compare them."""

import json
from pathlib import Path

WALL_CLOCK = ("time", "step_time", "tokens_per_sec", "tflops_per_device", "mfu", "seconds")  # differ run to run


def without_wall_clock(rows: list[dict]) -> list[dict]:
    """The rows without the fields that differ run to run: WALL_CLOCK and the rollouts' timing_s/* phases."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK and not k.startswith("timing_s/")} for r in rows]


def steady_rows(run_dir: Path) -> list[dict]:
    """Every row of run_dir/metrics.jsonl as written (no resume logic applied), without the wall-clock fields:
    what two runs of the same config must agree on, bit for bit."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return without_wall_clock([json.loads(line) for line in lines if line.strip()])
