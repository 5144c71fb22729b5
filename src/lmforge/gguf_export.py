"""An lmforge Transformer + Tokenizer -> a GGUF file that llama.cpp (llama-cli, llama-server, ollama) runs.

    state dict (QuantLinear layers dequantized) -> GGUF names (gguf_import's tables, inverted) -> q_proj / k_proj
    rows permuted into llama.cpp's interleaved rotary pairs (gguf_import.permute_rows) -> F32 / F16 / Q8_0 arrays
    -> GGUFWriter, with the config as llama.* keys and the tokenizer as tokenizer.ggml.* keys

Tensor types follow llama.cpp's convert_hf_to_gguf.py: 1-D tensors (norms) stay F32; 2-D weights are F32, F16,
or Q8_0. Q8_0 cuts each row into blocks of 32 consecutive weights, each with one float16 scale:

    d = max_j |w_j| / 127,    q_j = round(w_j / d) in [-127, 127],    w_j ~= d q_j     (34 bytes per 32 weights)

(quantized by the gguf package's reference code, the same numbers llama.cpp's quantizer writes); a weight whose row
length is not a multiple of 32 is written F16 instead. The tokenizer goes in as llama.cpp reads a byte-level BPE:
tokens by id, their types (control for special tokens), the merges, bos / eos / pad / end-of-turn ids, whether
to add bos, the pre-tokenizer's name (``tokenizer.ggml.pre``: which regex splits text before BPE), and the chat
template. ``gguf_import.load_gguf`` reads the file back into the same model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from lmforge.atomic import fsync_dir
from lmforge.gguf_import import (
    CONTROL,
    NORMAL,
    PRE_TOKENIZERS,
    UNUSED,
    USER_DEFINED,
    GGUFError,
    gguf_name,
    permute_rows,
    pre_tokenizer,
    tracked,
)
from lmforge.model import Transformer
from lmforge.quant import QuantLinear
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

OUTTYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32  # weights per Q8_0 block


def check_exportable(model: Transformer, source: str) -> None:
    """One clear error for what a GGUF Llama (and lmforge's importer) cannot hold."""
    cfg = model.config
    if cfg.num_labels:
        raise GGUFError(f"{source}: a model with a score head (reward model / critic, num_labels={cfg.num_labels}) "
                        "is not a language model llama.cpp can run; export the policy")
    if cfg.attention_bias or cfg.qkv_bias:
        raise GGUFError(f"{source}: projection biases (attention_bias / qkv_bias, e.g. Qwen2) are not exported to "
                        "GGUF yet (only bias-free Llama-family models)")


def float_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors as float32, int8 / int4 layers (lmforge.quant.QuantLinear) dequantized, tied head
    left out (GGUF ties by omitting output.weight)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for key in ("weight", "weight_scale", "weight_min"):
                state.pop(f"{name}.{key}", None)
            state[f"{name}.weight"] = module.dequantize(torch.float32).detach()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.float().cpu().contiguous() for k, v in state.items()}


def tensor_type(shape: tuple[int, ...], outtype: str) -> str:
    """'F32', 'F16' or 'Q8_0' for a tensor of ``shape`` in an ``outtype`` file (see the module docstring)."""
    if len(shape) < 2 or outtype == "f32":
        return "F32"
    if outtype == "q8_0" and shape[-1] % Q8_0_BLOCK == 0:
        return "Q8_0"
    return "F16"


