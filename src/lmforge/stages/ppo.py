"""``lmforge ppo``: RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022), in TRL's PPOTrainer form.

Four models: the policy (trained), a frozen reference, the reward (a reward model and/or verifiable rewards,
rewards.py), and a critic: a second Transformer with a scalar ``score`` head reading a value at every token,
initialised from the reward model (or the policy). Policy and critic train together through the one loop, as
one module (TRL's PolicyAndValueWrapper). Each rollout:

    r_t = -beta kl_t   (+ the sequence's score at its last token),  kl_t = log pi/pi_ref (k1) or k3
          (process_reward=PRM_DIR: + the PRM's normalised step score at each step's last token instead of the
          sequence's score: process supervision, objectives.rl.process_token_rewards)
    A, R = GAE(r, V; gamma, lam),  A whitened;   rewards optionally whitened (scale only) before GAE
    loss = clipped surrogate(A) + vf_coef * clipped value loss(V, R)       (objectives/rl.py)

beta is fixed, or adapted after every rollout towards ``target_kl`` (Ziegler et al. 2019). Every step logs
TRL's names: objective/kl, objective/entropy, objective/scores, objective/non_score_reward,
objective/rlhf_reward (J = E[score] - beta KL), policy/clipfrac_avg, policy/approxkl_avg, val/clipfrac_avg, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_model as save_weights
from torch import nn

from lmforge.config import parse_cli
from lmforge.generation import SamplingParams
from lmforge.model import unwrap
from lmforge.modelio import load_model_dir, save_model_dir
from lmforge.objectives.rl import (
    adaptive_kl_controller,
    gae,
    kl_estimate,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    process_token_rewards,
    whiten,
)
from lmforge.prm import PRMScorer, load_process_scorer, mean_step_reward, process_rewards
from lmforge.rewards import RewardSpec
from lmforge.rollout import (
    RLDataConfig,
    RolloutStream,
    batch_tokens,
    hash_seed,
    kl_anomaly_check,
    pack_rollout,
    policy_logprobs,
    print_rl_summary,
    prompt_indices,
    response_columns,
    response_logprobs,
    rl_summary,
    row_inputs,
    sample_and_score,
    score_buffer,
    start_rl_run,
)
from lmforge.train.loop import TrainConfig, autocast_context, train
from lmforge.train.runs import finish_run


@dataclass
class PPOConfig:
    out_dir: str = "runs/tiny/ppo"
    model: str = "runs/tiny/sft/model"  # the policy to start from
    ref_model: str = ""  # empty = the starting policy
    critic_from: str = ""  # model dir for the critic; empty = the first 'model' reward's path, else the policy
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(kind="model", path="runs/tiny/reward/model")])
    prompts_per_rollout: int = 16  # per process
    num_generations: int = 1  # completions per prompt
    epochs: int = 4  # PPO epochs over each rollout buffer (TRL's num_ppo_epochs)
    max_new_tokens: int = 64
    temperature: float = 1.0
    kl_coef: float = 0.05  # beta: the per-token KL penalty in the reward
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False
    target_kl: float = 6.0  # adaptive: the per-sequence KL aimed at
    kl_horizon: int = 10000  # adaptive: samples over which beta moves by at most 20%
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    pack: bool = True  # packed rollouts (document masks) instead of padded rows in the policy/critic/reference forwards
    process_reward: str = ""  # a PRM directory (or "checker", the step checker): dense step rewards instead of outcome
    process_prefix: str = "<think>\n"  # what the PRM reads before the first step (as it trained)
    compile_generation: bool = False  # torch.compile the rollouts' decode step: 10-40 s of warm-up on 2 cores
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-6, warmup_steps=0, schedule="constant",
                                                                   max_steps=100, batch_size=16,
                                                                   micro_batch_size=8, weight_decay=0.0,
                                                                   eval_every=20, save_every=50, log_every=1))

    def validate(self) -> None:
        rows = self.prompts_per_rollout * self.num_generations
        checks = [(self.prompts_per_rollout >= 1 and self.num_generations >= 1 and self.epochs >= 1,
                   "prompts_per_rollout, num_generations and epochs must be >= 1"),
                  (self.max_new_tokens >= 1 and self.temperature > 0, "max_new_tokens must be >= 1, temperature > 0"),
                  (self.kl_coef >= 0 and self.target_kl > 0 and self.kl_horizon > 0,
                   "kl_coef must be >= 0, target_kl and kl_horizon > 0"),
                  (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]"),
                  (rows % self.train.batch_size == 0, f"train.batch_size ({self.train.batch_size}) must divide "
                   f"prompts_per_rollout x num_generations = {rows}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class PolicyAndValue(nn.Module):
    """Policy and critic as one module for the loop: forward -> (policy hidden states (B, T, D), values (B, T))."""

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic
        if critic.lm_head.weight is not critic.model.embed_tokens.weight:
            critic.lm_head.requires_grad_(False)  # an untied output head plays no part in the values

    def forward(self, input_ids, **rows):
        """``rows``: attention_mask and position_ids (padded rows) or position_ids and document_ids (packed)."""
        hidden = self.policy(input_ids, **rows, return_hidden=True)
        critic = self.critic(input_ids, **rows, return_hidden=True)
        return hidden, self.critic.score(critic).squeeze(-1).float()


def logprobs_and_values(model, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log pi of the response tokens and (B, R) values V(s_t) read at the same columns, from a
    PolicyAndValue (called through its DDP wrapper, if any, so that gradients are synchronised)."""
    hidden, values = model(batch["input_ids"], **row_inputs(batch))
    head = unwrap(model).policy.lm_head.weight
    return response_logprobs(hidden, head, batch, temperature), response_values(values, batch)


