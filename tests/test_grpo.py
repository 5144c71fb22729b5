"""GRPO / RLOO: the KL term's fixed point on a bandit, reward going up on a toy verifiable task, the loud
zero-advantage warning, exact resume mid-RL, and the CLI end to end (grpo, rloo, the beta comparison plot)."""

import json
import math
import os
import signal
from copy import deepcopy

import pytest
import torch
from lmforge_cli import lmforge
from run_files import without_wall_clock
from safetensors.torch import save_model as save_weights
from test_rollout import make_model_dir, tiny_model, write_rl_prompts

import lmforge.model as model_module
import lmforge.rollout as rollout_module
from lmforge.config import load_config
from lmforge.modelio import load_model_dir
from lmforge.objectives.rl import grpo_advantages, grpo_loss
from lmforge.rollout import (
    DiskReference,
    RolloutStream,
    grpo_loss_fn,
    grpo_rollout,
    pack_rollout,
    reference_logprobs,
)
from lmforge.stages.grpo import GRPOConfig
from lmforge.stages.grpo import main as grpo_main
from lmforge.stages.ppo import PPOConfig
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.loop import TrainConfig, TrainingInterrupted, train
from lmforge.train.metrics import read_metrics


def test_grpo_k3_in_the_loss_settles_where_its_gradient_says():
    """GRPO puts k3 in the loss, sampled from pi: its expected gradient is (pi - pi_ref) grad log pi =
    grad KL(pi_ref || pi), so with pi_ref (0.6, 0.4), rewards (1, 3), beta 2 the policy settles at
    max E[r] - beta KL(pi_ref || pi): p0 = 1 - sqrt(0.4) = 0.368, near (not at) the reverse-KL optimum 0.356
    that PPO's KL-in-the-reward reaches (test_ppo.py)."""
    torch.manual_seed(0)
    pi_ref, rewards, beta = torch.tensor([0.6, 0.4]), torch.tensor([1.0, 3.0]), 2.0
    logits = torch.nn.Parameter(pi_ref.log().clone())
    opt = torch.optim.Adam([logits], lr=0.02)
    history = []
    for _ in range(500):
        logp_all = logits.log_softmax(-1)
        actions = torch.multinomial(logp_all.exp().detach(), 2048, replacement=True)
        logp = logp_all[actions][:, None]
        adv = grpo_advantages(rewards[actions], 2048, scale="none")
        loss, _ = grpo_loss(logp, None, pi_ref.log()[actions][:, None], adv, torch.ones_like(logp), beta=beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logits.softmax(-1)[0].item())
    assert abs(sum(history[-100:]) / 100 - (1 - math.sqrt(0.4))) < 0.006


def toy_config(**kw) -> GRPOConfig:
    train_cfg = TrainConfig(lr=2e-2, schedule="constant", warmup_steps=0, max_steps=kw.pop("max_steps", 8),
                            batch_size=kw.pop("batch_size", 8), micro_batch_size=4, weight_decay=0.0, eval_every=0, save_every=3,
                            log_every=1, device="cpu", grad_clip=1.0, num_threads=1)
    kw = {"prompts_per_rollout": 4, "num_generations": 4, "max_new_tokens": 4, "epochs": 2, "beta": 0.0, **kw}
    return GRPOConfig(train=train_cfg, **kw)


def count_fives(inp):
    """A toy verifiable reward: the share of completion tokens that are token 5."""
    r = torch.tensor([sum(t == 5 for t in ids) / len(ids) for ids in inp.completion_ids])
    return r, {"fives": r}


def run_toy(out, cfg: GRPOConfig, reward=count_fives, loss_fn=None, make_sampler=None):
    """GRPO on four fixed prompts of a 16-token model; ``make_sampler(policy)``: an async_rollout.AheadSampler
    generating the rollouts ahead (test_async_rollout.py), saved in every checkpoint and closed at the end."""
    policy = tiny_model(vocab=16)
    ref = deepcopy(policy).eval().requires_grad_(False)
    rows = [{"prompt": "p", "answer": None}] * 4
    sampler = make_sampler(policy) if make_sampler is not None else None
    stream = RolloutStream(grpo_rollout(cfg, policy, ref, None, rows, [[1, 2], [3], [4, 6, 7], [8]], reward,
                                        torch.device("cpu"), sampler=sampler),
                           epochs=cfg.epochs, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                           resume_dir=lambda: latest_checkpoint(out / "checkpoints"),
                           accumulation=cfg.train.accumulation(1))

    def save_model(path):
        save_weights(policy, str(path / "model.safetensors"))
        stream.save_buffer(path)
        if sampler is not None:
            sampler.save(path)
    try:
        train(policy, loss_fn or grpo_loss_fn(cfg), stream, cfg.train, out, save_model=save_model)
    finally:
        if sampler is not None:
            sampler.close()
    return policy


