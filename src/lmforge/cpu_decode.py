"""Decoding fast on a CPU: the weights laid out for the matmul kernels that win when a step has a few rows.

A decode step multiplies one row per sequence by every weight of the model, so it streams weights and pays a
fixed cost per kernel call; which kernel runs, and how many times, decides its speed more than the arithmetic.
lmforge.generation uses these for fp32 and bf16 models on CPU (GPUs need none of it):

- ``PackedDecodeStep`` (any row count): every projection prepacked once per generate call into oneDNN's blocked
  layout (oneDNN's kernel then runs 1.3-1.7x faster than MKL's on 16 rows), q, k and v fused into one matmul and
  gate and up into another (7 matmuls per layer become 4), and attention over the cache as one SDPA call with
  each kv head's group of query heads as its queries, (B, kv_heads, group, head_dim), so the grouped keys are
  read as they lie (SmolLM2 bf16, 16 rows, 70 positions: 73 against 166 us a layer for the two batched matmuls
  and softmax this replaced, whose kernels copied the strided keys; fp32 61 against 75 us). The math is the
  model's own (its RMSNorm modules, the same RoPE tables); tests hold it to the model's forward.
- ``packed_head``: the output head alone, prepacked (the fixed-shape and compiled decoders use it).
- ``column_major_weights`` (one row): MKL's kernel for a contiguous W.T streams the weights better than its
  kernel for a contiguous W.

Measured on a 2-core EPYC (bench/bench_generate.py: hidden 256, 4 layers, vocab 8192, 16 rows): ~3,000 new
tokens/s through ``Transformer.forward`` with the growing cache, ~4,500 through ``PackedDecodeStep``.

bf16 matmuls: the step packs its weights in ``model.decode_matmul_dtype`` (bf16 for the RL stages under
``train.dtype=bfloat16``) or, when that is None, in the weights' own dtype (``lmforge serve dtype=bfloat16``).
Activations, norms, attention and the cache stay in the weights' dtype, as in the model's own forward (fp32 for an
fp32 model under bf16 matmuls); only the projections and the head multiply in the matmul dtype, which oneDNN
runs on AVX512-BF16 / AMX where the CPU has them. SmolLM2-135M's 121 matmuls of one step at 16 rows
(2-core Intel Xeon with AMX): 37 ms fp32, 14 ms bf16; at one row 18 ms (fp32, MKL) against 14 ms.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import KVCache, _rope_by_halves
from lmforge.quant import QuantLinear


def _mkldnn_fp32_cpu(model) -> bool:
    w = model.lm_head.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def matmul_dtype(model) -> torch.dtype | None:
    """The dtype ``PackedDecodeStep`` multiplies in on this CPU: ``model.decode_matmul_dtype`` if set, else the
    weights' dtype; float32 or bfloat16 (bf16 only where oneDNN has bf16 kernels); None where neither applies."""
    w = model.lm_head.weight
    dtype = getattr(model, "decode_matmul_dtype", None) or w.dtype
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available() or w.dtype not in (torch.float32,
                                                                                                torch.bfloat16):
        return None
    if dtype == torch.bfloat16:
        return dtype if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return dtype if dtype == torch.float32 else None


def _pack_onednn(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (out, in) reordered for oneDNN's linear kernel, tuned for ``rows`` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias with a weight from ``_pack_onednn``, multiplied in the packed weight's dtype, returned in
    x's (fp32 activations with bf16 weights: x is rounded to bf16 for the product, accumulated in fp32)."""
    if x.dtype == packed.dtype:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [None], "")
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype).contiguous(), packed, bias, "none", [None],
                                              "").to(x.dtype)


