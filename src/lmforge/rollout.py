"""The rollout phase shared by the on-policy algorithms (GRPO, RLOO, PPO), and the stream that feeds it to the loop.

    prompts --generate n each--> completions --rewards--> scores
            --pack--> one buffer: [left-padded prompt | right-padded response] rows + masks
            --the same forward as training, in eval mode, no grad--> old log-probs (policy), ref log-probs, values
            --the stage--> advantages

and then ``epochs`` passes over the buffer in shuffled micro-batches through train/loop.train, whose data
iterator is a :class:`RolloutStream`: when the buffer is used up it rolls out again with the current policy.

Log-probabilities are computed by ONE function, :func:`response_logprobs`, on micro-batches cut by ONE
function, :func:`micro_batch`; the rollout scores the buffer in exactly the micro-batches the first epoch
will train on, so the first optimizer step sees a ratio pi/pi_old of exactly 1 (no silent off-policy drift
from different padding or batch shapes). The buffer being optimised is saved in every checkpoint
(rollout.safetensors), so resuming mid-iteration continues on the very same samples.

:func:`start_rl_run` is the set-up both stages share (models, prompts, reward, eval, out_dir, resume point).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from lmforge.answers import is_correct
from lmforge.data.prompts import read_rl_prompts, render_prompt
from lmforge.errors import DataError
from lmforge.generation import SamplingParams, generate
from lmforge.model import unwrap
from lmforge.modelio import load_model_and_tokenizer
from lmforge.objectives.lm import chunked_token_logprobs
from lmforge.objectives.rl import (
    grpo_advantages,
    grpo_loss,
    kl_estimate,
    masked_mean,
    process_advantages,
    rloo_advantages,
)
from lmforge.prm import process_rewards
from lmforge.rewards import RewardInput, build_reward
from lmforge.scoring import to_device
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.loop import autocast_context
from lmforge.train.metrics import MetricsLogger, read_metrics
from lmforge.train.runs import Run, log, start_run

SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids")  # (N, P + R) tensors
BUFFER_FILE = "rollout.safetensors"


# ---- prompts ----

def prompt_text(prompt) -> str:
    """The user's words: the string itself, or the last message's content."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def prompt_indices(n_rows: int, iteration: int, per_rollout: int, seed: int, rank: int = 0,
                   world_size: int = 1) -> list[int]:
    """The prompts of rollout ``iteration`` on ``rank``: a walk through seeded per-epoch shuffles of the data,
    a pure function of its arguments (so a resumed run draws exactly what the uninterrupted one would)."""
    out = []
    start = (iteration * world_size + rank) * per_rollout
    for k in range(start, start + per_rollout):
        epoch, pos = divmod(k, n_rows)
        order = list(range(n_rows))
        random.Random(f"{seed}/prompts/{epoch}").shuffle(order)
        out.append(order[pos])
    return out


# ---- the buffer ----

def pack_rollout(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> dict:
    """Rows [left-padded prompt | right-padded response] with masks and positions, on the CPU.

    Returns input_ids / attention_mask / position_ids (N, P + R), labels (N, R) (the response, -100 at
    padding), response_mask (N, R) float, prompt_len and response_len (N,). Positions count real tokens only,
    as in generation.left_pad, so a row's numbers do not depend on how much padding surrounds it.
    """
    n = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(c) for c in completion_ids))
    input_ids = torch.full((n, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, P + R), dtype=torch.long)
    labels = torch.full((n, R), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(c)] = 1
        if c:
            input_ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            labels[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels, "response_mask": (labels != -100).float(),
            "prompt_len": torch.tensor([len(p) for p in prompt_ids]),
            "response_len": torch.tensor([len(c) for c in completion_ids])}