def test_grpo_raises_the_reward_of_a_toy_verifiable_task(tmp_path):
    run_toy(tmp_path, toy_config(max_steps=40))  # 10 rollouts of 16 completions
    rows = read_metrics(tmp_path)
    rollouts = {r["rollout"]: r["reward"] for r in rows if "rollout" in r}
    assert rollouts[1] < 0.2 and rollouts[9] + rollouts[10] > 1.0, rollouts  # 1/16 at random
    first = rows[0]
    assert first["ratio_mean"] == 1.0 and first["approx_kl"] == 0.0 and first["clip_ratio"] == 0.0
    assert first["kl"] == 0.0  # policy == reference at the start, to the last bit
    assert all(0 <= r["frac_reward_zero_std"] <= 1 for r in rows)
    assert all(r["timing_s/gen"] > 0 and r["timing_s/ref"] > 0 for r in rows)  # every step: its rollout's phases


def test_one_update_per_rollout_skips_the_old_logprob_forward(tmp_path):
    """epochs 1 and one optimizer step per rollout: pi_old is pi exactly, so the loss uses logp.detach()."""
    run_toy(tmp_path, toy_config(max_steps=6, epochs=1, batch_size=16))
    rows = read_metrics(tmp_path)
    assert [r["rollout"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["ratio_mean"] == 1.0 and r["clip_ratio"] == 0.0 and r["entropy"] > 0 for r in rows)
    assert rows[0]["kl"] == 0.0 and rows[0]["kl_k1"] == 0.0 and rows[-1]["kl"] > 0


def test_rloo_raises_the_reward_too(tmp_path):
    run_toy(tmp_path, toy_config(max_steps=40, algorithm="rloo"))
    rollouts = {r["rollout"]: r["reward"] for r in read_metrics(tmp_path) if "rollout" in r}
    assert rollouts[1] < 0.2 and rollouts[9] + rollouts[10] > 1.0, rollouts


def test_flat_rewards_are_reported_loudly(tmp_path, capsys):
    def constant(inp):
        r = torch.ones(len(inp.completion_ids))
        return r, {"constant": r}
    run_toy(tmp_path, toy_config(max_steps=4), reward=constant)
    err = capsys.readouterr().err
    assert "WARNING rollout 1: all 4 groups got equal rewards" in err and "nothing is learnt" in err
    rows = read_metrics(tmp_path)
    assert all(r["frac_reward_zero_std"] == 1.0 and r["loss"] == 0.0 for r in rows)


def test_resume_mid_rollout_equals_the_uninterrupted_run(tmp_path):
    cfg = toy_config(max_steps=8)
    full = run_toy(tmp_path / "full", cfg)
    calls = [0]
    base = grpo_loss_fn(cfg)

    def interrupted(model, batch):  # SIGINT during step 3: mid-way through the first buffer's second epoch
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return base(model, batch)
    with pytest.raises(TrainingInterrupted, match="step 3"):
        run_toy(tmp_path / "cut", cfg, loss_fn=interrupted)
    assert (latest_checkpoint(tmp_path / "cut" / "checkpoints") / "rollout.safetensors").exists()
    resumed = run_toy(tmp_path / "cut", cfg)

    def curve(d):
        return without_wall_clock(read_metrics(d))
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---- the CLI ----



def micro(tmp_path):
    policy = make_model_dir(tmp_path / "policy")
    data = write_rl_prompts(tmp_path / "rl.jsonl")
    return [f"model={policy}", f"data.source={data}", f"data.eval_source={data}", "data.eval_size=4",
            "prompts_per_rollout=2", "num_generations=4", "max_new_tokens=6", "train.max_steps=4",
            "train.batch_size=4", "train.micro_batch_size=4", "train.eval_every=2", "train.save_every=2",
            "train.lr=1e-3", "train.num_threads=1", "rewards=[{kind: math}, {kind: format, weight: 0.5}, {kind: length, weight: 0.01}]"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_cli_end_to_end(tmp_path, algorithm):
    out = tmp_path / "run"
    proc = lmforge("grpo", f"out_dir={out}", f"algorithm={algorithm}", *micro(tmp_path))
    assert "RL summary" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["steps"] == 4
    assert (out / "model" / "model.safetensors").exists() and (out / "config.yaml").exists()
    rows = read_metrics(out)
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0]  # the starting point, before any update
    assert rows[1]["ratio_mean"] == 1.0 and rows[1]["kl"] == 0.0
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "rewards/math/mean",
                "rewards/format/mean", "rewards/length/mean", "kl", "entropy", "clip_ratio"):
        assert key in rows[1], key
    assert (out / "checkpoints" / "step_0000004" / "rollout.safetensors").exists()


