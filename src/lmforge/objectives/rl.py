"""RL-from-feedback objectives: KL estimators, GAE, PPO's clipped losses, GRPO / RLOO / Dr. GRPO.

Shapes: per-token tensors are (B, T) over the response tokens, right-padded, with ``mask`` 1 on real response
tokens; per-sequence tensors are (B,). Losses return ``(loss, metrics)`` with detached scalar metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.objectives.lm import _map_row_chunks

Metrics = dict[str, torch.Tensor]

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "dr_grpo")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * m) / sum(m) over ``dim`` (all dims if None); 0 where the mask is empty, never NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def aggregate_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean",
                   max_len: int | None = None) -> torch.Tensor:
    """Reduce (B, T) per-token losses to a scalar.

    - "token-mean": sum over all tokens / number of tokens (DAPO, Yu et al. 2025; every token weighs the same).
    - "seq-mean-token-sum": mean over sequences of the per-sequence token sum.
    - "seq-mean-token-mean": mean over sequences of the per-sequence token mean (original GRPO, Shao et al. 2024;
      biases towards long wrong answers, as Dr. GRPO points out).
    - "dr_grpo": sum over all tokens / (B * max_len), a constant normaliser (Liu et al. 2025, "Understanding
      R1-Zero-Like Training"); ``max_len`` defaults to T, the padded length.
    """
    mask = mask.to(token_loss.dtype)
    if loss_agg == "token-mean":
        return masked_mean(token_loss, mask)
    if loss_agg == "seq-mean-token-sum":
        return (token_loss * mask).sum(-1).mean()
    if loss_agg == "seq-mean-token-mean":
        return masked_mean(token_loss, mask, dim=-1).mean()
    if loss_agg == "dr_grpo":
        norm = token_loss.shape[-1] if max_len is None else max_len
        return (token_loss * mask).sum() / (token_loss.shape[0] * norm)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) for tokens sampled from pi (Schulman 2020, "Approximating KL").

    With log r = log pi_ref - log pi on a sample from pi:
    - "k1" = -log r = log pi - log pi_ref: unbiased, high variance, can be negative.
    - "k2" = (log r)^2 / 2: biased (low bias when pi ~ pi_ref), low variance, >= 0.
    - "k3" = r - 1 - log r: unbiased (E_pi[r] = 1), low variance, >= 0; the estimator GRPO uses.
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded (B, T) responses.

        delta_t = r_t + gamma V_{t+1} - V_t,    A_t = delta_t + gamma lam A_{t+1},    returns R_t = A_t + V_t

    computed backwards; past the last valid token V and A are 0, so the last token bootstraps with 0 (the
    episode ends). Advantages and returns are 0 at padding and carry no gradient.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance, as TRL); 0 at masked-out positions.

    With ``shift_mean=False`` the mean is added back: only the scale changes (TRL does this for rewards).
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def _clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, clip_eps: float,
                       clip_eps_high: float | None) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    token_loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return token_loss, ratio, metrics


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                    loss_agg: str = "token-mean") -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate (Schulman et al. 2017), per token, aggregated by ``loss_agg``.

        rho = pi(a|s) / pi_old(a|s),    L = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)

    eps_low = ``clip_eps``; eps_high = ``clip_eps_high`` or ``clip_eps`` (DAPO's clip-higher, Yu et al. 2025, sets
    it larger so low-probability tokens can grow). A token whose ratio is past the bound in the direction its
    advantage pushes gets exactly zero gradient. ``advantages`` is (B, T) or (B,) (broadcast over tokens).
    Metrics: "clipfrac" (fraction of tokens clipped), "approx_kl" (k3 estimate of KL(pi_old || pi) on the
    sampled tokens), "ratio_mean".
    """
    token_loss, _, metrics = _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high)
    return aggregate_loss(token_loss, mask, loss_agg), metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped value loss, token-mean: L = 1/2 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    Metrics: "vf_clipfrac" (fraction of tokens where the clipped term is the larger), "vpred" (mean V).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).float(), mask),
                   "vpred": masked_mean(values, mask)}
    return loss, metrics


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, DeepSeekMath), one per completion.

    ``rewards`` is (B * G,) with the G completions of each prompt contiguous. A_i = r_i - mean(group), divided by
    - "group": the group's std + eps (original GRPO; unbiased std, as TRL),
    - "batch": the whole batch's reward std + eps (group mean, batch std: more stable with small groups),
    - "none": nothing (Dr. GRPO, Liu et al. 2025: the std division up-weights too-easy / too-hard prompts).
    Advantages sum to zero within every group.
    """
    if group_size < 2:
        raise ValueError("group_size must be >= 2 for group-relative advantages")
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centred.reshape(rewards.shape)


def process_advantages(step_rewards: list[list[float]], step_ends: list[list[int]], group_size: int, length: int,
                       eps: float = 1e-4) -> torch.Tensor:
    """GRPO with process supervision (Shao et al. 2024, DeepSeekMath section 4.1.3), as a (B * G, length) tensor.

    Each completion i has step rewards r_i1..r_iK (a process reward model's scores) whose steps end at tokens
    end_i1 < ... < end_iK. Within a group of G completions every step reward is normalised by the mean and std
    of ALL the group's step rewards, r~ = (r - mean) / (std + eps), and token t's advantage is the sum of the
    normalised rewards of the steps that end at or after it, A_it = sum_{k: end_ik >= t} r~_ik: a token is
    credited with everything that follows it. Tokens after the last step end get 0. A group with one step
    reward in all gets 0 (no std).
    """
    if len(step_rewards) % group_size or len(step_rewards) != len(step_ends):
        raise ValueError(f"{len(step_rewards)} completions with {len(step_ends)} step lists do not make groups "
                         f"of {group_size}")
    out = torch.zeros(len(step_rewards), length)
    for g in range(0, len(step_rewards), group_size):
        flat = torch.tensor([r for rows in step_rewards[g:g + group_size] for r in rows], dtype=torch.float32)
        if flat.numel() < 2:
            continue
        mean, std = flat.mean(), flat.std()
        for i in range(g, g + group_size):
            for r, end in zip(step_rewards[i], step_ends[i], strict=True):
                out[i, :min(end, length - 1) + 1] += (r - mean) / (std + eps)
    return out


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j.

    ``rewards`` is (B * G,), the G samples of a prompt contiguous. Equals G/(G - 1) (r_i - mean_j r_j).
    """
    if group_size < 2:
        raise ValueError("group_size must be >= 2 for a leave-one-out baseline")
    grouped = rewards.reshape(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(rewards.shape)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, beta: float = 0.04, loss_agg: str = "token-mean",
              max_len: int | None = None) -> tuple[torch.Tensor, Metrics]:
    """GRPO's per-token objective (Shao et al. 2024, DeepSeekMath eq. 3), aggregated by ``loss_agg``.

        L_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t,
        k3_t = pi_ref/pi - 1 - log(pi_ref/pi)      (unbiased KL(pi || pi_ref) estimate, in the loss not the reward)

    ``advantages`` is (B,) per sequence (``grpo_advantages`` / ``rloo_advantages``) or (B, T). ``old_logprobs``
    None means one update per generation: rho = exp(logp - logp.detach()) = 1 with the policy gradient.
    ``ref_logprobs`` None or ``beta`` = 0 drops the KL term. ``loss_agg``: "token-mean" (DAPO),
    "seq-mean-token-mean" (original GRPO), "dr_grpo" (constant normaliser B * ``max_len``), or
    "seq-mean-token-sum". Metrics: "clipfrac", "approx_kl", "ratio_mean", and "kl" (masked mean k3 to the
    reference) when ``ref_logprobs`` is given.
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    token_loss, _, metrics = _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high)
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs, "k3")
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta != 0.0:
            token_loss = token_loss + beta * kl
    return aggregate_loss(token_loss, mask, loss_agg, max_len), metrics


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor | None = None,
                        chunk_size: int = 1024) -> torch.Tensor:
    """Entropy H = logsumexp(z) - sum softmax(z) z of each (..., V) row, in fp32 chunks of rows.

    Returns per-position entropies (...,), or their masked mean (a scalar) when ``mask`` is given.
    Differentiable (for an entropy bonus); each chunk is checkpointed when grad is needed.
    """
    def rows_entropy(z: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return torch.logsumexp(z, dim=-1) - (F.softmax(z, dim=-1) * z).sum(-1)

    flat = logits.reshape(-1, logits.shape[-1])
    dummy = torch.zeros(flat.shape[0], device=logits.device)
    entropy = _map_row_chunks(rows_entropy, flat, dummy, chunk_size).reshape(logits.shape[:-1])
    return entropy if mask is None else masked_mean(entropy, mask)


def adaptive_kl_controller(beta: float, current_kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Adaptive KL coefficient update (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences"):

        e = clip((KL - target) / target, -0.2, 0.2),    beta <- beta (1 + e n_steps / horizon)

    KL above target raises beta, below lowers it; returns the new beta.
    """
    error = min(max((current_kl - target) / target, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def kl_regularised_optimum(pi_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Closed-form maximiser of E_pi[r] - beta KL(pi || pi_ref) over the last dim: pi* = pi_ref exp(r/beta) / Z.

    The policy RLHF, DPO and GRPO-with-KL all aim at (Rafailov et al. 2023, eq. 4); computed as a softmax.
    """
    return torch.softmax(torch.log(pi_ref) + rewards / beta, dim=-1)
