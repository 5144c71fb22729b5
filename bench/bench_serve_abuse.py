"""`lmforge serve` under abuse: what each hostile client gets, how long it holds on, and the server's memory.

    python bench/bench_serve_abuse.py                  # this tree's serve
    python bench/bench_serve_abuse.py --src OTHER/src  # another tree's (e.g. before the bounds), same cases

Starts `lmforge serve` (default limits) on a random 2-layer model in a child process and sends, over loopback
sockets: a 40 MiB body under ``Content-Length: -1``, a non-integer and a missing length, a 1 GB length with no
body, headers and a body a byte per 0.5 s (slowloris), a connection that says nothing, 200 connections at once,
n=10000, n x max_tokens over the cap, wrong types, ``tools``, and 48 requests at once (more than max_queued);
then an ordinary request. The table gives each case's answer, the seconds until the server answered or closed,
and the server's resident memory after it (and its peak), read from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir
from lmforge.tokenizer import train_tokenizer

MESSAGES = [{"role": "user", "content": "Response A or B?"}]


def make_model(path: Path) -> Path:
    text = "The assistant answers the user. Response A or B? Thank you, that helps.\n"
    tok = train_tokenizer([text] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=512))
    save_model_dir(path, model, tok)
    return path


def memory(pid: int) -> tuple[float, float, int]:
    """(resident MiB, peak resident MiB, threads) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    value = {k: int(re.search(rf"{k}:\s+(\d+)", status)[1]) for k in ("VmRSS", "VmHWM", "Threads")}
    return value["VmRSS"] / 1024, value["VmHWM"] / 1024, value["Threads"]


