"""Run metrics: one JSON object per line in metrics.jsonl, the trackers of train.report_to beside it (TensorBoard
by default, W&B and MLflow when asked: lmforge.train.tracking), and a progress display.

metrics.jsonl is the source of truth (plots, tests and the scaling-law fits read it); TensorBoard is a view of
it. A run that starts again after a kill (from its last checkpoint, or from step 0 when there was none) logs the
steps after that point again, so the logger first drops the rows an earlier attempt wrote for them (the file is
rewritten atomically): after any number of kills metrics.jsonl holds exactly the rows of an uninterrupted run
(their wall-clock ``time`` and speed fields aside). The trackers cannot take rows back: TensorBoard's event files
are append-only, so its writer records a purge step and TensorBoard hides the earlier attempt's events from that
step on; W&B and MLflow reopen the earlier attempt's run and get the steps after the restart point again.
:func:`read_metrics` still honours the ``{"event": "resume"}`` rows older versions appended.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.atomic import write_atomic
from lmforge.train.tracking import DEFAULT_REPORT_TO, RunInfo, open_writers


class MetricsLogger:
    """Appends ``{"step", "time", **metrics}`` rows to ``out_dir/metrics.jsonl`` and hands them to the other
    writers of ``report_to`` (TensorBoard by default; W&B, MLflow: lmforge.train.tracking).

    Only the main rank should write (``enabled=is_main``); a disabled logger does nothing. ``start_step``: the
    run (re)starts there, so rows an earlier attempt logged at steps >= start_step are dropped from the file, and
    the trackers resume the earlier attempt's run (TensorBoard purging from start_step); None appends to whatever
    is there. ``tensorboard=False`` drops TensorBoard from the writers (small side logs).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 start_step: int | None = None, report_to=None, run_name: str = "", project: str = "lmforge",
                 config: dict | None = None, group: str = ""):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writers: list = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        restart = None  # the step an earlier attempt's rows are kept up to: the trackers resume its run
        if start_step is not None and self.path.exists():
            drop_rows_from(self.path, start_step)
            restart = start_step - 1
        report_to = [r for r in (DEFAULT_REPORT_TO if report_to is None else report_to)
                     if tensorboard or r != "tensorboard"]
        self.writers = open_writers(report_to, RunInfo(Path(out_dir), run_name, project, config or {}, restart,
                                                      group))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self._write(row)
        for w in self.writers:
            w.log(step, row)

    def log_files(self, name: str, paths) -> None:
        """Files (plots, a report) as artifacts of the trackers' run; a no-op for jsonl and TensorBoard."""
        for w in self.writers:
            w.log_files(name, [Path(p) for p in paths])

    def _write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:  # one complete line per write: a kill never tears one
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


def drop_rows_from(path: Path, step: int) -> int:
    """Rewrite metrics.jsonl (atomically) without its rows at steps >= ``step``, without a line torn by a crash,
    and with older versions' resume markers applied; returns how many rows were dropped."""
    if not path.exists():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    kept: list[tuple[int, bytes]] = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a torn last line (power cut mid-write) or garbage: not a row of this run
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        if row.get("event") == "resume":  # written by lmforge before this change
            kept = [(n, raw) for n, raw in kept if n <= row["step"]]
        elif row["step"] < step:
            kept.append((row["step"], line if line.endswith(b"\n") else line + b"\n"))
    if len(kept) != len(lines):
        write_atomic(path, b"".join(raw for _, raw in kept))
    return len(lines) - len(kept)


def _plain(v):
    """A JSON-able scalar: tensors become numbers, NaN/inf become null (strict JSON has no NaN)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (or of a run directory's), as an uninterrupted run would have written them:
    at each resume marker, earlier rows for steps after the resumed checkpoint are dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows: list[dict] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("event") == "resume":
            rows = [r for r in rows if r["step"] <= row["step"]]
        else:
            rows.append(row)
    return rows


class ProgressDisplay:
    """A rich progress bar on a terminal; in logs (no TTY) a plain line at most every ``plain_every_s`` seconds.

    Only the main rank shows anything. Use as a context manager; ``update`` sets the step and the info text
    (loss, lr, tokens/s), ``print`` writes a line above the bar (eval results, notices).
    """

    def __init__(self, total: int, start: int = 0, description: str = "train", enabled: bool = True,
                 plain_every_s: float = 30.0):
        self.total, self.step, self.info = total, start, ""
        self.description, self.enabled, self.plain_every_s = description, enabled, plain_every_s
        self.bar = None
        self.last_plain, self._plain_step = time.monotonic(), -1
        if enabled and sys.stdout.isatty():  # rich draws on stdout

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> ProgressDisplay:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and self.info and self.step != self._plain_step:
            self._plain_line()

    def update(self, step: int, info: str | None = None) -> None:
        self.step = step
        if info is not None:
            self.info = info
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=self.info)
        elif self.enabled and info is not None and time.monotonic() - self.last_plain >= self.plain_every_s:
            self._plain_line()

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)

    def _plain_line(self) -> None:
        print(f"{self.description} step {self.step}/{self.total}  {self.info}", flush=True)
        self.last_plain, self._plain_step = time.monotonic(), self.step
