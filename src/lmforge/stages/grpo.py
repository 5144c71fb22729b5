"""``lmforge grpo``: group-relative policy optimisation (or RLOO) with verifiable / model rewards.

Each RL iteration: take ``prompts_per_rollout`` prompts, sample ``num_generations`` completions each, score
them (rewards.py), turn the scores into advantages within each prompt's group

    GRPO (Shao et al. 2024)   A_i = (r_i - mean_group r) / (std_group r + eps)   (scale_rewards: group|batch|none)
    RLOO (Ahmadian et al. 2024) A_i = r_i - mean_{j != i} r_j                     (algorithm: rloo)

then optimise the clipped-ratio objective with an optional k3 KL penalty to the frozen reference (beta) for
``epochs`` passes over the buffer through the one training loop (objectives/rl.py grpo_loss). A group whose
rewards are all equal has zero advantage and teaches nothing: the share of such groups is logged every step
(frac_reward_zero_std) and a rollout where every group is flat prints a warning.

``compare_beta: [0.0, 0.1]`` runs the whole stage once per beta (into out_dir/beta_<b>) and plots completion
length and accuracy against step for each: the reward-hacking experiment of recipes/reward_hacking.yaml.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from lmforge.rewards import RewardSpec
from lmforge.train.loop import TrainConfig


@dataclass
class RLDataConfig:
    source: str = "builtin:tinyworld/rl"  # .jsonl(.gz) of {"prompt", "answer"} or builtin:tinyworld/rl
    prompt_field: str = "prompt"  # a string, or a list of chat messages (TRL's conversational prompt)
    answer_field: str = "answer"
    eval_source: str = "builtin:tinyworld/eval"  # greedy accuracy / length / reward every train.eval_every; "" = none
    eval_size: int = 64  # eval prompts used (the first ones)
    system_prompt: str = ""
    chat_template: bool = True  # render prompts with the chat template and an open assistant turn


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
    beta: float = 0.04  # KL(pi || pi_ref) coefficient (k3 estimator, in the loss); 0 = no KL anchor
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO clip-higher; None = clip_eps
    scale_rewards: Literal["group", "batch", "none"] = "group"  # "none" = Dr. GRPO
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "dr_grpo"] = "token-mean"
    compare_beta: list[float] = field(default_factory=list)  # run once per beta and plot length + accuracy
    process_reward: str = ""  # a PRM directory: process supervision (per-step advantages) instead of outcome
    process_prefix: str = "<think>\n"  # what the PRM reads before the first step (as it trained)
    compile_generation: bool = False  # torch.compile the rollouts' decode step: 10-40 s of warm-up on 2 cores
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
                  (rows % self.train.batch_size == 0,
                   f"train.batch_size ({self.train.batch_size}) must divide prompts_per_rollout x num_generations "
                   f"= {rows} (every optimizer step uses rows of one rollout)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---- pieces shared with ppo.py ----

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def flat_batch_warning(iteration: int, stats: dict, groups: int) -> None:
    if stats["frac_reward_zero_std"] >= 1.0:
        log(f"WARNING rollout {iteration + 1}: all {groups} groups got equal rewards (mean {stats['reward']:.3f}): "
            "every advantage is zero and nothing is learnt from this batch. Raise num_generations or temperature, "
            "or use prompts of a difficulty the policy sometimes solves")


def kl_anomaly_check(iteration: int, stats: dict) -> None:
    if not math.isfinite(stats.get("kl_k1", 0.0)):
        raise FloatingPointError(f"rollout {iteration + 1}: non-finite log-probabilities (policy or reference)")
    if stats.get("kl_k1", 0.0) < -0.05:
        log(f"WARNING rollout {iteration + 1}: the KL(pi || pi_ref) estimate is negative ({stats['kl_k1']:.3f} "
            "nats/token): the samples do not follow the policy being scored (check the sampling settings)")


def save_summary(out_dir: Path, summary: dict) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def first_and_last(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return (values[0], values[-1]) if values else (None, None)


# ---- GRPO / RLOO ----

def grpo_rollout(cfg: GRPOConfig, policy, ref, tokenizer, rows: list[dict], prompt_ids: list[list[int]], reward,
                 device, rank: int = 0, world_size: int = 1, prm=None):
    """The stage's ``make_rollout(iteration, plan) -> (buffer, stats)`` for a RolloutStream.

    ``reward`` is a rewards.CombinedReward or any callable RewardInput -> (total, {name: part}); ``tokenizer``
    may be None (completions are then scored as space-joined token ids, prompts padded with 0). ``prm``: a
    prm.PRMScorer whose step scores give per-token advantages (process supervision) instead of ``reward``'s.
    """
    import torch

    from lmforge.generation import SamplingParams
    from lmforge.objectives.rl import grpo_advantages, kl_estimate, masked_mean, rloo_advantages
    from lmforge.rollout import (
        hash_seed,
        pack_rollout,
        policy_scores,
        prompt_indices,
        sample_and_score,
        score_buffer,
    )
    from lmforge.train.loop import autocast_context

    G, T = cfg.num_generations, cfg.temperature
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    # One optimizer step per rollout, one pass: every micro-batch is scored before any update, so the old
    # log-probs equal the training ones exactly and need no forward of their own (TRL does the same).
    one_update = cfg.epochs == 1 and cfg.train.batch_size == cfg.prompts_per_rollout * G * world_size

    def make_rollout(iteration: int, plan):
        idx = prompt_indices(len(rows), iteration, cfg.prompts_per_rollout, cfg.train.seed, rank, world_size)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=T, n=G,
                                seed=hash_seed(cfg.train.seed, iteration, rank), compile=cfg.compile_generation)
        samples = sample_and_score(policy, tokenizer, [rows[i] for i in idx], [prompt_ids[i] for i in idx],
                                   params, reward)
        buffer = pack_rollout(samples.prompt_ids, samples.completion_ids, pad_id)
        batches = plan(len(samples.completion_ids))
        autocast = autocast_context(cfg.train, device)
        with torch.no_grad():
            if not one_update:  # else pi_old = pi exactly: the loss uses logp.detach() and skips this forward
                scored = score_buffer(policy_scores(policy, T, entropy=True), buffer, batches, device, autocast)
                buffer["old_logprobs"], entropy = scored["logprobs"], scored["entropy"]
            buffer["ref_logprobs"] = score_buffer(policy_scores(ref, T), buffer, batches, device, autocast)["logprobs"]
        if prm is not None:
            from lmforge.objectives.rl import process_advantages
            from lmforge.prm import process_rewards

            step_rewards, ends = process_rewards(prm, samples.prompt_ids, samples.completion_ids, samples.texts)
            buffer["advantages"] = process_advantages(step_rewards, ends, G, buffer["labels"].shape[1])
        elif cfg.algorithm == "rloo":
            buffer["advantages"] = rloo_advantages(samples.rewards, G)
        else:
            buffer["advantages"] = grpo_advantages(samples.rewards, G, cfg.scale_rewards)
        mask = buffer["response_mask"]
        stats = samples.stats(G)
        if prm is not None:
            stats["process/step_reward"] = sum(map(sum, step_rewards)) / max(sum(map(len, step_rewards)), 1)
        if not one_update:
            stats["entropy"] = masked_mean(entropy, mask).item()
            stats["kl_k1"] = masked_mean(kl_estimate(buffer["old_logprobs"], buffer["ref_logprobs"], "k1"), mask).item()
        stats["rollout"] = iteration + 1
        flat_batch_warning(iteration, stats, len(idx))
        kl_anomaly_check(iteration, stats)
        return buffer, stats
    return make_rollout


def grpo_loss_fn(cfg: GRPOConfig):
    """loss_fn(model, micro-batch) -> (loss, metrics) for the loop: objectives/rl.py grpo_loss on the buffer."""
    from lmforge.objectives.rl import grpo_loss, masked_mean
    from lmforge.rollout import policy_logprobs

    def loss_fn(model, batch):
        old = batch.get("old_logprobs")
        if old is None:  # the rollout skipped the policy forward: entropy and k1 come from this one
            logp, entropy = policy_logprobs(model, batch, cfg.temperature, entropy=True)
        else:
            logp = policy_logprobs(model, batch, cfg.temperature)
        loss, m = grpo_loss(logp, old, batch["ref_logprobs"], batch["advantages"], batch["response_mask"],
                            cfg.clip_eps, cfg.clip_eps_high, cfg.beta, cfg.loss_agg, max_len=cfg.max_new_tokens)
        metrics = {**batch["stats"], "kl": m["kl"], "clip_ratio": m["clipfrac"], "approx_kl": m["approx_kl"],
                   "ratio_mean": m["ratio_mean"]}
        if old is None:
            mask = batch["response_mask"]
            metrics["entropy"] = masked_mean(entropy, mask)
            metrics["kl_k1"] = masked_mean(logp.detach() - batch["ref_logprobs"], mask)
        return loss, metrics
    return loss_fn


def run_grpo(cfg: GRPOConfig) -> dict:
    """Train (or resume) and return a summary; with ``compare_beta`` run once per beta and plot."""
    from lmforge.train.dist import refuse_fsdp

    refuse_fsdp(cfg.train, "grpo")
    if cfg.compare_beta:
        return run_beta_comparison(cfg)
    from lmforge.modelio import save_model_dir, write_model_files
    from lmforge.rollout import RolloutStream, start_rl_run
    from lmforge.train.loop import train

    run = start_rl_run(cfg)
    policy, tokenizer, out_dir, dist = run.policy, run.tokenizer, run.out_dir, run.dist
    prm = None
    if cfg.process_reward:
        from lmforge.modelio import load_model_dir
        from lmforge.prm import PRMScorer

        prm = PRMScorer(load_model_dir(cfg.process_reward, device=dist.device, num_labels=1).eval(), tokenizer,
                        prefix=cfg.process_prefix)
    stream = RolloutStream(grpo_rollout(cfg, policy, run.ref, tokenizer, run.rows, run.prompt_ids, run.reward,
                                        dist.device, dist.rank, dist.world_size, prm=prm),
                           epochs=cfg.epochs, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                           resume_dir=run.resume_dir)

    def save_model(path: Path):
        write_model_files(path, policy, tokenizer)
        stream.save_buffer(path)

    run.log_start_eval()
    result = train(policy, grpo_loss_fn(cfg), stream, cfg.train, out_dir, save_model=save_model,
                   eval_fn=run.eval_fn, dist=dist, tokens_per_batch_fn=lambda b: int(b["attention_mask"].sum()),
                   run_config=cfg, description=cfg.algorithm)
    summary = {}
    if dist.is_main:
        save_model_dir(out_dir / "model", policy, tokenizer)
        summary = rl_summary(out_dir, result, run.t0, cfg.algorithm)
        save_summary(out_dir, summary)
    return summary


def rl_summary(out_dir: Path, result, t0: float, algorithm: str, reward_key: str = "reward") -> dict:
    from lmforge.train.metrics import read_metrics

    metrics = read_metrics(out_dir)
    summary = {"algorithm": algorithm, "steps": result.step, "seconds": round(time.time() - t0, 1),
               "model_dir": str(out_dir / "model")}
    for key in (reward_key, "eval/accuracy", "eval/mean_length", "eval/reward", "completions/mean_length"):
        first, last = first_and_last(metrics, key)
        if first is not None:
            summary[f"{key} first"], summary[f"{key} last"] = first, last
    return summary


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
    save_summary(out_dir, summary)
    return summary


def plot_runs(runs: dict[str, Path], path: Path) -> Path:
    """Completion length and eval accuracy vs step, one line per run (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.train.metrics import read_metrics

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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    runs = summary.get("runs", {"": summary})
    table = Table(title="RL summary")
    table.add_column("run")
    table.add_column("metric")
    table.add_column("first", justify="right")
    table.add_column("last", justify="right")
    for name, s in runs.items():
        for key in [k.removesuffix(" first") for k in s if k.endswith(" first")]:
            table.add_row(name, key, f"{s[key + ' first']:.3f}", f"{s[key + ' last']:.3f}")
    console = Console()
    console.print(table)
    for name, s in runs.items():
        console.print(f"{name + ': ' if name else ''}{s.get('steps')} steps in {s.get('seconds')} s -> {s.get('model_dir')}")
    if "plot" in summary:
        console.print(f"plot: {summary['plot']}")


def main(argv: list[str]) -> int:
    from lmforge.config import parse_cli

    cfg = parse_cli(argv, GRPOConfig, prog="lmforge grpo", description=__doc__, default_recipe="tiny", section="grpo")
    summary = run_grpo(cfg)
    if summary:
        print_summary(summary)
    return 0