def response_values(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """V(s_t) for each response token t: the value read where that token's logits are (columns P-1 ... P+R-2)."""
    return response_columns(values, batch) * batch["response_mask"]


def critic_source(cfg: PPOConfig) -> str:
    if cfg.critic_from:
        return cfg.critic_from
    return next((r.path for r in cfg.rewards if r.kind == "model"), cfg.model)


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards: -beta kl_t everywhere, plus the sequence's score at its last response token."""
    rewards = -beta * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def ppo_rollout(cfg: PPOConfig, model: PolicyAndValue, ref, tokenizer, rows: list[dict], prompt_ids: list[list[int]],
                reward, dist, kl_coef, prm: PRMScorer | None = None):
    """PPO's ``make_rollout(iteration, plan) -> (buffer, stats)`` for a RolloutStream: sample with the policy,
    score the buffer (log-probs and values, reference log-probs), shape the rewards with the KL penalty, GAE.
    ``kl_coef()`` is the KL coefficient of this rollout (the adaptive controller's state); ``prm`` pays its step
    scores at the steps' last tokens instead of the sequence's score at its last token."""
    T = cfg.temperature

    def make_rollout(iteration: int, plan):
        beta = kl_coef()
        idx = prompt_indices(len(rows), iteration, cfg.prompts_per_rollout, cfg.train.seed, dist.rank,
                             dist.world_size)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=T, n=cfg.num_generations,
                                seed=hash_seed(cfg.train.seed, iteration, dist.rank), compile=cfg.compile_generation)
        samples = sample_and_score(model.policy, tokenizer, [rows[i] for i in idx], [prompt_ids[i] for i in idx],
                                   params, reward)
        buffer = pack_rollout(samples.prompt_ids, samples.completion_ids, tokenizer.pad_id)
        logprobs, values, ref_logprobs = score_rollout(model, ref, buffer, plan(len(samples.completion_ids)), T,
                                                       dist.device, autocast_context(cfg.train, dist.device), cfg.pack)
        mask = buffer["response_mask"]
        kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * mask
        if prm is None:
            rewards = shaped_rewards(samples.rewards, kl, mask, beta)
        else:
            step_rewards, ends = process_rewards(prm, samples.prompt_ids, samples.completion_ids, samples.texts)
            rewards = -beta * kl * mask + process_token_rewards(step_rewards, ends, mask.shape[1]) * mask
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        buffer.update(old_logprobs=logprobs, old_values=values, returns=returns,
                      advantages=whiten(advantages, mask))
        stats = rollout_stats(cfg, samples, logprobs, ref_logprobs, kl, mask, beta, iteration)
        if prm is not None:
            stats["process/step_reward"] = mean_step_reward(step_rewards)
        kl_anomaly_check(iteration, stats)
        return buffer, stats
    return make_rollout


def score_rollout(model: PolicyAndValue, ref, buffer: dict, batches, temperature: float, device, autocast,
                  packed: bool = False):
    """(log-probs, values, reference log-probs) of the buffer's responses, in eval mode without gradients,
    scored in exactly the micro-batches the first epoch trains on."""
    def both(batch):
        logprobs, values = logprobs_and_values(model, batch, temperature)
        return {"logprobs": logprobs, "values": values}

    def reference(batch):
        return {"logprobs": policy_logprobs(ref, batch, temperature)}

    was_training = model.training
    model.eval()
    with torch.no_grad():
        scored = score_buffer(both, buffer, batches, device, autocast, packed)
        ref_logprobs = score_buffer(reference, buffer, batches, device, autocast, packed)["logprobs"]
    model.train(was_training)
    return scored["logprobs"], scored["values"], ref_logprobs


