"""What `lmforge serve` costs over calling generate() directly: a streamed request vs the same generate call.

    python bench/bench_serve_overhead.py [--model runs/smollm2] [--tokens 128] [--repeats 5]

A model (``--model``; by default a random one: hidden 256, 4 layers, 4/2 heads, FFN 688) is served in this
process, the same chat prompt completed greedily ``--repeats`` times each way: through HTTP with stream=true (the
server's tokenizer, stop strings and SSE framing included), with the scheduler stepping on the main thread (HTTP
and the client on other threads: how `lmforge serve` runs) and on a thread of its own (``make_server``'s
default, how serve ran before), and with generation.generate on the encoded prompt (an on_token callback timing
the first token). Each way runs as a block (its server made, warmed up, used and closed), and the three blocks
run twice in turn. Greedy, so all produce the same tokens; the table gives the medians of the time to the first
token and of tokens/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from lmforge.apps.serve import ServeConfig, make_server
from lmforge.data.chat import encode_prompt
from lmforge.generation import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_and_tokenizer, save_model_dir
from lmforge.tokenizer import train_tokenizer

MESSAGES = [{"role": "user", "content": "Response A or B?"}]


def served_stream(port: int, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first content chunk, seconds in all, completion tokens) of one streamed request."""
    body = {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response, first, used = conn.getresponse(), None, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
        used = chunk.get("usage", {}).get("completion_tokens", used) if chunk.get("usage") else used
    conn.close()
    return first or float("nan"), time.perf_counter() - start, used


def direct(model, tok, tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first: list[float] = []
    ids = encode_prompt(tok, MESSAGES)
    (c,) = generate(model, [ids], SamplingParams(max_new_tokens=tokens, temperature=0), tokenizer=tok,
                    pad_id=tok.pad_id, on_token=lambda r, t: first or first.append(time.perf_counter() - start))[0]
    return first[0], time.perf_counter() - start, len(c.token_ids)


def served(model, tok, path: str, tokens: int, repeats: int, engine_on_main: bool) -> list[tuple]:
    """``repeats`` streamed requests (after a warm-up) to a server of its own, its engine on this (the main)
    thread or on a thread of its own; the server is closed (its engine thread gone) before this returns."""
    server = make_server(ServeConfig(model=path, port=0, verbose=False), model, tok, start_engine=not engine_on_main)
    engine, port, rows = server.RequestHandlerClass.chat.engine, server.server_address[1], []
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def client():
        try:
            served_stream(port, 8)
            rows.extend(served_stream(port, tokens) for _ in range(repeats))
        finally:
            if engine_on_main:
                engine.stop()

    if engine_on_main:
        threading.Thread(target=client).start()
        engine.run()
    else:
        client()
    server.shutdown()
    server.server_close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a model directory (default: a random tiny model)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    path = args.model
    if not path:
        text = "The assistant answers the user. Response A or B? Thank you, that helps a lot today.\n"
        tok = train_tokenizer([text] * 20, vocab_size=300)
        torch.manual_seed(0)
        path = str(Path(tempfile.mkdtemp()) / "model")
        save_model_dir(path, Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=256,
                                                     intermediate_size=688, num_hidden_layers=4,
                                                     num_attention_heads=4, num_key_value_heads=2,
                                                     max_position_embeddings=1024)), tok)
    model, tok = load_model_and_tokenizer(path, device="cpu")
    model.eval()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    runs = {"served, engine on the main thread": [], "served, engine on its own thread": [], "direct": []}
    for _ in range(2):
        direct(model, tok, 8)  # warm-up
        runs["direct"] += [direct(model, tok, args.tokens) for _ in range(args.repeats)]
        runs["served, engine on the main thread"] += served(model, tok, path, args.tokens, args.repeats, True)
        runs["served, engine on its own thread"] += served(model, tok, path, args.tokens, args.repeats, False)
    print("| path | tokens | first token ms (median) | tokens/s (median) | ms/token (median) |")
    print("|---|---|---|---|---|")
    for name, rows in runs.items():
        ttft = statistics.median(r[0] for r in rows)
        rate = statistics.median(r[2] / r[1] for r in rows)
        print(f"| {name} | {rows[0][2]} | {1000 * ttft:.1f} | {rate:,.1f} | {1000 / rate:.1f} |")


if __name__ == "__main__":
    main()
