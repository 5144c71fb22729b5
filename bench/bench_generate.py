"""Generation throughput: lmforge's KV-cache engine vs transformers' ``generate`` (DynamicCache), same weights.

    python bench/bench_generate.py [--prompt 64] [--new 128] [--repeats 3] [--batches 1 16] [--no-compile]

Tiny random Llama (hidden 256, 4 layers, 4 heads / 2 kv heads, ffn 688, vocab 8192), fp32, 2 threads;
64-token prompts, 128 new tokens with end-of-sequence stopping off, greedy and sampled (temperature 1,
top_p 0.9). Prints new tokens per second (best of --repeats runs each) for transformers, lmforge's default
engine (growing cache), its fixed-shape decode uncompiled (static) and torch.compile'd (+ compile), and the
ratio to transformers. The first call of each is a warm-up outside the timing; for + compile it is printed:
it holds the compile (Dynamo + inductor; inductor's on-disk cache makes a second process faster).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial

import torch

from lmforge.generation import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir


def best_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall time of each function, and the time of its first (warm-up) call; runs alternate so that load
    from other processes hits all alike."""
    warmup = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up: allocator, kernels, lazy inits, compiles
        warmup[name] = time.perf_counter() - t0
    times = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times, warmup


def run_stock(model, prompts: torch.Tensor, new: int, sampling: dict) -> None:
    hf_kw = dict(do_sample=False) if sampling["temperature"] == 0 else dict(do_sample=True, top_k=0, **sampling)
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                             min_new_tokens=new, **hf_kw)
    assert out.shape == (prompts.shape[0], prompts.shape[1] + new)


def run_ours(model, prompts: list[list[int]], new: int, sampling: dict, **engine) -> None:
    params = SamplingParams(max_new_tokens=new, seed=0, **sampling, **engine)
    out = generate(model, prompts, params, eos_token_ids=[])
    assert all(len(row[0].token_ids) == new for row in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    ours = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(d, ours)
        stock = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").eval()
    stock.generation_config.eos_token_id = None  # always generate exactly --new tokens
    stock.generation_config.pad_token_id = 0

    modes = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, top_p=0.9)}
    engines = {"lmforge": dict(static_cache=False), "lmforge static": dict(static_cache=True)}
    if not args.no_compile:
        engines["lmforge + compile"] = dict(compile=True)
    rows, compile_s = [], {}
    for batch in args.batches:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt))
        for mode, sampling in modes.items():
            fns = {"transformers": partial(run_stock, stock, prompts, args.new, sampling)}
            fns |= {name: partial(run_ours, ours, prompts.tolist(), args.new, sampling, **kw)
                    for name, kw in engines.items()}
            times, warmup = best_times(fns, args.repeats)
            if "lmforge + compile" in warmup:
                compile_s.setdefault(batch, warmup["lmforge + compile"])
            new_tokens = batch * args.new
            rows += [(batch, mode, name, new_tokens / t, times["transformers"] / t) for name, t in times.items()]

    print(f"\ngeneration, {args.prompt}-token prompts, {args.new} new tokens, fp32, {args.threads} threads, "
          f"best of {args.repeats}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>5} {'mode':<8} {'implementation':<18} {'tok/s':>8} {'vs transformers':>16}")
    for batch, mode, name, tps, ratio in rows:
        print(f"{batch:>5} {mode:<8} {name:<18} {tps:>8.0f} {ratio:>15.2f}x")
    for batch, seconds in compile_s.items():
        print(f"lmforge + compile, batch {batch}: first call (compile warm-up, excluded above) {seconds:.1f} s")


if __name__ == "__main__":
    main()
