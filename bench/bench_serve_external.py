"""`lmforge serve` against `transformers serve --continuous-batching` and llama.cpp's server, on one model.

    python bench/bench_serve_external.py --model runs/smollm2 --quantized runs/smollm2-int4 \\
        --gguf-f32 runs/smollm2-F32.gguf --gguf-q8 runs/smollm2-Q8_0.gguf [--clients 1,4,16,32] [--tokens 32]

Every server runs in its own subprocess on a free port, one after another, all in one run of this script:
lmforge serve on the float32 directory, on it with ``dtype=bfloat16`` and on its quantized one (``lmforge
quantize``), transformers serve with continuous batching on the float32 directory in float32 and in bfloat16 (it
has no CPU quantization: only bitsandbytes), and
``python -m llama_cpp.server`` (llama-cpp-python) on the F32 and Q8_0 files ``lmforge export gguf`` wrote, with
``--n_threads`` = the cores (its default is half of them) and ``--interrupt_requests false`` (by default a new
request aborts the one streaming; this way they queue, one decoding at a time). The same streamed, greedy chat requests go to each
(bench_serve_load's client, the prompts rendered by each server's own copy of SmolLM2's chat template), the same
max_tokens. At each number of clients, every client sends its requests back to back (``--min-requests`` in all,
at least one per client). Tokens are counted the same way on every side: the streamed text, re-tokenised with the
model's tokenizer (llama-cpp-python's stream carries no usage). Printed per server and clients: aggregate output
tokens/s, p50 / p95 time to first token, p50 / p95 inter-token latency (per request: first to last token over
tokens - 1), then the issue's three ratios.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench_serve_load import load, stream

from lmforge.modelio import load_tokenizer

PY = sys.executable
# llama-cpp-python's server decodes ~2x slower per token when the openai package is importable (SmolLM2 F32, one
# client: 49 against 26 ms inter-token, measured here; transformers serve needs openai, so it is installed): its
# server runs with openai hidden, as in an environment made for it alone.
HIDE_OPENAI = ("import runpy, sys; sys.modules['openai'] = None; sys.argv[0] = 'llama_cpp.server'; "
               "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(args, port: int) -> dict[str, list[str]]:
    cores = str(os.cpu_count())
    llama = [PY, "-c", HIDE_OPENAI, "--port", str(port), "--n_threads", cores, "--n_threads_batch", cores,
             "--n_ctx", "4096", "--interrupt_requests", "false", "--model"]
    transformers = [str(Path(PY).parent / "transformers"), "serve", args.model, "--continuous-batching",
                    "--device", "cpu", "--port", str(port), "--dtype"]
    servers = {"lmforge fp32": [PY, "-m", "lmforge", "serve", args.model, f"port={port}", "verbose=false"],
               "lmforge bf16": [PY, "-m", "lmforge", "serve", args.model, f"port={port}", "verbose=false",
                                "dtype=bfloat16"],
               "transformers fp32 (CB)": transformers + ["float32"],
               "transformers bf16 (CB)": transformers + ["bfloat16"]}
    if args.quantized:
        servers["lmforge " + Path(args.quantized).name.rsplit("-", 1)[-1]] = [
            PY, "-m", "lmforge", "serve", args.quantized, f"port={port}", "verbose=false"]
    if args.gguf_f32:
        servers["llama.cpp F32"] = llama + [args.gguf_f32]
    if args.gguf_q8:
        servers["llama.cpp Q8_0"] = llama + [args.gguf_q8]
    return servers


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no server on port {port} after {timeout} s")


def bench_server(name: str, cmd: list[str], port: int, args, count) -> dict[int, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent / "src"),
                                                      os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        answer = stream(port, "What is the capital of France?", 12)["text"]  # warm-up (loads the model, inits CB)
        print(f"{name}: {' '.join(cmd[1:4])} ... ; answer {answer!r}", file=sys.stderr, flush=True)
        rows = {}
        for clients in map(int, args.clients.split(",")):
            rows[clients] = r = load(port, clients, max(1, args.min_requests // clients), args.tokens, count)
            print(f"| {name} | {clients} | {r['tokens/s']:,.1f} | {r['ttft p50']:.2f} | {r['ttft p95']:.2f} | "
                  f"{1000 * r['itl p50']:.0f} | {1000 * r['itl p95']:.0f} |" + (f" {r['empty']} empty" if r["empty"] else ""),
                  flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantized", help="lmforge quantize's directory of --model (its server is skipped without)")
    ap.add_argument("--gguf-f32", help="lmforge export gguf's F32 file (llama.cpp F32 is skipped without)")
    ap.add_argument("--gguf-q8", help="the Q8_0 file (llama.cpp Q8_0 is skipped without)")
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated server names to run (default: all)")
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    count = lambda r: len(tok.encode(r["text"]))
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.tokens} new tokens, greedy")
    print("| server | clients | output tokens/s | TTFT p50 s | TTFT p95 s | inter-token p50 ms | inter-token p95 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    for name in commands(args, 0):
        if not args.only or name in args.only.split(","):
            port = free_port()
            results[name] = bench_server(name, commands(args, port)[name], port, args, count)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    ratios(results)


def ratios(results: dict) -> None:
    """The issue's targets at 16 clients (throughput) and 1 client (inter-token p50)."""
    def r(a, b, key, clients):
        return f"{results[a][clients][key] / results[b][clients][key]:.2f}x" if clients in results.get(a, {}) and clients in results.get(b, {}) else "n/a"
    quant = next((n for n in results if n.startswith("lmforge int")), "lmforge quantized")
    print(f"targets: 16-client tokens/s lmforge fp32 / transformers fp32 = "
          f"{r('lmforge fp32', 'transformers fp32 (CB)', 'tokens/s', 16)} (>= 3x); "
          f"lmforge fp32 / llama.cpp F32 = {r('lmforge fp32', 'llama.cpp F32', 'tokens/s', 16)}, "
          f"{quant} / llama.cpp Q8_0 = {r(quant, 'llama.cpp Q8_0', 'tokens/s', 16)} (>= 1x); "
          f"1-client inter-token p50 lmforge fp32 / llama.cpp F32 = "
          f"{r('lmforge fp32', 'llama.cpp F32', 'itl p50', 1)}, {quant} / llama.cpp Q8_0 = "
          f"{r(quant, 'llama.cpp Q8_0', 'itl p50', 1)} (<= 1.5x)")
    print(f"bf16 (both sides' weights in bf16): 16-client tokens/s lmforge / transformers = "
          f"{r('lmforge bf16', 'transformers bf16 (CB)', 'tokens/s', 16)}; lmforge bf16 / transformers' faster of "
          f"fp32 and bf16 = {best_ratio(results, 16)}")


def best_ratio(results: dict, clients: int) -> str:
    """lmforge bf16's tokens/s over the faster transformers precision at ``clients``."""
    theirs = [results[n][clients]["tokens/s"] for n in ("transformers fp32 (CB)", "transformers bf16 (CB)")
              if clients in results.get(n, {})]
    if not theirs or clients not in results.get("lmforge bf16", {}):
        return "n/a"
    return f"{results['lmforge bf16'][clients]['tokens/s'] / max(theirs):.2f}x"


if __name__ == "__main__":
    main()