def rollout_stats(cfg: PPOConfig, samples, logprobs, ref_logprobs, kl, mask, beta: float, iteration: int) -> dict:
    """TRL's PPO rollout metrics (objective/kl, objective/entropy, objective/rlhf_reward, ...) and the next KL
    coefficient (kl_coef_next: the adaptive controller's step, or beta when it is fixed)."""
    scores = samples.rewards
    seq_kl = kl.sum(1).mean().item()
    non_score = (-beta * kl).sum(1).mean().item()
    stats = samples.stats(cfg.num_generations)
    if cfg.num_generations == 1:
        del stats["frac_reward_zero_std"]  # no groups to be flat
    eos = sum(f == "stop" for f in samples.finish_reasons)
    stats.update({"objective/kl": seq_kl, "objective/entropy": (-logprobs * mask).sum(1).mean().item(),
                  "objective/non_score_reward": non_score, "objective/scores": scores.mean().item(),
                  "objective/rlhf_reward": scores.mean().item() + non_score, "objective/kl_coef": beta,
                  "val/num_eos_tokens": float(eos), "kl_k1": masked_mean(logprobs - ref_logprobs, mask).item(),
                  "rollout": iteration + 1})
    stats["kl_coef_next"] = adaptive_kl_controller(beta, seq_kl, cfg.target_kl, len(scores), cfg.kl_horizon) \
        if cfg.adaptive_kl else beta
    return stats


def ppo_loss_fn(cfg: PPOConfig):
    """loss_fn(model, micro-batch) for the loop: clipped surrogate + vf_coef x clipped value loss (objectives/rl)."""
    def loss_fn(model, batch):
        logp, values = logprobs_and_values(model, batch, cfg.temperature)
        mask = batch["response_mask"]
        tokens = batch.get("loss_tokens")  # the step's token count: token-mean over the whole batch
        pg_loss, pm = ppo_policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask, cfg.clip_eps,
                                      num_tokens=tokens)
        vf_loss, vm = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, cfg.clip_value, tokens)
        stats = {k: v for k, v in batch["stats"].items() if k != "kl_coef_next"}
        return pg_loss + cfg.vf_coef * vf_loss, {
            **stats, "loss/policy_avg": pg_loss.detach(), "loss/value_avg": vf_loss.detach(),
            "policy/clipfrac_avg": pm["clipfrac"], "policy/approxkl_avg": pm["approx_kl"],
            "val/ratio": pm["ratio_mean"], "val/clipfrac_avg": vm["vf_clipfrac"], "val/vpred": vm["vpred"]}
    return loss_fn


def run_ppo(cfg: PPOConfig) -> dict:
    rl = start_rl_run(cfg)
    policy, tokenizer, out_dir, dist = rl.policy, rl.tokenizer, rl.out_dir, rl.dist
    critic = load_model_dir(critic_source(cfg), device=dist.device, num_labels=1)
    model = PolicyAndValue(policy, critic)
    prm = load_process_scorer(cfg.process_reward, tokenizer, dist.device, prefix=cfg.process_prefix) \
        if cfg.process_reward else None
    make_rollout = ppo_rollout(cfg, model, rl.ref, tokenizer, rl.rows, rl.prompt_ids, rl.reward, dist,
                               kl_coef=lambda: stream.stats.get("kl_coef_next", cfg.kl_coef), prm=prm)
    stream = RolloutStream(make_rollout, epochs=cfg.epochs, micro_batch_size=cfg.train.micro_batch_size,
                           seed=cfg.train.seed, resume_dir=rl.resume_dir,
                           accumulation=cfg.train.accumulation(dist.world_size), packed=cfg.pack)

    def save_model(path: Path):
        save_weights(model, str(path / "model.safetensors"))
        tokenizer.save(path)
        stream.save_buffer(path)

    result = train(model, ppo_loss_fn(cfg), stream, cfg.train, out_dir, save_model=save_model, eval_fn=rl.eval_fn,
                   dist=dist, tokens_per_batch_fn=batch_tokens, run_config=cfg,
                   description="ppo", eval_on_start=True)
    summary = {}
    if dist.is_main:
        summary = rl_summary(out_dir, result, "ppo", reward_key="objective/rlhf_reward")
        summary["critic_dir"] = str(save_model_dir(out_dir / "critic", critic, tokenizer))
    return finish_run(rl.run, summary, policy, tokenizer)


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, PPOConfig, prog="lmforge ppo", description=__doc__, default_recipe="tiny", section="ppo")
    summary = run_ppo(cfg)
    if summary:
        print_rl_summary(summary)
    return 0
