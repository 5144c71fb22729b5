"""The one training loop. Every stage (pretrain, SFT, reward, DPO, RL) brings its data and a loss function:

    loss_fn(model, batch) -> (loss, metrics)

and this loop does the rest: gradient accumulation, clipping, the learning-rate schedule, bf16 autocast on GPU,
optional torch.compile, DDP under torchrun, NaN/inf guards, periodic evaluation, metrics (JSONL + TensorBoard),
progress, atomic checkpoints and exact resume (model, optimizer, schedule, RNG and data position).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lmforge.train.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.dist import DistInfo, all_reduce_mean, barrier, init_distributed, wrap_ddp
from lmforge.train.metrics import MetricsLogger, progress_bar
from lmforge.train.optim import build_optimizer, lr_at


@dataclass
class TrainConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    max_steps: int = 1000
    batch_size: int = 32  # rows per optimizer step, over all processes
    micro_batch_size: int = 32  # rows per forward per process; accumulation fills the rest
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 20
    save_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10
    resume: bool = True
    device: str = "auto"
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) > max_steps ({self.max_steps})")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")

    def accumulation(self, world_size: int) -> int:
        rows = self.micro_batch_size * world_size
        if self.batch_size % rows:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size x processes "
                             f"= {self.micro_batch_size} x {world_size}")
        return self.batch_size // rows


@dataclass
class TrainResult:
    step: int
    tokens: int
    metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    skipped_steps: int = 0


class NonFiniteLoss(RuntimeError):
    pass


def autocast_context(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs, for MFU; None where a peak would be a guess (CPU, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("A10", 125e12),
                       ("4090", 165e12), ("3090", 71e12)):
        if key in name:
            return flops
    return None


def train(model: torch.nn.Module, loss_fn, train_data, cfg: TrainConfig, out_dir: str | Path, *, save_model,
          eval_fn=None, dist: DistInfo | None = None, tokens_per_batch_fn=None, flops_per_token: float | None = None,
          run_config=None, on_log=None, description: str = "train") -> TrainResult:
    """Optimise ``model`` for ``cfg.max_steps`` steps (resuming from out_dir/checkpoints when there are some).

    save_model(dir): writes the model directory (weights + tokenizer) into ``dir``; checkpoints add the
    training state beside it. tokens_per_batch_fn(batch): tokens in one micro-batch over all ranks, for
    throughput. on_log(step, metrics): called on every logged step (main rank).
    """
    dist = dist or init_distributed(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if run_config is not None:
            from lmforge.config import save_config

            save_config(run_config, out_dir / "config.yaml")
    accum = cfg.accumulation(dist.world_size)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

    step, tokens_seen, skipped = 0, 0, 0
    latest = latest_checkpoint(ckpt_root) if cfg.resume else None
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer)
        step, tokens_seen, skipped = state["step"], state.get("tokens", 0), state.get("skipped_steps", 0)
        train_data.load_state_dict(state["data"])
        if dist.is_main:
            print(f"resuming from {latest} (step {step})", flush=True)
    else:
        torch.manual_seed(cfg.seed)

    ddp_model = wrap_ddp(model, dist)
    fwd_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    params = [p for p in model.parameters() if p.requires_grad]
    logger = MetricsLogger(out_dir, enabled=dist.is_main)
    peak = peak_flops(dist.device)
    result = TrainResult(step=step, tokens=tokens_seen)

    def evaluate() -> dict:
        if eval_fn is None:
            return {}
        model.eval()
        with torch.no_grad(), autocast_context(cfg, dist.device):
            metrics = eval_fn(model)
        model.train()
        logger.log(step, metrics)
        return metrics

    def checkpoint() -> Path | None:
        path = None
        if dist.is_main:
            state = {"tokens": tokens_seen, "skipped_steps": skipped, "data": train_data.state_dict(),
                     "max_steps": cfg.max_steps}
            path = save_checkpoint(ckpt_root, step, save_model, optimizer, state, keep=cfg.keep_checkpoints)
        barrier()
        return path

    model.train()
    window_start, window_tokens, info = time.perf_counter(), 0, ""
    with progress_bar(dist.is_main) as bar:
        task = bar.add_task(description, total=cfg.max_steps, completed=step, info="")
        while step < cfg.max_steps:
            lr = lr_at(step, lr=cfg.lr, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                       schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_total, metric_sums = 0.0, {}
            for micro in range(accum):
                batch = next(train_data)
                sync = micro == accum - 1 or not dist.distributed
                ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
                with ctx, autocast_context(cfg, dist.device):
                    loss, metrics = loss_fn(fwd_model, batch)
                    (loss / accum).backward()
                loss_total += loss.detach().float().item() / accum
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v) / accum
                if tokens_per_batch_fn is not None:
                    n = tokens_per_batch_fn(batch)
                    tokens_seen += n
                    window_tokens += n
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            bad = not (math.isfinite(loss_total) and math.isfinite(float(grad_norm)))
            if all_reduce_mean(float(bad)) > 0:
                optimizer.zero_grad(set_to_none=True)
                if cfg.nan_policy == "stop":
                    raise NonFiniteLoss(f"non-finite loss ({loss_total}) or gradient norm ({float(grad_norm)}) at step "
                                        f"{step + 1}; lower train.lr, check the data, or set train.nan_policy=skip")
                skipped += 1
                logger.log(step, {"skipped_step": 1, "loss": loss_total})
                if skipped > cfg.max_skipped_steps:
                    raise NonFiniteLoss(f"{skipped} steps skipped for non-finite loss/gradients (limit "
                                        f"train.max_skipped_steps={cfg.max_skipped_steps}); stopping at step {step}")
                step += 1
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(task, completed=step)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {"loss": all_reduce_mean(loss_total), "lr": lr, "grad_norm": float(grad_norm),
                           **{k: all_reduce_mean(v) for k, v in metric_sums.items()}}
                if window_tokens:
                    metrics["tokens_per_sec"] = window_tokens / elapsed
                    metrics["tokens"] = tokens_seen
                    if flops_per_token:
                        achieved = flops_per_token * window_tokens / elapsed
                        metrics["tflops"] = achieved / 1e12
                        if peak:
                            metrics["mfu"] = achieved / (peak * dist.world_size)
                logger.log(step, metrics)
                result.metrics = metrics
                info = f"loss {metrics['loss']:.3f}  lr {lr:.2e}"
                if "tokens_per_sec" in metrics:
                    info += f"  {metrics['tokens_per_sec']:,.0f} tok/s"
                if "mfu" in metrics:
                    info += f"  MFU {metrics['mfu']:.1%}"
                bar.update(task, info=info)
                if on_log is not None and dist.is_main:
                    on_log(step, metrics)
                window_start, window_tokens = time.perf_counter(), 0

            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                result.eval_metrics = evaluate()
                if dist.is_main and result.eval_metrics:
                    shown = "  ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
                    bar.console.print(f"step {step}/{cfg.max_steps}  {info}  |  {shown}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                result.checkpoint = checkpoint()

    result.eval_metrics = evaluate()
    if latest is None or latest.name != f"step_{step:07d}":
        result.checkpoint = checkpoint()
    else:
        result.checkpoint = latest
    logger.close()
    result.step, result.tokens, result.skipped_steps = step, tokens_seen, skipped
    return result