def gguf_tensors(model: Transformer, outtype: str, progress: bool = False):
    """(GGUF name, numpy array as written, GGMLQuantizationType) of every tensor, q/k rows permuted."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    cfg = model.config
    state = float_state_dict(model)
    for name, w in tracked(state.items(), f"gguf {outtype}", len(state), progress):
        if ".self_attn.q_proj." in name:
            w = permute_rows(w, cfg.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            w = permute_rows(w, cfg.num_key_value_heads)
        qtype = GGMLQuantizationType[tensor_type(tuple(w.shape), outtype)]
        yield gguf_name(name), quantize(w.numpy(), qtype), qtype


def detect_pre(tokenizer: Tokenizer, source: str) -> str:
    """The ``tokenizer.ggml.pre`` name whose split (as lmforge's importer builds it) is this tokenizer's."""
    def as_json(pre) -> dict:
        probe = HFTokenizer(models.BPE())
        probe.pre_tokenizer = pre
        return json.loads(probe.to_str())["pre_tokenizer"]

    ours = json.loads(tokenizer.tok.to_str())["pre_tokenizer"]
    for name in PRE_TOKENIZERS:
        if as_json(pre_tokenizer(name, source)) == ours:
            return name
    raise GGUFError(f"{source}: the tokenizer's pre-tokenizer {json.dumps(ours)[:160]} is none llama.cpp is known "
                    f"to split the same way ({', '.join(PRE_TOKENIZERS)}); pass pre=NAME (a tokenizer.ggml.pre "
                    "value from llama.cpp's llama-vocab.cpp) if you know which one it is")


def vocabulary(tokenizer: Tokenizer, rows: int, source: str) -> tuple[list[str], list[int], list[str]]:
    """(token strings by id, llama.cpp token types, merges as 'a b') for an embedding of ``rows`` rows; ids the
    tokenizer does not use become '[PAD<id>]' tokens of type UNUSED (llama.cpp wants one token per row)."""
    spec = json.loads(tokenizer.tok.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("normalizer") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"{source}: only byte-level BPE tokenizers without a normalizer are exported to GGUF "
                        f"(model {model.get('type')}, normalizer {(spec.get('normalizer') or {}).get('type')}, "
                        f"decoder {(spec.get('decoder') or {}).get('type')})")
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= rows:
        raise GGUFError(f"{source}: the tokenizer has ids up to {max(vocab.values())}, the embedding {rows} rows")
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [UNUSED] * rows
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for i, added in tokenizer.tok.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def adds_bos(tokenizer: Tokenizer) -> bool:
    """Whether llama.cpp should put bos in front of a prompt: lmforge does when the chat render does not already
    start with it (data.chat's bos rule: a trained tokenizer's <|endoftext|> yes, SmolLM2's <|im_start|> no)."""
    if tokenizer.bos_id is None:
        return False
    render = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = tokenizer.encode(render)
    return not ids or ids[0] != tokenizer.bos_id


def add_tokenizer(writer, tokenizer: Tokenizer, rows: int, pre: str, source: str) -> dict:
    tokens, types, merges = vocabulary(tokenizer, rows, source)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    end_of_turn = tokenizer.token_to_id("<|im_end|>")
    if end_of_turn is not None and end_of_turn != tokenizer.eos_id:
        writer.add_eot_token_id(end_of_turn)  # llama.cpp stops a chat turn here as well as at eos
    bos = adds_bos(tokenizer)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template or CHATML_TEMPLATE)  # what lmforge renders with
    return {"tokens": len(tokens), "merges": len(merges), "pre": pre, "add_bos": bos,
            "unused_rows": types.count(UNUSED)}


def add_config(writer, model: Transformer, name: str, file_type: int) -> None:
    cfg = model.config
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)  # GGML_QNT_VERSION
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.resolved_head_dim)
    if cfg.resolved_head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(cfg.resolved_head_dim)
        writer.add_value_length(cfg.resolved_head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)


def write_gguf(path: str | Path, model: Transformer, tokenizer: Tokenizer, outtype: str = "f16", name: str = "",
               pre: str = "", progress: bool = False) -> dict:
    """Write ``model`` + ``tokenizer`` as one GGUF file (atomically: ``path.tmp``, fsync, rename); returns what
    was written: tensor counts by type, tokenizer facts, bytes."""
    try:
        from gguf import GGUFWriter, LlamaFileType
    except ImportError as e:
        raise ImportError("exporting GGUF files needs the gguf package: pip install 'gguf>=0.10' "
                          "(or pip install -e .[gguf])") from e
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    path = Path(path)
    source = str(path)
    check_exportable(model, source)
    pre = pre or detect_pre(tokenizer, source)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0}[outtype]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(str(tmp), "llama")
    try:
        add_config(writer, model, name or path.stem, int(file_type))
        facts = add_tokenizer(writer, tokenizer, model.config.vocab_size, pre, source)
        counts: dict[str, int] = {}
        for gname, array, qtype in gguf_tensors(model, outtype, progress):
            writer.add_tensor(gname, array, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "outtype": outtype, "bytes": path.stat().st_size, "tensor_types": counts,
            "tokenizer": facts}

