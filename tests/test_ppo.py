"""PPO: the KL-shaped reward reaches the KL-regularised optimum on a bandit, shaped rewards and values by hand,
adaptive KL, and `lmforge ppo` end to end with TRL's metric names and resume."""

import json

import pytest
import torch
from test_grpo import lmforge, micro
from test_rollout import make_model_dir, tiny_model

from lmforge.modelio import load_model_dir
from lmforge.objectives.rl import gae, kl_estimate, kl_regularised_optimum, ppo_policy_loss, whiten
from lmforge.stages.ppo import PolicyAndValue, logprobs_and_values, response_values, shaped_rewards
from lmforge.train.metrics import read_metrics


def test_kl_penalised_policy_gradient_reaches_the_kl_regularised_optimum():
    """Two responses, pi_ref = (0.6, 0.4), rewards (1, 3), beta = 2: max E[r] - beta KL(pi || pi_ref) is
    pi* = pi_ref exp(r / beta) / Z = (0.356, 0.644). PPO's path: r - beta k1 as the reward, GAE, whitened
    advantages, clipped surrogate; a free logit pair trained by it lands there."""
    torch.manual_seed(0)
    pi_ref, rewards, beta = torch.tensor([0.6, 0.4]), torch.tensor([1.0, 3.0]), 2.0
    target = kl_regularised_optimum(pi_ref, rewards, beta)
    torch.testing.assert_close(target, torch.tensor([0.3556, 0.6444]), atol=1e-4, rtol=0)
    logits = torch.nn.Parameter(pi_ref.log().clone())
    opt = torch.optim.Adam([logits], lr=0.02)
    history, n = [], 2048
    for _ in range(500):
        logp_all = logits.log_softmax(-1)
        actions = torch.multinomial(logp_all.exp().detach(), n, replacement=True)
        logp = logp_all[actions][:, None]  # one response token per sample
        mask = torch.ones_like(logp)
        kl = kl_estimate(logp.detach(), pi_ref.log()[actions][:, None], "k1")
        shaped = shaped_rewards(rewards[actions], kl, mask, beta)
        advantages, _ = gae(shaped, torch.zeros_like(shaped), mask, gamma=1.0, lam=1.0)
        loss, _ = ppo_policy_loss(logp, logp.detach(), whiten(advantages, mask), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logits.softmax(-1)[0].item())
    assert abs(sum(history[-100:]) / 100 - target[0].item()) < 0.006


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    r = shaped_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 2 - 0.15], [-1 - 0.25, 0, 0]]))


def test_policy_and_value_reads_values_where_the_logits_are():
    policy, critic = tiny_model(seed=0), tiny_model(seed=1, num_labels=1)
    torch.nn.init.normal_(critic.score.weight)
    model = PolicyAndValue(policy, critic).eval()
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "labels": torch.tensor([[4, 5]]),
             "response_mask": torch.ones(1, 2)}
    hidden, values = model(batch["input_ids"])
    torch.testing.assert_close(hidden, policy(batch["input_ids"], return_hidden=True))
    by_hand = critic.score(critic(batch["input_ids"], return_hidden=True))[0, :, 0]
    torch.testing.assert_close(response_values(values, batch)[0], by_hand[2:4])  # states before tokens 4 and 5
    batch |= {"attention_mask": torch.ones(1, 5, dtype=torch.long), "position_ids": torch.arange(5)[None]}
    logp, vals = logprobs_and_values(model, batch, 1.0)
    logits = policy(batch["input_ids"])[0]
    torch.testing.assert_close(logp[0], logits[[2, 3]].log_softmax(-1)[[0, 1], [4, 5]])
    torch.testing.assert_close(vals[0], by_hand[2:4])


@pytest.mark.slow
def test_ppo_cli_end_to_end_with_trl_metric_names_and_resume(tmp_path):
    rm = make_model_dir(tmp_path / "rm", seed=3, num_labels=1)
    out = tmp_path / "ppo"
    args = [f"out_dir={out}", *micro(tmp_path), f"rewards=[{{kind: model, path: {rm}}}]", "num_generations=1",
            "prompts_per_rollout=4", "epochs=2", "train.batch_size=2", "train.micro_batch_size=2", "adaptive_kl=true", "target_kl=0.01", "kl_coef=0.1"]
    lmforge("ppo", *args, "train.max_steps=2")
    proc = lmforge("ppo", *args)  # resumes from step 2 (mid-rollout: 4 steps per rollout) and finishes
    assert "resuming from" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and (out / "model").is_dir() and (out / "critic" / "config.json").exists()
    rows = [r for r in read_metrics(out) if "loss" in r]
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/non_score_reward",
                "objective/rlhf_reward", "objective/kl_coef", "policy/clipfrac_avg", "policy/approxkl_avg",
                "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens"):
        assert key in rows[0], key
    assert rows[0]["val/ratio"] == 1.0 and rows[0]["objective/kl"] == 0.0
    for r in rows:  # J = E[score] - beta KL, every step
        assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"] + r["objective/non_score_reward"])

    critic = load_model_dir(out / "critic", num_labels=1)
    assert critic.score is not None and critic.score.weight.any()