def micro_batch(buffer: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of the buffer, trimmed to their longest prompt and response (less padding, same numbers).

    Sequence tensors keep columns [P - longest prompt, P + longest response); per-token tensors (N, R) keep
    their first longest-response columns; per-row tensors (N,) are just indexed.
    """
    P = buffer["input_ids"].shape[1] - buffer["labels"].shape[1]
    p = int(buffer["prompt_len"][idx].max())
    r = max(1, int(buffer["response_len"][idx].max()))
    out = {}
    for k, v in buffer.items():
        if k in SEQUENCE_KEYS:
            out[k] = v[idx, P - p:P + r]
        elif v.dim() == 2:
            out[k] = v[idx, :r]
        else:
            out[k] = v[idx]
    return out


def epoch_order(n: int, seed: int, iteration: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash_seed(seed, iteration, epoch))
    return torch.randperm(n, generator=g)


def hash_seed(*parts) -> int:
    return random.Random("/".join(map(str, parts))).randrange(2**62)


def epoch_micro_batches(n: int, micro_batch_size: int, seed: int, iteration: int, epoch: int) -> list[torch.Tensor]:
    return list(epoch_order(n, seed, iteration, epoch).split(micro_batch_size))


# ---- the one log-prob function ----

def response_columns(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """The columns of per-position outputs (hidden states, values) that predict the response tokens: P-1 ... P+R-2."""
    R = batch["labels"].shape[1]
    return x[:, -R - 1:-1]


def response_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, batch: dict, temperature: float = 1.0,
                      entropy: bool = False):
    """(B, R) fp32 log pi(response token | prefix) at the sampling temperature, 0 at padding; with ``entropy``
    also the (B, R) entropy of pi there (no gradient).

    hidden: the policy's final hidden states over the whole row (B, P + R, D); head_weight: its lm_head weight.
    Only real response tokens go through the head, in chunks (objectives.lm.chunked_token_logprobs): prompt
    and padding positions cost nothing, and no (tokens x vocab) logits are held. Used by the rollout (old and
    reference log-probs) and by the training losses alike.
    """
    labels = batch["labels"]
    keep = labels != -100
    out = chunked_token_logprobs(response_columns(hidden, batch)[keep], head_weight, labels[keep],
                                 temperature=temperature, return_entropy=entropy)
    scatter = lambda v: v.new_zeros(labels.shape).masked_scatter(keep, v)  # noqa: E731
    return (scatter(out[0]), scatter(out[1])) if entropy else scatter(out)


def policy_logprobs(model, batch: dict, temperature: float = 1.0, entropy: bool = False):
    """``response_logprobs`` of ``model`` (an lmforge Transformer, possibly DDP-wrapped) on a micro-batch: the one
    forward the rollout and the training step share (padding masked out, positions counting real tokens)."""
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   return_hidden=True)
    return response_logprobs(hidden, unwrap(model).lm_head.weight, batch, temperature, entropy)


@torch.no_grad()
def score_buffer(fn: Callable[[dict], dict[str, torch.Tensor]], buffer: dict, batches: list[torch.Tensor],
                 device, autocast=None) -> dict[str, torch.Tensor]:
    """Run ``fn(micro_batch) -> {name: (b, r) or (b,) tensor}`` over ``batches`` of buffer rows and scatter the
    results back into (N, R) / (N,) CPU tensors (per-token ones zero-padded past each micro-batch's width)."""
    n, R = buffer["labels"].shape
    out: dict[str, torch.Tensor] = {}
    for idx in batches:
        with autocast if autocast is not None else nullcontext():
            results = fn(to_device(micro_batch(buffer, idx), device))
        for k, v in results.items():
            v = v.detach().float().cpu()
            if k not in out:
                out[k] = torch.zeros((n, R) if v.dim() == 2 else (n,))
            if v.dim() == 2:
                out[k][idx, :v.shape[1]] = v
            else:
                out[k][idx] = v
    return out


def policy_scores(model, temperature: float = 1.0, entropy: bool = False):
    """A ``score_buffer`` function: {"logprobs"} (+ "entropy" per token) of the responses under ``model``."""
    def fn(batch):
        if not entropy:
            return {"logprobs": policy_logprobs(model, batch, temperature)}
        logprobs, ent = policy_logprobs(model, batch, temperature, entropy=True)
        return {"logprobs": logprobs, "entropy": ent}
    return fn


class eval_mode:
    """Models in eval mode (no dropout) inside, back to their previous mode after."""

    def __init__(self, *models):
        self.models = [m for m in models if m is not None]

    def __enter__(self):
        self.modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.models, self.modes):
            m.train(mode)


# ---- the stream the training loop reads ----

class RolloutStream:
    """Micro-batches for train/loop.train that roll out a fresh buffer whenever the last one is used up.

    make_rollout(iteration, plan) -> (buffer, stats): the stage's rollout (generate, score, old/ref log-probs,
    advantages); ``plan(n)`` gives the first epoch's micro-batches of an n-row buffer, to score it in exactly
    those. Each buffer is trained on for ``epochs``
    shuffled passes of ``micro_batch_size`` rows. Every micro-batch carries the rollout's stats (a dict of
    floats) under "stats" so the loss function can report them with the step.

    State (JSON): iteration, epoch, position, stats; the buffer itself is written by :meth:`save_buffer` into
    the checkpoint directory and read back from ``resume_dir()`` by :meth:`load_state_dict`.
    """

    def __init__(self, make_rollout, *, epochs: int, micro_batch_size: int, seed: int,
                 resume_dir: Callable[[], Path | None] = lambda: None, on_rollout=None):
        self.make_rollout, self.epochs, self.micro_batch_size, self.seed = make_rollout, epochs, micro_batch_size, seed
        self.resume_dir, self.on_rollout = resume_dir, on_rollout
        self.iteration, self.epoch, self.position = 0, 0, 0  # iteration = rollouts made so far
        self.buffer: dict | None = None
        self.stats: dict = {}
        self._batches: list[torch.Tensor] = []

    def __iter__(self):
        return self

    def _plan(self, iteration: int, epoch: int) -> list[torch.Tensor]:
        n = self.buffer["labels"].shape[0] if self.buffer is not None else 0
        return epoch_micro_batches(n, self.micro_batch_size, self.seed, iteration, epoch)

    def __next__(self) -> dict:
        if self.buffer is None or self.epoch >= self.epochs:
            iteration = self.iteration
            self.buffer, self.stats = self.make_rollout(iteration, lambda n: epoch_micro_batches(
                n, self.micro_batch_size, self.seed, iteration, 0))
            if self.on_rollout is not None:
                self.on_rollout(self.iteration, self.stats)
            self.iteration += 1
            self.epoch, self.position = 0, 0
            self._batches = self._plan(self.iteration - 1, 0)
        idx = self._batches[self.position]
        batch = micro_batch(self.buffer, idx)
        batch["stats"] = {k: torch.tensor(float(v)) for k, v in self.stats.items()}
        self.position += 1
        if self.position == len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            if self.epoch < self.epochs:
                self._batches = self._plan(self.iteration - 1, self.epoch)
        return batch

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "epoch": self.epoch, "position": self.position,
                "stats": dict(self.stats), "has_buffer": self.buffer is not None}

    def save_buffer(self, directory: Path) -> None:
        if self.buffer is not None:
            save_file({k: v.contiguous() for k, v in self.buffer.items()}, str(Path(directory) / BUFFER_FILE))

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.epoch, self.position = state["iteration"], state["epoch"], state["position"]
        self.stats = dict(state["stats"])
        self.buffer = None
        if state["has_buffer"]:
            directory = self.resume_dir()
            if directory is None or not (Path(directory) / BUFFER_FILE).exists():
                raise FileNotFoundError(f"resuming mid-rollout needs {BUFFER_FILE} in the checkpoint "
                                        f"({directory}), and it is missing")
            self.buffer = load_file(str(Path(directory) / BUFFER_FILE))
            if self.epoch < self.epochs:
                self._batches = self._plan(self.iteration - 1, self.epoch)


