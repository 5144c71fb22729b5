"""GGUF files (llama.cpp's format) -> an lmforge Transformer + Tokenizer, ready to save as a model directory.

    GGUFReader(path) -> metadata (config, tokenizer) + tensors -> dequantize to float32 -> rename to the HF
    Llama layout -> undo llama.cpp's q/k row permutation -> Transformer; tokens + merges -> byte-level BPE

llama.cpp applies RoPE to adjacent pairs (x[2i], x[2i+1]); Hugging Face and lmforge rotate halves (x[i],
x[i + d/2]). ``convert_hf_to_gguf.py`` makes the two agree by permuting the rows of q_proj and k_proj inside
every head, so the same weights give the same attention scores; ``unpermute_rows`` is its inverse. Quantized
tensors (Q4_1, Q8_0, ...) are dequantized with the ``gguf`` package's reference code, so the imported float32
model computes exactly what the quantized one would with exact arithmetic.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from rich.progress import track
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)  # Llama, Mistral, SmolLM, TinyLlama, ... all convert to 'llama'

# GGUF tensor names -> Hugging Face Llama names ("blk.N.<key>.weight" -> "model.layers.N.<name>.weight")
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type); UNUSED marks embedding rows no text maps to
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# Pre-tokenizer regexes llama.cpp uses, by tokenizer.ggml.pre (llama-vocab.cpp). GPT-2's is ByteLevel's own.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGIT_SPLITTING = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b", "command-r")
# One tokenizer.ggml.pre name for each distinct split lmforge builds (the exporter writes the first that matches)
PRE_TOKENIZERS = ("gpt-2", "smollm", "llama-bpe")


class GGUFError(ValueError):
    """A GGUF file lmforge cannot import; the message names the file and the key or tensor."""


def read_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` (memory-mapped: tensors are read when dequantized), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError("importing GGUF files needs the gguf package: pip install 'gguf>=0.10' "
                          "(or pip install -e .[gguf])") from e
    try:
        return GGUFReader(path)
    except Exception as e:  # a truncated or foreign file fails deep inside numpy; say which file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader) -> dict:
    """Every key/value of the GGUF header as plain Python (str, int, float, bool, or lists of them).

    Read from ``field.parts`` (the raw arrays) rather than newer helper methods, so any gguf >= 0.10 works.
    """
    from gguf import GGUFValueType

    def scalar(part, kind):
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    out = {}
    for key, field in reader.fields.items():
        if not field.types or not field.data:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            out[key] = [scalar(field.parts[i], field.types[-1]) for i in field.data]
        else:
            out[key] = scalar(field.parts[field.data[0]], field.types[0])
    return out


def _float32(value) -> float:
    """A float stored as float32 (1e-5 reads back as 9.99999974e-06), as the short decimal it was written from."""
    return float(str(np.float32(value)))


def config_from_gguf(meta: dict, tensor_names: set[str], vocab_rows: int, source: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{source}: general.architecture {arch!r} is not supported "
                        f"(lmforge imports {', '.join(SUPPORTED_ARCHITECTURES)} GGUF files)")

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{source}: metadata key {arch}.{key} is missing")
        if isinstance(value, list):
            raise GGUFError(f"{source}: {arch}.{key} varies per layer ({value[:4]}...), which is not supported")
        return value

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise GGUFError(f"{source}: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs'}) is not supported")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or hidden // heads
    if meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{source}: partial rotary embeddings ({arch}.rope.dimension_count="
                        f"{meta[f'{arch}.rope.dimension_count']} < head dim {head_dim}) are not supported")
    return ModelConfig(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=head_dim if head_dim != hidden // heads else 0,
        max_position_embeddings=get("context_length", 2048),
        rope_theta=_float32(get("rope.freq_base", 10000.0)),
        rms_norm_eps=_float32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
    )


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (convert_hf_to_gguf.py LlamaModel.permute): within each head, rows
    [first half | second half] become interleaved pairs (h0, h_{d/2}, h1, h_{d/2+1}, ...). Used by tests."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_rows``: interleaved rotary pairs back to rotate-half order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (the inverse of ``hf_name``)."""
    module, _, kind = hf.rpartition(".")
    for gguf_key, hf_key in GLOBAL_NAMES.items():
        if module == hf_key:
            return f"{gguf_key}.{kind}"
    parts = module.split(".", 3)
    block = {v: k for k, v in BLOCK_NAMES.items()}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in block:
        return f"blk.{parts[2]}.{block[parts[3]]}.{kind}"
    raise GGUFError(f"tensor {hf!r} has no place in a GGUF Llama")


