"""A decoder-only transformer in the Llama layout, readable top to bottom.

    tokens -> embed -> [RMSNorm -> GQA attention (RoPE) -> + -> RMSNorm -> SwiGLU MLP -> +] x L -> RMSNorm -> lm_head

Parameter names are exactly those of Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj.weight``
...), so a state dict moves between the two with no renaming; Qwen2 (bias on q/k/v), Mistral and SmolLM are the
same architecture with other settings. Extras for alignment work: position ids and document ids for packed
sequences (attention never crosses a document boundary), a key-padding mask for left-padded batches, a
preallocated KV cache for generation, and an optional scalar ``score`` head for reward models and critics.
Packed forwards attend either through SDPA with a dense (B, 1, T, T) document mask or through FlexAttention with a
block-sparse mask built from the document ids (``Transformer.packed_attention``, see packed_backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from lmforge.objectives.lm import fused_linear_cross_entropy


@dataclass
class ModelConfig:
    """Field names follow ``transformers.LlamaConfig`` so config.json round-trips."""

    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    # Context extension, as config.json's rope_scaling: {"rope_type": "linear" | "dynamic" | "yarn" | "llama3",
    # "factor": ..., and the type's other keys}; None = plain RoPE. See rope_frequencies.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Llama's flag: bias on q, k, v and o projections
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    initializer_range: float = 0.02
    num_labels: int = 0  # > 0 adds a `score` head (reward model: 1, critic: 1)

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not self.head_dim and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}) unless head_dim is set")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim ({self.resolved_head_dim}) must be even for rotary embeddings")
        check_rope_scaling(self.rope_scaling)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 like Llama so bf16 activations keep their precision."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": (),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def rope_type(scaling: dict | None) -> str:
    """"default" for plain RoPE, else the scaling's type (config.json says rope_type, or type in old files)."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"


def check_rope_scaling(scaling: dict | None) -> None:
    """Raise one ValueError naming what is wrong with a rope_scaling dict (None and "default" are plain RoPE)."""
    kind = rope_type(scaling)
    if kind == "default":
        return
    if kind not in ROPE_TYPES:
        raise ValueError(f"RoPE scaling type {kind!r} is not supported (lmforge implements "
                         f"{', '.join(ROPE_TYPES)}; or none)")
    missing = [key for key in _ROPE_REQUIRED[kind] if scaling.get(key) is None]
    if missing:
        raise ValueError(f"RoPE scaling {kind!r} needs {', '.join(missing)} (got {scaling})")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"RoPE scaling {kind!r}: partial_rotary_factor={scaling['partial_rotary_factor']} is not "
                         "supported (every dimension turns)")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, max_positions: int = 0,
                     seq_len: int | torch.Tensor | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim / 2,) and the factor that scales cos and sin, for plain RoPE or one of the
    context-extension schemes, as transformers computes them (modeling_rope_utils). Plain RoPE turns pair i by
    position * f_i with f_i = theta^(-2i/d); ``max_positions`` is config.max_position_embeddings.

    linear (position interpolation, Chen et al. 2023): f_i / factor, positions squeezed into the trained range.
    dynamic (NTK-aware, bloc97 and emozilla 2023): for a sequence of L > max_positions tokens theta grows to
        theta * (factor * L / max_positions - (factor - 1)) ** (d / (d - 2)); plain RoPE up to max_positions.
        ``seq_len`` is L (an int, or a tensor inside a compiled step).
    llama3 (Llama 3.1): with the original context C, wavelengths 2 pi / f_i longer than C / low_freq_factor are
        divided by factor, shorter than C / high_freq_factor kept, and those between blended with
        s = (C / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor): (1 - s) f_i / factor + s f_i.
    yarn (Peng et al. 2023): a ramp over the dimensions, from f_i / factor for those that turn fewer than beta_slow
        times over C to f_i for those that turn more than beta_fast times; cos and sin are scaled by
        0.1 ln(factor) + 1 (or attention_factor, or the ratio of the mscale and mscale_all_dim versions).
    """
    kind = rope_type(scaling)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    if kind == "dynamic" and seq_len is not None and not (isinstance(seq_len, int) and seq_len <= max_positions):
        return _dynamic_frequencies(head_dim, theta, scaling["factor"], max_positions, seq_len, exponents), 1.0
    inv_freq = 1.0 / (theta ** exponents)
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling, max_positions), 1.0
    if kind == "yarn":
        return _yarn_frequencies(head_dim, theta, scaling, max_positions, device)
    return inv_freq, 1.0  # default; and dynamic up to max_positions


def _dynamic_frequencies(head_dim: int, theta: float, factor: float, max_positions: int, seq_len,
                         exponents: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK's frequencies for a sequence of ``seq_len`` tokens, computed in float32 as transformers does
    (its sequence length is a tensor), so that the two agree to the last bit."""
    length = torch.clamp(torch.as_tensor(seq_len, device=exponents.device), min=max_positions).float()
    base = theta * ((factor * length / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** exponents)


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling.get("original_max_position_embeddings") or max_positions
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)  # long waves: interpolated
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, blended, scaled)


