"""Packed-sequence attention: SDPA with a dense document mask vs FlexAttention with a block mask, one run.

    python bench/bench_packed_attention.py [--seqs 512 1024 2048] [--docs 4 16] [--rounds 5] [--threads 1]

One packed row of ``seq`` tokens holding ``docs`` documents of uneven random lengths, through a random model of
the tiny recipe's shape (hidden 192, 4 layers, 6 heads, 2 kv heads, vocab 2048), fp32 on CPU (bf16 autocast on
CUDA), with ``Transformer.packed_attention`` = sdpa and then flex, taking turns so that other load hits both alike.
Two measurements per side, the median of ``rounds`` after one warm-up call:

  train    forward + backward of the next-token loss (the SFT / GRPO training step's model part). On CPU the flex
           side is flex's eager reference operator (torch 2.13's flex_attention has no CPU backward).
  no-grad  forward under torch.no_grad (reference / old-policy log-probs). The flex side is compiled
           flex_attention; its first call per shape (the compile) is left out and printed as "flex 1st s".

Peak memory is what the measured calls added over the memory held before them: on CUDA max_memory_allocated, on
CPU the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs before each measurement).
The largest |logit difference| between the two sides is printed for every shape.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import statistics
import time

import torch

from lmforge.model import ModelConfig, Transformer

SIDES = ("sdpa", "flex")


def packed_documents(seq: int, docs: int, seed: int) -> torch.Tensor:
    """(1, seq) document ids of ``docs`` consecutive documents with random uneven lengths (each >= 1)."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seq - 1, generator=g)[:docs - 1].add(1).sort().values.tolist()
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, seq])]
    return torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def reset_peak(device: torch.device) -> float:
    """Start a peak-memory measurement; returns the MiB held now."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return _rss_kib("VmRSS") / 1024


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_kib("VmHWM") / 1024


def measure(model, ids, docs, grad: bool, rounds: int, device) -> dict:
    """Median seconds of ``rounds`` calls after one untimed warm-up call, and the peak MiB they added."""
    def call():
        if grad:
            model(ids, labels=ids, document_ids=docs).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(ids, document_ids=docs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    held = reset_peak(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"s": statistics.median(times), "peak": peak_mib(device) - held}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--docs", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=6, num_key_value_heads=2,
                                    max_position_embeddings=max(args.seqs))).to(device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    print(f"{device.type}, torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds}")
    print(f"{'seq':>5} {'docs':>4} {'pass':<8} {'sdpa s':>8} {'flex s':>8} {'flex/sdpa':>9} "
          f"{'sdpa MiB':>9} {'flex MiB':>9} {'flex 1st s':>10} {'max|dlogit|':>11}")
    for seq in args.seqs:
        for n_docs in args.docs:
            docs = packed_documents(seq, n_docs, seed=seq + n_docs).to(device)
            ids = torch.randint(0, 2048, (1, seq), generator=torch.Generator().manual_seed(seq)).to(device)
            logits, first = {}, {}
            for side in SIDES:  # the first no-grad call of a shape: flex compiles its kernel here
                model.packed_attention = side
                t0 = time.perf_counter()
                with torch.no_grad(), autocast:
                    logits[side] = model(ids, document_ids=docs).float()
                first[side] = time.perf_counter() - t0
            diff = float((logits["sdpa"] - logits["flex"]).abs().max())
            for grad, name in ((True, "train"), (False, "no-grad")):
                r = {}
                for side in SIDES:
                    model.packed_attention = side
                    with autocast:
                        r[side] = measure(model, ids, docs, grad, args.rounds, device)
                print(f"{seq:>5} {n_docs:>4} {name:<8} {r['sdpa']['s']:>8.4f} {r['flex']['s']:>8.4f} "
                      f"{r['flex']['s'] / r['sdpa']['s']:>8.2f}x {r['sdpa']['peak']:>9.1f} {r['flex']['peak']:>9.1f} "
                      f"{first['flex']:>10.2f} {diff:>11.2e}")


if __name__ == "__main__":
    main()
