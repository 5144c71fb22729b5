"""Training-step throughput: lmforge's Transformer vs transformers' LlamaForCausalLM on the same tiny config.

    python bench/bench_train_step.py [--steps 10] [--threads 2] [--compile]

Same weights, same batch (8 x 256 tokens), fp32, 2 threads, same AdamW (foreach) step included. The models
take turns step by step in one process, so that load from other processes hits both alike; warm-up steps
are not timed. Prints the median step time and tokens/s side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir


def make_step(model, loss_of):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def interleaved_times(steps: dict, n: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per step of each function, taking turns: warm-up rounds first, then ``n`` timed rounds."""
    times = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time lmforge under torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq)
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(d, ours)
        stock = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").train()
    inputs = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    labels = inputs.roll(-1, dims=1)  # lmforge takes aligned targets; transformers shifts the inputs itself
    labels[:, -1] = -100  # (so the last position has no target in either)
    with torch.no_grad():
        stock_loss, our_loss = stock(input_ids=inputs, labels=inputs).loss, ours(inputs, labels=labels)
    assert torch.allclose(stock_loss, our_loss, atol=1e-4), (stock_loss, our_loss)  # the same model math

    steps = {"transformers LlamaForCausalLM (sdpa)": make_step(stock, lambda m: m(input_ids=inputs,
                                                                                    labels=inputs).loss),
             "lmforge Transformer": make_step(ours, lambda m: m(inputs, labels=labels))}
    if args.compile:
        compiled = torch.compile(Transformer(cfg).train())
        steps["lmforge Transformer + torch.compile"] = make_step(compiled, lambda m: m(inputs, labels=labels))
    times = {name: statistics.median(t) for name, t in interleaved_times(steps, args.steps).items()}

    t_stock = times["transformers LlamaForCausalLM (sdpa)"]
    tokens = args.batch * args.seq
    print(f"\ntraining step, batch {args.batch} x {args.seq}, fp32, {args.threads} threads, "
          f"median of {args.steps} interleaved steps, load average {os.getloadavg()[0]:.1f}")
    print(f"{'implementation':<40} {'ms/step':>9} {'tokens/s':>10} {'vs stock':>9}")
    for name, t in times.items():
        print(f"{name:<40} {t * 1e3:>9.1f} {tokens / t:>10.0f} {t_stock / t:>8.2f}x")


if __name__ == "__main__":
    main()