def _yarn_frequencies(head_dim: int, theta: float, scaling: dict, max_positions: int, device):
    context = scaling.get("original_max_position_embeddings") or max_positions
    factor = scaling.get("factor") or max_positions / context

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def dimension_turning(turns: float) -> float:  # the dimension whose wave turns `turns` times over the context
        return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_turning(scaling.get("beta_fast") or 32), dimension_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    waves = theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    extrapolated, interpolated = 1.0 / waves, 1.0 / (factor * waves)
    keep = 1 - ramp  # 1: the dimension keeps its frequency (fast waves), 0: it is interpolated (slow waves)
    return interpolated * (1 - keep) + extrapolated * keep, attention


def _cos_sin(angles: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of (..., head_dim / 2) angles, each (..., head_dim), times ``scale`` (see rope_cache)."""
    both = torch.cat((angles, angles), dim=-1)
    cos, sin = both.cos(), both.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    half = angles.shape[-1]
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_cache(head_dim: int, length: int, theta: float, device=None, scaling: dict | None = None,
               max_positions: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables, (length, head_dim), for rotate-half RoPE (Su et al. 2021).

    Pair (x_i, x_{i+d/2}) turns by angle a_i: x_i' = x_i cos a_i - x_{i+d/2} sin a_i and
    x_{i+d/2}' = x_{i+d/2} cos a_i + x_i sin a_i. The sin table carries the signs (-sin | +sin), so that
    apply_rope is x * cos + swap_halves(x) * sin. With ``scaling`` the frequencies and the scale of both tables
    come from rope_frequencies (for dynamic NTK: those of sequences up to ``max_positions``).
    """
    inv_freq, scale = rope_frequencies(head_dim, theta, scaling, max_positions, device=device)
    return _cos_sin(torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq), scale)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles. x: (B, H, T, D); cos/sin: (B or 1, 1, T, D)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin  # roll by d/2 swaps the halves


def _rope_by_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope with the halves swapped by slicing instead of roll (the same values): inductor turns roll into
    a modulo gather that it recomputes inside the attention reduction; slices stay contiguous vector loads."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


class KVCache:
    """Preallocated keys and values for every layer: (layers, batch, kv_heads, max_len, head_dim).

    ``length`` positions are filled (the same for every row; left padding keeps rows aligned). The model
    writes new keys at [length, length + T) and advances ``length`` after its last layer.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 per_layer: bool = False):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.resolved_head_dim)
        if per_layer:  # a list of separate (batch, kv_heads, max_len, head_dim) tensors, as torch.compile'd
            # decoding wants them: updating one view of a shared tensor in a compiled graph copies the whole tensor
            self.k = [torch.zeros(shape[1:], device=device, dtype=dtype) for _ in range(shape[0])]
            self.v = [torch.zeros(shape[1:], device=device, dtype=dtype) for _ in range(shape[0])]
        else:
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, T, head_dim) in place after the filled part; return views of all keys so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, self.length, k.shape[2]).copy_(k)
        values.narrow(2, self.length, v.shape[2]).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) batch rows: drop finished sequences, or fan a prompt out to n samples."""
        if isinstance(self.k, list):
            self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        else:
            self.k = self.k[:, rows]
            self.v = self.v[:, rows]


