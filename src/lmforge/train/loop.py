"""The one training loop. Every stage (pretrain, SFT, reward model, DPO, PPO, GRPO) brings a model, a stream of
batches and a loss function

    loss_fn(model, batch) -> (loss, metrics)

and :func:`train` does the rest: gradient accumulation, clipping, the learning-rate schedule, bf16 autocast on
GPU, optional torch.compile, DDP or FSDP2 under torchrun, NaN/inf guards, periodic evaluation, metrics (JSONL +
TensorBoard), progress, atomic checkpoints and exact resume (model, optimizer, schedule, RNG, data position).
CPU and CUDA, one process or many, all take the same code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.errors import RunError
from lmforge.model import PACKED_ATTENTION, set_packed_attention, unwrap
from lmforge.scoring import to_device
from lmforge.train.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer,
    save_checkpoint,
    step_dir_name,
)
from lmforge.train.dist import (
    PARALLEL,
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    full_tensor,
    gather_weights,
    init_distributed,
    is_sharded,
    wrap_model,
)
from lmforge.train.metrics import MetricsLogger, ProgressDisplay
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.runlock import lock_out_dir, unlock_out_dir
from lmforge.train.tracking import DEFAULT_REPORT_TO, check_report_to


@dataclass
class TrainConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant", "linear"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of all steps decays linearly to the floor
    max_steps: int = 1000
    batch_size: int = 32  # rows per optimizer step, over all processes
    micro_batch_size: int = 32  # rows per forward per process; gradient accumulation makes up the rest
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_every: int = 100  # 0 = only at the end
    # evaluate before the first step too (a fresh run), logged at step 0 (TRL's eval_on_start); None: the
    # stage's default (GRPO and PPO: true, their summaries start the accuracy curve there; the others: false)
    eval_on_start: bool | None = None
    eval_batches: int = 20  # read by the stages' eval functions
    save_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2  # step directories kept; 0 = all
    log_every: int = 10  # 0 = only at the end
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA with bf16, else fp32
    compile: bool = False
    # packed batches (document ids): sdpa (dense document mask) | flex (FlexAttention block mask) | auto (flex on
    # CUDA, sdpa on CPU, where flex has no backward); model.packed_backend, bench/bench_packed_attention.py
    packed_attention: Literal["auto", "sdpa", "flex"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (ddp) or shard (fsdp, FSDP2) the model
    reshard_after_forward: bool = True  # fsdp: free each block's gathered weights after its forward (less memory)
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10  # skip policy: stop once more steps than this were skipped
    resume: bool = True
    device: str = "auto"
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default
    # where metrics go besides metrics.jsonl (always written): tensorboard, wandb, mlflow (train/tracking.py)
    report_to: list[str] = field(default_factory=lambda: list(DEFAULT_REPORT_TO))
    run_name: str = ""  # the trackers' run name; empty: "<run dir>/<stage dir>", e.g. "tiny/sft"
    tracking_project: str = "lmforge"  # W&B project / MLflow experiment
    tracking_group: str = ""  # the W&B run group; empty: the run directory (out_dir's parent), e.g. "tiny"

    def validate(self) -> None:
        checks = [
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.schedule in ("cosine", "wsd", "constant", "linear"), f"unknown schedule {self.schedule!r}"),
            (self.max_steps >= 1, f"max_steps must be at least 1, got {self.max_steps}"),
            (0 <= self.warmup_steps <= self.max_steps,
             f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}"),
            (0 <= self.decay_fraction <= 1, f"decay_fraction must be in [0, 1], got {self.decay_fraction}"),
            (self.schedule != "wsd" or self.warmup_steps + round(self.decay_fraction * self.max_steps)
             <= self.max_steps, f"wsd: warmup_steps ({self.warmup_steps}) + decay "
             f"({round(self.decay_fraction * self.max_steps)} steps) exceed max_steps ({self.max_steps})"),
            (self.batch_size >= 1 and self.micro_batch_size >= 1,
             f"batch_size and micro_batch_size must be positive, got {self.batch_size}, {self.micro_batch_size}"),
            (self.batch_size % max(self.micro_batch_size, 1) == 0,
             f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1/beta2 must be in [0, 1), got "
             f"{self.beta1}, {self.beta2}"),
            (self.eps > 0, f"eps must be positive, got {self.eps}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (min(self.eval_every, self.save_every, self.log_every, self.eval_batches) >= 0,
             "eval_every, save_every, log_every and eval_batches must be >= 0"),
            (self.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0 (0 = all), got {self.keep_checkpoints}"),
            (self.max_skipped_steps >= 0, f"max_skipped_steps must be >= 0, got {self.max_skipped_steps}"),
            (self.dtype in ("auto", "float32", "bfloat16"), f"unknown dtype {self.dtype!r}"),
            (self.packed_attention in PACKED_ATTENTION,
             f"unknown packed_attention {self.packed_attention!r} ({', '.join(PACKED_ATTENTION)})"),
            (self.nan_policy in ("stop", "skip"), f"unknown nan_policy {self.nan_policy!r}"),
            (self.parallel in PARALLEL, f"unknown parallel {self.parallel!r} ({', '.join(PARALLEL)})"),
            (self.num_threads >= 0, f"num_threads must be >= 0 (0 = torch's default), got {self.num_threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_report_to(self.report_to)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step: batch_size = micro_batch_size x processes x accumulation."""
        rows = self.micro_batch_size * world_size
        if self.batch_size % rows:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size x processes "
                             f"= {self.micro_batch_size} x {world_size} = {rows}")
        return self.batch_size // rows


