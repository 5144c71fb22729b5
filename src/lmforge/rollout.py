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

import ctypes
import ctypes.util
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from lmforge.answers import is_correct
from lmforge.data.packing import best_fit_pack
from lmforge.data.prompts import read_rl_prompts, render_prompt
from lmforge.environments import Episode, load_environment
from lmforge.errors import DataError
from lmforge.generation import Completion, SamplingParams, generate
from lmforge.model import set_packed_attention, unwrap
from lmforge.modelio import check_model_dir, load_model_and_tokenizer, load_model_dir
from lmforge.objectives.lm import chunked_token_logprobs
from lmforge.objectives.rl import (
    grpo_advantages,
    grpo_loss,
    informative_groups,
    kl_estimate,
    masked_mean,
    overlong_penalty,
    process_advantages,
    rloo_advantages,
)
from lmforge.prm import mean_step_reward, process_rewards
from lmforge.rewards import RewardInput, build_reward
from lmforge.scoring import to_device
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.dist import all_reduce_mean, gather_objects
from lmforge.train.loop import autocast_context, use_bf16
from lmforge.train.metrics import read_metrics
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

def pack_rollout(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                 masks: list[list[int]] | None = None) -> dict:
    """Rows [left-padded prompt | right-padded response] with masks and positions, on the CPU.

    Returns input_ids / attention_mask / position_ids (N, P + R), labels (N, R) (the response, -100 at
    padding), response_mask (N, R) float, prompt_len and response_len (N,). Positions count real tokens only,
    as in generation.left_pad, so a row's numbers do not depend on how much padding surrounds it. ``masks``
    (trajectories): per response token 1 for the model's, 0 for an environment's; those get label -100 and
    response_mask 0, so no loss, KL or log-prob is ever taken of text the model did not write.
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
            if masks is not None:
                labels[i, :len(c)][torch.tensor(masks[i], dtype=torch.bool).logical_not()] = -100
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels, "response_mask": (labels != -100).float(),
            "prompt_len": torch.tensor([len(p) for p in prompt_ids]),
            "response_len": torch.tensor([len(c) for c in completion_ids])}


def micro_batch(buffer: dict, idx: torch.Tensor, packed: bool = False) -> dict:
    """Rows ``idx`` of the buffer, trimmed to their longest prompt and response (less padding, same numbers);
    with ``packed``, their sequences packed into rows instead (:func:`packed_micro_batch`).

    Sequence tensors keep columns [P - longest prompt, P + longest response); per-token tensors (N, R) keep
    their first longest-response columns; per-row tensors (N,) are just indexed.
    """
    if packed:
        return packed_micro_batch(buffer, idx)
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


# ---- packed rollouts ----

def packed_micro_batch(buffer: dict, idx: torch.Tensor) -> dict:
    """Rows ``idx`` of the buffer with their sequences packed instead of padded: the same per-token and per-row
    tensors as :func:`micro_batch` ((n, r) labels, masks, log-probs, advantages, ...), but the model reads

        input_ids, position_ids, document_ids  (rows, width): each sequence's real prompt + response tokens, best-fit
                                               decreasing into rows as wide as the longest sequence; positions
                                               restart at 0 in each; document_ids keep attention inside a sequence
                                               (-1 on a row's padding tail); no attention_mask
        response_index                         (n, r): the flat (row * width + column) position whose output
                                               predicts each response token (:func:`response_columns` gathers it)

    A sequence's outputs are exactly its outputs alone (model.build_attention_mask), so the log-probs equal the
    padded path's up to float rounding; a micro-batch whose lengths differ costs fewer rows. One whose packed
    rows would compute no fewer tokens than the padded ones (even lengths) is returned padded instead: the
    document mask costs a little more than the padding mask (bench/bench_rl_pack.py).
    """
    P = buffer["input_ids"].shape[1] - buffer["labels"].shape[1]
    plen, rlen = buffer["prompt_len"][idx].tolist(), buffer["response_len"][idx].tolist()
    lengths = [p + q for p, q in zip(plen, rlen)]
    width, r = max(lengths), max(1, max(rlen))
    bins = best_fit_pack(lengths, width)
    if len(bins) * width >= len(idx) * (max(plen) + r):
        return micro_batch(buffer, idx)
    input_ids = torch.zeros((len(bins), width), dtype=torch.long)
    documents = torch.full((len(bins), width), -1, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    index = torch.zeros((len(idx), r), dtype=torch.long)
    for b, members in enumerate(bins):
        offset = 0
        for d, i in enumerate(members):
            row, p, q = int(idx[i]), plen[i], rlen[i]
            input_ids[b, offset:offset + p + q] = buffer["input_ids"][row, P - p:P + q]
            documents[b, offset:offset + p + q] = d
            positions[b, offset:offset + p + q] = torch.arange(p + q)
            index[i, :q] = b * width + offset + p - 1 + torch.arange(q)
            offset += p + q
    out = {k: (v[idx, :r] if v.dim() == 2 else v[idx]) for k, v in buffer.items() if k not in SEQUENCE_KEYS}
    out.update(input_ids=input_ids, position_ids=positions, document_ids=documents, response_index=index)
    return out


def row_inputs(batch: dict) -> dict:
    """The keyword arguments a micro-batch's forward takes besides input_ids: a padded batch's attention mask and
    positions, or a packed batch's positions and document ids."""
    if "document_ids" in batch:
        return {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"]}
    return {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens a micro-batch's forward reads, padded or packed (for tokens/s)."""
    if "document_ids" in batch:
        return int((batch["document_ids"] >= 0).sum())
    return int(batch["attention_mask"].sum())


def epoch_order(n: int, seed: int, iteration: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash_seed(seed, iteration, epoch))
    return torch.randperm(n, generator=g)


def hash_seed(*parts) -> int:
    return random.Random("/".join(map(str, parts))).randrange(2**62)


def epoch_micro_batches(n: int, micro_batch_size: int, seed: int, iteration: int, epoch: int) -> list[torch.Tensor]:
    return list(epoch_order(n, seed, iteration, epoch).split(micro_batch_size))


# ---- the one log-prob function ----

def response_columns(x: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, R, ...) per-position outputs (hidden states, values) at the positions that predict the response tokens:
    columns P-1 ... P+R-2 of a padded batch, the ``response_index`` positions of a packed one."""
    if "response_index" in batch:
        return x.reshape(-1, *x.shape[2:])[batch["response_index"]]
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
                                 temperature=temperature, return_entropy=entropy, chunk_size=256)
    scatter = lambda v: v.new_zeros(labels.shape).masked_scatter(keep, v)  # noqa: E731
    return (scatter(out[0]), scatter(out[1])) if entropy else scatter(out)


def policy_logprobs(model, batch: dict, temperature: float = 1.0, entropy: bool = False):
    """``response_logprobs`` of ``model`` (an lmforge Transformer, possibly DDP-wrapped) on a micro-batch: the one
    forward the rollout and the training step share (padding masked out, positions counting real tokens)."""
    hidden = model(batch["input_ids"], **row_inputs(batch), return_hidden=True)
    return response_logprobs(hidden, unwrap(model).lm_head.weight, batch, temperature, entropy)


@torch.no_grad()
def score_buffer(fn: Callable[[dict], dict[str, torch.Tensor]], buffer: dict, batches: list[torch.Tensor],
                 device, autocast=None, packed: bool = False) -> dict[str, torch.Tensor]:
    """Run ``fn(micro_batch) -> {name: (b, r) or (b,) tensor}`` over ``batches`` of buffer rows (padded, or
    ``packed``) and scatter the results back into (N, R) / (N,) CPU tensors (per-token ones zero-padded past each
    micro-batch's width)."""
    n, R = buffer["labels"].shape
    out: dict[str, torch.Tensor] = {}
    for idx in batches:
        with autocast if autocast is not None else nullcontext():
            results = fn(to_device(micro_batch(buffer, idx, packed), device))
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
    those. Each buffer is trained on for ``epochs`` shuffled passes of ``micro_batch_size`` rows. Every
    micro-batch carries the rollout's stats (a dict of floats) under "stats" so the loss function can report
    them with the step, and "loss_tokens": the response tokens of its whole optimizer step (its
    ``accumulation`` micro-batches on every process) divided by the number of micro-batches averaged into that
    step, so a token-mean loss divided by it weighs every token of the step alike (objectives.rl.aggregate_loss).
    ``packed``: micro-batches of packed sequences (:func:`packed_micro_batch`) instead of padded rows.

    State (JSON): iteration, epoch, position, stats; the buffer itself is written by :meth:`save_buffer` into
    the checkpoint directory and read back from ``resume_dir()`` by :meth:`load_state_dict`.
    """

    def __init__(self, make_rollout, *, epochs: int, micro_batch_size: int, seed: int,
                 resume_dir: Callable[[], Path | None] = lambda: None, on_rollout=None, accumulation: int = 1,
                 packed: bool = False):
        self.make_rollout, self.epochs, self.micro_batch_size, self.seed = make_rollout, epochs, micro_batch_size, seed
        self.resume_dir, self.on_rollout, self.accumulation = resume_dir, on_rollout, accumulation
        self.packed = packed
        self.whole_weights = nullcontext  # the loop's whole_weights under fsdp (train/loop.py lend_whole_weights)
        self.iteration, self.epoch, self.position = 0, 0, 0  # iteration = rollouts made so far
        self.buffer: dict | None = None
        self.stats: dict = {}
        self._batches: list[torch.Tensor] = []
        self._step_tokens: list[float] = []
        self._buffers: list[dict | None] = []  # every rank's buffer, gathered by state_dict for save_buffer

    def __iter__(self):
        return self

    def _plan(self, iteration: int, epoch: int) -> None:
        n = self.buffer["labels"].shape[0] if self.buffer is not None else 0
        self._batches = epoch_micro_batches(n, self.micro_batch_size, self.seed, iteration, epoch)
        self._step_tokens = step_token_counts(self.buffer["response_mask"], self._batches, self.accumulation)

    def next_buffer(self) -> None:
        """Roll out buffer number ``iteration`` (the stage's make_rollout) and plan its first epoch."""
        iteration = self.iteration
        with self.whole_weights():  # fsdp: the loop gathers the current policy for the rollout (train/loop.py)
            self.buffer, self.stats = self.make_rollout(iteration, lambda n: epoch_micro_batches(
                n, self.micro_batch_size, self.seed, iteration, 0))
        if self.on_rollout is not None:
            self.on_rollout(self.iteration, self.stats)
        self.iteration += 1
        self.epoch, self.position = 0, 0
        self._plan(self.iteration - 1, 0)

    def __next__(self) -> dict:
        if self.buffer is None or self.epoch >= self.epochs:
            self.next_buffer()
        idx = self._batches[self.position]
        batch = micro_batch(self.buffer, idx, self.packed)
        batch["stats"] = {k: torch.tensor(float(v)) for k, v in self.stats.items()}
        batch["loss_tokens"] = torch.tensor(self._step_tokens[self.position // self.accumulation])
        self.position += 1
        if self.position == len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            if self.epoch < self.epochs:
                self._plan(self.iteration - 1, self.epoch)
        return batch

    def state_dict(self) -> dict:
        """The position (JSON). Every rank calls it for a checkpoint (train/checkpointing.py), before rank 0 runs
        save_model: under torchrun it also gathers every rank's buffer (each rank rolled out its own rows), which
        :meth:`save_buffer` then writes."""
        self._buffers = gather_objects(self.buffer)
        return {"iteration": self.iteration, "epoch": self.epoch, "position": self.position,
                "stats": dict(self.stats), "has_buffer": self.buffer is not None}

    def save_buffer(self, directory: Path) -> None:
        """The buffer into ``directory``: one process's as is, rank r's under "rank{r}." in a multi-process run."""
        buffers = self._buffers or [self.buffer]
        if len(buffers) == 1:
            tensors = dict(buffers[0] or {})
        else:
            tensors = {f"rank{r}.{k}": v for r, b in enumerate(buffers) for k, v in (b or {}).items()}
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(directory) / BUFFER_FILE))

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.epoch, self.position = state["iteration"], state["epoch"], state["position"]
        self.stats = dict(state["stats"])
        self.buffer = None
        if state["has_buffer"]:
            directory = self.resume_dir()
            if directory is None or not (Path(directory) / BUFFER_FILE).exists():
                raise FileNotFoundError(f"resuming mid-rollout needs {BUFFER_FILE} in the checkpoint "
                                        f"({directory}), and it is missing")
            self.buffer = own_buffer(load_file(str(Path(directory) / BUFFER_FILE)))
            if self.epoch < self.epochs:
                self._plan(self.iteration - 1, self.epoch)


def own_buffer(tensors: dict) -> dict:
    """This rank's rows of a saved rollout buffer (save_buffer: "rank{r}."-prefixed under torchrun)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    prefix = f"rank{rank}."
    mine = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    if not mine and any(k.startswith("rank") and "." in k for k in tensors):
        raise FileNotFoundError(f"{BUFFER_FILE} holds no rows for rank {rank}: resume with the number of "
                                "processes that wrote it")
    return mine or tensors


def step_token_counts(response_mask: torch.Tensor, batches: list[torch.Tensor], accumulation: int) -> list[float]:
    """Per optimizer step of an epoch's micro-batches (``accumulation`` consecutive ones each): the step's
    response tokens over every process, divided by accumulation x processes (the micro-batches the loop
    averages). One all-reduce per epoch; every process plans its epochs at the same points, so they meet."""
    local = [float(response_mask[idx].sum()) for idx in batches]
    steps = torch.tensor([sum(local[i:i + accumulation]) for i in range(0, len(local), accumulation)],
                         dtype=torch.float64)
    return (all_reduce_mean(steps) / accumulation).tolist() if len(steps) else []


# ---- sampling and scoring ----

class Samples:
    """N = prompts x n completions (a prompt's n contiguous) with their rewards (and, when the engine returned
    them, the sampler's own log-probs of each token)."""

    def __init__(self, rows, prompt_ids, completions, rewards, parts):
        self.rows, self.prompt_ids = rows, prompt_ids
        self.completion_ids = [c.token_ids for c in completions]
        self.texts = [c.text if c.text is not None else " ".join(map(str, c.token_ids)) for c in completions]
        self.finish_reasons = [c.finish_reason for c in completions]
        self.logprobs = [c.logprobs for c in completions] if completions and completions[0].logprobs is not None \
            else None
        self.rewards, self.parts = rewards, parts
        self.masks: list[list[int]] | None = None  # trajectories: 1 = the model's token, 0 = the environment's

    def stats(self, group_size: int) -> dict[str, float]:
        """TRL's rollout metrics: reward (mean), reward_std, frac_reward_zero_std, completions/*, rewards/NAME/mean."""
        lengths = torch.tensor([float(len(c)) for c in self.completion_ids])
        zero_std = ~informative_groups(self.rewards, group_size)
        out = {"reward": self.rewards.mean().item(),
               "reward_std": self.rewards.std().item() if len(self.rewards) > 1 else 0.0,
               "frac_reward_zero_std": zero_std.float().mean().item(),
               "completions/mean_length": lengths.mean().item(),
               "completions/max_length": lengths.max().item(),
               "completions/clipped_ratio": sum(f == "length" for f in self.finish_reasons) / len(lengths)}
        out.update({f"rewards/{name}/mean": v.mean().item() for name, v in self.parts.items()})
        return out

    def take(self, rows: list[int]) -> Samples:
        """The samples at ``rows`` (in that order), as a new Samples."""
        out = Samples.__new__(Samples)
        for name in ("rows", "prompt_ids", "completion_ids", "texts", "finish_reasons"):
            setattr(out, name, [getattr(self, name)[i] for i in rows])
        out.logprobs = None if self.logprobs is None else [self.logprobs[i] for i in rows]
        out.masks = None if self.masks is None else [self.masks[i] for i in rows]
        index = torch.tensor(rows, dtype=torch.long)
        out.rewards, out.parts = self.rewards[index], {k: v[index] for k, v in self.parts.items()}
        return out

    def extend(self, other: Samples) -> Samples:
        """Append ``other``'s samples (same reward parts) in place; returns self."""
        for name in ("rows", "prompt_ids", "completion_ids", "texts", "finish_reasons"):
            getattr(self, name).extend(getattr(other, name))
        if self.logprobs is not None and other.logprobs is not None:
            self.logprobs.extend(other.logprobs)
        else:
            self.logprobs = None
        if self.masks is not None:
            self.masks.extend(other.masks)
        self.rewards = torch.cat([self.rewards, other.rewards])
        self.parts = {k: torch.cat([v, other.parts[k]]) for k, v in self.parts.items()}
        return self


def sample_and_score(policy, tokenizer, rows: list[dict], prompt_ids: list[list[int]], params, reward,
                     outs: list[list[Completion]] | None = None) -> Samples:
    """Generate ``params.n`` completions per prompt with the policy (eval mode), unless ``outs`` holds them
    already (generated ahead), and score them with ``reward``.

    Non-finite rewards are an error naming the reward, never a silent NaN in the advantages.
    """
    if outs is None:
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


def sample_trajectories(policy, tokenizer, rows: list[dict], prompt_ids: list[list[int]], params: SamplingParams,
                        env_cls, env_name: str, max_env_steps: int = 16) -> Samples:
    """``params.n`` episodes per prompt, a fresh ``env_cls`` each (environments.py): the model takes a turn (until
    end-of-turn, EOS or one of the environment's stop strings), the environment answers it, and so on until it
    says done or the episode's ``params.max_new_tokens`` (the model's and the environment's tokens together) run
    out ("length": the reward is what the steps gave so far). The completion is the whole trajectory after the
    prompt; ``masks`` marks the model's tokens (1) and the environment's (0: never trained on); the reward is
    the sum of the episode's step rewards (the part "env"). Each turn is one batched generate call over the
    episodes still running, seeded from (params.seed, turn)."""
    N, budget_total = len(rows) * params.n, params.max_new_tokens
    reps = [(i, row, ids) for i, (row, ids) in enumerate(zip(rows, prompt_ids)) for _ in range(params.n)]
    episodes = [Episode(env_cls, env_name, row, i, max_env_steps) for i, row, _ in reps]
    encode = (lambda t: tokenizer.encode(t)) if tokenizer is not None else (lambda t: [])  # noqa: E731
    completion = [encode(e.first)[:budget_total] for e in episodes]
    masks = [[0] * len(c) for c in completion]
    logprobs = [[0.0] * len(c) for c in completion]
    rewards, finish = [0.0] * N, ["length"] * N
    active, turn = list(range(N)), 0
    while active := [j for j in active if len(completion[j]) < budget_total]:
        budget = {j: budget_total - len(completion[j]) for j in active}
        seed = None if params.seed is None else hash_seed(params.seed, "turn", turn)
        turn_params = replace(params, n=1, max_new_tokens=max(budget.values()), seed=seed,
                              stop_strings=episodes[0].stop_strings)
        with eval_mode(policy):
            outs = generate(policy, [reps[j][2] + completion[j] for j in active], turn_params, tokenizer=tokenizer,
                            pad_id=tokenizer.pad_id if tokenizer is not None else 0)
        still = []
        for j, (out,) in zip(active, outs):
            ids = out.token_ids[:budget[j]]
            completion[j] += ids
            masks[j] += [1] * len(ids)
            logprobs[j] += (out.logprobs or [0.0] * len(ids))[:len(ids)]
            if out.finish_reason == "length" or len(out.token_ids) > budget[j]:
                continue  # out of tokens mid-turn: the episode is cut where it is
            text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""
            observation, reward, done = episodes[j].step(text)
            rewards[j] += reward
            if done:
                finish[j] = "stop"
                continue
            seen = encode(observation)[:budget_total - len(completion[j])]
            completion[j] += seen
            masks[j] += [0] * len(seen)
            logprobs[j] += [0.0] * len(seen)
            still.append(j)
        active, turn = still, turn + 1
    flat = [Completion(c, f, tokenizer.decode(c, skip_special_tokens=True) if tokenizer is not None else None, lp)
            for c, f, lp in zip(completion, finish, logprobs)]
    samples = Samples([r for _, r, _ in reps], [ids for _, _, ids in reps], flat, None, None)
    samples.logprobs = logprobs if params.return_logprobs else None
    total = torch.tensor(rewards)
    samples.rewards, samples.parts, samples.masks = total, {"env": total}, masks
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


# ---- GRPO / RLOO: the objective a config selects ----

# loss_type -> (clip_eps, clip_eps_high) when the config leaves them None. GSPO's ratio is a per-token geometric
# mean, hence its tiny range (Zheng et al. 2025); CISPO clips a weight, with no lower bound (MiniMax-M1).
OBJECTIVE_CLIPS = {"grpo": (0.2, None), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "cispo": (1.0, 4.0)}


@dataclass(frozen=True)
class Objective:
    """The GRPO family's objective as a config resolves it (:func:`resolve_objective`)."""
    loss_type: str  # grpo | dapo | gspo | cispo: the policy term (objectives.rl.grpo_loss)
    clip_low: float
    clip_high: float | None
    dynamic_sampling: bool  # drop groups whose rewards are all equal and sample more prompts (DAPO)
    max_refill_rounds: int
    overlong_buffer: int  # DAPO's soft overlong punishment over the last this-many tokens; 0 = off
    overlong_penalty: float
    tis_cap: float  # truncated importance sampling against the engine's log-probs; 0 = off


def resolve_objective(cfg) -> Objective:
    """The objective of a stages.grpo.GRPOConfig: its loss_type's defaults where the config says None
    (``loss_type=dapo`` is the whole of DAPO: clip-higher, dynamic sampling and overlong shaping)."""
    low, high = OBJECTIVE_CLIPS[cfg.loss_type]
    dapo = cfg.loss_type == "dapo"
    return Objective(
        cfg.loss_type, low if cfg.clip_eps is None else cfg.clip_eps,
        high if cfg.clip_eps_high is None else cfg.clip_eps_high,
        dapo if cfg.dynamic_sampling is None else cfg.dynamic_sampling, cfg.max_refill_rounds,
        (cfg.max_new_tokens // 4 if dapo else 0) if cfg.overlong_buffer is None else cfg.overlong_buffer,
        cfg.overlong_penalty, cfg.tis_cap)


def shape_rewards(samples: Samples, objective: Objective, max_new_tokens: int) -> Samples:
    """DAPO's overlong punishment added to the rewards (as the part "overlong"), when the objective has one."""
    if objective.overlong_buffer > 0:
        lengths = torch.tensor([len(c) for c in samples.completion_ids])
        penalty = overlong_penalty(lengths, max_new_tokens, objective.overlong_buffer)
        samples.parts = {**samples.parts, "overlong": penalty}
        samples.rewards = samples.rewards + objective.overlong_penalty * penalty
    return samples


def group_advantages(cfg, rewards: torch.Tensor) -> torch.Tensor:
    """RLOO's leave-one-out or GRPO's group-normalised advantages of a rollout's rewards (one per sample)."""
    if cfg.algorithm == "rloo":
        return rloo_advantages(rewards, cfg.num_generations)
    return grpo_advantages(rewards, cfg.num_generations, cfg.scale_rewards)


# ---- GRPO / RLOO: sampling groups (DAPO's dynamic sampling) ----

def draw_plan(cfg, objective: Objective, n_rows: int, iteration: int, r: int = 0, rank: int = 0,
              world_size: int = 1) -> tuple[list[int], SamplingParams]:
    """Round ``r`` of rollout ``iteration``: (prompt indices, SamplingParams), a pure function of its arguments, so
    a resumed run and a generation worker running ahead (async_rollout.py) draw exactly the same."""
    idx = prompt_indices(n_rows, iteration, cfg.prompts_per_rollout,
                         cfg.train.seed if r == 0 else f"{cfg.train.seed}/refill/{r}", rank, world_size)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=cfg.num_generations,
                            seed=hash_seed(cfg.train.seed, iteration, rank, *(("refill", r) if r else ())),
                            compile=cfg.compile_generation, return_logprobs=objective.tis_cap > 0,
                            logprobs_temperature=cfg.temperature)
    return idx, params


def sample_groups(cfg, objective: Objective, policy, tokenizer, rows: list[dict], prompt_ids: list[list[int]],
                  reward, iteration: int, rank: int = 0, world_size: int = 1,
                  env_cls=None, sampler=None) -> tuple[Samples, dict]:
    """The rollout's prompts_per_rollout groups of num_generations samples, scored and shaped, and their stats
    (with ``env_cls``, whole trajectories in cfg.environment: :func:`sample_trajectories`).

    With dynamic sampling (DAPO), groups whose rewards are all equal (zero advantage) are dropped and fresh
    prompts are drawn, up to ``max_refill_rounds`` more generate calls, until the batch is full; a batch still
    short is topped up with dropped groups (counted in dynamic_sampling/flat_groups). Every draw is a pure
    function of (seed, iteration, round, rank), so a resumed run draws the same. The stats (reward, ...) are the
    first round's, an unbiased sample of the policy; num_gen_batches counts the generate calls (verl's name).
    ``sampler`` (async_rollout.AheadSampler): the first round's completions were generated ahead, in a worker.
    """
    G, P = cfg.num_generations, cfg.prompts_per_rollout
    rounds = objective.max_refill_rounds + 1 if objective.dynamic_sampling else 1
    kept, flat, stats = None, [], {}
    for r in range(rounds):
        idx, params = draw_plan(cfg, objective, len(rows), iteration, r, rank, world_size)
        if env_cls is None:
            outs = sampler.completions(iteration) if sampler is not None and r == 0 else None  # generated ahead
            drawn = sample_and_score(policy, tokenizer, [rows[i] for i in idx], [prompt_ids[i] for i in idx], params,
                                     reward, outs)
        else:
            drawn = sample_trajectories(policy, tokenizer, [rows[i] for i in idx], [prompt_ids[i] for i in idx],
                                        params, env_cls, cfg.environment, cfg.max_env_steps)
        samples = shape_rewards(drawn, objective, cfg.max_new_tokens)
        if r == 0:
            stats = samples.stats(G)
        if not objective.dynamic_sampling:
            return samples, stats
        good = informative_groups(samples.rewards, G).tolist()
        chosen = samples.take([g * G + j for g, ok in enumerate(good) if ok for j in range(G)])
        kept = chosen if kept is None else kept.extend(chosen)
        flat += [(samples, g) for g, ok in enumerate(good) if not ok]
        if len(kept.rewards) >= P * G:
            break
    short = P - len(kept.rewards) // G
    for samples, g in flat[:max(short, 0)]:
        kept.extend(samples.take(list(range(g * G, (g + 1) * G))))
    stats.update({"num_gen_batches": float(r + 1), "dynamic_sampling/flat_groups": float(max(short, 0))})
    return kept.take(list(range(P * G))), stats


# ---- GRPO / RLOO: the rollout and the loss ----

def grpo_rollout(cfg, policy, ref, tokenizer, rows: list[dict], prompt_ids: list[list[int]], reward,
                 device, rank: int = 0, world_size: int = 1, prm=None, sampler=None):
    """GRPO's / RLOO's ``make_rollout(iteration, plan) -> (buffer, stats)`` for a RolloutStream (``cfg``: a
    stages.grpo.GRPOConfig): sample (sample_groups), old and reference log-probs, group-relative advantages.

    ``reward`` is a rewards.CombinedReward or any callable RewardInput -> (total, {name: part}); ``tokenizer``
    may be None (completions are then scored as space-joined token ids, prompts padded with 0). ``prm``: a
    prm.PRMScorer whose step scores give per-token advantages (process supervision) instead of ``reward``'s.
    ``sampler``: an async_rollout.AheadSampler generating ahead in a worker (cfg.rollout_staleness).
    """
    objective = resolve_objective(cfg)
    env_cls = load_environment(cfg.environment) if cfg.environment else None
    G, T = cfg.num_generations, cfg.temperature
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    # One optimizer step per rollout, one pass: every micro-batch is scored before any update, so the old
    # log-probs equal the training ones exactly and need no forward of their own (TRL does the same).
    one_update = cfg.epochs == 1 and cfg.train.batch_size == cfg.prompts_per_rollout * G * world_size

    def make_rollout(iteration: int, plan):
        release_freed_memory()  # the last step's gradients and activations, before generation packs its weights
        start = time.perf_counter()
        samples, stats = sample_groups(cfg, objective, policy, tokenizer, rows, prompt_ids, reward, iteration,
                                       rank, world_size, env_cls, sampler)
        generated = time.perf_counter()
        release_freed_memory()  # generation's packed weights and KV cache, before the forwards
        buffer = pack_rollout(samples.prompt_ids, samples.completion_ids, pad_id, samples.masks)
        if samples.logprobs is not None:
            buffer["rollout_logprobs"] = padded_rows(samples.logprobs, buffer["labels"].shape[1])
        batches = plan(len(samples.completion_ids))
        autocast = autocast_context(cfg.train, device)
        with torch.no_grad():
            if not one_update:  # else pi_old = pi exactly: the loss uses logp.detach() and skips this forward
                scored = score_buffer(policy_scores(policy, T, entropy=True), buffer, batches, device, autocast,
                                      cfg.pack)
                buffer["old_logprobs"], entropy = scored["logprobs"], scored["entropy"]
            buffer["ref_logprobs"] = reference_logprobs(ref, T, buffer, batches, device, autocast, cfg.pack)
        # verl's timing names: the generate calls and reward scoring (with a sampler, the wait for its worker),
        # then packing the buffer and the old and reference log-prob forwards; the step's whole time is the loop's
        # step_time
        stats["timing_s/gen"], stats["timing_s/ref"] = generated - start, time.perf_counter() - generated
        if prm is not None:
            step_rewards, ends = process_rewards(prm, samples.prompt_ids, samples.completion_ids, samples.texts)
            buffer["advantages"] = process_advantages(step_rewards, ends, G, buffer["labels"].shape[1])
            stats["process/step_reward"] = mean_step_reward(step_rewards)
        else:
            buffer["advantages"] = group_advantages(cfg, samples.rewards)
        mask = buffer["response_mask"]
        if not one_update:
            stats["entropy"] = masked_mean(entropy, mask).item()
            stats["kl_k1"] = masked_mean(kl_estimate(buffer["old_logprobs"], buffer["ref_logprobs"], "k1"), mask).item()
        stats["rollout"] = iteration + 1
        release_freed_memory()  # the scoring forwards', before training
        flat_batch_warning(iteration, stats, cfg.prompts_per_rollout)
        kl_anomaly_check(iteration, stats)
        return buffer, stats
    return make_rollout


class DiskReference:
    """A frozen reference model that stays in its model directory between uses (GRPOConfig.ref_offload).

    ``load()`` maps the directory's weights (safetensors, memory-mapped: load_model_dir) into a fresh eval-mode
    model for one rollout's reference forward; the caller drops it after, so its pages leave the process (they
    stay in the OS page cache, reclaimable, and the next load reads them back from there). The weights are the
    directory's, bit for bit, at every load, so the log-probs are those of a reference held in memory: what it
    saves is one model's weights of resident memory during generation and training, for one load per rollout
    (~0.3 s for 135M parameters from the page cache, on 2 CPU cores). A reference that moves (sync_ref_model)
    must stay in memory.
    """

    def __init__(self, path: str | Path, device, packed_attention: str = "auto"):
        self.path, self.device, self.packed_attention = path, device, packed_attention

    def load(self) -> torch.nn.Module:
        model = load_model_dir(self.path, device=self.device).eval().requires_grad_(False)
        set_packed_attention(model, self.packed_attention)
        return model


def reference_logprobs(ref, temperature: float, buffer: dict, batches: list[torch.Tensor], device, autocast,
                       packed: bool) -> torch.Tensor:
    """(N, R) log-probs of the buffer's responses under the reference: a module, or a :class:`DiskReference`
    loaded for this call only (released when it returns)."""
    model = ref.load() if isinstance(ref, DiskReference) else ref
    return score_buffer(policy_scores(model, temperature), buffer, batches, device, autocast, packed)["logprobs"]


def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or no C library to load)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def trim_before_embedding_backward(model) -> None:
    """Trim the C heap (release_freed_memory) at the end of every backward, just before the input embedding's.

    The embedding's gradient is the last to arrive, and a tied one (SmolLM2) is added to the head's as a dense
    (vocab x hidden) temporary: on top of every other gradient and of the freed activations of the recomputed
    blocks, still resident in the heap. That moment was the RL step's peak: bf16 GRPO on SmolLM2 went from 2,803
    to 2,679 MiB with this trim, at the same speed (bench/bench_grpo_smollm2.py, one run each). A hook on the
    embedding's output gradient; the gradient itself is unchanged."""
    def on_output(module, inputs, output):
        if output.requires_grad:
            output.register_hook(lambda grad: release_freed_memory())
    model.model.embed_tokens.register_forward_hook(on_output)


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; nothing where there is none).

    On CPU every tensor lives in the C allocator, and glibc keeps what is freed for reuse (tensors up to 32 MB
    come from its heap once a larger one was freed). An RL step's phases allocate differently shaped memory in
    turn (generation's packed weights and KV cache, the scoring forwards, the training activations and
    gradients), so memory one phase freed sat in the heap, resident, while the next phase's did not fit into it:
    on SmolLM2-135M GRPO (bench/bench_grpo_smollm2.py) 400-550 MB of free heap was resident at the peak. A trim
    between phases returns those pages (milliseconds); the next phase's allocations fault fresh ones in. The
    training forward gets one too (grpo_loss_fn): a gradient-checkpointed forward leaves ~300 MB of holes
    between the blocks' kept inputs, which the backward would otherwise stack its gradients on top of.
    """
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def padded_rows(values: list[list[float]], width: int) -> torch.Tensor:
    """(N, width) float tensor of ragged rows, zero-padded."""
    out = torch.zeros(len(values), width)
    for i, v in enumerate(values):
        if v:
            out[i, :len(v)] = torch.tensor(v)
    return out


def grpo_loss_fn(cfg):
    """loss_fn(model, micro-batch) -> (loss, metrics) for the loop: objectives/rl.py grpo_loss on the buffer, with
    the config's objective (loss_type, clip range, truncated IS) and the step's token count ("loss_tokens")."""
    objective = resolve_objective(cfg)

    def loss_fn(model, batch):
        old = batch.get("old_logprobs")
        if old is None:  # the rollout skipped the policy forward: entropy and k1 come from this one
            logp, entropy = policy_logprobs(model, batch, cfg.temperature, entropy=True)
        else:
            logp = policy_logprobs(model, batch, cfg.temperature)
        release_freed_memory()  # the forward's freed temporaries, before the backward allocates the gradients
        rollout = batch.get("rollout_logprobs") if objective.tis_cap > 0 else None
        loss, m = grpo_loss(logp, old, batch["ref_logprobs"], batch["advantages"], batch["response_mask"],
                            objective.clip_low, objective.clip_high, cfg.beta, cfg.loss_agg,
                            max_len=cfg.max_new_tokens, loss_type=objective.loss_type,
                            num_tokens=batch.get("loss_tokens"), rollout_logprobs=rollout, tis_cap=objective.tis_cap)
        metrics = {**batch["stats"], "kl": m["kl"], "clip_ratio": m["clipfrac"],
                   "clip_ratio/low_mean": m["clipfrac_low"], "clip_ratio/high_mean": m["clipfrac_high"],
                   "approx_kl": m["approx_kl"], "ratio_mean": m["ratio_mean"]}
        if "tis_weight" in m:
            metrics["tis_weight"] = m["tis_weight"]
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
    ref: torch.nn.Module | DiskReference  # frozen, eval mode (ref_offload: loaded per rollout)
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
        """The checkpoint a rerun resumes from (None: a fresh run, train.resume=false included, whatever the
        directory holds); RolloutStream reads its buffer from there, the rollout worker its jobs in flight."""
        return latest_checkpoint(self.out_dir / "checkpoints") if self.run.cfg.train.resume else None


def start_rl_run(cfg) -> RLRun:
    """The set-up GRPO and PPO share: runs.start_run (distributed init, out_dir with the resolved config.yaml, the
    seed), policy + frozen reference + tokenizer, training and eval prompts encoded as SFT trained
    (render_prompt), answers checked against the rewards, the reward, and the greedy eval function.

    ``cfg`` is a stage config with out_dir, model, ref_model, data (RLDataConfig), rewards, max_new_tokens,
    compile_generation and train (train.loop.TrainConfig).
    """
    run = start_run(cfg)
    dist = run.dist
    policy, ref, tokenizer = load_policy_and_ref(cfg.model, cfg.ref_model, dist.device, cfg.train.packed_attention,
                                                 offload=getattr(cfg, "ref_offload", False))  # grpo's; ppo's stays
    sample_as_trained(policy, cfg.train, dist.device)
    if dist.device.type == "cpu":
        trim_before_embedding_backward(policy)
    rows, prompt_ids, eval_rows, eval_ids = load_rl_data(cfg.data, tokenizer)
    check_answers(rows + eval_rows, cfg.rewards)
    reward = build_reward(cfg.rewards, pad_id=tokenizer.pad_id, device=dist.device)
    environment = getattr(cfg, "environment", "")  # grpo's; ppo has none
    env = (load_environment(environment), environment, cfg.max_env_steps) if environment else None
    eval_fn = make_eval_fn(policy, tokenizer, eval_rows, eval_ids, reward, cfg.max_new_tokens,
                           compile=cfg.compile_generation, env=env) if eval_rows else None
    return RLRun(run, policy, ref, tokenizer, rows, prompt_ids, eval_rows, eval_ids, reward, eval_fn)


def sample_as_trained(policy, train_cfg, device) -> None:
    """Under bf16 training (train.dtype, see train.loop.use_bf16) the policy's CPU rollouts multiply in bf16 too
    (``Transformer.decode_matmul_dtype``: cpu_decode packs bf16 weights, fp32 activations); fp32 otherwise."""
    if hasattr(policy, "decode_matmul_dtype"):
        policy.decode_matmul_dtype = torch.bfloat16 if use_bf16(train_cfg, device) else None


def load_policy_and_ref(policy_dir: str, ref_dir: str, device, packed_attention: str = "auto",
                        offload: bool = False):
    """(policy, frozen reference, tokenizer); the reference is the policy's directory unless ``ref_dir``, with
    its attention set to ``packed_attention`` (the loop sets the policy's), and with ``offload`` a
    :class:`DiskReference` on it (loaded for each reference forward) instead of a model."""
    policy, tokenizer = load_model_and_tokenizer(policy_dir, device)
    if offload:
        path = check_model_dir(ref_dir or policy_dir)
        return policy, DiskReference(path, policy.lm_head.weight.device, packed_attention), tokenizer
    ref = load_model_and_tokenizer(ref_dir or policy_dir, device)[0].requires_grad_(False)
    set_packed_attention(ref, packed_attention)
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
                 compile: bool = False, env=None):
    """eval/accuracy (when rows have answers), eval/mean_length and eval/reward of greedy completions
    (``compile``: with the torch.compile'd decode step, generation.SamplingParams.compile); with ``env``
    (class, name, step limit), of greedy trajectories in that environment, eval/reward being its reward."""
    def eval_fn(_model=None) -> dict:
        if not eval_rows:
            return {}
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, compile=compile)
        samples = []
        for s in range(0, len(eval_rows), batch_size):
            rows, ids = eval_rows[s:s + batch_size], eval_ids[s:s + batch_size]
            samples.append(sample_and_score(policy, tokenizer, rows, ids, params, reward) if env is None
                           else sample_trajectories(policy, tokenizer, rows, ids, params, *env))
        texts = [t for x in samples for t in x.texts]
        lengths = [len(c) for x in samples for c in x.completion_ids]
        out = {"eval/mean_length": sum(lengths) / len(lengths),
               "eval/reward": sum(float(x.rewards.sum()) for x in samples) / len(texts)}
        if all(r["answer"] is not None for r in eval_rows):
            out["eval/accuracy"] = sum(is_correct(t, r["answer"]) for t, r in zip(texts, eval_rows)) / len(texts)
        return out
    return eval_fn
