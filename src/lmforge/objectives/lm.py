"""Next-token cross-entropy without materialising (tokens x vocabulary) fp32 logits.

For hidden states h (N, D), output matrix W (V, D) and targets y, the mean loss over the M non-ignored rows is

    L = (1/M) sum_i [ logsumexp(W h_i) - (W h_i)_{y_i} ]

and its gradient has a closed form: with p_i = softmax(W h_i) and e_y the one-hot target,

    dL/dh_i = (1/M) (p_i - e_{y_i})^T W,        dL/dW = (1/M) sum_i (p_i - e_{y_i}) h_i^T.

So the forward pass walks over chunks of rows, builds one chunk's logits in fp32, takes its loss, turns the
logits into (p - e_y) in place and multiplies out both gradients right there. Backward only scales them by the
incoming gradient. Peak memory is O(chunk x V) instead of O(N x V), and the softmax is computed once instead of
forward + backward (the same idea as Liger Kernel's fused linear cross-entropy, Hsu et al. 2024).
"""

from __future__ import annotations

import torch


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size):
        n = hidden.shape[0]
        valid = labels != ignore_index
        count = int(valid.sum())
        scale = 1.0 / max(count, 1)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.empty_like(weight, dtype=torch.float32) if needs_grad else None
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
                if start == 0:
                    torch.mm(g.T.float(), h.float(), out=grad_weight)
                else:
                    grad_weight.addmm_(g.T.float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden.mul_(grad_output.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        gw = grad_weight.mul_(grad_output).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, chunk_size: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``; an all-ignored batch gives 0, not NaN.

    hidden: (..., D); weight: (V, D); labels: (...) with ``ignore_index`` for positions without a target.
    """
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                          ignore_index, chunk_size)