@dataclass
class TrainResult:
    step: int
    tokens: int = 0
    metrics: dict = field(default_factory=dict)  # the last logged training metrics
    eval_metrics: dict = field(default_factory=dict)  # the final evaluation
    checkpoint: Path | None = None
    skipped_steps: int = 0
    resumed_from: Path | None = None


class NonFiniteLoss(RunError):
    """The loss or gradient norm became NaN/inf (nan_policy=stop), or too many steps were skipped (skip); the
    message names the step and the last good checkpoint (the CLI prints it, exit 2)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived: the step in flight was finished and checkpointed, then training stopped (a second
    signal stops at once). The message names the step saved; ``signum`` is the signal (exit 128 + signum)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


def train(model: torch.nn.Module, loss_fn, train_data, cfg: TrainConfig, out_dir: str | Path, *,
          save_model=None, eval_fn=None, dist: DistInfo | None = None, tokens_per_batch_fn=None, on_eval=None,
          on_log=None, run_config=None, flops_per_token: float | None = None,
          description: str = "train", eval_on_start: bool = False) -> TrainResult:
    """Optimise ``model`` for ``cfg.max_steps`` steps, resuming from ``out_dir/checkpoints`` if there are some.

    loss_fn(model, batch) -> (scalar loss, {name: float|tensor}): ``model`` may be DDP/compile-wrapped
        or FSDP-sharded, so call it rather than reaching into attributes (``dist.unwrap`` gives the plain
        module under DDP). The batch has already been moved to the device. Metrics are averaged over
        micro-batches and ranks when logged.
    train_data: iterator of this rank's micro-batches with state_dict()/load_state_dict() (the data position).
    save_model(dir): writes the model directory (config.json, model.safetensors, tokenizer) into ``dir``;
        checkpoints add the training state beside it. None: just model.safetensors.
    eval_fn(model) -> {name: float}: every eval_every steps and at the end, on every rank, under no_grad and
        model.eval(); it does its own cross-rank reduction. on_eval(step, metrics) follows it on every rank.
    tokens_per_batch_fn(batch) -> this rank's tokens in a micro-batch (default: elements of ``input_ids`` or of
        the first tensor), summed over ranks for tokens/s; flops_per_token defaults to
        model.flops_per_token(seq_len of the first batch) for MFU.
    eval_on_start: the stage's default for cfg.eval_on_start (which wins when set): evaluate before step 1.
    on_log(step, metrics): every logged step, main rank. run_config: the stage's resolved config, written into
        every checkpoint (default: cfg); out_dir/config.yaml is the stage's (train/runs.py start_run).

    cfg.parallel=fsdp under torchrun trains a sharded copy of ``model`` while ``model`` waits on the CPU; it
    receives the whole weights for every checkpoint (so ``save_model`` works unchanged), every evaluation and
    at the end (back on the device), so eval_fn, save_model and callers see a plain model, as with ddp.

    A step is: forward_backward (the micro-batches, gradient accumulation), reduce_step (clipping, the loss and
    the flags every rank must agree on), then the update or the non-finite policy (skip_step), log_step,
    and after it evaluate / checkpoint / a stop on a signal (after_step).
    """
    cfg.validate()
    if cfg.eval_on_start is None:
        cfg = dataclasses.replace(cfg, eval_on_start=eval_on_start)
    dist = dist or init_distributed(cfg.device)
    _configure_backends(cfg, dist)
    accum = cfg.accumulation(dist.world_size)
    if dist.is_main:
        lock_out_dir(out_dir)  # one live run per out_dir (re-entrant: the stage's start_run took it already)
    try:
        return _train(model, loss_fn, train_data, cfg, Path(out_dir), dist, accum, save_model, eval_fn,
                      tokens_per_batch_fn, on_eval, on_log, run_config, flops_per_token, description)
    finally:
        if dist.is_main:
            unlock_out_dir(out_dir)


def _train(model, loss_fn, train_data, cfg: TrainConfig, out_dir: Path, dist: DistInfo, accum: int, save_model,
           eval_fn, tokens_per_batch_fn, on_eval, on_log, run_config, flops_per_token,
           description: str) -> TrainResult:
    s, notes = _start(model, train_data, cfg, out_dir, dist, save_model, eval_fn, on_eval, run_config,
                      flops_per_token)
    count_tokens = tokens_per_batch_fn or default_token_count
    peak = peak_flops(dist.device)
    s.net.train()
    window = _Window()
    signals = _StopSignals(verbose=dist.is_main)
    progress = ProgressDisplay(cfg.max_steps, s.step, description, enabled=dist.is_main)
    try:
        with signals, progress:
            for note in notes:
                progress.print(note)
            if start_eval(cfg, s.eval_fn, s.result.resumed_from):
                evaluate_at_start(s, progress)
            while s.step < cfg.max_steps:
                lr = lr_at(s.step, cfg)
                for group in s.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, metric_sums, step_tokens = forward_backward(s, loss_fn, accum, count_tokens)
                step_loss, norm, bad, totals = reduce_step(s, loss_sum, accum, step_tokens, signals)
                s.tokens += int(totals[3])
                if bad:
                    skip_step(s, step_loss, norm, progress)
                else:
                    s.optimizer.step()
                    s.optimizer.zero_grad(set_to_none=True)
                s.step += 1
                window.add(int(totals[3]))
                progress.update(s.step)
                if not bad and (_every(s.step, cfg.log_every) or s.step == cfg.max_steps):
                    log_step(s, step_loss, lr, norm, metric_sums, window, peak, progress, on_log)
                after_step(s, window, progress, stop=totals[2] > 0, signum=signals.received)
            if s.final_eval is None:  # resuming a finished run: its final evaluation is in the checkpoint
                s.final_eval = evaluate(s, progress)
                checkpoint(s)  # with the final evaluation, so a rerun neither evaluates nor logs it again
            s.result.eval_metrics = s.final_eval
            if s.sharded:  # hand the caller back the whole, trained model on every rank
                sync_model(s)
                s.model.to(dist.device)
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted):
            raise
        raise TrainingInterrupted(  # a second signal: stopped at once, in the middle of a step
            f"stopped at once during step {s.step + 1}; {_newest_saved(s)}", signals.received or signal.SIGINT
        ) from None
    finally:
        s.logger.close()
    s.result.step, s.result.tokens, s.result.skipped_steps = s.step, s.tokens, s.skipped
    s.result.checkpoint = s.ckpt_root / step_dir_name(s.step)
    return s.result


@dataclass
class LoopState:
    """What one call of train() works on: the model, its wrappers, the optimizer, the logger and the callbacks,
    and the counters that move (step, tokens, skipped steps, the last checkpoint)."""
    cfg: TrainConfig
    dist: DistInfo
    model: torch.nn.Module  # the plain module; under fsdp it waits on the CPU and gets the whole weights on demand
    wrapped: torch.nn.Module  # DDP around model, or (fsdp) a sharded copy of it
    net: torch.nn.Module  # wrapped without DDP: what the optimizer steps
    fwd_model: torch.nn.Module  # what loss_fn calls: wrapped, torch.compile'd with cfg.compile
    sharded: bool
    optimizer: torch.optim.Optimizer
    params: list
    train_data: object
    logger: MetricsLogger
    ckpt_root: Path
    run_config: object
    save_model: object
    eval_fn: object
    on_eval: object
    result: TrainResult
    step: int = 0
    tokens: int = 0
    skipped: int = 0
    last_saved: int | None = None  # the step of the newest checkpoint this run wrote (or resumed from)
    final_eval: dict | None = None  # the evaluation after the last step, once done (saved in its checkpoint)
    synced: int | None = None  # fsdp: the step whose whole weights ``model`` holds
    flops_per_token: float | None = None


def _configure_backends(cfg: TrainConfig, dist: DistInfo) -> None:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _start(model, train_data, cfg: TrainConfig, out_dir: Path, dist: DistInfo, save_model, eval_fn, on_eval,
           run_config, flops_per_token) -> tuple[LoopState, list[str]]:
    """Resume from the newest checkpoint (weights, RNG, data position, optimizer) or seed a fresh run; wrap the
    model (ddp / fsdp), build the optimizer and the logger. Returns the state and the notes to print."""
    ckpt_root = out_dir / "checkpoints"
    model.to(dist.device)
    set_packed_attention(model, cfg.packed_attention)
    step, tokens, skipped, notes, final_eval = 0, 0, 0, [], None
    resumed = latest_checkpoint(ckpt_root, warn=dist.is_main) if cfg.resume else None
    if resumed is not None:
        state = load_checkpoint(resumed, model)  # weights and RNG; the optimizer's state once it exists
        step, tokens, skipped = state["step"], state["tokens"], state["skipped_steps"]
        if step >= cfg.max_steps:
            final_eval = state.get("final_eval")
        train_data.load_state_dict(state["data"])
        notes.append(f"resuming from {resumed} (step {step}){_changes(state.get('train_config'), cfg)}")
    else:
        if latest_checkpoint(ckpt_root) is not None:
            notes.append(f"resume=false: starting from step 0; checkpoints in {ckpt_root} get overwritten")
        _seed_everything(cfg.seed + dist.rank)

    # ddp: DDP around model; fsdp: a sharded copy of it (net), model itself parked on the CPU until the end
    wrapped = wrap_model(model, dist, cfg.parallel, reshard_after_forward=cfg.reshard_after_forward,
                         bf16=use_bf16(cfg, dist.device))
    net = unwrap(wrapped)
    optimizer = build_optimizer(net, cfg)
    if resumed is not None:
        load_optimizer(resumed, optimizer, state["optimizer"])
    s = LoopState(
        cfg=cfg, dist=dist, model=model, wrapped=wrapped, net=net,
        fwd_model=torch.compile(wrapped) if cfg.compile else wrapped, sharded=is_sharded(net),
        optimizer=optimizer, params=[p for p in net.parameters() if p.requires_grad], train_data=train_data,
        # start_step: what a kill left past the checkpoint (or, with none, past step 0) is logged again, so it
        # goes first: the file equals an unbroken run's
        logger=MetricsLogger(out_dir, enabled=dist.is_main,
                             start_step=0 if start_eval(cfg, eval_fn, resumed) else step + 1, report_to=cfg.report_to, run_name=cfg.run_name, project=cfg.tracking_project,
                             group=cfg.tracking_group,
                             config=_as_dict(run_config if run_config is not None else cfg)),
        ckpt_root=ckpt_root, run_config=run_config if run_config is not None else cfg, save_model=save_model,
        eval_fn=eval_fn, on_eval=on_eval,
        result=TrainResult(step=step, tokens=tokens, skipped_steps=skipped, resumed_from=resumed),
        step=step, tokens=tokens, skipped=skipped, last_saved=step if resumed is not None else None,
        final_eval=final_eval, flops_per_token=flops_per_token)
    lend_whole_weights(s)
    return s, notes


def lend_whole_weights(s: LoopState) -> None:
    """fsdp: a data stream that reads the policy's weights while training (an RL rollout generating from it, a
    reference following it) declares a ``whole_weights`` attribute (a no-op context by default); the loop sets
    it to :func:`whole_weights`, so the stream reads the current weights and not the ones parked at the start."""
    if s.sharded and hasattr(s.train_data, "whole_weights"):
        s.train_data.whole_weights = lambda: whole_weights(s)


@contextlib.contextmanager
def whole_weights(s: LoopState):
    """Inside: ``s.model`` holds the sharded copy's current whole weights, on the device (every rank must enter
    it at the same point: the gather is a collective); after it, the plain model goes back to the CPU."""
    sync_model(s)
    s.model.to(s.dist.device)
    try:
        yield s.model
    finally:
        s.model.to("cpu")


def forward_backward(s: LoopState, loss_fn, accum: int, count_tokens) -> tuple[torch.Tensor, dict, int]:
    """One optimizer step's micro-batches: forward, loss / accum, backward (gradients reduced over ranks on the
    last one only). Returns (summed loss, metrics averaged over the micro-batches, this rank's tokens)."""
    cfg, dist = s.cfg, s.dist
    loss_sum = torch.zeros((), device=dist.device)
    metric_sums: dict = {}
    step_tokens = 0
    for micro in range(accum):
        batch = to_device(_next_batch(s.train_data, s.step, cfg.max_steps), dist.device)
        step_tokens += int(count_tokens(batch))
        if s.flops_per_token is None:
            s.flops_per_token = _model_flops_per_token(s.model, batch)
        with _gradient_sync(s.wrapped, last=micro == accum - 1):
            with autocast_context(cfg, dist.device):
                loss, metrics = loss_fn(s.fwd_model, batch)
            _check_loss(loss, s.step)
            (loss / accum).backward()
        loss_sum += loss.detach().float()
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            metric_sums[k] = metric_sums.get(k, 0.0) + v / accum
    return loss_sum, metric_sums, step_tokens


def reduce_step(s: LoopState, loss_sum: torch.Tensor, accum: int, step_tokens: int, signals: _StopSignals):
    """Clip the gradients, then one all-reduce of what every rank must agree on: the loss, whether any rank's
    gradient norm is non-finite, whether a signal arrived, the tokens. Returns (mean loss over ranks, this
    rank's gradient norm, bad: non-finite somewhere, the reduced totals)."""
    grad_norm = full_tensor(  # a DTensor under fsdp: the norm over every rank's shards
        torch.nn.utils.clip_grad_norm_(s.params, s.cfg.grad_clip if s.cfg.grad_clip > 0 else math.inf))
    local_loss, norm = torch.stack([loss_sum / accum, grad_norm.float().to(loss_sum.device)]).tolist()
    totals = all_reduce_sum(torch.tensor(
        [local_loss, float(not math.isfinite(norm)), float(signals.received is not None), step_tokens],
        dtype=torch.float64)).tolist()
    step_loss, bad = totals[0] / s.dist.world_size, not math.isfinite(totals[0]) or totals[1] > 0
    return step_loss, norm, bad, totals


def skip_step(s: LoopState, step_loss: float, norm: float, progress: ProgressDisplay) -> None:
    """The non-finite policy: drop the gradients; ``stop`` raises NonFiniteLoss, ``skip`` skips the update (and
    raises once more than max_skipped_steps were skipped)."""
    cfg = s.cfg
    s.optimizer.zero_grad(set_to_none=True)
    if cfg.nan_policy == "stop":
        raise NonFiniteLoss(
            f"non-finite loss ({step_loss}) or gradient norm ({norm}) at step {s.step + 1}; {_newest_saved(s)}. "
            f"Lower train.lr (now {cfg.lr:g}) or lengthen warmup, check the data for broken batches, or set "
            "train.nan_policy=skip to skip such steps")
    s.skipped += 1
    s.logger.log(s.step + 1, {"skipped_steps": s.skipped, "loss": step_loss, "grad_norm": norm})
    progress.print(f"step {s.step + 1}: non-finite loss or gradient norm, update skipped "
                   f"({s.skipped} skipped, limit train.max_skipped_steps={cfg.max_skipped_steps})")
    if s.skipped > cfg.max_skipped_steps:
        raise NonFiniteLoss(f"{s.skipped} steps skipped for non-finite loss or gradients, more than "
                            f"train.max_skipped_steps={cfg.max_skipped_steps}; stopping at step "
                            f"{s.step + 1}; {_newest_saved(s)}. Lower train.lr or check the data")


def log_step(s: LoopState, step_loss: float, lr: float, norm: float, metric_sums: dict, window: _Window,
             peak: float | None, progress: ProgressDisplay, on_log) -> None:
    """The step's metrics (loss, lr, gradient norm, the loss function's metrics averaged over ranks, tokens/s,
    MFU) into the logger, the progress line and on_log; the window of timed steps starts again."""
    extra = _mean_over_ranks(metric_sums)
    elapsed = window.elapsed()
    metrics = {"loss": step_loss, "lr": lr, "grad_norm": norm, **extra, "tokens": s.tokens,
               "step_time": elapsed / window.steps}
    if s.skipped:
        metrics["skipped_steps"] = s.skipped
    info = f"loss {step_loss:.4f}  lr {lr:.2e}"
    if window.tokens:
        tok_s = window.tokens / elapsed
        metrics["tokens_per_sec"] = tok_s
        info += f"  {tok_s:,.0f} tok/s"
        if s.flops_per_token:
            achieved = s.flops_per_token * tok_s / s.dist.world_size
            metrics["tflops_per_device"] = achieved / 1e12
            if peak:
                metrics["mfu"] = achieved / peak
                info += f"  MFU {achieved / peak:.1%}"
    s.result.metrics = metrics
    s.logger.log(s.step, metrics)
    progress.update(s.step, info)
    if on_log is not None and s.dist.is_main:
        on_log(s.step, metrics)
    window.reset()


def after_step(s: LoopState, window: _Window, progress: ProgressDisplay, stop: bool,
               signum: int | None = None) -> None:
    """Evaluate and checkpoint when their step comes (the final ones follow the last step); on a signal that
    reached any rank, checkpoint and stop everywhere."""
    cfg = s.cfg
    if _every(s.step, cfg.eval_every) and s.step < cfg.max_steps:
        s.result.eval_metrics = evaluate(s, progress)
        window.reset()
    if _every(s.step, cfg.save_every) and s.step < cfg.max_steps:
        checkpoint(s)
        window.reset()
    if stop:
        path = checkpoint(s) if s.last_saved != s.step else s.ckpt_root / step_dir_name(s.step)
        raise TrainingInterrupted(f"stopped by a signal after step {s.step} of {s.cfg.max_steps}; saved {path}. "
                                  "Run the same command again to resume from there", signum or signal.SIGINT)


def sync_model(s: LoopState) -> None:
    """fsdp: gather the sharded copy's whole weights into the plain model (once per step); a no-op otherwise."""
    if s.sharded and s.synced != s.step:
        gather_weights(s.net, s.model)
        s.synced = s.step


def start_eval(cfg: TrainConfig, eval_fn, resumed: Path | None) -> bool:
    """train.eval_on_start on a fresh run: the curve's starting point (a resumed run logged it already)."""
    return bool(cfg.eval_on_start) and eval_fn is not None and resumed is None


def evaluate_at_start(s: LoopState, progress: ProgressDisplay) -> None:
    """The step-0 evaluation, through the loop's logger (so the trackers get it too). Sampling in eval_fn must
    not move the training's random streams: the run trains exactly as it would without eval_on_start."""
    cuda = [s.dist.device] if torch.device(s.dist.device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        evaluate(s, progress)


def evaluate(s: LoopState, progress: ProgressDisplay) -> dict:
    """eval_fn on the plain model in eval mode under no_grad, logged and printed; {} without an eval_fn."""
    if s.eval_fn is None:
        return {}
    plain = s.model if s.sharded else s.net
    if s.sharded:  # every forward of a sharded model is a collective, and eval_fn may run more batches on one
        sync_model(s)  # rank than on another: it gets the whole model, as under ddp (the weights, not
        s.model.to(s.dist.device)  # gradients or AdamW state, must fit on one device)
    plain.eval()
    with torch.no_grad(), autocast_context(s.cfg, s.dist.device):
        metrics = {k: float(v) for k, v in s.eval_fn(plain).items()}
    plain.train()
    if s.sharded:
        s.model.to("cpu")
    s.logger.log(s.step, metrics)
    progress.print(f"step {s.step}/{s.cfg.max_steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if s.on_eval is not None:
        s.on_eval(s.step, metrics)
    return metrics


def checkpoint(s: LoopState) -> Path:
    """A checkpoint of this step (model files, optimizer, RNG, data position, configs); every rank calls it."""
    sync_model(s)  # fsdp: the whole weights into model, for save_model
    train_state = {"tokens": s.tokens, "skipped_steps": s.skipped, "train_config": dataclasses.asdict(s.cfg),
                   "config": _as_dict(s.run_config), "final_eval": s.final_eval}
    path = save_checkpoint(s.ckpt_root, s.step, s.save_model, s.model, s.optimizer, train_state,
                           s.train_data.state_dict(), keep=s.cfg.keep_checkpoints)
    s.last_saved = s.step
    return path


def _newest_saved(s: LoopState) -> str:
    """Where a rerun of the same command starts: the last good checkpoint, or step 0 when there is none yet."""
    if s.last_saved is None:
        return (f"no checkpoint yet (the first comes at step {s.cfg.save_every or s.cfg.max_steps}), so a rerun "
                "starts from step 0")
    return (f"the last good checkpoint is {s.ckpt_root / step_dir_name(s.last_saved)} (step {s.last_saved}), "
            "which a rerun resumes from")


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """cfg.dtype asks for bf16 ("auto": on CUDA GPUs that support it). Weights and AdamW state stay fp32."""
    return cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when use_bf16 (under fsdp the weights are also all-gathered in bf16, gradients reduced in
    fp32); fp32 otherwise."""
    if not use_bf16(cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=device.type != "cpu")


def _gradient_sync(model: torch.nn.Module, last: bool):
    """Gradient accumulation reduces over ranks on the last micro-batch only: DDP's no_sync() before it, FSDP2's
    set_requires_gradient_sync(False) (gradients accumulate unsharded, then one reduce-scatter)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()


# Dense bf16 peaks (no sparsity), most specific name first. MFU is only as good as this guess.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                   ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
                   ("A10", 125e12), ("4090", 165e12), ("3090", 71e12))


def peak_flops(device: torch.device) -> float | None:
    """Assumed bf16 peak of the GPU, for MFU; None on CPU and unknown GPUs (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def _first_tensor(batch) -> torch.Tensor | None:
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, dict):
        values = [batch["input_ids"]] if "input_ids" in batch else list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        return None
    return next((t for t in map(_first_tensor, values) if t is not None), None)


def default_token_count(batch) -> int:
    """Tokens in a micro-batch: the elements of ``input_ids`` (dict batches) or of the first tensor."""
    t = _first_tensor(batch)
    return t.numel() if t is not None else 0


def _model_flops_per_token(model: torch.nn.Module, batch) -> float:
    """model.flops_per_token(T) with T the first batch's sequence length; 0.0 when either is unknown."""
    t = _first_tensor(batch)
    fn = getattr(unwrap(model), "flops_per_token", None)
    return float(fn(t.shape[-1])) if fn is not None and t is not None and t.dim() >= 2 else 0.0


def _next_batch(train_data, step: int, max_steps: int):
    try:
        return next(train_data)
    except StopIteration:
        raise RuntimeError(f"train_data ran out of batches at step {step + 1} of {max_steps}: make it repeat "
                           "over epochs, or lower train.max_steps") from None


def _check_loss(loss, step: int) -> None:
    if not (torch.is_tensor(loss) and loss.dim() == 0 and loss.requires_grad):
        got = f"a tensor of shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}" \
            if torch.is_tensor(loss) else type(loss).__name__
        raise TypeError(f"step {step + 1}: loss_fn must return (scalar loss tensor with grad, metrics); got {got}")


def _mean_over_ranks(sums: dict) -> dict:
    if not sums:
        return {}
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    return dict(zip(keys, all_reduce_mean(values).tolist()))


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _changes(saved: dict | None, cfg: TrainConfig) -> str:
    """'; changed since the checkpoint: lr 0.001 -> 0.0003' (empty when nothing changed)."""
    now = dataclasses.asdict(cfg)
    diff = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if saved and k in saved and saved[k] != v]
    return f"; changed since the checkpoint: {', '.join(diff)}" if diff else ""


class _Window:
    """Steps, tokens and seconds since the last log line (eval and checkpoint time excluded)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


class _StopSignals:
    """SIGINT/SIGTERM: finish the step in flight, save a checkpoint, then stop. A second signal stops at once.

    Handlers are only installed from the main thread (Python allows no other) and restored on exit.
    """

    def __init__(self, verbose: bool = True):
        self.received: int | None = None
        self.verbose = verbose
        self._old: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