# ---- sampling and scoring ----

class Samples:
    """N = prompts x n completions (a prompt's n contiguous) with their rewards."""

    def __init__(self, rows, prompt_ids, completions, rewards, parts):
        self.rows, self.prompt_ids = rows, prompt_ids
        self.completion_ids = [c.token_ids for c in completions]
        self.texts = [c.text if c.text is not None else " ".join(map(str, c.token_ids)) for c in completions]
        self.finish_reasons = [c.finish_reason for c in completions]
        self.rewards, self.parts = rewards, parts

    def stats(self, group_size: int) -> dict[str, float]:
        """TRL's rollout metrics: reward (mean), reward_std, frac_reward_zero_std, completions/*, rewards/NAME/mean."""
        lengths = torch.tensor([float(len(c)) for c in self.completion_ids])
        groups = self.rewards.reshape(-1, group_size)
        zero_std = (groups.max(1).values - groups.min(1).values).abs() < 1e-8
        out = {"reward": self.rewards.mean().item(),
               "reward_std": self.rewards.std().item() if len(self.rewards) > 1 else 0.0,
               "frac_reward_zero_std": zero_std.float().mean().item(),
               "completions/mean_length": lengths.mean().item(),
               "completions/max_length": lengths.max().item(),
               "completions/clipped_ratio": sum(f == "length" for f in self.finish_reasons) / len(lengths)}
        out.update({f"rewards/{name}/mean": v.mean().item() for name, v in self.parts.items()})
        return out