def _pack_one_row(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (out, in) as a contiguous (in, out) matrix: what MKL's kernel streams best for one input row."""
    return weight.detach().t().contiguous()


def _linear_one_row(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias with a weight from ``_pack_one_row``."""
    return torch.mm(x, packed) if bias is None else torch.addmm(bias, x, packed)


def packed_head(model, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden (B, D) -> (B, V) fp32 logits with ``model.lm_head``, prepacked for oneDNN on CPU where that wins.

    The output head is the largest matmul of a decode step (vocab x hidden). MKL repacks the weight on every call;
    oneDNN with the weight packed once per generate call runs a 8192 x 256 head 2.2-2.6x faster for 2 to 16 rows
    (fp32, 1 thread of a 2-core EPYC), and a little slower for one row, which keeps MKL.
    """
    plain = lambda h: model.lm_head(h).float()  # noqa: E731
    if rows < 2 or not _mkldnn_fp32_cpu(model):
        return plain
    packed = _pack_onednn(model.lm_head.weight, rows)
    return lambda h: plain(h) if h.shape[0] < 2 else _linear(h, packed)


def packable(model, rows: int) -> bool:
    """Whether ``PackedDecodeStep`` applies: a CPU model with fp32 or bf16 weights whose ``matmul_dtype`` oneDNN
    runs, a float output head, and the projections either all plain nn.Linear or all ``quant.QuantLinear`` on
    their fused CPU kernel (LoRA-wrapped layers keep the generic path). One row too: SmolLM2-135M's batch-1 step
    took 71-74 ms against the generic forward's 85-97 ms (column-major MKL weights), a 4-layer d=256 model's 4.7-5.3 against 5.3-5.8 ms (2 threads, same
    tokens; README, "Serve a model")."""
    if rows < 1 or matmul_dtype(model) is None or not hasattr(model, "model") or type(model.lm_head) is not nn.Linear:
        return False
    projections = [m for layer in model.model.layers for m in (*layer.self_attn.children(), *layer.mlp.children())]
    kinds = {type(m) for m in projections}
    if kinds == {QuantLinear}:
        return len({(m.bits, m.group_size) for m in projections}) == 1 and all(
            m._kernel_dtype(m.weight_scale) is not None for m in projections)
    return kinds == {nn.Linear}


def fused_quant(layers: list[QuantLinear], row_scale: torch.Tensor | None = None) -> QuantLinear:
    """One QuantLinear for several with the same input (q, k, v; gate, up): their output rows stacked, each row's
    scale (and int4 minimum) times ``row_scale`` (exact: W = lo + q s, so c W = c lo + q (c s)), bias likewise."""
    first = layers[0]
    fused = QuantLinear(first.in_features, sum(m.out_features for m in layers), first.bits, first.group_size,
                        any(m.bias is not None for m in layers), first.weight.device, first.weight_scale.dtype)
    fused.use_kernel, fused.kernel_dtype = first.use_kernel, first.kernel_dtype
    fused.eval()
    scale = row_scale if row_scale is not None else torch.ones(fused.out_features)
    fused.weight = torch.cat([m.weight for m in layers])
    shape = (-1, 1) if first.bits == 4 else (-1,)
    fused.weight_scale = torch.cat([m.weight_scale for m in layers]) * scale.view(shape)
    if first.bits == 4:
        fused.weight_min = torch.cat([m.weight_min for m in layers]) * scale.view(shape)
    if fused.bias is not None:
        fused.bias = torch.cat([m.bias if m.bias is not None else m.weight_scale.new_zeros(m.out_features)
                                for m in layers]) * scale
    return fused


class PackedDecodeStep:
    """One token per row through the model with prepacked, fused weights: a drop-in for the model's forward in
    ``generation.CacheDecoder`` (same growing ``KVCache``, same key mask and positions), plus its ``head``.

    Packing copies the weights once per generate call (RL updates between calls are picked up); ``rows`` is the
    row count the kernels are tuned for, any count works. For one row the weights are laid out for MKL's kernel
    instead of oneDNN's: on SmolLM2's shapes, 30 layers of distinct weights, MKL on (in, out) matrices took 20 ms
    a step's matmuls against oneDNN's 29 ms at one row, and 54 against 39 ms at 16 rows (2-core Intel Xeon; the
    crossover is at 2-3 rows), so a batch-1 step went from ~36 to ~26 ms. Constant factors are folded into the
    packed weights, exactly in real arithmetic: each RMSNorm gain g into the columns of the matmul that follows
    it (W (g * x) = (W diag g) x, the final norm's into the head) and the attention scale 1/sqrt(d) into the
    query rows (RoPE is linear), so a step runs ~40 small ops per layer fewer than the model's forward.

    Quantized projections (``lmforge quantize``) are fused the same way (q, k, v into one QuantLinear, gate and up
    into another; the query scale in their scales), their norms keep their gains (a gain cannot be folded into
    int4 groups without re-quantizing), and the float head is packed as above: SmolLM2 int4 at batch 1 went from
    ~22 to ~15 ms a token against the generic forward (timed before and after; README, "Serve a model").
    """

    def __init__(self, model, rows: int):
        self.model = model
        cfg = model.config
        self.n_heads, self.n_kv, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                  cfg.resolved_head_dim)
        self.n_qk = (self.n_heads + self.n_kv) * self.head_dim  # q and k columns of the fused projection
        self.eps = cfg.rms_norm_eps
        self.layers = []
        dtype = matmul_dtype(model)  # bf16 packs for oneDNN at every row count (one row: 14 against MKL's 18 ms)
        pack, linear = ((_pack_one_row, _linear_one_row) if rows == 1 and dtype == torch.float32
                        else (_pack_onednn, _linear))
        self._linear = linear

        def project(parts: list[nn.Module], gain: torch.Tensor, row_scale: torch.Tensor | None = None):
            """(x -> x @ W.T + b for the parts stacked, the gain the norm before it keeps: None if folded)."""
            if type(parts[0]) is QuantLinear:
                return fused_quant(parts, row_scale), gain
            scale = row_scale if row_scale is not None else torch.ones(sum(p.out_features for p in parts))
            bias = (torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in parts])
                    .float() * scale if any(p.bias is not None for p in parts) else None)
            # in place: one temporary copy, not three; folded in fp32, then rounded once to the matmul dtype
            w = torch.cat([p.weight for p in parts]).float().mul_(scale[:, None])
            packed = pack((w.mul_(gain.float()) if gain is not None else w).to(dtype), rows)
            bias = bias.to(dtype) if bias is not None and dtype != torch.float32 else bias
            return (lambda x: linear(x, packed, bias)), None  # not self: a cycle would keep the weights until a GC

        with torch.no_grad():
            for block in model.model.layers:
                a, mlp = block.self_attn, block.mlp
                qkv = (a.q_proj, a.k_proj, a.v_proj)
                rows_scale = torch.ones(sum(p.out_features for p in qkv))
                rows_scale[:a.q_proj.out_features] = self.head_dim ** -0.5
                w_qkv, in_gain = project(list(qkv), block.input_layernorm.weight, rows_scale)
                w_gate_up, post_gain = project([mlp.gate_proj, mlp.up_proj], block.post_attention_layernorm.weight)
                self.layers.append(dict(qkv=w_qkv, in_gain=in_gain, o=project([a.o_proj], None)[0],
                                        gate_up=w_gate_up, post_gain=post_gain, down=project([mlp.down_proj], None)[0]))
            self.lm_head = pack((model.lm_head.weight.float() * model.model.norm.weight.float()).to(dtype), rows)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, D) hidden states from ``__call__`` -> (B, V) logits (the final norm's gain is in the packed head)."""
        return self._linear(hidden, self.lm_head).float()

    def __call__(self, tokens: torch.Tensor, key_mask: torch.Tensor | None, position: torch.Tensor | None,
                 cache: KVCache) -> torch.Tensor:
        """(B,) tokens -> (B, D) normalised hidden states for ``head``; keys and values written at ``cache.length``.
        (B, T) tokens (a prefill chunk) -> (B, D) of each row's last token; all T positions written.

        key_mask: (B, >= length + T), 0 = left padding, or None; position: (B, T) RoPE position per row and token
        ((B, 1) for one token), or None for cache.length + t in every row. head(step(...)) equals the logits of
        forward(tokens (as (B, T)), attention_mask=key_mask, position_ids=position, cache=cache)[:, -1] up to
        float rounding.
        """
        return self.forward_groups([(tokens, key_mask, position, cache)])[0]

    def forward_groups(self, groups: list[tuple]) -> list[torch.Tensor]:
        """``__call__`` for several (tokens, key_mask, position, cache) batches at once, each over its own cache
        (the scheduler's decoding rows and its prefill chunks): every projection runs once over all their tokens,
        one pass over the weights instead of one per batch; attention runs per batch. One hidden state per batch."""
        m, H, kv, d, g = self.model, self.n_heads, self.n_kv, self.head_dim, self.n_heads // self.n_kv
        parts, cos, sin = [], [], []
        for tokens, key_mask, position, cache in groups:
            B, T = tokens.shape[0], tokens.shape[1] if tokens.dim() == 2 else 1
            m._extend_rope(cache.length + T)
            c, s, keep = self._rope_and_mask(B, T, cache.length, key_mask, position)
            parts.append((B, T, cache, keep))
            cos.append(c.expand(B, T, 1, d).reshape(B * T, 1, d))
            sin.append(s.expand(B, T, 1, d).reshape(B * T, 1, d))
        cos, sin = (cos[0], sin[0]) if len(groups) == 1 else (torch.cat(cos), torch.cat(sin))
        norm = lambda t, gain=None: F.rms_norm(t, (t.shape[-1],), gain, self.eps)  # noqa: E731
        x = m.model.embed_tokens(torch.cat([t.reshape(-1) for t, *_ in groups]))  # (tokens, D), weights' dtype
        for i, w in enumerate(self.layers):
            qkv = w["qkv"](norm(x, w["in_gain"]))
            qk = _rope_by_halves(qkv[:, :self.n_qk].view(-1, H + kv, d), cos, sin)  # q (scaled) and k together
            ys, start = [], 0
            for B, T, cache, keep in parts:
                q_k, v = qk[start:start + B * T].view(B, T, H + kv, d), qkv[start:start + B * T, self.n_qk:]
                keys, values = cache.update(i, q_k[:, :, H:].transpose(1, 2),  # (B, kv, length + T, d) after it
                                            v.view(B, T, kv, d).transpose(1, 2))
                # each kv head's group of query heads as that head's queries: (B, kv, group T, d), one kernel
                q = q_k[:, :, :H].view(B, T, kv, g, d).permute(0, 2, 3, 1, 4).reshape(B, kv, g * T, d)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=1.0)
                ys.append(y.view(B, kv, g, T, d).permute(0, 3, 1, 2, 4).reshape(B * T, H * d))
                start += B * T
            x = x + w["o"](ys[0] if len(ys) == 1 else torch.cat(ys))
            gate, up = w["gate_up"](norm(x, w["post_gain"])).chunk(2, dim=-1)
            x = x + w["down"](F.silu(gate) * up)
        out, start = [], 0
        for B, T, cache, _ in parts:
            cache.length += T
            out.append(norm(x[start:start + B * T].view(B, T, -1)[:, -1]))
            start += B * T
        return out

    def _rope_and_mask(self, B: int, T: int, past: int, key_mask: torch.Tensor | None,
                       position: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """cos and sin broadcasting over (B, T, heads, head_dim), and SDPA's boolean mask over (B, kv, group T,
        past + T) (None: every key visible). A chunk is causal, and a query at a padding position sees itself,
        as in model.build_attention_mask, so no row is fully masked."""
        m, L, device = self.model, past + T, self.model.lm_head.weight.device
        if T == 1:  # decode: one position per row
            cos, sin = m.rope_at(position[:, 0] if position is not None else past, L)  # (B, d), or (d,) shared
            if position is not None:
                cos, sin = cos[:, None, None], sin[:, None, None]
            return cos, sin, (key_mask[:, None, None, :L] != 0) if key_mask is not None else None
        cos, sin = m.rope_at(position if position is not None else torch.arange(past, L, device=device), L)
        q_pos, k_pos = torch.arange(past, L, device=device)[:, None], torch.arange(L, device=device)
        allowed = k_pos <= q_pos  # (T, L)
        if key_mask is not None:
            allowed = allowed & (key_mask[:, None, :L] != 0) | (k_pos == q_pos)  # (B, T, L)
        groups = self.n_heads // self.n_kv
        keep = allowed.expand(B, T, L)[:, None, None].expand(B, 1, groups, T, L).reshape(B, 1, groups * T, L)
        return cos[..., None, :], sin[..., None, :], keep


@contextmanager
def column_major_weights(model):
    """On CPU, hold every Linear weight column-major (same values and shapes) while generating one row at a time.

    nn.Linear computes x @ W.T. Decoding multiplies a few rows by every weight once per token, so it streams
    the weights from memory; MKL's kernel for a contiguous W.T does that much better than its dot-product
    kernel for a contiguous W (fp32, 2-core EPYC: a 4-layer d=256 decode step went from 2.9 to 2.0 ms at
    batch 1). Values and shapes are unchanged, and the original tensors are put back afterwards (views of them
    stay valid); the copy holds a second set of Linear weights in memory while generate runs.
    """
    if model.lm_head.weight.device.type != "cpu":
        yield
        return
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    originals = {}
    with torch.no_grad():
        for key, w in weights.items():
            originals[key] = w.data
            w.data = w.data.t().contiguous().t()
    try:
        yield
    finally:
        for key, w in weights.items():
            w.data = originals[key]
