"""``lmforge grpo``: group-relative policy optimisation (or RLOO) with verifiable / model rewards.

Each RL iteration: take ``prompts_per_rollout`` prompts, sample ``num_generations`` completions each, score
them (rewards.py), turn the scores into advantages within each prompt's group

    GRPO (Shao et al. 2024)   A_i = (r_i - mean_group r) / (std_group r + eps)   (scale_rewards: group|batch|none)
    RLOO (Ahmadian et al. 2024) A_i = r_i - mean_{j != i} r_j                     (algorithm: rloo)

then optimise the clipped-ratio objective with an optional k3 KL penalty to the frozen reference (beta) for
``epochs`` passes over the buffer through the one training loop (objectives/rl.py grpo_loss). A group whose
rewards are all equal has zero advantage and teaches nothing: the share of such groups is logged every step
(frac_reward_zero_std) and a rollout where every group is flat prints a warning.

``sync_ref_model: true`` moves the reference towards the policy every ``ref_model_sync_steps`` optimizer steps,
theta_ref <- alpha * theta + (1 - alpha) * theta_ref with alpha = ``ref_model_mixup_alpha`` (1: a copy; TR-DPO,
train/reference.py); a rollout's reference log-probs are the reference's at that rollout.

``environment: calculator`` (or feedback, or a user's ``module:Class``; environments.py) runs GRPO over whole
multi-turn trajectories: the environment answers each model turn (a tool result, feedback), its text is masked
out of the loss, and its reward is the episode's.

``compare_beta: [0.0, 0.1]`` runs the whole stage once per beta (into out_dir/beta_<b>) and plots completion
length and accuracy against step for each: the reward-hacking experiment of recipes/reward_hacking.yaml.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from lmforge.async_rollout import AheadSampler, GenerationWorker
from lmforge.atomic import write_atomic
from lmforge.config import parse_cli
from lmforge.figures import save_figure
from lmforge.modelio import write_model_files
from lmforge.prm import load_process_scorer
from lmforge.rewards import RewardSpec
from lmforge.rollout import (
    RLDataConfig,
    RolloutStream,
    batch_tokens,
    draw_plan,
    grpo_loss_fn,
    grpo_rollout,
    print_rl_summary,
    resolve_objective,
    rl_summary,
    start_rl_run,
)
from lmforge.train.loop import TrainConfig, train
from lmforge.train.metrics import read_metrics
from lmforge.train.reference import ReferenceSync, check_sync_options
from lmforge.train.runs import finish_run, log


@dataclass
class GRPOConfig:
    out_dir: str = "runs/tiny/grpo"
    model: str = "runs/tiny/sft/model"  # the policy to start from (a model directory)
    ref_model: str = ""  # frozen reference for the KL term; empty = the starting policy
    algorithm: Literal["grpo", "rloo"] = "grpo"
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(kind="math")])
    prompts_per_rollout: int = 8  # per process
    num_generations: int = 8  # G: completions per prompt (a group)
    epochs: int = 1  # passes over each rollout buffer (TRL's num_iterations); > 1 makes the clipping matter
    max_new_tokens: int = 64
    temperature: float = 1.0
    beta: float = 0.04  # KL(pi || pi_ref) coefficient (k3 estimator, in the loss); 0 = no KL anchor (DAPO has none)
    # the policy term: grpo (token clip) | dapo (clip-higher + dynamic sampling + overlong shaping) | gspo (one
    # length-normalised ratio per sequence) | cispo (clipped stop-gradient IS weights); objectives/rl.py grpo_loss
    loss_type: Literal["grpo", "dapo", "gspo", "cispo"] = "grpo"
    clip_eps: float | None = None  # lower clip; None = the loss type's (grpo/dapo 0.2, gspo 3e-4, cispo 1 = none)
    clip_eps_high: float | None = None  # upper clip; None = the loss type's (grpo clip_eps, dapo 0.28, gspo 4e-4,
    #                                     cispo 4)
    dynamic_sampling: bool | None = None  # drop zero-variance groups, sample more prompts; None = on for dapo
    max_refill_rounds: int = 3  # dynamic sampling: extra generate calls per rollout, at most
    overlong_buffer: int | None = None  # DAPO soft overlong punishment over the last N tokens; None = dapo:
    #                                     max_new_tokens // 4, else 0 (off)
    overlong_penalty: float = 1.0  # its weight (the penalty reaches -overlong_penalty at max_new_tokens)
    tis_cap: float = 0.0  # > 0: truncated importance sampling against the engine's own log-probs, capped here
    scale_rewards: Literal["group", "batch", "none"] = "group"  # "none" = Dr. GRPO
    # token-mean: every token of an optimizer step weighs the same, across micro-batches and processes (DAPO);
    # bnpo: each micro-batch's token mean (TRL's bnpo); seq-mean-token-mean: original GRPO; dr_grpo
    loss_agg: Literal["token-mean", "bnpo", "seq-mean-token-sum", "seq-mean-token-mean", "dr_grpo"] = "token-mean"
    compare_beta: list[float] = field(default_factory=list)  # run once per beta and plot length + accuracy
    sync_ref_model: bool = False  # the reference follows the policy (TR-DPO; TRL's names): every
    ref_model_sync_steps: int = 64  # this many optimizer steps,
    ref_model_mixup_alpha: float = 0.6  # theta_ref <- alpha * theta + (1 - alpha) * theta_ref (1 = a hard copy)
    # a multi-turn / tool environment (environments.py): calculator | feedback | package.module:Class |
    # file.py:Class; empty = single-turn completions scored by `rewards`. Its reward replaces `rewards`; its
    # observations are masked out of the loss; eval runs greedy episodes in it
    environment: str = ""
    max_env_steps: int = 16  # an episode not done after this many environment steps is an error
    pack: bool = True  # packed rollouts (document masks) instead of padded rows in the policy/reference forwards
    # asynchronous rollouts (async_rollout.py): 0 = each rollout is generated, in this process, by the weights that
    # then train on it; s >= 1 = a worker process generates rollout k+s while the policy trains on rollout k
    # (s steps off-policy, as verl / prime-rl; pair it with tis_cap to correct for the stale sampler)
    rollout_staleness: int = 0
    rollout_threads: int = 1  # the worker's CPU threads (it generates on the CPU)
    process_reward: str = ""  # a PRM directory (or "checker": the thinking world's step checker): process supervision
    process_prefix: str = "<think>\n"  # what the PRM reads before the first step (as it trained)
    compile_generation: bool = False  # torch.compile the rollouts' decode step: 10-40 s of warm-up on 2 cores
    # recompute each block's activations in the backward instead of keeping them (the same loss and gradients,
    # less peak memory, one more forward per step); honoured by Transformer.forward when training
    gradient_checkpointing: bool = False
    # keep the frozen reference in its model directory, memory-mapped for each rollout's reference forward and
    # released after (rollout.DiskReference): the same log-probs, one model's weights less resident memory during
    # generation and training, one load per rollout (~0.3 s at 135M); not with sync_ref_model (it moves)
    ref_offload: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, warmup_steps=0, schedule="constant",
                                                                   max_steps=100, batch_size=64,
                                                                   micro_batch_size=16, weight_decay=0.0,
                                                                   eval_every=20, save_every=50, log_every=1))

    def validate(self) -> None:
        rows = self.prompts_per_rollout * self.num_generations
        checks = [(self.num_generations >= 2, "num_generations must be >= 2 (advantages are relative to a group)"),
                  (self.prompts_per_rollout >= 1 and self.epochs >= 1, "prompts_per_rollout and epochs must be >= 1"),
                  (self.max_new_tokens >= 1 and self.temperature > 0, "max_new_tokens must be >= 1, temperature > 0"),
                  (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
                  (self.max_refill_rounds >= 0 and self.overlong_penalty >= 0 and self.tis_cap >= 0,
                   "max_refill_rounds, overlong_penalty and tis_cap must be >= 0"),
                  (self.max_env_steps >= 1, f"max_env_steps must be >= 1, got {self.max_env_steps}"),
                  (self.rollout_staleness >= 0 and self.rollout_threads >= 1,
                   "rollout_staleness must be >= 0 and rollout_threads >= 1"),
                  (not (self.rollout_staleness and self.environment),
                   "rollout_staleness > 0 does not run environments yet (multi-turn episodes generate in-process)"),
                  (self.overlong_buffer is None or 0 <= self.overlong_buffer < self.max_new_tokens,
                   f"overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens})"),
                  (not (self.ref_offload and self.sync_ref_model),
                   "ref_offload keeps the reference on disk, so it cannot follow the policy (sync_ref_model)"),
                  (rows % self.train.batch_size == 0,
                   f"train.batch_size ({self.train.batch_size}) must divide prompts_per_rollout x num_generations "
                   f"= {rows} (every optimizer step uses rows of one rollout)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_sync_options(self)


def run_grpo(cfg: GRPOConfig) -> dict:
    """Train (or resume) and return a summary; with ``compare_beta`` run once per beta and plot."""
    if cfg.compare_beta:
        return run_beta_comparison(cfg)

    rl = start_rl_run(cfg)
    policy, tokenizer, out_dir, dist = rl.policy, rl.tokenizer, rl.out_dir, rl.dist
    policy.gradient_checkpointing = cfg.gradient_checkpointing
    prm = None
    if cfg.process_reward:
        prm = load_process_scorer(cfg.process_reward, tokenizer, dist.device, prefix=cfg.process_prefix)
    sampler = ahead_sampler(cfg, rl)
    stream = RolloutStream(grpo_rollout(cfg, policy, rl.ref, tokenizer, rl.rows, rl.prompt_ids, rl.reward,
                                        dist.device, dist.rank, dist.world_size, prm=prm, sampler=sampler),
                           epochs=cfg.epochs, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                           resume_dir=rl.resume_dir, accumulation=cfg.train.accumulation(dist.world_size),
                           packed=cfg.pack)
    data = stream
    if cfg.sync_ref_model:
        data = ReferenceSync(stream, rl.ref, policy, every=cfg.ref_model_sync_steps, alpha=cfg.ref_model_mixup_alpha,
                             accumulation=cfg.train.accumulation(dist.world_size), resume_dir=rl.resume_dir)

    def save_model(path: Path):
        write_model_files(path, policy, tokenizer)
        stream.save_buffer(path)
        if data is not stream:
            data.save(path)
        if sampler is not None:
            sampler.save(path)

    try:
        result = train(policy, grpo_loss_fn(cfg), data, cfg.train, out_dir, save_model=save_model,
                       eval_fn=rl.eval_fn, dist=dist, tokens_per_batch_fn=batch_tokens,
                       run_config=cfg, description=cfg.algorithm, eval_on_start=True)
    finally:
        if sampler is not None:
            sampler.close()
    summary = rl_summary(out_dir, result, cfg.algorithm) if dist.is_main else {}
    return finish_run(rl.run, summary, policy, tokenizer)


def ahead_sampler(cfg: GRPOConfig, rl) -> AheadSampler | None:
    """cfg.rollout_staleness > 0: a worker process generating each rollout's first round ahead of training
    (draw_plan: the same prompts and seeds the in-process loop would use), resumed from the newest checkpoint."""
    if cfg.rollout_staleness == 0:
        return None
    if rl.dist.world_size > 1:
        raise ValueError("rollout_staleness > 0 runs in one process for now (a worker beside it); under torchrun "
                         "use rollout_staleness=0")
    objective = resolve_objective(cfg)

    def job(k: int):
        idx, params = draw_plan(cfg, objective, len(rl.rows), k)
        return [rl.prompt_ids[i] for i in idx], params

    steps_per_rollout = cfg.epochs * cfg.prompts_per_rollout * cfg.num_generations // cfg.train.batch_size
    sampler = AheadSampler(GenerationWorker(rl.policy, rl.tokenizer, cfg.rollout_threads), rl.policy,
                           cfg.rollout_staleness, job, last=math.ceil(cfg.train.max_steps / steps_per_rollout) - 1)
    sampler.load(rl.resume_dir())
    return sampler


def run_beta_comparison(cfg: GRPOConfig) -> dict:
    """The stage once per beta in ``compare_beta`` (out_dir/beta_<b>), then length and accuracy vs step (PNG)."""
    out_dir = Path(cfg.out_dir)
    runs = {}
    for beta in cfg.compare_beta:
        sub = replace(cfg, beta=beta, compare_beta=[], out_dir=str(out_dir / f"beta_{beta:g}"))
        log(f"== {cfg.algorithm} with beta = {beta:g} -> {sub.out_dir}")
        runs[beta] = run_grpo(sub)
    plot = plot_runs({f"beta={b:g}": out_dir / f"beta_{b:g}" for b in cfg.compare_beta}, out_dir / "length_accuracy.png")
    summary = {"runs": {f"beta={b:g}": s for b, s in runs.items()}, "plot": str(plot)}
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def plot_runs(runs: dict[str, Path], path: Path) -> Path:
    """Completion length and eval accuracy vs step, one line per run (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("completions/mean_length", "rollout completion length (tokens)"),
              ("eval/accuracy", "eval accuracy (greedy)"), ("kl", "KL(pi || pi_ref) (k3, per token)")]
    for label, run_dir in runs.items():
        rows = read_metrics(run_dir)
        for ax, (key, title) in zip(axes, panels):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, markersize=3, label=label)
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
    axes[0].legend()
    return save_figure(fig, path, dpi=110)


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, GRPOConfig, prog="lmforge grpo", description=__doc__, default_recipe="tiny", section="grpo")
    summary = run_grpo(cfg)
    if summary:
        print_rl_summary(summary)
    return 0