@pytest.mark.slow
def test_cli_beta_comparison_plots_and_bad_data_is_one_error(tmp_path):
    out = tmp_path / "cmp"
    lmforge("grpo", f"out_dir={out}", "compare_beta=[0.0, 0.5]", *micro(tmp_path), "train.max_steps=2")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"beta=0", "beta=0.5"} and (out / "length_accuracy.png").stat().st_size > 0
    assert (out / "beta_0" / "model").is_dir() and (out / "beta_0.5" / "model").is_dir()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1 + 1?"}\n')
    proc = lmforge("grpo", f"out_dir={tmp_path / 'x'}", *micro(tmp_path), f"data.source={bad}", check=False)
    assert proc.returncode == 2 and "bad.jsonl:1: the math reward needs an 'answer' field" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_builtin_recipes_parse():
    hacking = load_config(GRPOConfig, "reward_hacking", section="grpo")
    assert hacking.compare_beta[0] == 0.0 and len(hacking.compare_beta) == 2
    assert [(r.kind, r.weight > 0) for r in hacking.rewards] == [("math", True), ("length", True)]
    assert load_config(GRPOConfig, "tiny", section="grpo").rewards[0].kind == "math"
    assert load_config(PPOConfig, "tiny", section="ppo").rewards[0].kind == "model"


def test_gradient_checkpointing_trains_the_same_weights_and_is_engaged(tmp_path, monkeypatch):
    """grpo's gradient_checkpointing=true recomputes every block in the backward (lmforge.model.checkpoint is
    called once per layer per training forward) and ends at the same losses and weights as the default run."""
    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = [a for a in micro(tmp_path) if not a.startswith("train.eval_every")] + ["train.eval_every=0",
                                                                                    "train.max_steps=2"]
    runs = {}
    for on in (False, True):
        calls.clear()
        out = tmp_path / f"ckpt_{on}"
        grpo_main([f"out_dir={out}", f"gradient_checkpointing={str(on).lower()}", *args])
        runs[on] = ([r["loss"] for r in read_metrics(out) if "loss" in r], load_model_dir(out / "model"))
        assert len(calls) == (2 * runs[on][1].config.num_hidden_layers if on else 0)  # 2 steps x every layer
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-6)
    for (name, a), b in zip(runs[False][1].state_dict().items(), runs[True][1].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_disk_reference_gives_the_log_probs_of_the_reference_in_memory(tmp_path):
    """rollout.reference_logprobs with a DiskReference (ref_offload) loads the directory for the call and gives
    exactly the log-probs of the same reference held in memory (not those of the policy that moved)."""
    path = make_model_dir(tmp_path / "ref")
    policy, ref = load_model_dir(path), load_model_dir(path).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    vocab = ref.config.vocab_size
    buffer = pack_rollout([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [torch.randint(vocab, (n,), generator=g).tolist()
                                                              for n in (5, 3, 6)], pad_id=0)
    args = (1.0, buffer, [torch.arange(3)], torch.device("cpu"), None)
    for packed in (False, True):
        from_disk = reference_logprobs(DiskReference(path, "cpu"), *args, packed)
        assert torch.equal(from_disk, reference_logprobs(ref, *args, packed))
        assert not torch.allclose(from_disk, reference_logprobs(policy.eval(), *args, packed))


def test_ref_offload_trains_the_same_and_loads_the_reference_once_per_rollout(tmp_path, monkeypatch):
    """grpo's ref_offload=true keeps the reference in its directory (rollout.DiskReference), loaded once per
    rollout for the reference forward and nowhere else, and ends at the same losses, KL and weights as the run
    with the reference in memory; every rollout also trims the C heap at its 3 phase boundaries (and each training
    forward and backward)."""
    loads, trims = [], []
    real_load = rollout_module.load_model_dir
    monkeypatch.setattr(rollout_module, "load_model_dir", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    if rollout_module.MALLOC_TRIM is not None:
        real_trim = rollout_module.MALLOC_TRIM
        monkeypatch.setattr(rollout_module, "MALLOC_TRIM", lambda pad: trims.append(pad) or real_trim(pad))
    args = [a for a in micro(tmp_path) if not a.startswith("train.eval_every")] + ["train.eval_every=0"]
    runs = {}
    for on in (False, True):
        loads.clear()
        out = tmp_path / f"offload_{on}"
        grpo_main([f"out_dir={out}", f"ref_offload={str(on).lower()}", *args])
        metrics = [r for r in read_metrics(out) if "loss" in r]
        runs[on] = ([(r["loss"], r["kl"]) for r in metrics], load_model_dir(out / "model"))
        assert len(loads) == (2 if on else 0)  # 4 steps of half a rollout: 2 rollouts, one load each
    assert runs[True][0] == runs[False][0]
    for (name, a), b in zip(runs[False][1].state_dict().items(), runs[True][1].state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    if rollout_module.MALLOC_TRIM is not None:
        # both runs: 3 phase boundaries per rollout, 1 per training forward and 1 per backward (before the embedding's)
        assert len(trims) == 2 * (2 * 3 + 4 + 4)


def test_ref_offload_refuses_a_reference_that_moves():
    with pytest.raises(ValueError, match="ref_offload"):
        GRPOConfig(ref_offload=True, sync_ref_model=True).validate()
