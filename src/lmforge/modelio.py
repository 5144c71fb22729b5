"""Model directories in the Hugging Face layout: config.json + model.safetensors (+ tokenizer files).

A directory lmforge writes opens with ``transformers.AutoModelForCausalLM.from_pretrained``; a Llama-family
directory written by Hugging Face (Llama, Qwen2, Mistral, SmolLM) opens as an lmforge ``Transformer``.
Weights are read from safetensors only: pickled ``pytorch_model.bin`` files can run code when loaded, so they
are refused with a message saying how to convert them.

:func:`load_model_and_tokenizer` is the one loader every stage, engine and app opens a model directory with.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.atomic import replace_dir
from lmforge.errors import ConfigError, ModelLoadError
from lmforge.model import ModelConfig, Transformer, check_rope_scaling, rope_type, unwrap
from lmforge.quant import from_saved_state, quantize_skeleton, saved_quantization_config, to_saved_state
from lmforge.tokenizer import Tokenizer

# model_type -> (architecture class name written to config.json, key quirks)
SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
DTYPES = ("float32", "bfloat16", "float16")  # what a config's ``dtype`` may name (load_model_and_tokenizer)


def config_to_hf(cfg: ModelConfig, **token_ids) -> dict:
    """ModelConfig -> a config.json dict that transformers reads as Llama (or Qwen2 when only q/k/v have bias)."""
    qwen2 = cfg.qkv_bias and not cfg.attention_bias
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling:  # the old key, which transformers 4 and 5 both read (5 also writes rope_parameters)
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if not qwen2:
        out.update(attention_bias=cfg.attention_bias, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False)
    if cfg.num_labels:  # a score head: a reward model / critic, which transformers opens as *ForSequenceClassification
        out["num_labels"] = cfg.num_labels
        out["architectures"] = [out["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
    out.update({k: v for k, v in token_ids.items() if v is not None})
    return out


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """A Llama-family config.json dict -> ModelConfig; anything we would compute differently is an error."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                         f"(lmforge loads {', '.join(SUPPORTED_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    rope_theta, rope_scaling = rope_from_hf(hf, source)
    if model_type == "mistral" and hf.get("sliding_window"):
        warnings.warn(f"{source}: Mistral sliding_window={hf['sliding_window']} is ignored; attention is full, "
                      "which is identical for sequences shorter than the window", stacklevel=2)
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        warnings.warn(f"{source}: Qwen2 use_sliding_window=true (sliding_window={hf.get('sliding_window')} from "
                      f"layer {hf.get('max_window_layers', 0)}) is ignored; attention is full, which is identical for "
                      "sequences shorter than the window", stacklevel=2)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim if head_dim != hf["hidden_size"] // n_heads else 0,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type != "mistral")),
        attention_bias=bool(hf.get("attention_bias", False)) if model_type == "llama" else False,
        qkv_bias=model_type == "qwen2",
        initializer_range=hf.get("initializer_range", 0.02),
        num_labels=int(hf.get("num_labels", 0)) if "num_labels" in hf and hf.get("architectures", [""])[0]
        .endswith("ForSequenceClassification") else 0,
    )


def rope_from_hf(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from a config.json: transformers 5 writes ``rope_parameters`` (theta
    inside), older files ``rope_scaling`` and a top-level ``rope_theta``; where both are present transformers 5
    reads ``rope_scaling``, and so do we. Types lmforge does not compute are one ValueError naming the file."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: per-layer RoPE parameters {params} are not supported")
    theta = params.get("rope_theta") or hf.get("rope_theta") or 10000.0
    kind = rope_type(params)
    if kind == "default":
        return theta, None
    scaling = {"rope_type": kind, **{k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}}
    if kind in ("llama3", "yarn"):  # as transformers standardizes them: the original context defaults to ours
        scaling["original_max_position_embeddings"] = (hf.get("original_max_position_embeddings")
                                                       or scaling.get("original_max_position_embeddings")
                                                       or hf.get("max_position_embeddings", 2048))
    try:
        check_rope_scaling(scaling)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return theta, scaling


def check_context(model, longest: int, key: str, value: int) -> None:
    """Refuse a run whose longest row (``longest`` tokens, allowed by the setting ``key=value``) is longer than the
    model's context: RoPE would go on to positions past max_position_embeddings that the model never trained on,
    while the saved config still claims the shorter context. One ConfigError naming the key."""
    context = model.config.max_position_embeddings
    if longest > context:
        says = "is longer than" if longest == value else f"lets rows reach {longest} tokens, more than"
        raise ConfigError(f"{key}={value} {says} the model's context (max_position_embeddings={context}): set "
                          f"{key}={context} or less")


def save_model_dir(path: str | Path, model: Transformer, tokenizer=None, generation_config: dict | None = None,
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write a Hugging Face model directory atomically (tmp dir, then rename), so a kill never leaves half of one.

    extra_files: name -> text, for things like the resolved run config.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_model_files(tmp, model, tokenizer, generation_config, extra_files)
    replace_dir(tmp, path)
    return path


def write_model_files(path: Path, model: Transformer, tokenizer=None, generation_config: dict | None = None,
                      extra_files: dict[str, str] | None = None) -> None:
    """The files of a model directory, written into an existing (usually temporary) directory."""
    path = Path(path)
    model = unwrap(model)  # torch.compile and DDP wrappers
    token_ids = {}
    if tokenizer is not None:
        token_ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    config = config_to_hf(model.config, **token_ids)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model, "quantization_config", None):  # lmforge.quant: the layers are saved quantized
        config["quantization_config"] = saved_quantization_config(model)
        state = to_saved_state(state, model)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with the embedding; transformers re-ties it
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(path)
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos_ids(tokenizer),
               "pad_token_id": tokenizer.pad_id}
        gen.update(generation_config or {})
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)


