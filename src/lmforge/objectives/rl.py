"""RL-from-feedback objectives: KL estimators, GAE, PPO's clipped losses, GRPO / RLOO / Dr. GRPO, DAPO, GSPO, CISPO,
truncated importance sampling, DAPO's dynamic sampling and overlong reward shaping.

Shapes: per-token tensors are (B, T) over the response tokens, right-padded, with ``mask`` 1 on real response
tokens; per-sequence tensors are (B,). Losses return ``(loss, metrics)`` with detached scalar metrics.

Token-level losses divide by a token count. Under gradient accumulation (and data parallelism) the count must be
the whole optimizer step's, not each micro-batch's, or every micro-batch weighs the same however many tokens it
holds (TRL's "bnpo"). ``num_tokens`` is that count divided by the number of micro-batches averaged into the
step (micro-batches x processes): the loop then sums sum(loss over tokens) / (step tokens) exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.objectives.lm import _map_row_chunks

Metrics = dict[str, torch.Tensor]

LOSS_AGGREGATIONS = ("token-mean", "bnpo", "seq-mean-token-sum", "seq-mean-token-mean", "dr_grpo")
POLICY_LOSSES = ("grpo", "dapo", "gspo", "cispo")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * m) / sum(m) over ``dim`` (all dims if None); 0 where the mask is empty, never NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def aggregate_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean",
                   max_len: int | None = None, num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reduce (B, T) per-token losses to a scalar.

    - "token-mean": sum over all tokens / ``num_tokens``, the optimizer step's token count per averaged
      micro-batch (DAPO's token-level loss, Yu et al. 2025: every token of the batch weighs the same however the
      batch is cut into micro-batches); without ``num_tokens``, this micro-batch's count.
    - "bnpo": sum / this micro-batch's token count, always (TRL's "bnpo"; each micro-batch weighs the same).
    - "seq-mean-token-sum": mean over sequences of the per-sequence token sum.
    - "seq-mean-token-mean": mean over sequences of the per-sequence token mean (original GRPO, Shao et al. 2024;
      biases towards long wrong answers, as Dr. GRPO points out).
    - "dr_grpo": sum over all tokens / (B * max_len), a constant normaliser (Liu et al. 2025, "Understanding
      R1-Zero-Like Training"); ``max_len`` defaults to T, the padded length.
    """
    mask = mask.to(token_loss.dtype)
    if loss_agg == "token-mean" and num_tokens is not None:
        return (token_loss * mask).sum() / torch.as_tensor(num_tokens, dtype=token_loss.dtype).clamp(min=1e-8)
    if loss_agg in ("token-mean", "bnpo"):
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
            "clipfrac_low": masked_mean(((ratio < 1 - clip_eps) & (advantages < 0)).float(), mask),
            "clipfrac_high": masked_mean(((ratio > 1 + high) & (advantages > 0)).float(), mask),
            "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return token_loss, ratio, metrics


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                    loss_agg: str = "token-mean", num_tokens=None) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate (Schulman et al. 2017), per token, aggregated by ``loss_agg``.

        rho = pi(a|s) / pi_old(a|s),    L = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)

    eps_low = ``clip_eps``; eps_high = ``clip_eps_high`` or ``clip_eps`` (DAPO's clip-higher, Yu et al. 2025, sets
    it larger so low-probability tokens can grow). A token whose ratio is past the bound in the direction its
    advantage pushes gets exactly zero gradient. ``advantages`` is (B, T) or (B,) (broadcast over tokens).
    Metrics: "clipfrac" (fraction of tokens clipped; "clipfrac_low" / "clipfrac_high": below 1 - eps_low with
    A < 0, above 1 + eps_high with A > 0), "approx_kl" (k3 estimate of KL(pi_old || pi) on the sampled tokens),
    "ratio_mean". ``num_tokens``: see aggregate_loss.
    """
    token_loss, _, metrics = _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high)
    return aggregate_loss(token_loss, mask, loss_agg, num_tokens=num_tokens), metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2, num_tokens=None) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped value loss, token-mean: L = 1/2 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    Metrics: "vf_clipfrac" (fraction of tokens where the clipped term is the larger), "vpred" (mean V).
    ``num_tokens``: the step's token count per averaged micro-batch (aggregate_loss's "token-mean").
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped_sq, clipped_sq), mask, num_tokens=num_tokens)
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
    reward in all gets 0 (no std). Computed as each group's ``process_token_rewards`` summed from the end.
    """
    if len(step_rewards) % group_size or len(step_rewards) != len(step_ends):
        raise ValueError(f"{len(step_rewards)} completions with {len(step_ends)} step lists do not make groups "
                         f"of {group_size}")
    groups = [process_token_rewards(step_rewards[g:g + group_size], step_ends[g:g + group_size], length, eps)
              for g in range(0, len(step_rewards), group_size)]
    if not groups:
        return torch.zeros(0, length)
    paid = torch.cat(groups)  # each normalised step reward at its step's last token
    return paid.flip(1).cumsum(1).flip(1)  # token t: the sum of what is paid at t and after


