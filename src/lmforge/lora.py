"""LoRA adapters on lmforge's Transformer, through `peft` (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

Each targeted linear layer W (out x in) gets a trainable low-rank update while W stays frozen:

    y = W x + (alpha / r) * B A dropout(x),     A: r x in (random init), B: out x r (zero init, so y starts = W x)

The targets are plain ``nn.Linear`` modules named like Llama's (q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj), so the same config works for QLoRA once the base weights are quantized (bitsandbytes'
Linear4bit replaces nn.Linear; peft wraps either). Adapters are saved in PEFT's own format
(adapter_config.json + adapter_model.safetensors, keys ``base_model.model.<llama name>.lora_A.weight``), which
``peft.PeftModel.from_pretrained`` loads onto lmforge's model or onto transformers' LlamaForCausalLM alike.
Merging folds B A into W and gives back a plain Transformer: an ordinary lmforge / Hugging Face checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.modelio import load_model_dir, load_tokenizer, save_model_dir
from lmforge.quant import QuantizedModelError, is_quantized

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraOptions:
    enabled: bool = False  # off: full fine-tuning (the default)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))
    merge: bool = True  # also write the merged model (a plain checkpoint) next to the adapter

    def validate(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        unknown = [m for m in self.target_modules if m not in LLAMA_LINEARS]
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty subset of {LLAMA_LINEARS}, got {self.target_modules}")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs peft: pip install 'lmforge[hf]' (or pip install peft)") from e
    return peft


def apply_lora(model: torch.nn.Module, opts: LoraOptions, base_path: str | None = None):
    """Wrap ``model`` in a peft PeftModel with fresh LoRA adapters; only the adapters require grad."""
    if is_quantized(model):
        raise QuantizedModelError(f"{base_path or 'this model'} is quantized (lmforge quantize): LoRA here trains "
                                  "adapters on a float model; fine-tune the float checkpoint, then quantize")
    peft = _peft()
    config = peft.LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                             target_modules=list(opts.target_modules), bias="none")
    wrapped = peft.get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = base_path
    return wrapped


def save_adapter(model, path: str | Path) -> Path:
    """adapter_config.json + adapter_model.safetensors (PEFT's format) into ``path``."""
    path = Path(path)
    # the embeddings are never adapted here; "auto" would re-read the base config.json through transformers
    model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
    readme = path / "README.md"  # peft writes a hub model card template; nothing in it is true here
    if readme.exists():
        readme.unlink()
    return path


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """Put a saved adapter on ``model`` (an lmforge Transformer): a peft PeftModel."""
    peft = _peft()
    return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def merge_lora(model) -> torch.nn.Module:
    """Fold every adapter into its base weight (W <- W + (alpha/r) B A) and return the plain model."""
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def merge_adapter_dir(base: str | Path, adapter_dir: str | Path, out_dir: str | Path, tokenizer=None) -> Path:
    """Base model directory + adapter directory -> a merged model directory (config, weights, tokenizer)."""
    merged = merge_lora(load_adapter(load_model_dir(base), adapter_dir))
    if tokenizer is None:
        source = Path(adapter_dir) if (Path(adapter_dir) / "tokenizer.json").exists() else base
        tokenizer = load_tokenizer(source)
    return save_model_dir(out_dir, merged, tokenizer)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
