"""The DPO family as a loss function for the one training loop: what `lmforge dpo` and `lmforge online-dpo` share.

    loss_type  sigmoid (DPO) | ipo | hinge (SLiC) | cdpo / robust (label_smoothing = flip rate)   need pi_ref
               simpo (length-normalised, margin gamma) | orpo (odds ratio + SFT NLL)             reference-free
    rpo_alpha  > 0: + alpha * NLL of the chosen answer per token (RPO, Pang et al. 2024; TRL's rpo_alpha)

The losses themselves are pure functions in objectives/preference.py; the log-probs come from scoring.py.
"""

from __future__ import annotations

import torch

from lmforge.objectives import dpo_loss, orpo_loss, simpo_loss
from lmforge.scoring import completion_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "cdpo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def check_loss_options(cfg) -> None:
    """ValueError unless cfg's loss_type, beta, label_smoothing and rpo_alpha make a valid DPO-family loss."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}")
    if cfg.beta <= 0:
        raise ValueError(f"beta must be positive, got {cfg.beta}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {cfg.rpo_alpha}")


def dpo_loss_fn(cfg, beta: float | None = None, ref_model=None):
    """loss_fn(model, batch) for the loop: one forward over chosen + rejected (collate_pairs), then the loss.

    ``cfg``: any config with loss_type, beta, label_smoothing, simpo_gamma, rpo_alpha and logprob_chunk_size
    (`lmforge dpo`'s and `lmforge online-dpo`'s). ``beta`` overrides cfg.beta (the beta sweep). The reference
    log-probs come from the batch ("ref_logps", precomputed) or, with ``ref_model``, from a frozen live model.
    """
    beta = cfg.beta if beta is None else beta

    def loss_fn(model, batch):
        logps, lengths = completion_logps(model, batch, cfg.logprob_chunk_size)
        chosen, rejected = logps.chunk(2)
        len_c, len_r = lengths.chunk(2)
        if cfg.loss_type == "simpo":
            return simpo_loss(chosen, rejected, len_c, len_r, beta=beta, gamma=cfg.simpo_gamma,
                              label_smoothing=cfg.label_smoothing)
        if cfg.loss_type == "orpo":
            nll = -chosen.sum() / len_c.sum().clamp(min=1)  # SFT loss: mean NLL over the chosen tokens
            return orpo_loss(chosen, rejected, len_c, len_r, nll, lambda_=beta)
        if ref_model is not None:
            with torch.no_grad():
                ref = completion_logps(ref_model, batch, cfg.logprob_chunk_size)[0]
        else:
            ref = batch["ref_logps"]
        ref_c, ref_r = ref.chunk(2)
        lengths_kw = dict(chosen_lengths=len_c, rejected_lengths=len_r) if cfg.loss_type == "ipo" else {}
        smoothing = cfg.label_smoothing
        if cfg.loss_type == "cdpo" and "confidence" in batch:  # an AI judge's soft labels: eps = 1 - P(chosen)
            smoothing = (1 - batch["confidence"] + cfg.label_smoothing).clamp(max=0.5)
        loss, metrics = dpo_loss(chosen, rejected, ref_c, ref_r, beta=beta, loss_type=cfg.loss_type,
                                 label_smoothing=smoothing, **lengths_kw)
        if cfg.rpo_alpha > 0:
            nll = -chosen.sum() / len_c.sum().clamp(min=1)
            loss, metrics = loss + cfg.rpo_alpha * nll, {**metrics, "nll_loss": nll.detach()}
        return loss, metrics
    return loss_fn
