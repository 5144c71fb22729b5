"""``lmforge quantize model=DIR out=DIR bits=8|4 [group_size=32]``: int8 / int4 weight-only quantisation.

The decoder's projections (q/k/v/o, gate/up/down) are stored as int8 (one scale per output channel) or int4
(a scale and a minimum per group of ``group_size`` inputs); embeddings, norms and the tied output head stay
float (see lmforge/quant.py for the math and the file format). int4's group_size trades size for accuracy:
32 (the default) costs 0.25 bytes of scale and min per weight, 64 half that; on SmolLM2 (whose GGUF weights
are already 4-bit in blocks of 32) group 32 loses nothing and group 64 raises perplexity by a third.
The output is a model directory that ``generate``, ``chat``, ``serve``, ``eval`` and ``sample`` open like any
other; it cannot be trained.

Both models are measured on CPU and the numbers printed and written to ``out/quantize.json``: size of the
weight files, perplexity on held-out English (``eval_text``; default the paragraph shipped with lmforge), the
relative weight error per layer (||W - W_q|| / ||W||, mean and max), and greedy decode speed at batch 1.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lmforge.config import parse_cli
from lmforge.errors import ConfigError
from lmforge.evaluation import decode_speed, heldout_text, token_perplexity
from lmforge.modelio import load_model_dir, load_tokenizer, resolve_model_dir, save_model_dir
from lmforge.quant import QuantizedModelError, quantize_model


@dataclass
class QuantizeConfig:
    model: str = ""  # lmforge or Hugging Face Llama-family model directory (or hub id), float weights
    out: str = ""  # the quantized model directory to write
    bits: int = 8  # 8: per-channel symmetric int8; 4: group-wise int4 with scales and minimums
    group_size: int = 32  # int4: inputs sharing a scale and min (32/64/128/256 use torch's fused CPU kernel)
    eval_text: str = ""  # text file for the held-out perplexity; empty = lmforge/assets/heldout_english.txt
    eval_tokens: int = 2048  # perplexity over at most this many tokens of it
    speed_tokens: int = 32  # new tokens for the decode tok/s check (batch 1, greedy); 0 = skip it

    def validate(self) -> None:
        for key in ("model", "out"):
            if not getattr(self, key):
                raise ValueError(f"{key}=... is required (lmforge quantize model=DIR out=DIR bits=8)")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        if self.bits == 4 and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")
        if self.eval_tokens < 2:
            raise ValueError(f"eval_tokens must be >= 2, got {self.eval_tokens}")
        if self.eval_text and not Path(self.eval_text).is_file():
            raise ValueError(f"eval_text {self.eval_text}: no such file")


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def measure(model, ids: list[int] | None, prompt: list[int], speed_tokens: int) -> dict:

    out = {"perplexity": round(token_perplexity(model, ids), 4) if ids else None}
    if speed_tokens > 0:
        out["decode_tok_s"] = round(decode_speed(model, prompt, speed_tokens), 1)
    return out


def eval_ids(cfg: QuantizeConfig, tokenizer) -> list[int] | None:
    if tokenizer is None:
        return None
    if cfg.eval_text:
        text = Path(cfg.eval_text).read_text(encoding="utf-8")
    else:
        text = heldout_text()
    return tokenizer.encode(text)[:cfg.eval_tokens]


def run_quantize(cfg: QuantizeConfig) -> dict:
    """Quantize cfg.model into cfg.out and measure both; returns the summary written to out/quantize.json."""
    src = resolve_model_dir(cfg.model)
    hf = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    if hf.get("quantization_config"):
        raise QuantizedModelError(f"{src}: already quantized ({hf['quantization_config']}); quantize the float "
                                  "model it came from")
    t0 = time.time()
    model = load_model_dir(src, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(src) if (src / "tokenizer.json").exists() else None
    ids = eval_ids(cfg, tokenizer)
    prompt = (ids or [0])[:16]
    before = measure(model, ids, prompt, cfg.speed_tokens)
    errors = quantize_model(model, cfg.bits, cfg.group_size)
    gen_file = src / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else None
    out = save_model_dir(cfg.out, model, tokenizer, generation_config=gen)
    del model
    quantized = load_model_dir(out).eval()  # measure what users will load
    after = measure(quantized, ids, prompt, cfg.speed_tokens)
    summary = {
        "model": str(cfg.model), "out": str(out), "bits": cfg.bits,
        "group_size": cfg.group_size if cfg.bits == 4 else None,
        "size_mb": {"float": round(weight_bytes(src) / 1e6, 3), "quantized": round(weight_bytes(out) / 1e6, 3)},
        "perplexity": {"float": before["perplexity"], "quantized": after["perplexity"]},
        "perplexity_text": cfg.eval_text or "lmforge/assets/heldout_english.txt",
        "perplexity_tokens": len(ids) if ids else 0,
        "decode_tok_s": {"float": before.get("decode_tok_s"), "quantized": after.get("decode_tok_s"),
                         "batch_size": 1, "new_tokens": cfg.speed_tokens, "threads": torch.get_num_threads()},
        "weight_error": {k: round(v, 6) if isinstance(v, float) else v for k, v in errors.items()},
        "seconds": round(time.time() - t0, 2),
    }
    (out / "quantize.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(s: dict) -> None:
    name = f"int{s['bits']}" + (f" (group {s['group_size']})" if s["group_size"] else "")
    table = Table(title=f"lmforge quantize -> {s['out']}")
    table.add_column("")
    table.add_column("float32", justify="right")
    table.add_column(name, justify="right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    table.add_row("weights (MB)", fmt(s["size_mb"]["float"], ".2f"), fmt(s["size_mb"]["quantized"], ".2f"))
    table.add_row(f"perplexity ({s['perplexity_tokens']} tokens)", fmt(s["perplexity"]["float"], ".3f"),
                  fmt(s["perplexity"]["quantized"], ".3f"))
    speed = s["decode_tok_s"]
    table.add_row("decode tok/s (batch 1)", fmt(speed["float"], ".1f"), fmt(speed["quantized"], ".1f"))
    Console().print(table)
    e = s["weight_error"]
    print(f"{e['layers']} layers quantized; relative weight error ||W - Wq|| / ||W||: mean {e['rel_error_mean']:.4f}, "
          f"max {e['rel_error_max']:.4f}; perplexity on {s['perplexity_text']}; details in {s['out']}/quantize.json")


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, QuantizeConfig, prog="lmforge quantize", description=__doc__)
    try:
        summary = run_quantize(cfg)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"lmforge quantize: error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0
