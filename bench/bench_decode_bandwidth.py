"""Where batch-1 fp32 decoding on a CPU hits its floor: how fast each matmul kernel streams a decoder's weights.

    python bench/bench_decode_bandwidth.py [--model runs/smollm2] [--threads 2] [--repeats 15]

One decode step of one sequence multiplies one row by every weight once, so its time is the weights' bytes over
the rate a kernel streams them. This prints, in one process, GiB/s for SmolLM2-135M's shapes (30 layers of
q+k+v, o, gate+up and down, then the tied 49,152 x 576 head; 513 MiB of fp32, far more than the caches, so every
weight comes from memory) through each kernel lmforge could use:

    sum                      torch.sum over the same bytes: what the memory system gives a plain stream
    MKL, W (out, in)         F.linear on nn.Linear's own layout
    MKL, W column-major      F.linear on W.t().contiguous().t() (cpu_decode.column_major_weights)
    oneDNN packed            cpu_decode's prepacked weights (what PackedDecodeStep runs)
    two Python threads       each half of every weight on its own thread (1 intra-op thread each)

and, with --model, the model's own decode step (PackedDecodeStep, one row, ~70-token context) in ms.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch
import torch.nn.functional as F

from lmforge.cpu_decode import PackedDecodeStep
from lmforge.model import KVCache
from lmforge.modelio import load_model_dir

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # SmolLM2-135M, fused qkv / gate+up


def timed(step, repeats: int) -> float:
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


def linear_steps(weights: list[torch.Tensor], xs: dict) -> dict:
    """The kernels on the same weights: name -> a function that runs every matmul once."""
    col = [w.t().contiguous().t() for w in weights]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    run = lambda ws, f: lambda: [f(xs[w.shape[-1]], w) for w in ws]  # noqa: E731
    return {"MKL, W (out, in)": run(weights, F.linear),
            "MKL, W column-major": run(col, F.linear),
            "oneDNN packed": lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [None], "")
                                      for w, p in zip(weights, packed)]}


def two_thread_step(weights: list[torch.Tensor], xs: dict):
    """Each weight split in two by output rows; the second half runs on a worker thread."""
    halves = [(w[: w.shape[0] // 2].t().contiguous().t(), w[w.shape[0] // 2:].t().contiguous().t()) for w in weights]
    go, done, job, out = threading.Semaphore(0), threading.Semaphore(0), [None], [None]

    def worker():
        while True:
            go.acquire()
            out[0] = F.linear(*job[0])
            done.release()

    threading.Thread(target=worker, daemon=True).start()

    def step():
        for a, b in halves:
            x = xs[a.shape[1]]
            job[0] = (x, b)
            go.release()
            first = F.linear(x, a)
            done.acquire()
            torch.cat([first, out[0]], 1)
    return step


def model_step_ms(model_dir: str, repeats: int) -> float:
    model = load_model_dir(model_dir).eval()
    with torch.inference_mode():
        cache = KVCache(model.config, 1, 256)
        model(torch.arange(100, 170)[None], cache=cache)
        step = PackedDecodeStep(model, 1)
        token = torch.tensor([42])
        return 1000 * timed(lambda: step.head(step(token, None, None, cache)), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--model", default="", help="also time this model's batch-1 decode step (lmforge import smollm2)")
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(o, i) for o, i in SHAPES]
    xs = {i: torch.randn(1, i) for i in {i for _, i in SHAPES}}
    gib = sum(w.numel() for w in weights) * 4 / 2**30
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"{gib * 1024:.0f} MiB of fp32 weights ({len(SHAPES)} matmuls), {args.threads} threads, load average {load}")
    torch.set_num_threads(args.threads)
    flat = torch.cat([w.flatten() for w in weights])
    rows = {"sum (the memory system's stream)": lambda: flat.sum()}
    with torch.inference_mode():
        rows.update(linear_steps(weights, xs))
        for name, step in rows.items():
            t = timed(step, args.repeats)
            print(f"{name:<36} {1000 * t:7.1f} ms  {gib / t:5.1f} GiB/s")
        torch.set_num_threads(1)
        sys.setswitchinterval(1e-5)  # hand the GIL over at once: each thread waits on the other every matmul
        t = timed(two_thread_step(weights, xs), args.repeats)
        print(f"{'two Python threads, half each':<36} {1000 * t:7.1f} ms  {gib / t:5.1f} GiB/s")
        torch.set_num_threads(args.threads)
    if args.model:
        print(f"{args.model}: PackedDecodeStep, one row: {model_step_ms(args.model, args.repeats):.1f} ms a token")


if __name__ == "__main__":
    main()
