"""Token-level cross-entropy and log-probabilities without materialising (tokens x vocabulary) fp32 logits.

For hidden states h (N, D), output matrix W (V, D) and targets y, the per-token loss is

    l_i = logsumexp(W h_i) - (W h_i)_{y_i} = -log p(y_i | h_i)

and, for the mean over the M non-ignored rows, the gradient has a closed form: with p_i = softmax(W h_i) and
e_y the one-hot target,

    dL/dh_i = (1/M) (p_i - e_{y_i})^T W,        dL/dW = (1/M) sum_i (p_i - e_{y_i}) h_i^T.

For ``reduction="mean"`` / ``"sum"`` the forward pass walks over chunks of rows, builds one chunk's logits in fp32,
takes its loss, turns the logits into (p - e_y) in place and multiplies out both gradients right there; backward
only scales them by the incoming gradient. Peak memory is O(chunk x V) instead of O(N x V), and the softmax is
computed once instead of forward + backward (the same idea as Liger Kernel's fused linear cross-entropy,
Hsu et al. 2024). ``reduction="none"`` needs a per-token incoming gradient that is unknown at forward time, so
each chunk runs under ``torch.utils.checkpoint``: only the chunk's inputs are kept and its logits are rebuilt,
one chunk at a time, during backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, reduction, needs_grad):
        n = hidden.shape[0]
        valid = labels != ignore_index
        count = int(valid.sum())
        scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            y = labels[start:start + chunk_size]
            keep = valid[start:start + chunk_size]
            target = y.clamp(min=0)[:, None]
            logits = (h @ w.T).float()
            target_logit = logits.gather(1, target).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(top).exp_()  # in place: one (chunk x V) buffer serves logits, exp and softmax
            norm = exp.sum(dim=-1, keepdim=True)
            lse = top.squeeze(1) + norm.log().squeeze(1)
            total += ((lse - target_logit) * keep).sum()
            if needs_grad:
                probs = exp.div_(norm)
                probs.scatter_add_(1, target, torch.full_like(norm, -1.0))
                probs.mul_((keep * scale)[:, None])
                g = probs.to(hidden.dtype)
                grad_hidden[start:start + chunk_size] = g @ w
                grad_weight.addmm_(g.T.float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("chunked_cross_entropy was run with grad disabled; it cannot be backpropagated")
        # in place, to hold no second (N x D) / (V x D) buffer; a second backward through the same graph raises
        gh = grad_hidden.mul_(grad_output.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        gw = grad_weight.mul_(grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def _map_row_chunks(fn: Callable[..., torch.Tensor], rows: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int, *shared: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(rows_chunk, labels_chunk, *shared)`` to chunks of rows and concatenate the (chunk,) results.

    With grad enabled each chunk is checkpointed, so backward rebuilds one chunk's intermediates at a time
    instead of keeping all of them alive: peak memory O(chunk x V) rather than O(N x V).
    """
    grad = torch.is_grad_enabled() and (rows.requires_grad or any(t.requires_grad for t in shared))
    outs = []
    for start in range(0, rows.shape[0], chunk_size):
        args = (rows[start:start + chunk_size], labels[start:start + chunk_size], *shared)
        outs.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    if not outs:
        return rows.new_zeros(0, dtype=torch.float32)
    return torch.cat(outs)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = -100, chunk_size: int = 1024,
                          reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T`` against ``labels``, computed ``chunk_size`` rows at a time.

    hidden: (N, D) or (B, T, D) final hidden states; weight: (V, D) the lm_head; labels: (N,) or (B, T) with
    ``ignore_index`` where there is no target. Logits are upcast to fp32 one chunk at a time only, so peak
    memory is O(chunk_size x V). Equals ``F.cross_entropy(hidden @ weight.T, labels, reduction=...)`` in fp32.

    reduction: "mean" over non-ignored tokens (an all-ignored batch gives 0, not NaN, and a zero gradient),
    "sum", or "none" (fp32 per-token losses of ``labels``' shape, 0 at ignored positions).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if reduction == "none":
        def rows_ce(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy((h @ w.to(h.dtype).T).float(), y, reduction="none", ignore_index=ignore_index)

        return _map_row_chunks(rows_ce, flat_hidden, flat_labels, chunk_size, weight).reshape(labels.shape)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(flat_hidden, weight, flat_labels, ignore_index, chunk_size,
                                          reduction, needs_grad)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, chunk_size: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``: ``chunked_cross_entropy(reduction="mean")``."""
    return chunked_cross_entropy(hidden, weight, labels, ignore_index, chunk_size, reduction="mean")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   chunk_size: int = 1024) -> torch.Tensor:
    """Per-token log p(label) = -cross_entropy(logits, label), in fp32; 0 at positions where label == ignore_index.

    logits: (..., V); labels: (...). Computed as ``-F.cross_entropy(reduction="none")`` on fp32 chunks of rows
    (never a full fp32 log_softmax), each chunk checkpointed when grad is needed. Labels must already be
    aligned with the logits (shift them yourself for next-token prediction).
    """
    def rows_logp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(x.float(), y, reduction="none", ignore_index=ignore_index)

    flat = _map_row_chunks(rows_logp, logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), chunk_size)
    return flat.reshape(labels.shape)


class _LinearTokenLogprobs(torch.autograd.Function):
    """log p(y | h) = (W h / T)_y - logsumexp(W h / T) per row, with entropies on request; see chunked_token_logprobs.

    Gradient: d log p_y / dz = e_y - softmax(z) for z = W h / T, so with incoming g per row
    dh = (g (e_y - p) / T) W and dW = sum_rows (g (e_y - p) / T)^T h. The forward keeps each chunk's softmax p
    when all of them fit in ``keep_limit`` elements (backward is then two matmuls per chunk); else backward
    rebuilds a chunk's p from h and the saved logsumexp (one more matmul, O(chunk x V) memory).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, temperature, with_entropy, keep_limit,
                needs_grad):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != ignore_index
        targets = labels.clamp(min=0)
        w = weight.to(hidden.dtype)
        probs = hidden.new_empty((n, vocab), dtype=torch.float32) if needs_grad and n * vocab <= keep_limit else None
        logps = hidden.new_empty(n, dtype=torch.float32)
        lses = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n, dtype=torch.float32) if with_entropy else None
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = (hidden[rows] @ w.T).float()
            if temperature != 1.0:
                z.div_(temperature)
            target = z.gather(1, targets[rows, None]).squeeze(1)
            top = z.amax(dim=-1, keepdim=True)
            z.sub_(top)  # in place: z - max
            if probs is not None:  # exp(z - max) straight into the kept buffer, normalised below
                e = torch.exp(z, out=probs[rows])
            else:
                e = torch.exp(z) if with_entropy else z.exp_()
            norm = e.sum(dim=-1, keepdim=True)
            lses[rows] = (top + norm.log()).squeeze(1)
            logps[rows] = target - lses[rows]
            if with_entropy:  # H = log sum e - sum p (z - max); the row dots as a batched matmul, no (rows, V) product
                dots = torch.bmm(e[:, None, :], z[:, :, None]).view(-1)
                entropy[rows] = norm.log().squeeze(1) - dots / norm.squeeze(1)
            if probs is not None:
                e.div_(norm)
        logps.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, targets, valid, lses, probs)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        if entropy is None:
            return logps
        ctx.mark_non_differentiable(entropy)
        return logps, entropy.masked_fill_(~valid, 0.0)

    @staticmethod
    def backward(ctx, grad_logps, *_):
        hidden, weight, targets, valid, lses, probs = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        g = (grad_logps.float() * valid) / ctx.temperature
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            if probs is not None:
                p = probs[rows]  # used up in place: a second backward through the same graph is not supported
            else:
                z = (hidden[rows] @ w.T).float()
                p = (z.div_(ctx.temperature) if ctx.temperature != 1.0 else z).sub_(lses[rows, None]).exp_()
            dz = p.mul_(-g[rows, None]).scatter_add_(1, targets[rows, None], g[rows, None])  # g (e_y - p) / T
            if grad_hidden is not None:
                grad_hidden[rows] = dz.to(hidden.dtype) @ w
            if grad_weight is not None:
                grad_weight.addmm_(dz.T, hidden[rows].float())
        return (grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None,
                None, None, None, None, None, None, None)


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk_size: int = 1024, ignore_index: int = -100, temperature: float = 1.0,
                           return_entropy: bool = False, keep_limit: int = 2**25):
    """Per-token log p(label) from hidden states and the lm_head, never holding (tokens x V) logits.

    hidden: (..., D); weight: (V, D); labels: (...). Returns fp32 of ``labels``' shape, 0 at ignored positions;
    with ``return_entropy`` also the entropy of each position's distribution (no gradient). ``temperature``
    divides the logits first (RL scores samples at the temperature they were drawn at). Logits are built one
    chunk of rows at a time in fp32; the softmax is kept for backward only while it fits in ``keep_limit``
    elements (2^25 = 128 MiB), else backward rebuilds it chunk by chunk. The same numbers with or without grad.
    """
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out = _LinearTokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), ignore_index,
                                     chunk_size, temperature, return_entropy, keep_limit, needs_grad)
    if return_entropy:
        return out[0].reshape(labels.shape), out[1].reshape(labels.shape)
    return out.reshape(labels.shape)


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sequence log-probability: sum_t m_t log p_t over the last dim, or that sum / sum_t m_t if ``average``.

    token_logps, mask: (..., T). An all-masked row gives 0. The average is what SimPO, ORPO and IPO use.
    """
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)
