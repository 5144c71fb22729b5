"""Weight-only post-training quantisation of the decoder's linear layers: int8 and int4.

Each q/k/v/o and gate/up/down projection W (out x in) is replaced by a :class:`QuantLinear` holding integer
weights and float scales; activations, norms, embeddings and the (tied) output head stay in float.

int8, symmetric, one scale per output channel (row) i:

    s_i = max_j |W_ij| / 127,    q_ij = clamp(round(W_ij / s_i), -127, 127),    W_ij ~= s_i q_ij

int4, asymmetric, one scale and one offset per group of ``group_size`` consecutive inputs of a row (g = a group):

    m_ig = min_{j in g} W_ij,  s_ig = (max_{j in g} W_ij - m_ig) / 15,
    q_ij = clamp(round((W_ij - m_ig) / s_ig), 0, 15),    W_ij ~= m_ig + s_ig q_ij

(round = round half to even; a row or group whose values are all equal gets s = 1 and q = 0, so it comes back
exactly.) The error per weight is at most s / 2: int8 keeps 1/254 of a row's range, int4 1/30 of a group's.
int4's offset m is torch's tinygemm convention W = (q - 8) s + z in another form: z = m + 8 s.

On disk (``model.safetensors``) an int8 model is in compressed-tensors' ``pack-quantized`` format, the one
llm-compressor writes and transformers (with ``pip install compressed-tensors``) and vLLM load as W8A16: a layer
``P`` is ``P.weight_packed`` int32 (out, ceil(in / 4)), four weights a word as unsigned bytes q + 128 (weight
``4k + b`` in bits 8b..8b+7), ``P.weight_scale`` (out, 1) and ``P.weight_shape`` = (out, in); config.json's
``quantization_config`` says ``"quant_method": "compressed-tensors"`` with one channel-wise, symmetric 8-bit
int weight scheme for every Linear but ``lm_head`` (see ``compressed_tensors_config``). int4 stays lmforge's own
format: ``P.weight`` uint8 (out, in / 2), two weights a byte (``q[2k]`` the low nibble, ``q[2k+1]`` the high
one), with ``P.weight_scale`` and ``P.weight_min`` (out, in / group_size), config.json saying
``"quantization_config": {"quant_method": "lmforge", "bits": 4, "group_size": ...}``. compressed-tensors (and
vLLM's kernels) store an asymmetric group's offset as an integer zero point, W = (q - z) s; lmforge's int4 keeps
a float minimum, W = m + q s, which represents llama.cpp's Q4_1 blocks exactly (why SmolLM2 loses nothing at
group 32) and which no integer z can stand for. Both formats (and int8 directories in lmforge's older own format,
``P.weight`` int8 + ``P.weight_scale`` (out,)) open with ``modelio.load_model_dir`` as a Transformer with
QuantLinear layers; ``P.bias`` is kept where a layer has one.

Forward on CPU uses torch's fused weight-only kernels, packed on first use (int8:
``aten._weight_int8pack_mm``; int4: ``aten._convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu``,
which needs out % 16 == 0 and group_size in 32/64/128/256). They take the activations in ``KERNEL_DTYPE``
(bfloat16 by default: on a 2-core AVX-512 EPYC, a 1536 x 576 int8 matvec takes 50 us with bf16 activations,
115 us as a plain fp32 nn.Linear, and 950 us with fp32 activations, for which these kernels are not vectorised).
Elsewhere (CUDA, MPS, shapes the kernels refuse) the layer dequantizes its weight and calls F.linear.
Quantized weights are not trainable: a forward in training mode with gradients on raises QuantizedModelError.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # the only group sizes _weight_int4pack_mm_for_cpu accepts
KERNEL_DTYPE: torch.dtype | None = torch.bfloat16  # activations for the CPU kernels; None = the input's dtype


class QuantizedModelError(ConfigError):
    """A quantized model was asked to do what only a float model can (train, be quantized again)."""


# ---------------------------------------------------------------------------------------------- pure functions
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> q int8 (out, in), scale float32 (out,), with W ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(scale.dtype) * scale[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 -> (out, in / 2) uint8: q[:, 2k] in the low nibble, q[:, 2k + 1] in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) uint8 values 0..15 (inverse of pack_int4)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> packed uint8 (out, in / 2), scale and min float32 (out, in / group_size), with
    W[:, j] ~= min[:, j // group_size] + q[:, j] * scale[:, j // group_size] (see the module docstring)."""
    out_features, in_features = w.shape
    if group_size < 2 or group_size % 2 or in_features % group_size:
        raise ValueError(f"int4 group_size must be even and divide in_features ({in_features}), got {group_size}")
    groups = w.detach().float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((groups - lo[..., None]) / scale[..., None]), 0, 15)
    return pack_int4(q.reshape(out_features, in_features)), scale, lo


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features = packed.shape[0]
    q = unpack_int4(packed).to(scale.dtype).reshape(out_features, -1, group_size)
    return (lo[..., None] + q * scale[..., None]).reshape(out_features, -1)


