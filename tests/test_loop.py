"""The one training loop: schedules, accumulation, exact resume, NaN guards, no-pickle checkpoints, DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import write_model_files
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.loop import NonFiniteLoss, TrainConfig, train
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import lr_at

HERE = Path(__file__).parent


class Stream:
    """A resumable stream of random token batches (state = how many were drawn)."""

    def __init__(self, rows=4, seq=16, vocab=64, seed=0):
        self.rows, self.seq, self.vocab, self.seed, self.index = rows, seq, vocab, seed, 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.index)
        self.index += 1
        x = torch.randint(0, self.vocab, (self.rows, self.seq + 1), generator=g)
        x[:, 1::2] = (x[:, 0::2][:, : x[:, 1::2].shape[1]] + 1) % self.vocab  # learnable: odd = even + 1
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, s):
        self.index = s["index"]


def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def lm_loss(model, batch):
    x, y = batch
    return model(x, labels=y), {}


def cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=2, max_steps=6, batch_size=4, micro_batch_size=4, log_every=1,
                eval_every=0, save_every=3, seed=0)
    return TrainConfig(**{**base, **kw})


def run(out, model=None, data=None, **kw):
    model = model or tiny_model()
    result = train(model, lm_loss, data or Stream(), cfg(**kw), out,
                   save_model=lambda d: write_model_files(d, model))
    return model, result


def test_lr_schedules_at_hand_picked_steps():
    common = dict(lr=1.0, max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, schedule="cosine", **common) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **common) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **common) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_at(110, schedule="cosine", **common) == pytest.approx(0.1)
    assert lr_at(60, schedule="linear", **common) == pytest.approx(0.55)
    assert lr_at(50, schedule="wsd", decay_fraction=0.2, **common) == 1.0  # plateau until step 88
    assert lr_at(99, schedule="wsd", decay_fraction=0.2, **common) == pytest.approx(1 - 0.9 * 11 / 22)
    assert lr_at(110, schedule="wsd", decay_fraction=0.2, **common) == pytest.approx(0.1)
    assert lr_at(60, schedule="constant", **common) == 1.0


def test_loss_decreases(tmp_path):
    _, result = run(tmp_path, max_steps=30, save_every=0)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big, _ = run(tmp_path / "a", data=Stream(rows=4), max_steps=2, save_every=0, grad_clip=0)
    # the same 4 rows, as two micro-batches of 2
    class Halves(Stream):
        def __next__(self):
            i, half = divmod(self.index, 2)
            self.index, saved = i, self.index
            x, y = Stream.__next__(self)
            self.index = saved + 1
            return x[half * 2:(half + 1) * 2], y[half * 2:(half + 1) * 2]
    small, _ = run(tmp_path / "b", data=Halves(rows=4), max_steps=2, save_every=0, grad_clip=0, micro_batch_size=2)
    for (n, a), b in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_resume_after_a_kill_is_bit_identical(tmp_path):
    full_model, _ = run(tmp_path / "full")
    full = [r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r]

    class Killed(Stream):  # dies while drawing the batch of step 5 (after the step-3 checkpoint)
        def __next__(self):
            if self.index == 4:
                raise KeyboardInterrupt
            return super().__next__()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", data=Killed())
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_0000003"
    resumed_model, result = run(tmp_path / "cut")
    rows = [r for r in read_metrics(tmp_path / "cut") if "loss" in r]
    by_step = {r["step"]: r["loss"] for r in rows}  # steps 4.. logged again after the resume
    assert [by_step[s] for s in range(1, 7)] == full
    assert result.step == 6
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def nan_on_call(n):
    """A loss function whose n-th call returns NaN (a bad batch in the middle of a run)."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        loss = model(batch[0], labels=batch[1])
        return (loss * float("nan") if calls[0] == n else loss), {}
    return loss_fn


def test_nan_stop_names_the_step(tmp_path):
    model = tiny_model()
    with pytest.raises(NonFiniteLoss, match="at step 2"):
        train(model, nan_on_call(2), Stream(), cfg(), tmp_path, save_model=lambda d: write_model_files(d, model))


def test_nan_skip_skips_and_continues(tmp_path):
    model = tiny_model()
    result = train(model, nan_on_call(2), Stream(), cfg(nan_policy="skip"), tmp_path,
                   save_model=lambda d: write_model_files(d, model))
    assert result.skipped_steps == 1 and result.step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoints_hold_no_pickle_and_ignore_partial_dirs(tmp_path):
    run(tmp_path)
    root = tmp_path / "checkpoints"
    step = latest_checkpoint(root)
    assert step.name == "step_0000006"
    for f in step.iterdir():
        assert f.suffix in (".json", ".safetensors"), f
        if f.suffix == ".safetensors":
            load_file(str(f))
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"] == {"index": 6}
    (root / "step_0000009.tmp").mkdir()  # a write killed halfway
    assert latest_checkpoint(root).name == "step_0000006"


def test_finished_run_resumes_as_a_no_op(tmp_path):
    run(tmp_path)
    n_rows = len(read_metrics(tmp_path))
    _, result = run(tmp_path)
    assert result.step == 6
    assert len([r for r in read_metrics(tmp_path)[n_rows:] if "loss" in r]) == 0


def test_bad_batch_geometry_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        cfg(batch_size=6, micro_batch_size=4).validate()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    script = HERE / "ddp_train.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), str(tmp_path / "two")], check=True, env=env, timeout=300,
                   capture_output=True)
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    assert not math.isclose(one[0], one[-1])
