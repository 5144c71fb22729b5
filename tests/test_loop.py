"""The one training loop: schedules, accumulation, exact resume, NaN guards, no-pickle checkpoints, DDP."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import ddp_train
import pytest
import torch
from ddp_train import Stream, TinyConfig, TinyLM, lm_loss, weights_saver
from run_files import steady_rows
from safetensors.torch import load_file

from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.loop import NonFiniteLoss, TrainConfig, TrainingInterrupted, train
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import build_optimizer, lr_at

HERE = Path(__file__).parent


def cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=2, max_steps=6, batch_size=4, micro_batch_size=4, log_every=1,
                eval_every=0, save_every=3, seed=0, num_threads=1)  # tiny ops: threads only contend
    return TrainConfig(**{**base, **kw})


def run(out, model_config=None, data=None, loss_fn=lm_loss, **kw):
    torch.manual_seed(0)
    model = TinyLM(model_config)
    result = train(model, loss_fn, data or Stream(), cfg(**kw), out, save_model=weights_saver(model))
    return model, result


def losses(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def test_lr_schedules_at_hand_picked_steps():
    def at(step, **kw):
        return lr_at(step, TrainConfig(**{"lr": 1.0, "max_steps": 110, "warmup_steps": 10, "min_lr_ratio": 0.1,
                                          **kw}))
    assert at(0) == pytest.approx(0.1)  # warmup starts at lr / warmup_steps
    assert at(4) == pytest.approx(0.5)
    assert at(9) == pytest.approx(1.0) and at(10) == pytest.approx(1.0)  # warmup ends at lr
    assert at(60) == pytest.approx(0.55)  # cosine midpoint: (1 + 0.1) / 2
    assert at(110) == pytest.approx(0.1)  # ends at lr * min_lr_ratio
    assert at(60, schedule="linear") == pytest.approx(0.55)
    assert at(50, schedule="wsd", decay_fraction=0.2) == 1.0  # plateau until the last 22 steps
    assert at(87, schedule="wsd", decay_fraction=0.2) == 1.0
    assert at(99, schedule="wsd", decay_fraction=0.2) == pytest.approx(1 - 0.9 * 11 / 22)
    assert at(110, schedule="wsd", decay_fraction=0.2) == pytest.approx(0.1)
    assert at(60, schedule="constant") == 1.0


def test_config_validation_names_the_problem():
    for kw, match in [(dict(lr=0), "lr must be positive"), (dict(warmup_steps=7), "warmup_steps"),
                      (dict(batch_size=6), "multiple of micro_batch_size"), (dict(beta2=1.0), "beta"),
                      (dict(schedule="wsd", warmup_steps=5, decay_fraction=0.5), "wsd")]:
        with pytest.raises(ValueError, match=match):
            cfg(**kw).validate()
    with pytest.raises(ValueError, match="micro_batch_size x processes = 4 x 2"):
        cfg(batch_size=4).accumulation(world_size=2)
    assert cfg(batch_size=16, micro_batch_size=2).accumulation(world_size=2) == 4


def test_weight_decay_groups_skip_norms_and_biases():
    opt = build_optimizer(TinyLM(), cfg(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and {p.dim() for p in decayed["params"]} == {2}
    assert plain["weight_decay"] == 0.0 and {p.dim() for p in plain["params"]} == {1}


def test_loss_decreases_and_metrics_are_logged(tmp_path):
    _, result = run(tmp_path, lr=3e-2, max_steps=25, save_every=0)
    curve = losses(tmp_path)
    assert len(curve) == 25 and sum(curve[-5:]) / 5 < curve[0] - 0.5, curve
    assert {"lr", "grad_norm", "accuracy", "tokens_per_sec", "tflops_per_device", "step_time"} <= set(result.metrics)
    assert result.tokens == 25 * 4 * 16
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard beside the JSONL
    assert not (tmp_path / "config.yaml").exists()  # the stage's start_run writes it, once (tests/test_runs.py)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big, _ = run(tmp_path / "a", data=Stream(rows=4), max_steps=2, save_every=0)
    small, _ = run(tmp_path / "b", data=Stream(rows=2), max_steps=2, save_every=0, micro_batch_size=2)
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.equal(big.mix.weight, TinyLM().mix.weight)  # it did train


def test_resume_after_a_kill_is_bit_identical(tmp_path):
    tied_dropout = TinyConfig(dropout=0.1, tie=True)  # RNG must be restored; a tied weight is saved once
    full_model, _ = run(tmp_path / "full", tied_dropout)

    class Killed(Stream):  # dies drawing step 5's batch, after the step-3 checkpoint
        def __next__(self):
            if self.index == 4:
                raise KeyboardInterrupt
            return super().__next__()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", tied_dropout, data=Killed())
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_0000003"
    resumed_model, result = run(tmp_path / "cut", tied_dropout)
    assert result.resumed_from.name == "step_0000003" and result.step == 6
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # bit-identical, all 6 steps
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_sigint_saves_the_step_then_resume_matches(tmp_path):
    run(tmp_path / "full")
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background (nohup ... &)

    def interrupted_at_step_4(model, batch, calls=[0]):  # noqa: B006 (a call counter)
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return lm_loss(model, batch)
    with pytest.raises(TrainingInterrupted, match="after step 4 of 6; saved .*step_0000004. Run the same command "
                                                  "again to resume from there") as stopped:
        run(tmp_path / "cut", loss_fn=interrupted_at_step_4)
    assert stopped.value.signum == signal.SIGINT
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_0000004"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    run(tmp_path / "cut")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


class KilledAt(Stream):
    """A stream whose process "dies" (KeyboardInterrupt, no checkpoint) drawing the batch at ``index``."""

    def __init__(self, index):
        super().__init__()
        self.kill_at = index

    def __next__(self):
        if self.index == self.kill_at:
            raise KeyboardInterrupt
        return super().__next__()


def test_metrics_after_kills_equal_an_unbroken_runs_row_for_row(tmp_path):
    run(tmp_path / "full")
    for index in (1, 4, 5):  # before the first checkpoint (step 1 logged), after step 3's, twice after it
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "cut", data=KilledAt(index))
    run(tmp_path / "cut")
    assert steady_rows(tmp_path / "cut") == steady_rows(tmp_path / "full")  # the file itself: no step twice
    assert [r["step"] for r in steady_rows(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_hides_the_steps_a_killed_attempt_logged(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, data=KilledAt(5))  # logged steps 1-5, saved step 3
    run(tmp_path)
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_every_checkpoint_file_is_fsynced_before_its_directory_is_renamed(tmp_path, monkeypatch):
    synced, unsynced_at_rename = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src, dst):
        if Path(src).is_dir() and str(src).endswith(".tmp"):
            files = [f for f in Path(src).rglob("*") if f.is_file()]
            unsynced_at_rename.append(sorted(f.name for f in files if f.stat().st_ino not in synced))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run(tmp_path, max_steps=3, save_every=3)
    assert unsynced_at_rename == [[]]  # one checkpoint, every file in it on disk before it got its name


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damaged):
    full, _ = run(tmp_path / "full", save_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", data=KilledAt(5), save_every=2)  # checkpoints at steps 2 and 4
    cut = tmp_path / "cut" / "checkpoints" / "step_0000004" / damaged
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a disk that filled up, a copy cut short
    with pytest.warns(UserWarning, match=f"step_0000004 is damaged \\({damaged}"):
        resumed, result = run(tmp_path / "cut", save_every=2)
    assert result.resumed_from.name == "step_0000002" and result.step == 6
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert steady_rows(tmp_path / "cut") == steady_rows(tmp_path / "full")


def nan_on_call(n):
    """A loss function whose n-th call returns NaN (a bad batch in the middle of a run)."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        loss, metrics = lm_loss(model, batch)
        return (loss * float("nan") if calls[0] == n else loss), metrics
    return loss_fn


