"""Preference losses: reward modelling, the DPO family, SimPO, ORPO and KTO.

Every function is pure: per-example tensors in, ``(loss, metrics)`` out, the loss being the batch mean and the
metrics detached scalars named as TRL logs them. Unless noted, log-probabilities are per-sequence sums over the
completion tokens, shape (B,); ``sequence_logprobs`` in ``lmforge.objectives.lm`` produces them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]

DPO_LOSS_TYPES = ("sigmoid", "cdpo", "robust", "ipo", "hinge")


def _as_tensor(x: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                  chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> tuple[torch.Tensor, Metrics]:
    """Reward-model loss under the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT).

        P(y_w > y_l) = sigma(r_w - r_l),    L = -mean log sigma(r_w - r_l - m)

    ``margin`` m (scalar or (B,)) is Llama 2's preference-strength margin (Touvron et al. 2023); None means 0.
    Metrics: "accuracy" (fraction with r_w > r_l), "margin" (mean r_w - r_l), "rewards/chosen", "rewards/rejected".
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    d = diff.detach()
    return loss, {
        "accuracy": (d > 0).float().mean(),
        "margin": d.mean(),
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
    }


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float | torch.Tensor = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """The DPO family on one batch of preference pairs.

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)) and eps = ``label_smoothing``
    (a float, or a (B,) tensor of per-pair probabilities that the "chosen" answer is in fact the worse one,
    e.g. soft labels from an AI judge):

    - "sigmoid": DPO (Rafailov et al. 2023), L = -log sigma(beta h); with eps > 0 it is the conservative
      "cdpo" (Mitchell 2023): L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), i.e. the expected DPO
      loss under the soft label. "cdpo" is an alias for it. Value at h = 0: ln 2 for every eps.
    - "robust": robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), an unbiased loss under label-flip
      rate eps < 1/2: L = ((1 - eps)(-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps). At h = 0: ln 2.
    - "ipo": IPO (Azar et al. 2023), L = (h - (1 - 2 eps) / (2 beta))^2. With eps = 0 the target is 1/(2 beta);
      a soft label p = 1 - eps moves it to (p - 1/2)/beta, the minimiser of IPO's general objective. At h = 0:
      1/(4 beta^2). IPO is meant for length-AVERAGED log-probs (TRL divides by the completion length for
      "ipo"): pass averaged logps, or pass ``chosen_lengths``/``rejected_lengths`` and this function divides.
    - "hinge": SLiC-HF (Zhao et al. 2023), L = relu(1 - beta h); with eps > 0 the same label mixture as cDPO,
      (1 - eps) relu(1 - beta h) + eps relu(1 + beta h). At h = 0: 1.

    ``chosen_lengths``/``rejected_lengths`` (token counts, (B,)), when given, divide the policy and reference
    log-probs of that side before anything else, for any loss_type; rewards are then per-token.
    Metrics (TRL names): "rewards/chosen" = mean beta (log pi(y_w) - log pi_ref(y_w)), "rewards/rejected",
    "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected" (policy, as passed in).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if chosen_lengths is not None:
        policy_chosen_logps = policy_chosen_logps / chosen_lengths
        ref_chosen_logps = ref_chosen_logps / chosen_lengths
    if rejected_lengths is not None:
        policy_rejected_logps = policy_rejected_logps / rejected_lengths
        ref_rejected_logps = ref_rejected_logps / rejected_lengths
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = _as_tensor(label_smoothing, h)
    if loss_type in ("sigmoid", "cdpo"):
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        if bool((eps >= 0.5).any()):
            raise ValueError("robust DPO needs label_smoothing (the flip rate) < 0.5")
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - (1 - 2 * eps) / (2 * beta)) ** 2
    else:  # hinge
        losses = (1 - eps) * torch.relu(1 - beta * h) + eps * torch.relu(1 + beta * h)
    metrics = _pair_metrics(beta * chosen_logratios, beta * rejected_logratios,
                            policy_chosen_logps, policy_rejected_logps)
    return losses.mean(), metrics


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024): reference-free, length-normalised preference loss with a target margin.

        r(y) = (beta / |y|) log pi(y|x),    L = -log sigma(r(y_w) - r(y_l) - gamma)

    ``gamma`` is the absolute reward margin of the paper's equation (TRL's ``simpo_gamma``). The authors' code
    instead sets ``gamma_beta_ratio`` = gamma / beta (e.g. beta = 2.0, gamma_beta_ratio = 0.25 is gamma = 0.5);
    convert with gamma = gamma_beta_ratio * beta. ``label_smoothing`` eps mixes in the flipped label as cDPO:
    -(1 - eps) log sigma(z) - eps log sigma(-z). Metrics as ``dpo_loss``, with rewards r(y).
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths
    z = chosen_rewards - rejected_rewards - gamma
    eps = _as_tensor(label_smoothing, z)
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    metrics = _pair_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    return losses.mean(), metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): expm1 near 0, log1p far from it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, chosen_nll: torch.Tensor,
              lambda_: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """ORPO (Hong et al. 2024): SFT on the chosen answer plus an odds-ratio preference term, no reference model.

        log p(y) = (1/|y|) log pi(y|x)                      (length-averaged log-prob, so p is in (0, 1))
        log odds(y) = log p - log(1 - p) = log p - log1mexp(log p)
        L = L_SFT + lambda * mean[-log sigma(log odds(y_w) - log odds(y_l))]

    ``chosen_nll`` is the SFT loss on the chosen answers (scalar, or (B,) and averaged). ``lambda_`` is TRL's
    ``beta``. log(1 - p) uses log1mexp (expm1 when p > 1/2) and the averaged log-prob is clamped to <= -1e-6 so
    an answer with probability 1 in fp32 gives a finite loss. Metrics (TRL names): "nll_loss",
    "log_odds_ratio" (mean log sigma(log odds ratio)), "log_odds_chosen" (mean log odds ratio), "rewards/chosen"
    = lambda * mean averaged log-prob (so "rewards/*" as in TRL), "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected".
    """
    chosen_avg = (policy_chosen_logps / chosen_lengths).clamp(max=-1e-6)
    rejected_avg = (policy_rejected_logps / rejected_lengths).clamp(max=-1e-6)
    log_odds = (chosen_avg - _log1mexp(chosen_avg)) - (rejected_avg - _log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll.mean()
    loss = nll - lambda_ * ratio.mean()
    metrics = _pair_metrics(lambda_ * chosen_avg, lambda_ * rejected_avg, policy_chosen_logps, policy_rejected_logps)
    metrics.update({
        "nll_loss": nll.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "log_odds_chosen": log_odds.detach().mean(),
    })
    return loss, metrics


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl_estimate: torch.Tensor | float, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024): prospect-theoretic loss on unpaired desirable / undesirable examples.

        r = log pi(y|x) - log pi_ref(y|x),    z0 = max(0, KL estimate), detached
        desirable (label True):      L = lambda_D (1 - sigma(beta (r - z0)))
        undesirable (label False):   L = lambda_U (1 - sigma(beta (z0 - r)))

    The loss is the mean over the whole batch, as TRL. ``kl_estimate`` is the reference point: a batch estimate
    of KL(pi || pi_ref), in TRL the mean of log pi - log pi_ref over mismatched (x, y') pairs; it only shifts
    the reference point and gets no gradient. Metrics: "rewards/chosen" / "rewards/rejected" = mean beta r over
    the desirable / undesirable examples (0 when that group is empty, never NaN), "count/chosen",
    "count/rejected", "kl" (z0).
    """
    labels = labels.bool()
    r = policy_logps - ref_logps
    z0 = _as_tensor(kl_estimate, r).detach().clamp(min=0)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    loss = torch.where(labels, desirable, undesirable).mean()
    rewards = beta * r.detach()
    n_chosen, n_rejected = labels.sum(), (~labels).sum()
    return loss, {
        "rewards/chosen": torch.where(labels, rewards, 0).sum() / n_chosen.clamp(min=1),
        "rewards/rejected": torch.where(labels, 0, rewards).sum() / n_rejected.clamp(min=1),
        "count/chosen": n_chosen.float(),
        "count/rejected": n_rejected.float(),
        "kl": z0,
    }


def implicit_reward(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward r(x, y) = beta (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, eq. 5).

    Equal to the true reward up to a prompt-only term beta log Z(x), so it ranks completions of one prompt
    (best-of-N) and compares two of them (reward accuracy).
    """
    return beta * (policy_logps - ref_logps)
