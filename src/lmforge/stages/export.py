"""``lmforge export gguf MODEL [out=FILE.gguf] [outtype=f16|f32|q8_0]``: a model directory as one GGUF file.

    lmforge export gguf runs/tiny/sft/model outtype=q8_0        -> runs/tiny/sft/model-Q8_0.gguf
    llama-server -m runs/tiny/sft/model-Q8_0.gguf               (llama.cpp; ollama: FROM ./model-Q8_0.gguf)

The file holds the weights (F32; F16; or Q8_0: blocks of 32 weights with one float16 scale, 8.5 bits a weight;
norms stay F32), the config, the tokenizer (byte-level BPE vocabulary, merges, special tokens, the pre-tokenizer's
llama.cpp name) and the chat template, so llama.cpp, llama-cpp-python and ollama run it as it is; see
lmforge/gguf_export.py. An int8 / int4 directory from ``lmforge quantize`` is dequantized first. Unless
``check=false``, the file is read back with lmforge's own GGUF importer (what ``lmforge import FILE.gguf`` does)
and compared with the source model on held-out English: largest logit difference, how often the two agree on the
most likely next token, and both perplexities, written beside the file as FILE.json.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.atomic import write_atomic
from lmforge.config import parse_cli
from lmforge.errors import ConfigError
from lmforge.evaluation import heldout_text
from lmforge.gguf_export import OUTTYPES, write_gguf
from lmforge.gguf_import import load_gguf
from lmforge.modelio import load_model_and_tokenizer, resolve_model_dir

FORMATS = ("gguf",)


@dataclass
class ExportConfig:
    format: str = "gguf"  # the file format (gguf: llama.cpp, ollama)
    model: str = ""  # lmforge or Hugging Face Llama-family model directory (or hub id); int8/int4 are dequantized
    out: str = ""  # the file to write; "" = beside the model directory: <dir>-<OUTTYPE>.gguf
    outtype: str = "f16"  # f32 | f16 | q8_0 (2-D weights; norms stay f32)
    name: str = ""  # general.name in the file; "" = the file's stem
    pre: str = ""  # tokenizer.ggml.pre (llama.cpp's pre-tokenizer); "" = recognised from tokenizer.json
    check: bool = True  # read the file back (lmforge's GGUF importer) and compare logits with the source
    check_tokens: int = 2048  # at most this many tokens of held-out English for the check (capped by the context)

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r} "
                             "(lmforge export gguf MODEL ...)")
        if not self.model:
            raise ValueError("model=... is required (lmforge export gguf MODEL [out=FILE.gguf])")
        if self.outtype not in OUTTYPES:
            raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {self.outtype!r}")
        if self.check_tokens < 2:
            raise ValueError(f"check_tokens must be >= 2, got {self.check_tokens}")


def default_out(model_dir: Path, outtype: str) -> Path:
    return model_dir.parent / f"{model_dir.name}-{outtype.upper()}.gguf"


def compare(source, exported, ids: list[int]) -> dict:
    """How closely the exported model computes the source's next-token distribution on ``ids`` (one forward pass
    each: the largest logit difference, top-1 agreement, and perplexity exp(mean -log p(x_t | x_<t)))."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        a, b = source(x)[0].float(), exported(x)[0].float()
    target = x[0, 1:]
    ppl = lambda logits: round(math.exp(float(F.cross_entropy(logits[:-1], target))), 4)  # noqa: E731
    return {"max_abs_logit_diff": round(float((a - b).abs().max()), 6),
            "logit_scale": round(float(a.abs().max()), 3),
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
            "perplexity": {"source": ppl(a), "exported": ppl(b)}, "tokens": len(ids)}


def run_export(cfg: ExportConfig) -> dict:
    """Write cfg.model as a GGUF file; returns the summary (also written as <out>.json)."""
    t0 = time.time()
    src = resolve_model_dir(cfg.model)
    model, tokenizer = load_model_and_tokenizer(src, device="cpu")  # a GGUF file carries the tokenizer too
    out = Path(cfg.out) if cfg.out else default_out(src, cfg.outtype)
    written = write_gguf(out, model, tokenizer, cfg.outtype, name=cfg.name, pre=cfg.pre, progress=True)
    summary = {"model": str(cfg.model), **written, "size_mb": round(written["bytes"] / 1e6, 3),
               "parameters": model.num_params(), "seconds": round(time.time() - t0, 2)}
    if cfg.check:
        exported, _, _ = load_gguf(out)
        ids = tokenizer.encode(heldout_text())[:min(cfg.check_tokens, model.config.max_position_embeddings)]
        summary["check"] = {**compare(model, exported, ids), "text": "lmforge/assets/heldout_english.txt"}
    write_atomic(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str]) -> int:
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv = [f"format={argv[0]}", *argv[1:]]  # `lmforge export gguf ...`
    if len(argv) > 1 and "=" not in argv[1] and not argv[1].startswith("-"):
        argv = [argv[0], f"model={argv[1]}", *argv[2:]]  # `lmforge export gguf MODEL ...`
    cfg = parse_cli(argv, ExportConfig, prog="lmforge export", description=__doc__)
    try:
        s = run_export(cfg)
    except (FileNotFoundError, ValueError, ImportError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"lmforge export: error: {e}", file=sys.stderr)
        return 2
    types = ", ".join(f"{n} {t}" for t, n in sorted(s["tensor_types"].items()))
    print(f"exported {s['model']} -> {s['path']} ({s['outtype']}: {types} tensors; {s['size_mb']:.1f} MB; "
          f"tokenizer {s['tokenizer']['tokens']:,} tokens, pre {s['tokenizer']['pre']!r}) in {s['seconds']:.1f} s")
    if "check" in s:
        c = s["check"]
        print(f"check (re-read with lmforge's importer, {c['tokens']} tokens of {c['text']}): max |logit diff| "
              f"{c['max_abs_logit_diff']:.2e} (logits up to {c['logit_scale']:.1f}), same top-1 token "
              f"{c['top1_agreement']:.1%}, perplexity {c['perplexity']['source']:.3f} -> "
              f"{c['perplexity']['exported']:.3f}")
    return 0