def eos_ids(tokenizer) -> list[int] | int:
    """Every id that ends a generation: the document end and, with a chat template, the end of a turn."""
    ids = [tokenizer.eos_id]
    im_end = tokenizer.token_to_id("<|im_end|>")
    if im_end is not None and im_end not in ids:
        ids.append(im_end)
    return ids if len(ids) > 1 else ids[0]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards named by model.safetensors.index.json; never pickle."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path}: only pickle weights (*.bin / *.pt) found; lmforge loads safetensors only because "
                         "unpickling can run arbitrary code. Convert once with transformers: "
                         "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory, or a Hugging Face hub id ('org/name') downloaded once into the hub cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise FileNotFoundError(f"{name_or_path}: not a local directory, and huggingface_hub is not installed "
                                    "to download it (pip install huggingface_hub)") from e
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                                          "tokenizer*"]))
    raise FileNotFoundError(f"{name_or_path}: no such model directory")


def load_model_dir(name_or_path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, num_labels: int | None = None) -> Transformer:
    """Open an lmforge or Hugging Face Llama-family directory as a Transformer.

    num_labels: add (or keep) a scalar head; a new head starts at zero init when the directory has none.
    """
    path = resolve_model_dir(name_or_path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json, so this is not a model directory")
    hf = json.loads(config_file.read_text())
    cfg = config_from_hf(hf, str(config_file))
    if num_labels is not None:
        cfg.num_labels = num_labels
    with torch.device("meta"):
        model = Transformer(cfg)
    state = read_state_dict(path)
    if hf.get("quantization_config"):  # written by `lmforge quantize`: int8/int4 layers (lmforge.quant)
        quantize_skeleton(model, hf["quantization_config"], str(config_file))
        state = from_saved_state(state, hf["quantization_config"])
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if cfg.num_labels and "score.weight" not in state:
        state["score.weight"] = torch.zeros(cfg.num_labels, cfg.hidden_size)
    if not cfg.num_labels:
        state.pop("score.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()  # the tables were made on the meta device
    return model.to(device=device, dtype=dtype)


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    return Tokenizer.load(resolve_model_dir(name_or_path))


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA if present, else Apple MPS, else CPU; anything else is passed to torch.device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_model_and_tokenizer(path: str | Path, device: str | torch.device = "auto", dtype: str = "float32",
                             num_labels: int | None = None) -> tuple[Transformer, Tokenizer]:
    """(model in eval mode, tokenizer) of a model directory (or hub id): the one loader of the package.

    device: ``auto`` picks CUDA, then MPS, then CPU (pick_device); dtype: one of DTYPES; num_labels: add (or
    keep) a scalar head (reward models, critics). The tokenizer must be there too: it carries the chat template.
    A missing directory or file is a ModelLoadError naming ``path`` (the CLI prints it, exit 2).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        model = load_model_dir(path, device=pick_device(device), dtype=getattr(torch, dtype), num_labels=num_labels)
        tokenizer = load_tokenizer(path)
    except FileNotFoundError as e:
        raise ModelLoadError(f"model={path}: {e} (train one with `lmforge sft`, or import one)") from None
    return model.eval(), tokenizer