def process_token_rewards(step_rewards: list[list[float]], step_ends: list[list[int]], length: int,
                          eps: float = 1e-4) -> torch.Tensor:
    """PPO's dense process reward (Lightman et al. 2023; Wang et al. 2024, Math-Shepherd's step-by-step PPO), as a
    (B, length) tensor of per-token rewards.

    Completion i's step rewards r_i1..r_iK (a process reward model's scores) are normalised by the mean and std of
    ALL the buffer's step rewards, r~ = (r - mean) / (std + eps), as DeepSeekMath normalises them for GRPO
    (``process_advantages``; here over the whole buffer, since PPO needs no groups), and r~_ik is paid at the token
    its step ends on, end_ik (clamped to the last column). GAE then turns them into advantages against the critic:
    with gamma = lam = 1 and V = 0, token t's advantage is sum_{k: end_ik >= t} r~_ik, which is exactly
    process_advantages. A buffer with fewer than two step rewards gets 0 everywhere (no std).
    """
    if len(step_rewards) != len(step_ends):
        raise ValueError(f"{len(step_rewards)} completions with {len(step_ends)} step lists")
    out = torch.zeros(len(step_rewards), length)
    flat = torch.tensor([r for rows in step_rewards for r in rows], dtype=torch.float32)
    if flat.numel() < 2:
        return out
    mean, std = flat.mean(), flat.std()
    for i, (rewards, ends) in enumerate(zip(step_rewards, step_ends, strict=True)):
        for r, end in zip(rewards, ends, strict=True):
            out[i, min(end, length - 1)] += (r - mean) / (std + eps)
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


def gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 3e-4, clip_eps_high: float | None = 4e-4) -> tuple[torch.Tensor, Metrics]:
    """GSPO's sequence-level objective (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7).

        s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp( (1/|y_i|) sum_t log(pi(y_it) / pi_old(y_it)) )
        L = -(1/B) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

    One length-normalised ratio per sequence, so a sequence is clipped (kept or dropped) as a whole and its
    tokens share one importance weight: grad s_i = s_i (1/|y_i|) sum_t grad log pi(y_it). The paper's ranges are
    tiny (3e-4, 4e-4) because s_i is a per-token geometric mean. ``advantages`` is (B,). An empty response has
    s_i = 1 and no gradient. Metrics: "clipfrac" (share of sequences clipped), "clipfrac_low" / "clipfrac_high",
    "approx_kl" (token k3 of KL(pi_old || pi)), "ratio_mean" (mean s_i).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if advantages.dim() == 2:
        advantages = advantages[:, 0]
    seq_ratio = torch.exp(masked_mean(logprobs - old_logprobs, mask, dim=-1))
    unclipped = -advantages * seq_ratio
    clipped = -advantages * torch.clamp(seq_ratio, 1 - clip_eps, 1 + high)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {"clipfrac": (clipped > unclipped).float().mean(),
                   "clipfrac_low": ((seq_ratio < 1 - clip_eps) & (advantages < 0)).float().mean(),
                   "clipfrac_high": ((seq_ratio > 1 + high) & (advantages > 0)).float().mean(),
                   "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask),
                   "ratio_mean": seq_ratio.mean()}
    return loss, metrics


def cispo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, clip_eps: float = 1.0,
                     clip_eps_high: float | None = 4.0) -> tuple[torch.Tensor, Metrics]:
    """CISPO's per-token loss (MiniMax-M1, Chen et al. 2025, eq. 4): clip the importance weight, not the update.

        r_t = pi(y_t) / pi_old(y_t),    L_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A log pi(y_t)

    The weight is a constant (stop-gradient), so every token keeps a REINFORCE gradient A grad log pi, scaled
    by its truncated weight: unlike PPO's clip, no token's gradient is dropped (rare "fork" tokens included).
    eps_low = 1 (the default) puts no lower bound on the weight, as MiniMax-M1 does; eps_high bounds it above.
    Returns (B, T) token losses (aggregate them like GRPO's) and metrics "clipfrac" (share of tokens whose
    weight was truncated), "clipfrac_low" / "clipfrac_high", "approx_kl", "ratio_mean".
    """
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    weight = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    token_loss = -weight * advantages * logprobs
    with torch.no_grad():
        low, up = ratio < 1 - clip_eps, ratio > 1 + high
        metrics = {"clipfrac": masked_mean((low | up).float(), mask), "clipfrac_low": masked_mean(low.float(), mask),
                   "clipfrac_high": masked_mean(up.float(), mask),
                   "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs.detach(), "k3"), mask),
                   "ratio_mean": masked_mean(ratio, mask)}
    return token_loss, metrics


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap: float = 2.0, sequence: bool = False) -> torch.Tensor:
    """Truncated importance sampling for a sampler that is not the trainer (Yao et al. 2025, "Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training"; Ionides 2008 for truncation).

        w_t = min(pi_old(y_t) / pi_rollout(y_t), C)          (per token; no gradient)
        w_i = min(exp(mean_t log(pi_old(y_it) / pi_rollout(y_it))), C)   (``sequence``: GSPO's length-normalised form)

    pi_rollout is what the generation engine sampled from (its own kernels, cache, precision: vLLM in bf16, or
    the KV-cache decode here); pi_old is the trainer's forward over the same tokens. Multiplying the policy loss
    by w corrects the gradient for the mismatch, and the cap C bounds its variance. 0 at padding; (B, T), or
    (B, 1) with ``sequence``.
    """
    log_w = (old_logprobs - rollout_logprobs).detach()
    if sequence:
        return torch.exp(masked_mean(log_w, mask, dim=-1)).clamp(max=cap)[:, None]
    return torch.exp(log_w).clamp(max=cap) * mask.to(log_w.dtype)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, beta: float = 0.04, loss_agg: str = "token-mean",
              max_len: int | None = None, *, loss_type: str = "grpo", num_tokens=None,
              rollout_logprobs: torch.Tensor | None = None, tis_cap: float = 2.0) -> tuple[torch.Tensor, Metrics]:
    """The GRPO family's objective: a policy term chosen by ``loss_type`` + beta k3 KL to the reference.

        grpo   L_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)   (Shao et al. 2024, eq. 3)
        dapo   the same token-level clip with eps_high > eps_low ("clip-higher", Yu et al. 2025), averaged over
               every token of the step (aggregate_loss's "token-mean" with ``num_tokens``)
        gspo   gspo_loss: one length-normalised ratio per sequence (Zheng et al. 2025)
        cispo  cispo_token_loss: -sg(clip(rho_t)) A log pi_t (Chen et al. 2025)
        + beta k3_t,  k3_t = pi_ref/pi - 1 - log(pi_ref/pi)  (unbiased KL(pi || pi_ref), in the loss not the reward)

    ``advantages`` is (B,) per sequence (``grpo_advantages`` / ``rloo_advantages``) or (B, T). ``old_logprobs``
    None means one update per generation: rho = exp(logp - logp.detach()) = 1 with the policy gradient.
    ``ref_logprobs`` None or ``beta`` = 0 drops the KL term. ``loss_agg`` reduces token losses (see
    aggregate_loss; "dr_grpo" uses B * ``max_len``); gspo's policy term is a mean over sequences whatever it is.
    ``rollout_logprobs`` (the sampler's own log-probs) weighs the policy term by truncated_is_weights(cap
    ``tis_cap``). Metrics: "clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl", "ratio_mean", "kl" (masked
    mean k3 to the reference) when ``ref_logprobs`` is given, "tis_weight" (mean weight) with rollout log-probs.
    """
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"loss_type must be one of {POLICY_LOSSES}, got {loss_type!r}")
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    weights = None
    if rollout_logprobs is not None:
        weights = truncated_is_weights(old_logprobs, rollout_logprobs, mask, tis_cap, sequence=loss_type == "gspo")
    if loss_type == "gspo":
        if weights is not None:  # the sequence weight scales the sequence's advantage (a constant)
            advantages = advantages.reshape(-1) * weights[:, 0]
        policy, metrics = gspo_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high)
        token_loss = torch.zeros_like(logprobs)
    else:
        if loss_type == "cispo":
            token_loss, metrics = cispo_token_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high)
        else:
            token_loss, _, metrics = _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_eps,
                                                        clip_eps_high)
        if weights is not None:
            token_loss = token_loss * weights
        policy = None
    if weights is not None:
        metrics["tis_weight"] = masked_mean(weights.expand_as(mask), mask).detach()
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs, "k3")
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta != 0.0:
            token_loss = token_loss + beta * kl
    loss = aggregate_loss(token_loss, mask, loss_agg, max_len, num_tokens)
    return (loss if policy is None else policy + loss), metrics


@torch.no_grad()
def informative_groups(rewards: torch.Tensor, group_size: int, tol: float = 1e-8) -> torch.Tensor:
    """(B,) bool: the groups whose rewards are not all equal (DAPO's dynamic sampling, Yu et al. 2025).

    A group with zero reward variance has zero group-relative advantage everywhere: it costs compute and, in a
    token-mean loss, dilutes every other group's gradient. DAPO drops such groups and samples more prompts until
    the batch is full. ``rewards`` is (B * G,), each group contiguous.
    """
    grouped = rewards.reshape(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values).abs() > tol


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a length-aware reward term (<= 0):

        R(y) = 0                                  |y| <= L_max - L_buf
             = ((L_max - L_buf) - |y|) / L_buf    L_max - L_buf < |y| <= L_max
             = -1                                 |y| > L_max

    times ``penalty``. ``max_len`` = L_max (the generation limit), ``buffer`` = L_buf (0: no shaping). A
    truncated answer is not scored as wrong for being long, it is nudged to finish before the limit.
    """
    lengths = lengths.float()
    if buffer <= 0:
        return torch.zeros_like(lengths)
    expected = max_len - buffer
    ramp = (expected - lengths) / buffer
    out = torch.where(lengths <= expected, torch.zeros_like(lengths), ramp)
    return penalty * torch.where(lengths > max_len, -torch.ones_like(lengths), out)


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