def sample_and_score(policy, tokenizer, rows: list[dict], prompt_ids: list[list[int]], params, reward) -> Samples:
    """Generate ``params.n`` completions per prompt with the policy (eval mode) and score them with ``reward``.

    Non-finite rewards are an error naming the reward, never a silent NaN in the advantages.
    """
    with eval_mode(policy):
        outs = generate(policy, prompt_ids, params, tokenizer=tokenizer,
                        pad_id=tokenizer.pad_id if tokenizer is not None else 0)
    n = params.n
    flat = [c for row in outs for c in row]
    rep_rows = [r for r in rows for _ in range(n)]
    rep_ids = [p for p in prompt_ids for _ in range(n)]
    samples = Samples(rep_rows, rep_ids, flat, None, None)
    total, parts = reward(RewardInput(prompts=[prompt_text(r["prompt"]) for r in rep_rows],
                                      completions=samples.texts, answers=[r.get("answer") for r in rep_rows],
                                      prompt_ids=rep_ids, completion_ids=samples.completion_ids,
                                      finish_reasons=samples.finish_reasons))
    for name, v in parts.items():
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise ValueError(f"reward {name!r} gave {bad} non-finite values (NaN/inf) out of {len(v)}")
    samples.rewards, samples.parts = total.float(), parts
    return samples


# ---- the RL stages' data, checks and summary ----

@dataclass
class RLDataConfig:
    source: str = "builtin:tinyworld/rl"  # .jsonl(.gz) of {"prompt", "answer"} or builtin:tinyworld/rl
    prompt_field: str = "prompt"  # a string, or a list of chat messages (TRL's conversational prompt)
    answer_field: str = "answer"
    eval_source: str = "builtin:tinyworld/eval"  # greedy accuracy / length / reward every train.eval_every; "" = none
    eval_size: int = 64  # eval prompts used (the first ones)
    system_prompt: str = ""
    chat_template: bool = True  # render prompts with the chat template and an open assistant turn


def flat_batch_warning(iteration: int, stats: dict, groups: int) -> None:
    """A warning when every group of a rollout got equal rewards: all advantages are zero, nothing is learnt."""
    if stats["frac_reward_zero_std"] >= 1.0:
        log(f"WARNING rollout {iteration + 1}: all {groups} groups got equal rewards (mean {stats['reward']:.3f}): "
            "every advantage is zero and nothing is learnt from this batch. Raise num_generations or temperature, "
            "or use prompts of a difficulty the policy sometimes solves")


