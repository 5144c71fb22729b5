"""Reference refresh (TR-DPO): the mixing rule by hand, when it fires inside a step's micro-batches, the reference
in the checkpoint and back on resume, GRPO's exact resume with it, and DPO from the CLI (a reference copied every
k-th step puts the DPO loss back at ln 2)."""

import json
import math
import os
import signal
from copy import deepcopy

import pytest
import torch
from lmforge_cli import lmforge
from preference_helpers import easy_pairs, micro_model_dir, write_jsonl
from run_files import without_wall_clock
from safetensors.torch import save_model as save_weights
from test_dpo import MICRO
from test_grpo import count_fives, toy_config
from test_rollout import tiny_model

from lmforge.rollout import RolloutStream, grpo_loss_fn, grpo_rollout
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.loop import TrainingInterrupted, train
from lmforge.train.metrics import read_metrics
from lmforge.train.reference import REFERENCE_FILE, ReferenceSync, mix_into


def filled(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(layer.weight, value)
    return layer


def test_mix_into_is_the_tr_dpo_update():
    ref, policy = filled(0.0), filled(1.0)
    mix_into(ref, policy, 0.25)
    assert ref.weight.tolist() == [[0.25, 0.25]]  # 0.25 * 1 + 0.75 * 0
    mix_into(ref, policy, 0.25)
    assert ref.weight.tolist() == [[0.4375, 0.4375]]  # 0.25 + 0.75 * 0.25
    mix_into(ref, policy, 1.0)
    assert torch.equal(ref.weight, policy.weight)


class Counter:
    """A micro-batch iterator with the loop's state protocol."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return self.i

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_the_reference_moves_before_the_first_micro_batch_of_every_kth_step(tmp_path):
    ref, policy = filled(0.0), filled(0.0)
    sync = ReferenceSync(Counter(), ref, policy, every=2, alpha=0.5, accumulation=2)
    seen = []
    for step in range(6):  # the policy's weight is the number of updates so far
        torch.nn.init.constant_(policy.weight, float(step))
        for _ in range(2):
            next(sync)
            seen.append(ref.weight[0, 0].item())
    # steps 0,1: untouched; step 2: 0.5 * 2; step 4: 0.5 * 4 + 0.5 * 1 = 2.5
    assert seen == [0, 0, 0, 0, 1, 1, 1, 1, 2.5, 2.5, 2.5, 2.5]
    assert sync.syncs == 2
    sync.save(tmp_path)
    state = json.loads(json.dumps(sync.state_dict()))
    again = ReferenceSync(Counter(), filled(0.0), policy, every=2, alpha=0.5, accumulation=2,
                          resume_dir=lambda: tmp_path)
    again.load_state_dict(state)
    assert again.reference.weight[0, 0].item() == 2.5 and again.position == 12 and again.data.i == 12
    (tmp_path / REFERENCE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=REFERENCE_FILE):
        ReferenceSync(Counter(), filled(0.0), policy, every=2, alpha=0.5, resume_dir=lambda: tmp_path
                      ).load_state_dict(state)
    with pytest.raises(ValueError, match="differ in their parameters"):
        ReferenceSync(Counter(), torch.nn.Linear(3, 1), policy, every=2, alpha=0.5)


def run_synced_grpo(out, cfg, loss_fn=None):
    """test_grpo.run_toy with a reference that follows the policy (and a KL term that reads it)."""
    policy = tiny_model(vocab=16)
    ref = deepcopy(policy).eval().requires_grad_(False)
    rows = [{"prompt": "p", "answer": None}] * 4
    resume_dir = lambda: latest_checkpoint(out / "checkpoints")  # noqa: E731
    stream = RolloutStream(grpo_rollout(cfg, policy, ref, None, rows, [[1, 2], [3], [4, 6, 7], [8]], count_fives,
                                        torch.device("cpu")),
                           epochs=cfg.epochs, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                           resume_dir=resume_dir, accumulation=cfg.train.accumulation(1))
    data = ReferenceSync(stream, ref, policy, every=cfg.ref_model_sync_steps, alpha=cfg.ref_model_mixup_alpha,
                         accumulation=cfg.train.accumulation(1), resume_dir=resume_dir)

    def save_model(path):
        save_weights(policy, str(path / "model.safetensors"))
        stream.save_buffer(path)
        data.save(path)

    train(policy, loss_fn or grpo_loss_fn(cfg), data, cfg.train, out, save_model=save_model)
    return policy, ref


def test_grpo_with_a_following_reference_resumes_exactly(tmp_path):
    cfg = toy_config(max_steps=8, beta=0.5, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)
    full, full_ref = run_synced_grpo(tmp_path / "full", cfg)
    start = tiny_model(vocab=16)
    assert any(not torch.equal(a, b) for a, b in zip(full_ref.parameters(), start.parameters()))  # it moved
    calls, base = [0], grpo_loss_fn(cfg)

    def interrupted(model, batch):  # SIGINT in step 4: after the reference's first sync (before step 3)
        calls[0] += 1
        if calls[0] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return base(model, batch)
    with pytest.raises(TrainingInterrupted, match="step 4"):
        run_synced_grpo(tmp_path / "cut", cfg, loss_fn=interrupted)
    assert (latest_checkpoint(tmp_path / "cut" / "checkpoints") / REFERENCE_FILE).exists()
    resumed, resumed_ref = run_synced_grpo(tmp_path / "cut", cfg)

    def curve(d):
        return without_wall_clock(read_metrics(d))
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")
    for a, b in zip([*full.parameters(), *full_ref.parameters()], [*resumed.parameters(), *resumed_ref.parameters()]):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_dpo_cli_with_the_reference_copied_every_third_step_restarts_at_ln2(tmp_path):
    model, data = micro_model_dir(tmp_path / "sft"), write_jsonl(tmp_path / "pairs.jsonl", easy_pairs(64))
    lmforge("dpo", f"model={model}", f"data.source={data}", f"out_dir={tmp_path / 'dpo'}", "beta=0.1", "rpo_alpha=0",
            "sync_ref_model=true", "ref_model_sync_steps=3", "ref_model_mixup_alpha=1", "train.max_steps=6",
            *MICRO, "train.log_every=1", "train.lr=3e-3", "train.warmup_steps=0")
    losses = [r["loss"] for r in read_metrics(tmp_path / "dpo") if "loss" in r]
    assert len(losses) == 6, losses
    # policy == reference before steps 1 and 4 (a copy after step 3): the DPO loss is exactly ln 2 there
    assert all(losses[i] == pytest.approx(math.log(2), abs=1e-5) for i in (0, 3)), losses
    assert all(losses[i] < math.log(2) - 1e-3 for i in (1, 2, 4, 5)), losses
