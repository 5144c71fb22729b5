"""Reference refresh: the reference model follows the policy every k optimizer steps, as a copy or an EMA.

TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"): every tau steps

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref

alpha = 1 is the hard update (the reference becomes the policy), alpha < 1 the soft one (an exponential moving
average of the policy, sampled every tau steps). The config names are TRL's: sync_ref_model, ref_model_sync_steps
(tau), ref_model_mixup_alpha (alpha). `lmforge dpo`, `lmforge online-dpo` and `lmforge grpo` take them.

:class:`ReferenceSync` does it from inside the one loop without a hook: it wraps a stage's micro-batch iterator
and updates the reference just before handing out the first micro-batch of every tau-th step, i.e. after that
many optimizer updates and before anything of the next step (a GRPO rollout's reference log-probs included) reads
the reference. The reference's weights go into every checkpoint (:meth:`save`) and come back on resume, so a
resumed run is the uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from lmforge.model import unwrap

REFERENCE_FILE = "reference.safetensors"


def check_sync_options(cfg) -> None:
    """ValueError unless cfg's ref_model_sync_steps >= 1 and ref_model_mixup_alpha in (0, 1]."""
    if cfg.ref_model_sync_steps < 1:
        raise ValueError(f"ref_model_sync_steps must be >= 1, got {cfg.ref_model_sync_steps}")
    if not 0 < cfg.ref_model_mixup_alpha <= 1:
        raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {cfg.ref_model_mixup_alpha}")


@torch.no_grad()
def mix_into(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """theta_ref <- alpha * theta + (1 - alpha) * theta_ref, in place, parameter by parameter (by name)."""
    params = dict(unwrap(policy).named_parameters())
    for name, p_ref in unwrap(reference).named_parameters():
        p_ref.lerp_(params[name].detach().to(p_ref.dtype), alpha)


class ReferenceSync:
    """A stage's micro-batch iterator that also moves ``reference`` towards ``policy`` every ``every`` optimizer
    steps of ``accumulation`` micro-batches (see the module docstring). State: the wrapped iterator's and the
    count of micro-batches handed out; ``resume_dir()`` is the checkpoint a rerun resumes from."""

    def __init__(self, data, reference: torch.nn.Module, policy: torch.nn.Module, *, every: int, alpha: float,
                 accumulation: int = 1, resume_dir: Callable[[], Path | None] = lambda: None):
        ours, theirs = dict(unwrap(reference).named_parameters()), dict(unwrap(policy).named_parameters())
        odd = next((k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape), None)
        if odd is not None or len(ours) != len(theirs):
            raise ValueError(f"sync_ref_model: the reference and the policy differ in their parameters "
                             f"({odd or 'their number'}); a reference that follows the policy must be its shape")
        self.data, self.reference, self.policy = data, reference, policy
        self.every, self.alpha, self.accumulation, self.resume_dir = every, alpha, accumulation, resume_dir
        self.position = 0
        self.syncs = 0
        self._whole_weights = contextlib.nullcontext

    @property
    def whole_weights(self):
        """fsdp: the loop's context that puts the current whole weights into ``policy`` (train/loop.py
        lend_whole_weights); passed on to the wrapped stream when it reads the policy too (an RL rollout)."""
        return self._whole_weights

    @whole_weights.setter
    def whole_weights(self, context) -> None:
        self._whole_weights = context
        if hasattr(self.data, "whole_weights"):
            self.data.whole_weights = context

    def __iter__(self):
        return self

    def __next__(self):
        step, first = divmod(self.position, self.accumulation)
        if first == 0 and step > 0 and step % self.every == 0:
            with self.whole_weights():
                mix_into(self.reference, self.policy, self.alpha)
            self.syncs += 1
        batch = next(self.data)
        self.position += 1
        return batch

    def save(self, path: Path) -> None:
        """The reference's weights into a checkpoint (or model) directory."""
        save_model(unwrap(self.reference), str(Path(path) / REFERENCE_FILE))  # tied weights stored once

    def state_dict(self) -> dict:
        return {"data": self.data.state_dict(), "position": self.position, "syncs": self.syncs}

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state["data"])
        self.position, self.syncs = int(state["position"]), int(state["syncs"])
        if self.syncs:  # the reference has moved since the start: its weights are in the checkpoint
            directory = self.resume_dir()
            path = Path(directory) / REFERENCE_FILE if directory is not None else None
            if path is None or not path.exists():
                raise FileNotFoundError(f"resuming a run whose reference follows the policy needs {REFERENCE_FILE} "
                                        f"in the checkpoint ({directory}), and it is missing")
            load_model(unwrap(self.reference), str(path), device=str(next(self.reference.parameters()).device))