def kl_anomaly_check(iteration: int, stats: dict) -> None:
    """Non-finite log-probabilities are an error; a clearly negative KL estimate (samples that do not follow the
    policy being scored) a warning."""
    if not math.isfinite(stats.get("kl_k1", 0.0)):
        raise FloatingPointError(f"rollout {iteration + 1}: non-finite log-probabilities (policy or reference)")
    if stats.get("kl_k1", 0.0) < -0.05:
        log(f"WARNING rollout {iteration + 1}: the KL(pi || pi_ref) estimate is negative ({stats['kl_k1']:.3f} "
            "nats/token): the samples do not follow the policy being scored (check the sampling settings)")


def first_and_last(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return (values[0], values[-1]) if values else (None, None)


def rl_summary(out_dir: Path, result, algorithm: str, reward_key: str = "reward") -> dict:
    """algorithm, steps, and the first and last value of the reward and eval curves in out_dir/metrics.jsonl."""
    metrics = read_metrics(out_dir)
    summary = {"algorithm": algorithm, "steps": result.step}
    for key in (reward_key, "eval/accuracy", "eval/mean_length", "eval/reward", "completions/mean_length"):
        first, last = first_and_last(metrics, key)
        if first is not None:
            summary[f"{key} first"], summary[f"{key} last"] = first, last
    return summary


def print_rl_summary(summary: dict) -> None:
    """The first and last value of every reward / eval curve of an RL summary (or of each run of a comparison)."""
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


# ---- GRPO / RLOO ----

def grpo_rollout(cfg, policy, ref, tokenizer, rows: list[dict], prompt_ids: list[list[int]], reward,
                 device, rank: int = 0, world_size: int = 1, prm=None):
    """GRPO's / RLOO's ``make_rollout(iteration, plan) -> (buffer, stats)`` for a RolloutStream (``cfg``: a
    stages.grpo.GRPOConfig): sample, score, old and reference log-probs, group-relative advantages.

    ``reward`` is a rewards.CombinedReward or any callable RewardInput -> (total, {name: part}); ``tokenizer``
    may be None (completions are then scored as space-joined token ids, prompts padded with 0). ``prm``: a
    prm.PRMScorer whose step scores give per-token advantages (process supervision) instead of ``reward``'s.
    """
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


def grpo_loss_fn(cfg):
    """loss_fn(model, micro-batch) -> (loss, metrics) for the loop: objectives/rl.py grpo_loss on the buffer."""
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


# ---- the run set-up the RL stages share ----

@dataclass
class RLRun:
    """What an RL stage (GRPO / RLOO, PPO) starts from; made by :func:`start_rl_run`."""
    run: Run  # runs.start_run's: config, process group (device, rank, is_main), out_dir, start time
    policy: torch.nn.Module  # trained
    ref: torch.nn.Module  # frozen, eval mode
    tokenizer: object
    rows: list[dict]  # training prompts (read_rl_prompts rows) and their encoded ids
    prompt_ids: list[list[int]]
    eval_rows: list[dict]  # the first data.eval_size eval prompts (none: [])
    eval_ids: list[list[int]]
    reward: object  # rewards.CombinedReward
    eval_fn: Callable[..., dict] | None  # greedy eval/accuracy, eval/mean_length, eval/reward; None without eval rows

    @property
    def dist(self):
        return self.run.dist

    @property
    def out_dir(self) -> Path:
        return self.run.out_dir

    def resume_dir(self) -> Path | None:
        """The checkpoint a rerun resumes from (None: a fresh run); RolloutStream reads its buffer from there."""
        return latest_checkpoint(self.out_dir / "checkpoints")

    def log_start_eval(self) -> None:
        """The eval metrics at step 0 (the starting point of every curve), on a fresh run, on the main process."""
        if self.eval_fn is not None and self.dist.is_main and self.resume_dir() is None:
            MetricsLogger(self.out_dir, tensorboard=False).log(0, self.eval_fn())


def start_rl_run(cfg) -> RLRun:
    """The set-up GRPO and PPO share: runs.start_run (distributed init, out_dir with the resolved config.yaml, the
    seed), policy + frozen reference + tokenizer, training and eval prompts encoded as SFT trained
    (render_prompt), answers checked against the rewards, the reward, and the greedy eval function.

    ``cfg`` is a stage config with out_dir, model, ref_model, data (RLDataConfig), rewards, max_new_tokens,
    compile_generation and train (train.loop.TrainConfig).
    """
    run = start_run(cfg)
    dist = run.dist
    policy, ref, tokenizer = load_policy_and_ref(cfg.model, cfg.ref_model, dist.device)
    rows, prompt_ids, eval_rows, eval_ids = load_rl_data(cfg.data, tokenizer)
    check_answers(rows + eval_rows, cfg.rewards)
    reward = build_reward(cfg.rewards, pad_id=tokenizer.pad_id, device=dist.device)
    eval_fn = make_eval_fn(policy, tokenizer, eval_rows, eval_ids, reward, cfg.max_new_tokens,
                           compile=cfg.compile_generation) if eval_rows else None
    return RLRun(run, policy, ref, tokenizer, rows, prompt_ids, eval_rows, eval_ids, reward, eval_fn)


def load_policy_and_ref(policy_dir: str, ref_dir: str, device):
    """(policy, frozen reference, tokenizer); the reference is the policy's directory unless ``ref_dir``."""
    policy, tokenizer = load_model_and_tokenizer(policy_dir, device)
    ref = load_model_and_tokenizer(ref_dir or policy_dir, device)[0].requires_grad_(False)
    return policy, ref, tokenizer


def load_rl_data(cfg, tokenizer) -> tuple[list[dict], list[list[int]], list[dict], list[list[int]]]:
    """(train rows, their rendered prompt ids, eval rows, their ids) for an RLDataConfig."""
    rows = read_rl_prompts(cfg.source, cfg.prompt_field, cfg.answer_field)
    eval_rows = read_rl_prompts(cfg.eval_source, cfg.prompt_field, cfg.answer_field)[:cfg.eval_size] \
        if cfg.eval_source and cfg.eval_size > 0 else []

    def ids(rs):
        return [render_prompt(tokenizer, r["prompt"], cfg.system_prompt, cfg.chat_template) for r in rs]
    return rows, ids(rows), eval_rows, ids(eval_rows)


def check_answers(rows: list[dict], rewards) -> None:
    if any(r.kind == "math" for r in rewards):
        missing = next((r for r in rows if r["answer"] is None), None)
        if missing is not None:
            raise DataError(f"{missing['where']}: the math reward needs an 'answer' field")


def make_eval_fn(policy, tokenizer, eval_rows, eval_ids, reward, max_new_tokens: int, batch_size: int = 64,
                 compile: bool = False):
    """eval/accuracy (when rows have answers), eval/mean_length and eval/reward of greedy completions
    (``compile``: with the torch.compile'd decode step, generation.SamplingParams.compile)."""
    def eval_fn(_model=None) -> dict:
        if not eval_rows:
            return {}
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, compile=compile)
        samples = []
        for s in range(0, len(eval_rows), batch_size):
            samples.append(sample_and_score(policy, tokenizer, eval_rows[s:s + batch_size],
                                            eval_ids[s:s + batch_size], params, reward))
        texts = [t for x in samples for t in x.texts]
        lengths = [len(c) for x in samples for c in x.completion_ids]
        out = {"eval/mean_length": sum(lengths) / len(lengths),
               "eval/reward": sum(float(x.rewards.sum()) for x in samples) / len(texts)}
        if all(r["answer"] is not None for r in eval_rows):
            out["eval/accuracy"] = sum(is_correct(t, r["answer"]) for t, r in zip(texts, eval_rows)) / len(texts)
        return out
    return eval_fn