class PagedKVPool:
    """Keys and values of many sequences in fixed-size blocks (paged attention, Kwon et al. 2023, vLLM).

    Storage is (layers, num_blocks * block_size, kv_heads, head_dim): block b holds slots
    [b * block_size, (b + 1) * block_size). A sequence owns a block table (block ids in order); its position p
    lives at slot table[p // block_size] * block_size + p % block_size, so a sequence grows a block at a time,
    blocks are shared by reference (a common prompt prefix), and the memory is fixed whatever the lengths.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device=None, dtype=torch.float32):
        # one extra block past the last, kept at zero: the slot that padding reads (``zero_slot``); the others
        # start uninitialised (every position is written before it is read)
        shape = (config.num_hidden_layers, (num_blocks + 1) * block_size, config.num_key_value_heads,
                 config.resolved_head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.zero_slot = num_blocks * block_size
        self.k[:, self.zero_slot:].zero_()
        self.v[:, self.zero_slot:].zero_()

    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Flat slots of positions [start, end) of the sequence with block table ``table``."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, T) -> keys, values (layers, B, kv_heads, T, head_dim), the layout of ``KVCache``."""
        flat, shape = slots.reshape(-1), (self.k.shape[0], *slots.shape, *self.k.shape[2:])
        return (self.k.index_select(1, flat).view(shape).permute(0, 1, 3, 2, 4),
                self.v.index_select(1, flat).view(shape).permute(0, 1, 3, 2, 4))

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (layers, N, kv_heads, head_dim) at flat slots (N,)."""
        self.k.index_copy_(1, slots, k)
        self.v.index_copy_(1, slots, v)

    def copy_block(self, src: int, dst: int, count: int) -> None:
        """Copy the first ``count`` slots of block ``src`` into block ``dst`` (copy on write of a shared tail)."""
        a, b = src * self.block_size, dst * self.block_size
        self.k[:, b:b + count] = self.k[:, a:a + count]
        self.v[:, b:b + count] = self.v[:, a:a + count]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask, layer: int, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # grouped-query attention: each kv head serves n_heads // n_kv_heads query heads (SDPA indexes, never copies)
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(mask, BlockMask):
            y = flex_attend(q, k, v, mask, gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def decode(self, x, cos, sin, keys, values, slot: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """One new token per row with fixed shapes (gpt-fast style), for ``Transformer.decode_step``.

        x: (B, hidden); keys/values: this layer's preallocated cache (B, kv_heads, S, head_dim), written in place
        at ``slot`` ((1,) long); visible: (B, 1, 1, L) bool over the first L <= S slots. The token attends over
        those L slots, the invisible ones masked. GQA views the query heads as (kv_heads, group): no key is copied.
        Compiled, the scores and the weighted sum are written as broadcast products and sums, which inductor
        fuses into one pass over the cache (30% faster than bmm for one query on CPU); eager, they are matmuls.
        """
        B, group = x.shape[0], self.n_heads // self.n_kv_heads
        q = self.q_proj(x).view(B, self.n_kv_heads, group, self.head_dim)
        k = self.k_proj(x).view(B, self.n_kv_heads, 1, self.head_dim)
        v = self.v_proj(x).view(B, self.n_kv_heads, 1, self.head_dim)
        q, k = _rope_by_halves(q, cos, sin), _rope_by_halves(k, cos, sin)
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        L = visible.shape[-1]
        keys, values = keys[:, :, :L], values[:, :, :L]
        fused = torch.compiler.is_compiling()
        scores = (q[:, :, :, None] * keys[:, :, None]).sum(-1) if fused else q @ keys.transpose(-1, -2)
        scores = scores.float() * self.head_dim ** -0.5  # (B, kv_heads, group, L)
        p = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(values.dtype)
        y = (p[..., None] * values[:, :, None]).sum(-2) if fused else p @ values  # (B, kv_heads, group, head_dim)
        return self.o_proj(y.reshape(B, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, layer: int, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        # Recompute each block's activations in backward instead of storing them: activation memory drops from
        # O(layers) blocks to about one, for roughly one extra forward pass of compute. Training forwards only.
        self.gradient_checkpointing = False
        # How packed (document_ids) forwards attend: "sdpa" (dense mask), "flex" (block mask) or "auto" (flex on
        # CUDA, sdpa on CPU; see packed_backend). Set from train.packed_attention by the loop.
        self.packed_attention = "auto"
        # The dtype the CPU decode step multiplies in (cpu_decode.PackedDecodeStep): None = the weights' dtype. The
        # RL stages set bfloat16 under train.dtype=bfloat16, so their rollouts sample with bf16 matmuls as they train.
        self.decode_matmul_dtype: torch.dtype | None = None
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False) if config.num_labels else None
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope()
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections shrink with depth so the residual stream starts near unit size.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=config.initializer_range / math.sqrt(2 * config.num_hidden_layers))

    def reset_rope(self, length: int | None = None) -> None:
        """(Re)build the cos/sin tables, on the device of the weights, for ``length`` positions."""
        c = self.config
        length = length or c.max_position_embeddings
        device = self.model.embed_tokens.weight.device
        cos, sin = rope_cache(c.resolved_head_dim, length, c.rope_theta, device, c.rope_scaling,
                              c.max_position_embeddings)
        self.rope_cos, self.rope_sin = cos, sin

    def rope_at(self, positions: torch.Tensor | int, length: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (positions.shape + (head_dim,)) at ``positions`` in a forward over a sequence ``length`` tokens
        long (int, or a tensor in a compiled step). The tables' rows, except for dynamic NTK scaling past the
        context: its frequencies depend on the length, which is the longest row's (max position + 1), as in
        transformers; with a KV cache the cache length, so rows that finish early do not change it."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        c = self.config
        if rope_type(c.rope_scaling) != "dynamic" or isinstance(length, int) and length <= c.max_position_embeddings:
            return cos, sin
        positions = torch.as_tensor(positions, device=cos.device)
        inv_freq, _ = rope_frequencies(c.resolved_head_dim, c.rope_theta, c.rope_scaling,
                                       c.max_position_embeddings, length, cos.device)
        long_cos, long_sin = _cos_sin(positions[..., None].float() * inv_freq, 1.0)
        if isinstance(length, int):
            return long_cos, long_sin
        longer = length > c.max_position_embeddings  # a tensor: choose without a host sync (compiled decoding)
        return torch.where(longer, long_cos, cos), torch.where(longer, long_sin, sin)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); or the mean next-token loss when ``labels`` is given.

        labels: (B, T) targets already aligned with the outputs (-100 = ignore), so shifting is the data's job.
        position_ids: (B, T); default past_length + arange(T), or restarting at 0 in each document.
        attention_mask: (B, past + T) with 1 for real tokens and 0 for padding (left-padded batches).
        document_ids: (B, T) packed-sequence document index; attention never crosses documents.
        return_hidden: return final-norm hidden states (B, T, D) instead of logits (for heads and chunked losses).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        length = past + T  # of the sequence (the cache's, or the longest row's): what dynamic NTK depends on
        if position_ids is not None:  # given: make sure the tables reach them (reading the max is a host sync)
            longest = int(position_ids.max()) + 1
            self._extend_rope(longest)
            length = length if cache is not None else longest
        elif document_ids is not None:
            position_ids = positions_from_documents(document_ids)
            if rope_type(self.config.rope_scaling) == "dynamic":
                length = int(position_ids.max()) + 1  # the longest packed document, as transformers sees it
        self._extend_rope(past + T)
        cos, sin = self._rope(position_ids, past, T, length)
        if document_ids is not None and packed_backend(self.packed_attention, input_ids.device,
                                                       attention_mask is not None or past > 0) == "flex":
            mask = document_block_mask(document_ids)
        else:
            mask = build_attention_mask(T, past, attention_mask, document_ids, input_ids.device)

        x = self.model.embed_tokens(input_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.model.layers):
            if recompute:
                x = checkpoint(block, x, cos, sin, mask, i, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, i, cache)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        if return_hidden:
            return x
        if labels is None:
            return self.lm_head(x)
        return fused_linear_cross_entropy(x, self.lm_head.weight, labels)  # never holds (B, T, V) fp32 logits

    def decode_step(self, input_ids: torch.Tensor, cache_k: list[torch.Tensor], cache_v: list[torch.Tensor],
                    slot: torch.Tensor, pad: torch.Tensor, key_mask: torch.Tensor,
                    length: int | None = None) -> torch.Tensor:
        """One decoding step with fixed shapes: (B,) tokens -> (B, D) final-norm hidden states (``lm_head`` is the
        caller's), written so that ``torch.compile`` sees one graph (gpt-fast style).

        cache_k/cache_v: per layer (B, kv_heads, S, head_dim), e.g. a ``KVCache(per_layer=True)``'s lists; the new
        keys go to ``slot``, a (1,) long tensor (the same slot in every row: left padding keeps rows aligned), and
        the token attends to the slots <= slot where ``key_mask`` (B, S) is True (False = left padding). pad: (B,)
        left padding per row, so the RoPE position is slot - pad. length: attend over the first ``length`` slots
        only (> slot; None = all S). The caller makes sure the rope tables reach S (``_extend_rope``). Same result
        as forward(input_ids[:, None], cache=..., return_hidden=True) up to float rounding.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_at(slot - pad, slot + 1)
        cos, sin = cos[:, None, None].to(x.dtype), sin[:, None, None].to(x.dtype)  # (B, 1, 1, D)
        S = key_mask.shape[1] if length is None else length
        visible = (key_mask[:, :S] & (torch.arange(S, device=slot.device) <= slot))[:, None, None]
        for i, block in enumerate(self.model.layers):
            h = block.self_attn.decode(block.input_layernorm(x), cos, sin, cache_k[i], cache_v[i], slot, visible)
            x = x + h
            x = x + block.mlp(block.post_attention_layernorm(x))
        return self.model.norm(x)

    def _extend_rope(self, needed: int) -> None:
        if needed > self.rope_cos.shape[0]:  # longer than configured: extend the tables rather than fail
            self.reset_rope(2 * needed)

    def _rope(self, position_ids: torch.Tensor | None, past: int, T: int,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, T, D); (1, 1, T, D) for the default positions past..past+T-1 (a slice)."""
        cos, sin = self.rope_cos, self.rope_sin
        if rope_type(self.config.rope_scaling) == "dynamic" and length > self.config.max_position_embeddings:
            positions = position_ids if position_ids is not None else torch.arange(past, past + T,
                                                                                   device=cos.device)[None]
            cos, sin = (t.unsqueeze(1) for t in self.rope_at(positions, length))
        elif position_ids is None:
            cos, sin = cos[None, None, past:past + T], sin[None, None, past:past + T]
        else:
            cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
        dtype = self.model.embed_tokens.weight.dtype
        return cos.to(dtype), sin.to(dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once); non_embedding drops the token embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward + backward; the output head always multiplies,
        tied or not) plus attention scores and values (Kaplan et al. 2020: 12 * layers * d_attn * T)."""
        c = self.config
        matmul_weights = sum(p.numel() for name, p in self.named_parameters()
                             if p.dim() == 2 and not name.startswith("model.embed_tokens"))
        if c.tie_word_embeddings:
            matmul_weights += self.lm_head.weight.numel()
        return 6 * matmul_weights + 12 * c.num_hidden_layers * c.num_attention_heads * c.resolved_head_dim * seq_len


def unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile and DDP wrappers (what gets saved, what has ``.config``); an FSDP-sharded
    module is its own (sharded) self."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 where each packed document begins: [0,0,0,1,1] -> [0,1,2,0,1]."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def build_attention_mask(T: int, past: int, attention_mask: torch.Tensor | None,
                         document_ids: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean (B, 1, T, past + T) mask (True = may attend), or None when plain causal attention suffices.

    Queries sit at positions past..past+T-1 and see keys at or before their own position, that are not padding
    and that belong to the same document. A query at a padding position sees itself, so no row is fully masked
    (a fully masked row would give NaN; padding outputs are ignored anyway).
    """
    if attention_mask is None and document_ids is None:
        if past == 0 or T == 1:
            return None  # SDPA's is_causal handles T > 1 with no past; one new token may see everything
    S = past + T
    q_pos = torch.arange(past, S, device=device)
    k_pos = torch.arange(S, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    if document_ids is not None:
        if past:
            raise ValueError("document_ids (packing) is for training forwards, not cached generation")
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]
        mask = mask & same_doc[:, None]
    if attention_mask is not None:
        if attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {S}")
        mask = mask & attention_mask.bool()[:, None, None, :]
        mask = mask | (k_pos[None, :] == q_pos[:, None])[None, None]
    return mask


PACKED_ATTENTION = ("auto", "sdpa", "flex")
FLEX_BLOCK = 128  # FlexAttention's default tile: the block mask says, per (query tile, key tile), none/some/all


def packed_backend(mode: str, device: torch.device, padded: bool) -> str:
    """"flex" or "sdpa" for a packed forward under ``mode`` (PACKED_ATTENTION) on ``device``; ``padded``: the
    forward also has a key-padding mask or a KV cache, which only the dense mask handles.

    auto is flex on CUDA (fused kernels that skip the tiles across documents; the dense mask turns SDPA's flash
    kernel off) and sdpa elsewhere: on CPU torch 2.13's flex_attention has no backward and, eager, is slower than
    SDPA with the mask (bench/bench_packed_attention.py). flex never falls back: it raises where it cannot run.
    """
    if mode not in PACKED_ATTENTION:
        raise ValueError(f"packed_attention must be one of {', '.join(PACKED_ATTENTION)}, got {mode!r}")
    if mode == "auto":
        return "flex" if device.type == "cuda" and not padded else "sdpa"
    if mode == "flex" and padded:
        raise ValueError("packed_attention=flex takes document ids alone (padding is a document of its own), "
                         "not an attention_mask or a KV cache")
    return mode


def set_packed_attention(module: nn.Module, mode: str) -> None:
    """Set ``packed_attention`` on every Transformer inside ``module`` (a policy, a policy + critic pair)."""
    packed_backend(mode, torch.device("cpu"), False)  # validates the name
    for m in module.modules():
        if isinstance(m, Transformer):
            m.packed_attention = mode


def document_block_mask(document_ids: torch.Tensor, block: int = FLEX_BLOCK) -> BlockMask:
    """FlexAttention's BlockMask for causal attention inside each packed document, built from the document ids
    (B, T) in O(T x documents) memory, never a (T, T) mask: a key tile is skipped unless it shares a document
    with the query tile (and is not after it), and marked full (no per-element mask) when both tiles lie inside
    one document, none past T, and the key tile is strictly before the query tile (create_block_mask's tiles). Same visible pairs as build_attention_mask.
    """
    B, T = document_ids.shape
    n = -(-T // block)
    ids = document_ids - document_ids.amin(dim=1, keepdim=True)  # >= 0 per row (rollout padding is -1)
    counts = F.one_hot(ids, int(ids.max()) + 1).to(torch.float32)  # (B, T, docs)
    counts = F.pad(counts, (0, 0, 0, n * block - T)).view(B, n, block, -1).sum(2)  # tokens of a doc per tile
    present = (counts > 0).to(torch.float32)
    shares = (present @ present.transpose(1, 2)) > 0  # (B, n, n): query tile i and key tile j share a document
    below = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril(-1)
    diagonal = torch.eye(n, dtype=torch.bool, device=ids.device)
    single = (present.sum(-1) == 1) & (counts.sum(-1) == block)  # one document, no position past T
    doc = counts.argmax(-1)
    full = below & single[:, :, None] & single[:, None, :] & (doc[:, :, None] == doc[:, None, :])
    partial = ((shares & below) | diagonal) & ~full
    # mask_mod may read positions past T (the last tile's tail): there the id matches no real document
    padded = F.pad(document_ids, (0, n * block - T), value=int(document_ids.min()) - 1)

    def same_document(b, h, q, k):
        return (k <= q) & (padded[b, q] == padded[b, k])

    def tiles(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)  # the tiles to visit first, in order
        return m.sum(-1).to(torch.int32)[:, None], order.to(torch.int32)[:, None]

    (num, idx), (full_num, full_idx) = tiles(partial), tiles(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=same_document,
                                    seq_lengths=(T, T))


_compiled_flex: dict = {}  # device type -> torch.compile'd flex_attention


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                gqa: bool) -> torch.Tensor:
    """flex_attention(q, k, v) under ``block_mask``, compiled (fused kernels; eager, flex materialises the
    scores). On CPU torch 2.13's flex_attention refuses inputs that need gradients, so a CPU forward that needs
    them runs flex's own operator eagerly (its reference math, which has a backward): the same masked attention,
    as slow as dense attention or slower; it is what makes the flex path testable on CPU."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        if torch.compiler.is_compiling():
            raise RuntimeError("packed_attention=flex: torch.compile cannot build flex attention's backward on "
                               "CPU; use packed_attention=sdpa (or auto) on CPU, or train.compile=false")
        out, _, _ = flex_attention_op(q, k, v, _score_identity, block_mask.as_tuple(), q.shape[-1] ** -0.5, {})
        return out
    if torch.compiler.is_compiling():  # inside a compiled model: dynamo fuses the call itself
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    kind = q.device.type
    if kind not in _compiled_flex:  # CPU: one kernel per shape (inductor's dynamic-shape CPU flex kernel failed
        # to build at T=2048 in torch 2.13); elsewhere shapes that change (RL packed widths) turn dynamic
        _compiled_flex[kind] = torch.compile(flex_attention, dynamic=False if kind == "cpu" else None)
    return _compiled_flex[kind](q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _score_identity(score, b, h, q, k):
    return score
