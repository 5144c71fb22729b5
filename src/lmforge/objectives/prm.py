"""Process reward model objective and metrics (Lightman et al. 2023, "Let's Verify Step by Step"; Wang et al.
2024, Math-Shepherd; Zheng et al. 2024, ProcessBench).

A PRM gives each step k of a solution a logit z_k; p_k = sigma(z_k) is the probability that the step is right
(given the steps before it). Pure functions on tensors or lists; no model, data or config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def prm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Binary cross-entropy at the step separators, averaged over every labelled step of the batch.

        L = -(1/K) sum_k [ y_k log sigma(z_k) + (1 - y_k) log(1 - sigma(z_k)) ]

    logits, labels: same shape; labels are 1 (right step), 0 (wrong step), a soft label in (0, 1) (the share of
    Monte-Carlo rollouts that succeed), or -100 where no step ends (ignored). Metrics: ``step_accuracy`` (share
    of steps with (p_k > 0.5) == (y_k >= 0.5)) and ``num_steps`` (K). No labelled step: loss 0.
    """
    mask = labels != -100
    z, y = logits[mask].float(), labels[mask].float()
    if z.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, {"step_accuracy": zero.detach(), "num_steps": zero.detach()}
    loss = F.binary_cross_entropy_with_logits(z, y)
    accuracy = ((z > 0) == (y >= 0.5)).float().mean()
    return loss, {"step_accuracy": accuracy.detach(), "num_steps": torch.tensor(float(z.numel()))}


def aggregate_steps(probs: Sequence[float], how: str = "min") -> float:
    """One score for a solution from its steps' probabilities: ``min`` (the weakest step, Lightman et al.),
    ``prod`` (all steps right, if independent) or ``last`` (the final step's). No steps: 0."""
    if not probs:
        return 0.0
    if how == "min":
        return float(min(probs))
    if how == "prod":
        return float(math.prod(probs))
    if how == "last":
        return float(probs[-1])
    raise ValueError(f"aggregation must be min, prod or last, got {how!r}")


def first_error(flags: Sequence[bool]) -> int:
    """Index of the first False (wrong step), -1 when every step is right."""
    return next((i for i, ok in enumerate(flags) if not ok), -1)


def first_error_f1(predicted: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]],
                   threshold: float = 0.5) -> dict[str, float]:
    """ProcessBench's score: find the first wrong step, or say there is none.

    The predicted first error is the first step with p_k < threshold (-1: none). ``error_accuracy``: share of
    solutions with an error whose first error is found exactly; ``correct_accuracy``: share of all-right
    solutions judged all right; ``f1``: their harmonic mean 2ab / (a + b). A judge that always says "no error"
    scores a = 0, b = 1, F1 = 0; NaN where a kind of solution is absent.
    """
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions for {len(labels)} solutions")
    hits = {"error": [], "correct": []}
    for probs, flags in zip(predicted, labels):
        gold = first_error(flags)
        guess = first_error([p >= threshold for p in probs])
        hits["correct" if gold == -1 else "error"].append(guess == gold)
    a = sum(hits["error"]) / len(hits["error"]) if hits["error"] else math.nan
    b = sum(hits["correct"]) / len(hits["correct"]) if hits["correct"] else math.nan
    f1 = math.nan if math.isnan(a) or math.isnan(b) else (2 * a * b / (a + b) if a + b > 0 else 0.0)
    return {"error_accuracy": a, "correct_accuracy": b, "f1": f1, "n_error": len(hits["error"]),
            "n_correct": len(hits["correct"])}