# ---------------------------------------------------------------------------------------------- the layer
class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as int8 or int4 (see the module docstring). Not an nn.Linear subclass on
    purpose: code that finds plain nn.Linear layers (LoRA) must leave these alone; the CPU decode step
    (cpu_decode.PackedDecodeStep) fuses them knowingly (cpu_decode.fused_quant).

    ``use_kernel`` (default True) and ``kernel_dtype`` (default ``KERNEL_DTYPE``) may be set per layer; the
    packed kernel weights are built on the first CPU forward and rebuilt when the buffers are replaced (moved,
    cast, loaded); after editing them in place, set ``layer._packed = None``.
    """

    use_kernel = True
    kernel_dtype: torch.dtype | None = None  # None: the module default KERNEL_DTYPE

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 0, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        if bits == 4 and (group_size < 2 or group_size % 2 or in_features % group_size):
            raise ValueError(f"int4 group_size must be even and divide in_features ({in_features}), got {group_size}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else 0
        if bits == 8:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        else:
            groups = in_features // group_size
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("weight_min", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self._packed: tuple | None = None  # (key, kernel tensors...) for the CPU kernels

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 0) -> QuantLinear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, w.device)
        with torch.no_grad():
            if bits == 8:
                layer.weight, layer.weight_scale = quantize_int8(w)
            else:
                layer.weight, layer.weight_scale, layer.weight_min = quantize_int4(w, group_size)
            if linear.bias is not None:
                layer.bias = linear.bias.detach().float().clone()
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight these integers stand for."""
        if self.bits == 8:
            w = dequantize_int8(self.weight, self.weight_scale)
        else:
            w = dequantize_int4(self.weight, self.weight_scale, self.weight_min, self.group_size)
        return w if dtype is None else w.to(dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}, "
                f"bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            raise QuantizedModelError(
                f"this model is int{self.bits}-quantized (weight-only): its quantized weights cannot be trained. "
                "Train or fine-tune the float model and quantize the result (`lmforge quantize`); a quantized "
                "directory is for generate / chat / serve / eval (and as a frozen reference, in eval mode)")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        dtype = self._kernel_dtype(x2)
        packed = self._packed_for(dtype) if dtype is not None else None
        if packed is None:
            y = F.linear(x2, self.dequantize(x.dtype))
        else:
            xk = x2.to(dtype).contiguous()
            if not torch.compiler.is_compiling():  # compiled graphs hand the kernel fresh (aligned) buffers
                xk = _aligned(xk)
            if self.bits == 8:
                y = torch.ops.aten._weight_int8pack_mm(xk, *packed)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, packed[0], self.group_size, packed[1])
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _kernel_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The activation dtype for the fused CPU kernel, or None where it does not apply (use the fallback)."""
        if not self.use_kernel or x.device.type != "cpu" or self.weight.device.type != "cpu":
            return None
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        if self.bits == 4 and (self.out_features % 16 or self.group_size not in KERNEL_GROUP_SIZES):
            return None
        return self.kernel_dtype or KERNEL_DTYPE or x.dtype

    def _packed_for(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kernel's (weight, scales) for activations in ``dtype``, packed now if the buffers changed. Inside
        torch.compile only an existing packing is used (generation's eager prefill makes it); else None, and
        the caller takes the traceable fallback."""
        if torch.compiler.is_compiling():
            return self._packed[1:] if self._packed is not None and self._packed[0][0] == dtype else None
        key = lambda: (dtype, self.weight.data_ptr(), self.weight_scale.data_ptr(),  # noqa: E731
                       getattr(self, "weight_min", self.weight_scale).data_ptr())
        if self._packed is None or self._packed[0] != key():
            with torch.inference_mode(False):  # ordinary tensors, usable later outside inference mode too
                packed = self._pack(dtype)
            self._packed = (key(), *packed)
        return self._packed[1:]

    @torch.no_grad()
    def _pack(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernels' own layouts: int8 weight + scales in ``dtype``; int4: tinygemm's packed weight and
        (groups, out, 2) scales and zeros, z = min + 8 s (the kernel computes (q - 8) s + z)."""
        if self.bits == 8:  # the kernel reads the weight as stored; an unaligned one is moved (once)
            self.weight = _aligned(self.weight.contiguous())
            return self.weight, _aligned(self.weight_scale.to(dtype).contiguous())
        q = unpack_int4(self.weight).to(torch.int32)
        inner_k_tiles = 8 if self.in_features % 256 == 0 else 4 if self.in_features % 128 == 0 else 2
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), inner_k_tiles)
        scale = self.weight_scale.float()
        zero = self.weight_min.float() + 8 * scale
        return packed, torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it at a 64-byte aligned address: the int8 CPU kernel (torch 2.13) segfaults on
    operands that are not (safetensors' load_file hands out tensors at any offset; views of activations too)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


# ---------------------------------------------------------------------------------------------- whole models
def quantization_config(bits: int, group_size: int) -> dict:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return {"quant_method": "lmforge", "bits": bits, "group_size": group_size if bits == 4 else None}


def target_linears(model) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(qualified name, parent, attribute, layer) of every projection of the decoder layers."""
    found = []
    for i, block in enumerate(model.model.layers):
        for part_name in ("self_attn", "mlp"):
            part = getattr(block, part_name)
            for attr in TARGETS:
                if hasattr(part, attr):
                    found.append((f"model.layers.{i}.{part_name}.{attr}", part, attr, getattr(part, attr)))
    return found


def quantize_model(model, bits: int = 8, group_size: int = 32) -> dict:
    """Replace the decoder's projections by QuantLinear in place; return error statistics.

    rel_error of a layer = ||W - W_hat||_F / ||W||_F; the summary gives its mean and max over layers and the
    largest |W - W_hat| of any weight. Sets ``model.quantization_config`` (written to config.json on save).
    """
    if getattr(model, "quantization_config", None):
        raise QuantizedModelError(f"the model is already quantized ({model.quantization_config})")
    qconfig = quantization_config(bits, group_size)
    layers = target_linears(model)
    if bits == 4:
        bad = sorted({f"{name} (in_features {layer.in_features})" for name, _, _, layer in layers
                      if layer.in_features % group_size})
        if group_size < 2 or group_size % 2 or bad:
            raise ValueError(f"group_size={group_size} must be even and divide every layer's in_features; "
                             f"it does not for {', '.join(bad[:3]) or 'any layer'}. Try 32 or 64")
    errors, max_abs = [], 0.0
    for name, parent, attr, linear in layers:
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not nn.Linear (merge LoRA adapters first)")
        q = QuantLinear.from_linear(linear, bits, group_size).to(linear.weight.device)
        with torch.no_grad():
            w, diff = linear.weight.float(), q.dequantize(torch.float32) - linear.weight.float()
            errors.append(float(diff.norm() / w.norm().clamp_min(1e-12)))
            max_abs = max(max_abs, float(diff.abs().max()))
        q.train(linear.training)
        setattr(parent, attr, q)
    model.quantization_config = qconfig
    return {"layers": len(layers), "rel_error_mean": sum(errors) / max(len(errors), 1),
            "rel_error_max": max(errors, default=0.0), "max_abs_error": max_abs}


CT_FORMAT = "pack-quantized"  # compressed-tensors' format name for int weights packed into int32 words


def compressed_tensors_config(ignore: list[str]) -> dict:
    """config.json's quantization_config for an int8 lmforge model, in compressed-tensors' schema: one group of
    8-bit symmetric int weights with one scale per output channel, activations left in float (W8A16)."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
               "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": ignore, "kv_cache_scheme": None}


def saved_quantization_config(model) -> dict:
    """What config.json says about a quantized model: compressed-tensors' schema for int8, lmforge's for int4."""
    qconfig = model.quantization_config
    if qconfig["bits"] != 8:
        return qconfig
    return compressed_tensors_config(["lm_head"] + (["score"] if model.config.num_labels else []))


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 -> (out, ceil(in / 4)) int32: compressed-tensors' 8-bit packing (see the module docstring)."""
    u = q.to(torch.int64) + 128
    u = F.pad(u, (0, -u.shape[1] % 4))
    word = u[:, 0::4] | u[:, 1::4] << 8 | u[:, 2::4] << 16 | u[:, 3::4] << 24
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)  # the same 32 bits, signed


