"""Crash safety end to end: kill -9 at random points, SIGTERM, a non-finite loss, two runs in one out_dir.

The runs are a micro `lmforge pretrain` (28k parameters, 12 steps) through the CLI's own dispatch
(lmforge.cli.main), each in a forked child of the test process: the same code path as `python -m lmforge`, a real
process to kill, and no interpreter start per run. POSIX only (fork, SIGKILL).
"""

import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
from run_files import steady_rows

from lmforge import cli
from lmforge.errors import OutDirInUse
from lmforge.stages import constitutional
from lmforge.train.runlock import LOCK_FILE, lock_out_dir, unlock_out_dir

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(os, "fork"), reason="forks and kills processes (POSIX)")]

STEPS = 12
MICRO = ["seq_len=32", "vocab_size=300", "model.hidden_size=32", "model.intermediate_size=64",
         "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=1",
         f"train.max_steps={STEPS}", "train.batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=2",
         "train.eval_every=6", "train.eval_batches=1", "train.save_every=2", "train.log_every=1",
         "train.lr=1e-2", "train.num_threads=1", "sample_tokens=4", "data.mix=[]"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the king rode to a castle while the queen spoke of rain and sun over the green hills".split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(30)) + "\n\n" for _ in range(300)))
    return path


def pretrain_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["pretrain", f"out_dir={out}", f"data.source={corpus}", *MICRO, *extra]


def spawn(args: list[str], log: Path) -> int:
    """Fork a child that runs ``lmforge ARGS`` (cli.main) with its output in ``log``; returns its PID."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        rc = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            rc = cli.main(args)
        except BaseException as e:  # noqa: BLE001 (whatever escapes the CLI: report it, exit non-zero)
            print(f"escaped the CLI: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    return pid


def wait(pid: int, timeout: float = 120) -> int:
    """The child's exit code (128 + N for signal N), waiting at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} still running after {timeout}s")


def logged_steps(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_until(args, out: Path, log: Path, rows: int, extra_delay: float, sig=signal.SIGKILL) -> int:
    """Run ``args``; once metrics.jsonl has ``rows`` lines (0: at once), wait ``extra_delay`` s and send ``sig``.
    Returns the exit code (a run that finished first just finishes)."""
    pid = spawn(args, log)
    deadline = time.monotonic() + 120
    while logged_steps(out) < rows and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    time.sleep(extra_delay)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    return wait(pid)


def model_bytes(out: Path) -> bytes:
    return (out / "model" / "model.safetensors").read_bytes()


def test_kill_9_at_random_points_then_resume_equals_an_unbroken_run(tmp_path, corpus):
    full = tmp_path / "full"
    assert wait(spawn(pretrain_args(full, corpus), tmp_path / "full.log")) == 0, (tmp_path / "full.log").read_text()
    cut = tmp_path / "cut"
    rng = random.Random(15)
    kills = 0
    for _ in range(6):  # the rows seen before the kill, then up to 0.4 s more: data prep, mid-step, mid-save
        rc = run_until(pretrain_args(cut, corpus), cut, tmp_path / "cut.log", rng.randint(0, STEPS + 2),
                       rng.uniform(0, 0.4))
        kills += rc == 128 + signal.SIGKILL
    assert wait(spawn(pretrain_args(cut, corpus), tmp_path / "cut.log")) == 0, (tmp_path / "cut.log").read_text()
    assert kills >= 3, (tmp_path / "cut.log").read_text()  # most kills land before the run ends
    assert model_bytes(cut) == model_bytes(full)  # the weights, bit for bit
    assert steady_rows(cut) == steady_rows(full)  # every metric row, once, bit for bit (wall-clock fields aside)
    assert [r["step"] for r in steady_rows(cut) if "loss" in r] == list(range(1, STEPS + 1))
    assert not (cut / LOCK_FILE).exists()


def test_sigterm_says_which_step_was_saved_and_that_the_same_command_resumes(tmp_path, corpus):
    out, log = tmp_path / "run", tmp_path / "run.log"
    rc = run_until(pretrain_args(out, corpus), out, log, rows=3, extra_delay=0, sig=signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, log.read_text()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("lmforge pretrain: interrupted: stopped by a signal after step ")
    step = int(last.split("after step ")[1].split()[0])
    assert 3 <= step < STEPS and f"of {STEPS}; saved {out / 'checkpoints' / f'step_{step:07d}'}" in last, last
    assert last.endswith("Run the same command again to resume from there"), last
    assert "Traceback" not in log.read_text()
    assert wait(spawn(pretrain_args(out, corpus), log)) == 0
    assert f"resuming from {out / 'checkpoints' / f'step_{step:07d}'} (step {step})" in log.read_text()


def test_a_non_finite_loss_under_nan_policy_stop_is_one_line_and_exit_2(tmp_path, corpus, capsys):
    rc = cli.main(pretrain_args(tmp_path, corpus, "train.lr=1e30", "train.nan_policy=stop"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err[-1].startswith("lmforge pretrain: error: non-finite loss") and "at step 2; no checkpoint yet" in err[-1]
    assert "Traceback" not in "\n".join(err)


def hold_lock(out: Path) -> int:
    """A child process that takes out_dir's lock and sleeps until killed; returns its PID once it holds it."""
    out.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        try:
            lock_out_dir(out)
            time.sleep(600)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while str(pid) not in ((out / LOCK_FILE).read_text() if (out / LOCK_FILE).exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return pid


def test_a_second_run_in_a_live_runs_out_dir_is_refused_naming_its_pid(tmp_path, corpus, capsys):
    holder = hold_lock(tmp_path)
    try:
        rc = cli.main(pretrain_args(tmp_path, corpus))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and f"is in use by another run: PID {holder}" in err[-1], err
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    lock_out_dir(tmp_path)  # the holder was killed -9: its lock file is stale, and taken over
    assert f"left by PID {holder}" in capsys.readouterr().err
    assert str(os.getpid()) in (tmp_path / LOCK_FILE).read_text()
    unlock_out_dir(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_reentrant_within_a_process_and_exclusive_across(tmp_path):
    lock_out_dir(tmp_path)
    lock_out_dir(tmp_path)  # the stage's start_run, then the loop's train(): one holder
    unlock_out_dir(tmp_path)
    assert (tmp_path / LOCK_FILE).exists()
    pid = os.fork()
    if pid == 0:
        try:
            lock_out_dir(tmp_path)
            os._exit(1)  # took a lock another live process holds
        except OutDirInUse as e:
            os._exit(0 if f"PID {os.getppid()}" in str(e) else 2)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    assert wait(pid) == 0
    unlock_out_dir(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()


def test_constitutional_traces_appended_after_a_torn_line_keep_every_new_row(tmp_path):
    traces = tmp_path / "traces.jsonl"
    traces.write_text('{"id": "a", "x": 1}\n{"id": "b", "x"')  # killed mid-write
    constitutional._append(traces, [{"id": "c", "x": 3}])
    assert sorted(constitutional.read_jsonl_by_id(traces)) == ["a", "c"]