def test_nan_stop_names_the_step(tmp_path):
    with pytest.raises(NonFiniteLoss, match="at step 2; no checkpoint yet .*starts from step 0. Lower train.lr"):
        run(tmp_path, loss_fn=nan_on_call(2))
    last_good = tmp_path / "later" / "checkpoints" / "step_0000003"
    with pytest.raises(NonFiniteLoss, match=f"at step 5; the last good checkpoint is {last_good} \\(step 3\\), "
                                            "which a rerun resumes from"):
        run(tmp_path / "later", loss_fn=nan_on_call(5))


def test_nan_skip_skips_and_continues(tmp_path):
    model, result = run(tmp_path, loss_fn=nan_on_call(2), nan_policy="skip")
    assert result.skipped_steps == 1 and result.step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("skipped_steps")] == [2, 3, 4, 5, 6]
    with pytest.raises(NonFiniteLoss, match="more than train.max_skipped_steps=0"):
        run(tmp_path / "strict", loss_fn=nan_on_call(2), nan_policy="skip", max_skipped_steps=0)


def test_checkpoints_hold_no_pickle_and_ignore_partial_dirs(tmp_path):
    run(tmp_path, max_steps=9, keep_checkpoints=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000006", "step_0000009"]  # pruned
    step = latest_checkpoint(root)
    assert step.name == "step_0000009"
    for f in step.iterdir():
        assert f.suffix in (".json", ".safetensors"), f
        if f.suffix == ".safetensors":
            assert load_file(str(f))
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["step"] == 9 and state["data"] == [{"index": 9}] and state["config"]["max_steps"] == 9
    assert "lmforge_version" in state and state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1
    (root / "step_0000012.tmp").mkdir()  # a write killed halfway
    assert latest_checkpoint(root).name == "step_0000009"
    (root / "latest").write_text("step_0000012\n")  # a pointer to something partial is never trusted
    assert latest_checkpoint(root).name == "step_0000009"


def test_finished_run_resumes_as_a_no_op(tmp_path):
    run(tmp_path)
    n_rows = len(read_metrics(tmp_path))
    _, result = run(tmp_path)
    assert result.step == 6 and result.checkpoint.name == "step_0000006"
    assert read_metrics(tmp_path)[:n_rows] == read_metrics(tmp_path)
    with pytest.raises(ValueError, match="does not match the model"):  # a checkpoint of another model
        torch.manual_seed(0)
        train(TinyLM(TinyConfig(dim=8)), lm_loss, Stream(), cfg(), tmp_path, save_model=None)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    script = HERE / "ddp_train.py"
    ddp_train.main(tmp_path / "one")  # no torchrun: one process, 2 micro-batches of 2 rows per step
    with socket.socket() as s:  # a free loopback port: no hostname lookup, no clash with a parallel run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(tmp_path / "two")],
                         env=env, timeout=300, capture_output=True, text=True)
    assert two.returncode == 0, two.stdout[-2000:] + "\n" + two.stderr[-6000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6 and not math.isclose(a[0], a[-1])
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    val = [[r["val_loss"] for r in read_metrics(tmp_path / d) if "val_loss" in r] for d in ("one", "two")]
    assert len(val[0]) == len(val[1]) == 2 and max(abs(x - y) for x, y in zip(*val)) < 1e-5, val
    state = json.loads((tmp_path / "two" / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data"] == [{"index": 6}, {"index": 6}]
