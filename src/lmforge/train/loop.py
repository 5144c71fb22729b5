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
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

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
    unwrap,
    wrap_model,
)
from lmforge.train.metrics import MetricsLogger, ProgressDisplay
from lmforge.train.optim import build_optimizer, lr_at
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
    eval_batches: int = 20  # read by the stages' eval functions
    save_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2  # step directories kept; 0 = all
    log_every: int = 10  # 0 = only at the end
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA with bf16, else fp32
    compile: bool = False
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


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf (nan_policy=stop), or too many steps were skipped (skip)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived: the step in flight was finished and checkpointed, then training stopped."""


def train(model: torch.nn.Module, loss_fn, train_data, cfg: TrainConfig, out_dir: str | Path, *,
          save_model=None, eval_fn=None, dist: DistInfo | None = None, tokens_per_batch_fn=None, on_eval=None,
          on_log=None, run_config=None, flops_per_token: float | None = None,
          description: str = "train") -> TrainResult:
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
    on_log(step, metrics): every logged step, main rank. run_config: the stage's resolved config, written to
        out_dir/config.yaml and into every checkpoint (default: cfg).

    cfg.parallel=fsdp under torchrun trains a sharded copy of ``model`` while ``model`` waits on the CPU; it
    receives the whole weights for every checkpoint (so ``save_model`` works unchanged), every evaluation and
    at the end (back on the device), so eval_fn, save_model and callers see a plain model, as with ddp.
    """
    cfg.validate()
    dist = dist or init_distributed(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accum = cfg.accumulation(dist.world_size)
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    run_config = run_config if run_config is not None else cfg
    if dist.is_main:
        from lmforge.config import save_config

        save_config(run_config, out_dir / "config.yaml")

    model.to(dist.device)
    step, tokens, skipped, notes = 0, 0, 0, []
    resumed = latest_checkpoint(ckpt_root) if cfg.resume else None
    if resumed is not None:
        state = load_checkpoint(resumed, model)  # weights and RNG; the optimizer's state once it exists
        step, tokens, skipped = state["step"], state["tokens"], state["skipped_steps"]
        train_data.load_state_dict(state["data"])
        notes.append(f"resuming from {resumed} (step {step}){_changes(state.get('train_config'), cfg)}")
    else:
        if latest_checkpoint(ckpt_root) is not None:
            notes.append(f"resume=false: starting from step 0; checkpoints in {ckpt_root} get overwritten")
        _seed_everything(cfg.seed + dist.rank)
    last_saved = step if resumed is not None else None

    # ddp: DDP around model; fsdp: a sharded copy of it (net), model itself parked on the CPU until the end
    wrapped = wrap_model(model, dist, cfg.parallel, reshard_after_forward=cfg.reshard_after_forward,
                         bf16=use_bf16(cfg, dist.device))
    net = unwrap(wrapped)
    sharded = is_sharded(net)
    optimizer = build_optimizer(net, cfg)
    if resumed is not None:
        load_optimizer(resumed, optimizer, state["optimizer"])
    fwd_model = torch.compile(wrapped) if cfg.compile else wrapped
    params = [p for p in net.parameters() if p.requires_grad]
    logger = MetricsLogger(out_dir, enabled=dist.is_main, resume_step=step if resumed is not None else None,
                           report_to=cfg.report_to, run_name=cfg.run_name, project=cfg.tracking_project,
                           config=_as_dict(run_config))
    count_tokens = tokens_per_batch_fn or default_token_count
    peak = peak_flops(dist.device)
    result = TrainResult(step=step, tokens=tokens, skipped_steps=skipped, resumed_from=resumed)

    synced = None  # fsdp: the step whose whole weights ``model`` holds

    def sync_model() -> None:
        nonlocal synced
        if sharded and synced != step:
            gather_weights(net, model)
            synced = step

    def evaluate(progress: ProgressDisplay) -> dict:
        if eval_fn is None:
            return {}
        plain = model if sharded else net
        if sharded:  # every forward of a sharded model is a collective, and eval_fn may run more batches on one
            sync_model()  # rank than on another: it gets the whole model, as under ddp (the weights, not
            model.to(dist.device)  # gradients or AdamW state, must fit on one device)
        plain.eval()
        with torch.no_grad(), autocast_context(cfg, dist.device):
            metrics = {k: float(v) for k, v in eval_fn(plain).items()}
        plain.train()
        if sharded:
            model.to("cpu")
        logger.log(step, metrics)
        progress.print(f"step {step}/{cfg.max_steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if on_eval is not None:
            on_eval(step, metrics)
        return metrics

    def checkpoint() -> Path:
        nonlocal last_saved
        sync_model()  # fsdp: the whole weights into model, for save_model
        train_state = {"tokens": tokens, "skipped_steps": skipped, "train_config": dataclasses.asdict(cfg),
                       "config": _as_dict(run_config)}
        path = save_checkpoint(ckpt_root, step, save_model, model, optimizer, train_state,
                               train_data.state_dict(), keep=cfg.keep_checkpoints)
        last_saved = step
        return path

    net.train()
    window = _Window()
    signals = _StopSignals(verbose=dist.is_main)
    progress = ProgressDisplay(cfg.max_steps, step, description, enabled=dist.is_main)
    try:
        with signals, progress:
            for note in notes:
                progress.print(note)
            while step < cfg.max_steps:
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=dist.device)
                metric_sums: dict = {}
                step_tokens = 0
                for micro in range(accum):
                    batch = to_device(_next_batch(train_data, step, cfg.max_steps), dist.device)
                    step_tokens += int(count_tokens(batch))
                    if flops_per_token is None:
                        flops_per_token = _model_flops_per_token(model, batch)
                    with _gradient_sync(wrapped, last=micro == accum - 1):
                        with autocast_context(cfg, dist.device):
                            loss, metrics = loss_fn(fwd_model, batch)
                        _check_loss(loss, step)
                        (loss / accum).backward()
                    loss_sum += loss.detach().float()
                    for k, v in metrics.items():
                        v = v.detach().float() if torch.is_tensor(v) else float(v)
                        metric_sums[k] = metric_sums.get(k, 0.0) + v / accum
                grad_norm = full_tensor(  # a DTensor under fsdp: the norm over every rank's shards
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
                local_loss, norm = torch.stack([loss_sum / accum, grad_norm.float().to(loss_sum.device)]).tolist()
                totals = all_reduce_sum(torch.tensor(
                    [local_loss, float(not math.isfinite(norm)), float(signals.received is not None), step_tokens],
                    dtype=torch.float64)).tolist()
                step_loss, bad = totals[0] / dist.world_size, not math.isfinite(totals[0]) or totals[1] > 0
                tokens += int(totals[3])
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    if cfg.nan_policy == "stop":
                        raise NonFiniteLoss(
                            f"non-finite loss ({step_loss}) or gradient norm ({norm}) at step {step + 1}: lower "
                            f"train.lr (now {cfg.lr:g}) or lengthen warmup, check the data for broken batches, or "
                            f"set train.nan_policy=skip to skip such steps")
                    skipped += 1
                    logger.log(step + 1, {"skipped_steps": skipped, "loss": step_loss, "grad_norm": norm})
                    progress.print(f"step {step + 1}: non-finite loss or gradient norm, update skipped "
                                   f"({skipped} skipped, limit train.max_skipped_steps={cfg.max_skipped_steps})")
                    if skipped > cfg.max_skipped_steps:
                        raise NonFiniteLoss(f"{skipped} steps skipped for non-finite loss or gradients, more than "
                                            f"train.max_skipped_steps={cfg.max_skipped_steps}; stopping at step "
                                            f"{step + 1}. Lower train.lr or check the data")
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step += 1
                window.add(int(totals[3]))
                progress.update(step)

                if not bad and (_every(step, cfg.log_every) or step == cfg.max_steps):
                    extra = _mean_over_ranks(metric_sums)
                    elapsed = window.elapsed()
                    result.metrics = {"loss": step_loss, "lr": lr, "grad_norm": norm, **extra,
                                      "tokens": tokens, "step_time": elapsed / window.steps}
                    if skipped:
                        result.metrics["skipped_steps"] = skipped
                    info = f"loss {step_loss:.4f}  lr {lr:.2e}"
                    if window.tokens:
                        tok_s = window.tokens / elapsed
                        result.metrics["tokens_per_sec"] = tok_s
                        info += f"  {tok_s:,.0f} tok/s"
                        if flops_per_token:
                            achieved = flops_per_token * tok_s / dist.world_size
                            result.metrics["tflops_per_device"] = achieved / 1e12
                            if peak:
                                result.metrics["mfu"] = achieved / peak
                                info += f"  MFU {achieved / peak:.1%}"
                    logger.log(step, result.metrics)
                    progress.update(step, info)
                    if on_log is not None and dist.is_main:
                        on_log(step, result.metrics)
                    window.reset()
                if _every(step, cfg.eval_every) and step < cfg.max_steps:
                    result.eval_metrics = evaluate(progress)
                    window.reset()
                if _every(step, cfg.save_every) and step < cfg.max_steps:
                    checkpoint()
                    window.reset()
                if totals[2] > 0:  # a signal reached some rank: save, then stop everywhere
                    path = checkpoint() if last_saved != step else ckpt_root / step_dir_name(step)
                    raise TrainingInterrupted(f"stopped by a signal at step {step}; saved {path}. Run the same "
                                              "command again to resume from there")

            result.eval_metrics = evaluate(progress)
            if last_saved != step:
                checkpoint()
            if sharded:  # hand the caller back the whole, trained model on every rank
                sync_model()
                model.to(dist.device)
    finally:
        logger.close()
    result.step, result.tokens, result.skipped_steps = step, tokens, skipped
    result.checkpoint = ckpt_root / step_dir_name(step)
    return result


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """cfg.dtype asks for bf16 ("auto": on CUDA GPUs that support it). Weights and AdamW state stay fp32."""
    return cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when use_bf16 (under fsdp the weights are also all-gathered in bf16, gradients reduced in
    fp32); fp32 otherwise."""
    if not use_bf16(cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


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


def to_device(batch, device: torch.device):
    """Tensors in a (nested) tuple/list/dict moved to ``device``; anything else passed through."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


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
    import random

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
