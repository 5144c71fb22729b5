"""HTTP stack for `lmforge serve`: the standard library server serve runs on vs FastAPI + uvicorn.

    python bench/bench_http_stack.py [--requests 400] [--events 32]

Both serve, in this one process, a trivial JSON endpoint (GET /json) and an SSE stream of ``--events`` events
then [DONE] (GET /sse), no model behind either: what is measured is the HTTP layer alone. The standard library
side is serve's own Handler and BoundedHTTPServer (keep-alive, the connection bound, the read deadlines; a stream
ends with its connection); the other is a FastAPI app under uvicorn (asyncio, h11, chunked streams, keep-alive).
Clients are threads with one keep-alive http.client connection each, at 1 and at 16 clients; the table gives
requests/s and the p50 / p95 latency of a whole response. Clients and servers share the process and its GIL, as
they share the cores, for both sides alike.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from lmforge.apps.serve import BoundedHTTPServer, Handler, ServeConfig


class BenchHandler(Handler):
    chat = SimpleNamespace(cfg=ServeConfig(model="bench", verbose=False), engine=SimpleNamespace(stop=lambda: None))
    events = 32

    def route(self, method: str) -> None:
        self.streaming = False
        if self.path == "/json":
            self.send_json(200, {"object": "bench", "ok": True})
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(self.events):
                self.wfile.write(f"data: {json.dumps({'index': i, 'delta': 'tok'})}\n\n".encode())
                self.wfile.flush()
            self.end_stream()


def start_stdlib(events: int) -> tuple[int, Callable[[], None]]:
    handler = type("Bench", (BenchHandler,), {"events": events})
    server = BoundedHTTPServer(("127.0.0.1", 0), handler, max_connections=64)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop():
        server.shutdown()
        server.server_close()
    return server.server_address[1], stop


def start_fastapi(events: int) -> tuple[int, Callable[[], None]]:
    app = FastAPI()

    @app.get("/json")
    async def plain():
        return {"object": "bench", "ok": True}

    @app.get("/sse")
    async def sse():
        async def chunks():
            for i in range(events):
                yield f"data: {json.dumps({'index': i, 'delta': 'tok'})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    with socket.socket() as probe:  # a free port; uvicorn binds it itself, as `uvicorn app --port N` does
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)
    return port, stop


def load(port: int, path: str, clients: int, per_client: int) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p95 ms) of ``clients`` threads each making ``per_client`` GETs of ``path``."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for _ in range(per_client):
            t = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200 and body, (response.status, body[:100])
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=20)
    return len(latencies) / wall, 1000 * statistics.median(latencies), 1000 * cuts[18]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per row (JSON; SSE rows get a quarter)")
    parser.add_argument("--events", type=int, default=32, help="events per SSE response")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("| endpoint | clients | stdlib req/s | stdlib p50 / p95 ms | FastAPI+uvicorn req/s | "
          "FastAPI p50 / p95 ms | stdlib / FastAPI |")
    print("|---|---|---|---|---|---|---|")
    servers = {"stdlib": start_stdlib(args.events), "fastapi": start_fastapi(args.events)}
    for port, _ in servers.values():  # warm-up
        load(port, "/json", 2, 20)
        load(port, "/sse", 2, 5)
    for path, total in (("/json", args.requests), ("/sse", max(16, args.requests // 4))):
        for clients in (1, 16):
            row = {name: load(port, path, clients, max(1, total // clients)) for name, (port, _) in servers.items()}
            (a, a50, a95), (b, b50, b95) = row["stdlib"], row["fastapi"]
            print(f"| {path} | {clients} | {a:,.0f} | {a50:.2f} / {a95:.2f} | {b:,.0f} | {b50:.2f} / {b95:.2f} | "
                  f"{a / b:.2f}x |", flush=True)
    for _, stop in servers.values():
        stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
