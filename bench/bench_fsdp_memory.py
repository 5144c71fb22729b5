"""Training state per process under FSDP2 (train.parallel=fsdp) at 1, 2 and 4 processes on CPU (gloo).

    python bench/bench_fsdp_memory.py [--procs 1 2 4] [--layers 12] [--hidden 768] [--vocab 32768]

Each run is ``torchrun --nproc_per_node=N`` of this file with ``--worker``: a Llama-style Transformer (GPT-2-small
sized by default, ~110M parameters, tied embeddings) is sharded as the loop shards it (train/dist.py wrap_model),
takes 2 AdamW steps on 1 x 64 random tokens per process, and every rank reports

    params / grads / AdamW   bytes of this rank's local shards (DTensor.to_local()) of the parameters, their
                             gradients (after backward, before the step) and the optimizer's exp_avg + exp_avg_sq
    RSS after                the process's resident memory after the 2 steps (VmRSS after malloc_trim): torch
                             itself, activations freed, and on CPU also the plain whole model the loop parks there
                             while the shards train
    peak RSS                 ru_maxrss: adds the moment of sharding, when a whole deep copy exists beside the model

The table prints rank 0's numbers (the ranks differ by at most one row of a parameter's dim 0). On a GPU the
parked copy lives in host memory, so device memory holds only the shards, the gathered units and activations.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.train.dist import cleanup, gather_objects, init_distributed, is_dtensor, wrap_model
from lmforge.train.loop import TrainConfig
from lmforge.train.optim import build_optimizer

MIB = 2**20


def local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = t.to_local() if is_dtensor(t) else t
    return t.numel() * t.element_size()


def rss_now() -> int:
    """Resident bytes of this process now (Linux), after handing freed heap back to the system (glibc's
    malloc_trim), so that memory freed since the peak does not count."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    dist = init_distributed("cpu")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=256)
    model = Transformer(config)
    n_params = model.num_params()
    net = wrap_model(model, dist, "fsdp")
    optimizer = build_optimizer(net, TrainConfig(lr=1e-4))
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(dist.rank)
    grads = 0
    for _ in range(2):
        x = torch.randint(0, args.vocab, (1, 65), generator=g)
        net(x[:, :-1], labels=x[:, 1:]).backward()
        grads = sum(local_bytes(p.grad) for p in params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    adam = sum(local_bytes(v) for state in optimizer.state.values() for k, v in state.items()
               if k in ("exp_avg", "exp_avg_sq"))
    row = {"params": sum(local_bytes(p) for p in params), "grads": grads, "adam": adam,
           "rss_now": rss_now(), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "n_params": n_params}
    rows = gather_objects(row)
    if dist.is_main:
        Path(args.worker).write_text(repr(rows))
    cleanup()


def launch(procs: int, args, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={procs}",
           "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--worker", str(out),
           "--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    return eval(out.read_text())  # noqa: S307  (our own repr of a list of dicts of ints)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--worker", default="")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    out = Path(f"/tmp/bench_fsdp_memory_{os.getpid()}.txt")
    results = {n: launch(n, args, out) for n in args.procs}
    n_params = results[args.procs[0]][0]["n_params"]
    print(f"FSDP2 on CPU (gloo): {n_params / 1e6:.1f}M parameters, fp32 weights, AdamW; MiB per process (rank 0)")
    print(f"{'processes':>9} | {'params':>7} | {'grads':>7} | {'AdamW':>7} | {'state':>7} | {'RSS after':>9} | "
          f"{'peak RSS':>8}")
    for n, rows in results.items():
        r = rows[0]
        state = r["params"] + r["grads"] + r["adam"]
        print(f"{n:>9} | {r['params'] / MIB:>7.1f} | {r['grads'] / MIB:>7.1f} | {r['adam'] / MIB:>7.1f} | "
              f"{state / MIB:>7.1f} | {r['rss_now'] / MIB:>9.0f} | {r['rss'] / MIB:>8.0f}")
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