def hf_name(gguf_name: str, source: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; unknown names are an error."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise GGUFError(f"{source}: tensor {gguf_name!r} has no place in a Llama model")


def model_from_gguf(reader, meta: dict, source: str, dtype: torch.dtype = torch.float32,
                    progress: bool = False) -> Transformer:
    """Dequantize every tensor, rename it, undo the q/k permutation, and load it into a Transformer."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{source}: no token_embd.weight tensor")
    vocab_rows = int(tensors["token_embd.weight"].shape[-1])  # GGUF shapes are (in, out): ggml order
    cfg = config_from_gguf(meta, set(tensors), vocab_rows, source)
    state = {}
    for name, t in tracked(tensors.items(), "dequantize", len(tensors), progress):
        key = hf_name(name, source)
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{source}: tensor {name}: {e}") from None
        w = torch.from_numpy(np.array(array, dtype=np.float32)).reshape([int(d) for d in reversed(t.shape)])
        if ".self_attn.q_proj." in key:
            w = unpermute_rows(w, cfg.num_attention_heads)
        elif ".self_attn.k_proj." in key:
            w = unpermute_rows(w, cfg.num_key_value_heads)
        state[key] = w.to(dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise GGUFError(f"{source}: tensors do not match a {cfg.num_hidden_layers}-layer Llama: "
                        f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for key, w in state.items():
        shape = tuple(model.state_dict()[key].shape)
        if tuple(w.shape) != shape:
            raise GGUFError(f"{source}: tensor {key} has shape {tuple(w.shape)}, the config implies {shape}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()  # the tables were made on the meta device
    return model.eval()


def tokenizer_from_gguf(meta: dict, source: str) -> Tokenizer:
    """tokenizer.ggml.* -> a byte-level BPE ``tokenizers`` tokenizer with the same ids, specials and template."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (lmforge imports byte-level "
                        "BPE tokenizers, 'gpt2'; SentencePiece 'llama' tokenizers are not supported yet)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {}
    for i, token in enumerate(tokens):
        if types[i] == UNUSED:  # padding rows of the embedding (lmforge export writes them as [PAD<id>])
            continue
        if vocab.setdefault(token, i) != i:
            raise GGUFError(f"{source}: tokenizer.ggml.tokens has {token!r} twice (ids {vocab[token]} and {i})")
    tok = HFTokenizer(models.BPE(vocab, merges))
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                    for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)])
    tok.pre_tokenizer = pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), source)
    tok.decoder = decoders.ByteLevel()

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, pad = name("bos"), name("eos"), name("padding")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:  # Llama 3: transformers adds bos itself
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tokens.index(bos))])
    if eos is None:
        raise GGUFError(f"{source}: metadata has no tokenizer.ggml.eos_token_id")
    arch = meta.get("general.architecture", "llama")
    return Tokenizer(tok, bos=bos, eos=eos, pad=pad, chat_template=meta.get("tokenizer.chat_template"),
                     model_max_length=int(meta.get(f"{arch}.context_length", 1_000_000)))


def pre_tokenizer(pre: str, source: str):
    """The split llama.cpp applies for ``tokenizer.ggml.pre`` before BPE, then bytes -> GPT-2's unicode alphabet."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2"):  # files without a 'pre' predate it and were split GPT-2's way
        return byte_level
    if pre in DIGIT_SPLITTING:  # every digit its own token, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    warnings.warn(f"{source}: tokenizer.ggml.pre {pre!r} is not known to lmforge; using GPT-2's pre-tokenizer, "
                  "so some texts (digits, punctuation runs) may split differently from llama.cpp", stacklevel=3)
    return byte_level


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False
              ) -> tuple[Transformer, Tokenizer, dict]:
    """(model, tokenizer, metadata without the token lists) from a GGUF file."""
    reader = read_gguf(path)
    meta = metadata(reader)
    model = model_from_gguf(reader, meta, str(path), dtype=dtype, progress=progress)
    tokenizer = tokenizer_from_gguf(meta, str(path))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GGUFError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the embedding only "
                        f"{model.config.vocab_size} rows")
    info = {k: v for k, v in meta.items() if not (isinstance(v, list) and len(v) > 64)}
    return model, tokenizer, info


def tracked(items, label: str, total: int, show: bool):
    """``items``, under a rich progress bar when ``show``."""
    if not show:
        yield from items
        return
    yield from track(items, description=label, total=total, transient=True)
