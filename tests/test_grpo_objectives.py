"""The GRPO family's objectives in the rollout and the loop: each loss_type learns the toy task, DAPO's dynamic
sampling refills the batch with groups that teach something, overlong shaping, truncated importance sampling;
`lmforge grpo loss_type=dapo` (with a reference that follows the policy) end to end."""

from copy import deepcopy

import pytest
import torch
from lmforge_cli import lmforge
from run_files import without_wall_clock
from test_grpo import count_fives, micro, run_toy, toy_config
from test_rollout import tiny_model

from lmforge.rollout import grpo_rollout, resolve_objective
from lmforge.stages.grpo import GRPOConfig
from lmforge.train.metrics import read_metrics


@pytest.mark.parametrize("loss_type", ["dapo", "gspo", "cispo"])
def test_every_loss_type_raises_the_reward_of_the_toy_task(tmp_path, loss_type):
    run_toy(tmp_path, toy_config(max_steps=40, loss_type=loss_type))
    rollouts = {r["rollout"]: r["rewards/fives/mean"] for r in read_metrics(tmp_path) if "rollout" in r}
    assert rollouts[1] < 0.2 and rollouts[9] + rollouts[10] > 1.0, rollouts


def test_loss_type_defaults():
    assert resolve_objective(GRPOConfig()).clip_high is None and not resolve_objective(GRPOConfig()).dynamic_sampling
    dapo = resolve_objective(GRPOConfig(loss_type="dapo", max_new_tokens=64))
    assert (dapo.clip_low, dapo.clip_high, dapo.dynamic_sampling, dapo.overlong_buffer) == (0.2, 0.28, True, 16)
    gspo = resolve_objective(GRPOConfig(loss_type="gspo", clip_eps_high=1e-3))
    assert (gspo.clip_low, gspo.clip_high) == (3e-4, 1e-3)
    assert resolve_objective(GRPOConfig(loss_type="dapo", dynamic_sampling=False)).dynamic_sampling is False


def first_prompt_only(inp):
    """Reward only varies on prompt [1, 2]: every other group is flat (zero advantage)."""
    r = torch.tensor([float(p == [1, 2]) * (sum(t == 5 for t in c) + 1) / (len(c) + 1)
                      for p, c in zip(inp.prompt_ids, inp.completion_ids)])
    return r, {"first": r}


def rollout_once(cfg, reward, iteration=0):
    policy = tiny_model(vocab=16)
    ref = deepcopy(policy).eval().requires_grad_(False)
    rows = [{"prompt": "p", "answer": None}] * 4
    make = grpo_rollout(cfg, policy, ref, None, rows, [[1, 2], [3], [4, 6, 7], [8]], reward, torch.device("cpu"))
    return make(iteration, lambda n: [torch.arange(n)])


def test_dynamic_sampling_drops_flat_groups_and_refills_the_batch():
    cfg = toy_config(prompts_per_rollout=2, num_generations=4, batch_size=8, max_new_tokens=6, epochs=1,
                     dynamic_sampling=True, max_refill_rounds=6)
    buffer, stats = rollout_once(cfg, first_prompt_only)
    assert buffer["advantages"].shape == (8,)
    informative = (buffer["advantages"].reshape(2, 4).abs().sum(1) > 0).tolist()
    assert stats["num_gen_batches"] > 1 and stats["dynamic_sampling/flat_groups"] == 2 - sum(informative)
    assert sum(informative) >= 1  # prompt [1, 2] was drawn, and its group kept
    again, stats2 = rollout_once(cfg, first_prompt_only)
    assert torch.equal(again["input_ids"], buffer["input_ids"])  # a pure function of the seed
    assert without_wall_clock([stats2]) == without_wall_clock([stats])

    off = toy_config(prompts_per_rollout=2, num_generations=4, batch_size=8, max_new_tokens=6, epochs=1)
    assert "num_gen_batches" not in rollout_once(off, first_prompt_only)[1]


def test_overlong_shaping_penalises_answers_that_run_to_the_limit():
    cfg = toy_config(max_new_tokens=6, overlong_buffer=2, overlong_penalty=0.5, epochs=1, batch_size=16)
    buffer, stats = rollout_once(cfg, count_fives)
    lengths = buffer["response_len"].float()
    assert (lengths == 6).all()  # no stop token in the toy vocabulary: every sample hits the limit
    assert stats["rewards/overlong/mean"] == -1.0  # (6 - 2 - 6) / 2 -> clamped at -1 at the limit


def test_truncated_importance_sampling_weights_are_one_when_engine_and_trainer_agree(tmp_path):
    run_toy(tmp_path, toy_config(max_steps=2, tis_cap=2.0, epochs=1, batch_size=16))
    rows = read_metrics(tmp_path)
    assert all(abs(r["tis_weight"] - 1.0) < 1e-4 for r in rows)  # the KV-cache decode vs the training forward


@pytest.mark.slow
def test_cli_dapo_with_a_following_reference(tmp_path):
    out = tmp_path / "dapo"
    lmforge("grpo", f"out_dir={out}", "loss_type=dapo", "sync_ref_model=true", "ref_model_sync_steps=2",
            *micro(tmp_path))
    rows = [r for r in read_metrics(out) if "rollout" in r]
    assert len(rows) == 4
    for key in ("num_gen_batches", "dynamic_sampling/flat_groups", "rewards/overlong/mean", "clip_ratio/high_mean"):
        assert key in rows[0], key
    assert (out / "checkpoints" / "step_0000004" / "reference.safetensors").exists()
    resolved = (out / "config.yaml").read_text()
    assert "loss_type: dapo" in resolved and "sync_ref_model: true" in resolved
