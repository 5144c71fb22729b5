"""Training-step throughput: lmforge's Transformer vs transformers' LlamaForCausalLM on the same tiny config.

    python bench/bench_train_step.py [--steps 10] [--compile]

Same weights, same batch (8 x 256 tokens), fp32, 2 threads, AdamW step included; prints tokens/s side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def time_steps(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time lmforge under torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM

    from lmforge.model import ModelConfig, Transformer
    from lmforge.modelio import save_model_dir

    cfg = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(d, ours)
        stock = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    inputs, labels = x[:, :-1], x[:, 1:]

    def make_step(model, loss_of):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

        def step():
            loss = loss_of(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    rows = []
    hf_labels = x.clone()  # transformers shifts labels itself
    stock.train()
    t_stock = time_steps(make_step(stock, lambda m: m(input_ids=inputs, labels=hf_labels[:, :-1]).loss), args.steps)
    rows.append(("transformers LlamaForCausalLM (sdpa)", t_stock))
    ours.train()
    t_ours = time_steps(make_step(ours, lambda m: m(inputs, labels=labels)), args.steps)
    rows.append(("lmforge Transformer", t_ours))
    if args.compile:
        compiled = torch.compile(ours)
        rows.append(("lmforge Transformer + torch.compile",
                     time_steps(make_step(compiled, lambda m: m(inputs, labels=labels)), args.steps, warmup=3)))

    tokens = args.batch * args.seq
    print(f"\ntraining step, batch {args.batch} x {args.seq}, fp32, {args.threads} threads, {args.steps} steps")
    print(f"{'implementation':<40} {'ms/step':>9} {'tokens/s':>10} {'vs stock':>9}")
    for name, t in rows:
        print(f"{name:<40} {t * 1e3:>9.1f} {tokens / t:>10.0f} {t_stock / t:>8.2f}x")


if __name__ == "__main__":
    main()