def unpack_int8(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of pack_int8: (out, ceil(in / 4)) int32 -> (out, in) int8."""
    word = packed.to(torch.int64) & 0xFFFFFFFF
    u = torch.stack([(word >> (8 * b)) & 255 for b in range(4)], dim=-1).reshape(packed.shape[0], -1)
    return (u[:, :in_features] - 128).to(torch.int8)


def to_saved_state(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """A quantized model's state dict as it is written to disk (int8 layers packed, see the module docstring)."""
    if model.quantization_config["bits"] != 8:
        return state
    state = dict(state)
    for name, *_ in target_linears(model):
        q = state.pop(f"{name}.weight")
        state[f"{name}.weight_packed"] = pack_int8(q)
        state[f"{name}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
        state[f"{name}.weight_scale"] = state[f"{name}.weight_scale"][:, None].contiguous()
    return state


def from_saved_state(state: dict[str, torch.Tensor], qconfig: dict) -> dict[str, torch.Tensor]:
    """The inverse of to_saved_state: a state dict as read from a quantized directory -> QuantLinear buffers."""
    if qconfig.get("quant_method") != "compressed-tensors":
        return state
    state = dict(state)
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key[:-len(".weight_packed")]
        shape = state.pop(f"{name}.weight_shape").tolist()
        state[f"{name}.weight"] = unpack_int8(state.pop(key), shape[1])
        state[f"{name}.weight_scale"] = state[f"{name}.weight_scale"].reshape(-1)
    return state


def _bits_and_group(qconfig, source: str) -> tuple[int, int]:
    """(bits, group_size) of a config.json quantization_config lmforge reads; anything else is a clear error."""
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors":
        groups = list((qconfig.get("config_groups") or {}).values())
        ours = compressed_tensors_config([])["config_groups"]["group_0"]
        weights = (groups[0].get("weights") or {}) if len(groups) == 1 else {}
        if (qconfig.get("format") != CT_FORMAT or len(groups) != 1 or groups[0].get("input_activations")
                or any(weights.get(k) != v for k, v in ours["weights"].items() if k != "dynamic")):
            raise ValueError(f"{source}: this compressed-tensors quantization_config is not one lmforge reads "
                             f"(lmforge reads format {CT_FORMAT!r} with one group of weights "
                             f"{ours['weights']} and float activations): {qconfig!r:.300}")
        return 8, 0
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "lmforge":
        raise ValueError(f"{source}: quantization_config {qconfig!r} is not lmforge's "
                         '(expected {"quant_method": "lmforge", "bits": 8 | 4, "group_size": ...} or '
                         "compressed-tensors' int8 pack-quantized)")
    bits, group_size = qconfig.get("bits"), qconfig.get("group_size") or 0
    if bits not in (4, 8) or (bits == 4 and not isinstance(group_size, int)):
        raise ValueError(f"{source}: quantization_config needs bits 8 or 4 (int4: an integer group_size), "
                         f"got {qconfig!r}")
    return bits, group_size


def quantize_skeleton(model, qconfig: dict, source: str = "config.json") -> None:
    """Turn a freshly built (usually meta-device) Transformer into the shape a quantized directory was saved in,
    ready for load_state_dict (after ``from_saved_state``); the model is put in eval mode (a quantized model is
    for inference)."""
    bits, group_size = _bits_and_group(qconfig, source)
    for _, parent, attr, linear in target_linears(model):
        device, dtype = linear.weight.device, linear.weight.dtype
        setattr(parent, attr, QuantLinear(linear.in_features, linear.out_features, bits, group_size,
                                          linear.bias is not None, device=device, dtype=dtype))
    model.quantization_config = quantization_config(bits, group_size)
    model.eval()


def is_quantized(model) -> bool:
    return bool(getattr(getattr(model, "module", model), "quantization_config", None))
