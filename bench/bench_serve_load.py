"""`lmforge serve` under concurrent clients: the continuous-batching scheduler against one request at a time.

    python bench/bench_serve_load.py --model runs/smollm2 [--clients 1,4,16] [--tokens 64] [--requests 2]

Both sides in one process, the same model, prompts and lengths: the server as it ships (every request on the
scheduler, decoding together) and the same server with the scheduler limited to one running sequence
(max_running=1: requests queue and run one after another, as serve did before the scheduler). For each number of
clients, every client sends ``--requests`` streamed chat requests back to back (greedy, ``--tokens`` new tokens,
different prompts); printed: aggregate output tokens/s, p50 / p95 time to first token and p50 inter-token latency
over all requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from lmforge.apps.serve import ServeConfig, make_server
from lmforge.modelio import load_model_and_tokenizer

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 12 + 30?", "Say hello in Spanish.",
             "Why is the sky blue?", "Write a haiku about rain.", "What is a prime number?", "Spell 'cat'."]


def stream(port: int, question: str, tokens: int) -> dict:
    """One streamed, greedy chat request: the arrival time of each content chunk (s from sending), the text, and
    the completion tokens the server's usage reports (0 when it sends none)."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    stamps, text, used = [], [], 0
    for line in conn.getresponse():
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            used = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter() - start)
            text.append(chunk["choices"][0]["delta"]["content"])
    conn.close()
    return {"stamps": stamps, "text": "".join(text), "used": used}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def load(port: int, clients: int, requests: int, tokens: int, count=lambda r: r["used"]) -> dict:
    """``clients`` threads each send ``requests`` requests back to back. Tokens are ``count(result)`` (default: the
    server's usage). Inter-token latency: "itl" per request, (last chunk - first chunk) / (tokens - 1), so servers
    that put several tokens in one chunk are timed alike; "gap" is the median gap between chunks."""
    def client(c: int) -> list:
        return [stream(port, QUESTIONS[(c * requests + r) % len(QUESTIONS)], tokens) for r in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rows in pool.map(client, range(clients)) for r in rows]
    wall = time.perf_counter() - start
    ttft = [r["stamps"][0] for r in results if r["stamps"]]
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    itl = [(r["stamps"][-1] - r["stamps"][0]) / (count(r) - 1) for r in results if r["stamps"] and count(r) > 1]
    return {"tokens/s": sum(map(count, results)) / wall, "ttft p50": pct(ttft, 0.5), "ttft p95": pct(ttft, 0.95),
            "gap p50": statistics.median(gaps) if gaps else float("nan"), "itl p50": pct(itl, 0.5),
            "itl p95": pct(itl, 0.95), "empty": sum(not r["stamps"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2)
    args = ap.parse_args()
    model, tok = load_model_and_tokenizer(args.model, "cpu")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print("| server | clients | output tokens/s | TTFT p50 s | TTFT p95 s | inter-token p50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, running in (("scheduler (max_running=32)", 32), ("one at a time (max_running=1)", 1)):
        server = make_server(ServeConfig(model=args.model, port=0, verbose=False, max_running=running,
                                         max_queued=256, max_connections=128), model, tok)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        stream(port, "Hi", 4)  # warm-up
        for clients in map(int, args.clients.split(",")):
            r = load(port, clients, args.requests, args.tokens)
            print(f"| {name} | {clients} | {r['tokens/s']:,.1f} | {r['ttft p50']:.2f} | {r['ttft p95']:.2f} | "
                  f"{1000 * r['gap p50']:.0f} |", flush=True)
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