def exchange(port: int, head: bytes, body: bytes = b"", pace: float = 0.0, limit: float = 60.0) -> tuple[str, float]:
    """Send head + body (the body a byte per ``pace`` s if pace; all of it if body is empty), read the answer;
    (status line and message or what happened, seconds until the server answered or closed)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        answered = threading.Event()

        def sender():
            try:
                data = body or head
                if not pace or not body:
                    s.sendall(head + body)
                    return
                s.sendall(head)
                for i in range(len(data)):
                    if answered.is_set():
                        return
                    s.sendall(data[i:i + 1])
                    time.sleep(pace)
            except OSError:
                pass

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        try:
            first = s.recv(65536)
        except TimeoutError:
            return f"no answer in {limit:g} s", time.monotonic() - start
        except ConnectionResetError:
            first = b""
        answered.set()
        seconds = time.monotonic() - start
        first += rest_of(s, first)
    line = first.split(b"\r\n", 1)[0].decode(errors="replace")
    message = re.search(rb'"message": "([^"]{0,110})', first)
    return (f"{line} ({message[1].decode()})" if message else line) or "closed, no answer", seconds


def rest_of(s: socket.socket, got: bytes) -> bytes:
    """The rest of a response whose start is ``got`` (its headers and Content-Length), or b"" after 2 s."""
    length = re.search(rb"Content-Length: (\d+)", got)
    more = b""
    s.settimeout(2)
    try:
        while b"\r\n\r\n" not in got + more or (length and len((got + more).split(b"\r\n\r\n", 1)[1]) < int(length[1])):
            chunk = s.recv(65536)
            if not chunk:
                break
            more += chunk
    except OSError:
        pass
    return more


def post(body: dict | bytes, length: str | None = None, extra: str = "") -> tuple[bytes, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data) if length is None else length}\r\n" if length != "none" else ""
    return (head + extra + "\r\n").encode(), data


def flood(port: int, count: int, pid: int) -> tuple[str, float]:
    start = time.monotonic()
    conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    time.sleep(0.5)
    threads = memory(pid)[2]
    answers, waiting, deadline = [], conns[-count // 2:], time.monotonic() + 10
    while waiting and time.monotonic() < deadline:
        for c in select.select(waiting, [], [], 0.5)[0]:
            answers.append(c.recv(200).split(b"\r\n", 1)[0].decode() or "closed")
            waiting.remove(c)
    answers += ["no answer in 10 s"] * len(waiting)
    for c in conns:
        c.close()
    counts = {a: answers.count(a) for a in sorted(set(answers))}
    return f"{count} opened; the last {count // 2}: {counts}; {threads} server threads", time.monotonic() - start


def burst(port: int, count: int) -> tuple[str, float]:
    head, body = post({"messages": MESSAGES, "max_tokens": 64})
    start = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        lines = list(pool.map(lambda _: exchange(port, head, body, limit=300)[0].split(" (")[0], range(count)))
    return str({a: lines.count(a) for a in sorted(set(lines))}), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    parser.add_argument("--limit", type=float, default=60.0, help="seconds a client waits for an answer")
    args = parser.parse_args()
    model = make_model(Path(tempfile.mkdtemp()) / "model")
    env = {**os.environ, "PYTHONPATH": args.src, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model), "port=0", "device=cpu",
                             "verbose=false"], stderr=subprocess.PIPE, text=True, env=env)
    port = int(re.search(r"127\.0\.0\.1:(\d+)/v1", proc.stderr.readline())[1])
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (40 << 20) + b'"}]}'
    cases = [
        ("Content-Length: -1, 40 MiB body", lambda: exchange(port, *post(big, "-1"), limit=args.limit)),
        ("Content-Length: abc", lambda: exchange(port, *post({"messages": MESSAGES}, "abc"), limit=args.limit)),
        ("no Content-Length", lambda: exchange(port, *post({"messages": MESSAGES}, "none"), limit=args.limit)),
        ("Content-Length: 1e9, no body sent", lambda: exchange(port, *post(b"", str(10 ** 9)), limit=args.limit)),
        ("headers a byte per 0.5 s", lambda: exchange(port, b"", b"".join(post({"messages": MESSAGES}, None,
                                                                               "X-Pad: " + "a" * 300 + "\r\n")),
                                                      pace=0.5, limit=args.limit)),
        ("body a byte per 0.5 s", lambda: exchange(port, post(b"x" * 300)[0], b"x" * 300, pace=0.5, limit=args.limit)),
        ("a connection that sends nothing", lambda: exchange(port, b"", limit=args.limit)),
        ("200 connections at once", lambda: flood(port, 200, proc.pid)),
        ("n=10000", lambda: exchange(port, *post({"messages": MESSAGES, "n": 10000, "max_tokens": 64}),
                                     limit=args.limit)),
        ("n=16 x max_tokens=512", lambda: exchange(port, *post({"messages": MESSAGES, "n": 16, "max_tokens": 512}),
                                                   limit=args.limit)),
        ('"stream": "yes"', lambda: exchange(port, *post({"messages": MESSAGES, "stream": "yes", "max_tokens": 4}),
                                             limit=args.limit)),
        ('"tools": [...]', lambda: exchange(port, *post({"messages": MESSAGES, "max_tokens": 4,
                                                         "tools": [{"type": "function"}]}), limit=args.limit)),
        ("48 requests at once (64 tokens each)", lambda: burst(port, 48)),
        ("then an ordinary request", lambda: exchange(port, *post({"messages": MESSAGES, "max_tokens": 8}),
                                                      limit=args.limit)),
    ]
    rss, peak, threads = memory(proc.pid)
    print(f"serve from {args.src}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"at start: {rss:.0f} MiB resident, {threads} threads")
    print("| case | answer | seconds to answer / close | resident MiB after (peak) | threads after |")
    print("|---|---|---|---|---|")
    for name, run in cases:
        try:
            answer, seconds = run()
        except OSError as e:
            answer, seconds = f"client error: {e!r:.60}", float("nan")
        rss, peak, threads = memory(proc.pid)
        print(f"| {name} | {answer} | {seconds:.2f} | {rss:.0f} ({peak:.0f}) | {threads} |", flush=True)
    proc.terminate()
    proc.wait(timeout=30)


if __name__ == "__main__":
    main()
