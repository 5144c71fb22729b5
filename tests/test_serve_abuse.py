"""`lmforge serve` under abuse and load, over loopback sockets on a tiny model.

Raw sockets send what no well-behaved client would: bad, negative, missing and duplicate Content-Lengths,
oversize bodies (413 before they are sent), bodies cut short, headers and bodies a byte at a time (slowloris),
idle and idle keep-alive connections, more connections than max_connections; JSON requests break the caps and
the types. After each kind, an ordinary request is still answered. Then the queue: full -> 429 with Retry-After;
a client that disconnects cancels its request (the engine stops generating for it); request_timeout cancels
(504); /metrics parses as Prometheus text. Last, 8 clients x 5 requests at once, streamed and not: every
response valid. Timeouts here are generous bounds, never measurements."""

import http.client
import json
import re
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmforge.apps.serve import Metrics, ServeConfig, make_server
from lmforge.modelio import load_model_and_tokenizer

MESSAGES = [{"role": "user", "content": "Response A or B?"}]
LIMITS = dict(max_connections=6, max_queued=8, max_n=4, max_request_tokens=100, max_body=4096, read_timeout=1.0,
              idle_timeout=0.5, max_new_tokens=4)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    path = tiny_model_dir("abuse", text="The assistant answers the user. Response A or B? Thank you.\n",
                          layers=1, max_positions=256)
    return str(path), load_model_and_tokenizer(str(path), device="cpu")


class Served:
    """make_server(cfg) serving on a thread; .port, .chat, .stop()."""

    def __init__(self, loaded, **overrides):
        path, (model, tok) = loaded
        self.server = make_server(ServeConfig(model=path, port=0, verbose=False, **{**LIMITS, **overrides}),
                                  model, tok)
        self.port, self.chat = self.server.server_address[1], self.server.RequestHandlerClass.chat
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def served(loaded):
    s = Served(loaded)
    yield s
    s.stop()


def call(port, path="/v1/chat/completions", body=None, timeout=60):
    """(status, headers, parsed JSON or text) over urllib."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, text = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, headers, text = e.code, e.headers, e.read().decode()
    return status, headers, json.loads(text) if headers.get("Content-Type", "").startswith("application/json") \
        else text


def still_served(port):
    status, _, out = call(port, body={"messages": MESSAGES, "max_tokens": 2})
    assert status == 200 and out["object"] == "chat.completion", out


def wait_until(condition, timeout=20.0):
    """Poll condition() until it holds (a generous bound, not a measurement)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def read_all(sock) -> bytes:
    """Everything until the server closes (a reset after its answer counts as closed)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def raw(port, data: bytes, close_write=False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        return read_all(s)


def status_of(response: bytes) -> int:
    found = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert found, response[:200]
    return int(found[1])


def post_head(length: str | None, extra: str = "") -> bytes:
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {length}\r\n" if length is not None else ""
    return (head + extra + "\r\n").encode()


BODY = json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode()


@pytest.mark.parametrize("head, body, status, message", [
    (post_head("-1"), BODY * 300, 400, b"non-negative integer"),  # was: read to EOF, unbounded memory
    (post_head("abc"), BODY, 400, b"non-negative integer"),  # was: a 500
    (post_head(" 1e3"), BODY, 400, b"non-negative integer"),
    (post_head("99999999999999999999"), BODY, 400, b"non-negative integer"),
    (post_head(None, f"Content-Length: {len(BODY)}\r\nContent-Length: 7\r\n"), BODY, 400, b"non-negative"),
    (post_head(None), BODY, 411, b"needs a Content-Length"),
    (post_head(None, "Transfer-Encoding: chunked\r\n"), b"5\r\nhello\r\n0\r\n\r\n", 411, b"Transfer-Encoding"),
    (post_head(str(10 ** 9)), b"", 413, b"over this server's max_body of 4096"),  # answered with no body sent
    (post_head("5000"), b"x" * 5000, 413, b"max_body"),
    (post_head("200"), BODY[:50], 400, b"body ended after 50"),
    (post_head(str(len(BODY)), "Expect: 100-continue\r\n"), BODY, 100, b"100 Continue"),
    (post_head("9000", "Expect: 100-continue\r\n"), b"", 413, b"max_body"),
])
def test_bad_lengths_and_bodies_are_answered_and_closed(served, head, body, status, message):
    response = raw(served.port, head + body, close_write=True)
    assert status_of(response) == status and message in response, response[:300]
    if status != 100:
        assert b"Connection: close" in response
    still_served(served.port)


def trickle(sock, data: bytes) -> bool:
    """Send data a byte every 0.1 s; True if the server answered or closed before it was all sent."""
    for byte in data:
        if select.select([sock], [], [], 0.1)[0]:
            return True
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return True
    return False


def test_slow_headers_and_bodies_are_cut_off_and_idle_connections_closed(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as s:  # slowloris: headers
        assert trickle(s, post_head(str(len(BODY)), "X-Padding: " + "a" * 200 + "\r\n"))  # 25 s at this pace
        assert read_all(s) == b""  # cut off at read_timeout (1 s), answered nothing
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as s:  # slowloris: the body
        s.sendall(post_head("200"))
        assert trickle(s, b" " * 200)
        response = read_all(s)
    assert status_of(response) == 408 and b"read_timeout=1 s" in response
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as s:  # says nothing: closed
        assert read_all(s) == b""
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as s:  # keep-alive, then idle: closed
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = read_all(s)
        assert status_of(response) == 200 and response.endswith(b'"status": "ok", "model": "abuse0"}')
    still_served(served.port)


def test_more_connections_than_max_connections_get_503_and_threads_stay_bounded(loaded):
    s = Served(loaded, max_connections=4, idle_timeout=30.0)
    before = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", s.port), timeout=20) for _ in range(4)]
    try:
        wait_until(lambda: s.server.open == 4)
        threads = threading.active_count()
        assert threads == before + 4  # one handler thread per connection
        extra = [socket.create_connection(("127.0.0.1", s.port), timeout=20) for _ in range(20)]
        answers = [read_all(c) for c in extra]
        assert all(status_of(a) == 503 and b"max_connections" in a and b"Retry-After: 1" in a for a in answers)
        assert threading.active_count() == threads  # the flood started no thread
        assert s.server.open == 4
    finally:
        for c in held + extra:
            c.close()
    wait_until(lambda: s.server.open == 0)  # the held connections' threads see their close and end
    still_served(s.port)
    s.stop()


@pytest.mark.parametrize("fields, status, param, message", [
    ({"n": 5}, 400, "n", "'n' must be an integer in [1, 4]"),
    ({"n": "3"}, 400, "n", "'n' must be an integer in [1, 4]"),
    ({"n": 4, "max_tokens": 30}, 400, "max_tokens", "n x max_tokens = 4 x 30 = 120 tokens is over"),
    ({"max_tokens": 101}, 400, "max_tokens", "limit of 100 per request"),
    ({"stream": "yes"}, 400, "stream", "'stream' must be bool"),
    ({"stream": True, "stream_options": []}, 400, "stream_options", "'stream_options' must be an object"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, 400, "include_usage", "must be bool"),
    ({"stream_options": {"continuous_usage_stats": True}}, 400, "stream_options", "may only hold include_usage"),
    ({"messages": {"role": "user", "content": "hi"}}, 400, "messages", "'messages' must be a non-empty list"),
    ({"model": 3}, 400, "model", "'model' must be str"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "'tools' is not supported"),
    ({"tool_choice": "auto"}, 400, "tool_choice", "not supported"),
    ({"functions": [{"name": "f"}]}, 400, "functions", "not supported"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
    ({"logit_bias": {"5": 100}}, 400, "logit_bias", "not supported"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", "other than 0 is not supported"),
    ({"frequency_penalty": True}, 400, "frequency_penalty", "other than 0 is not supported"),
    ({"temperatur": 0}, 400, "temperatur", "Unrecognized request argument supplied: temperatur"),
    ({"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {},
      "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u1", "model": "anything"}, 200, None, ""),
    ({"n": 4, "max_tokens": 25}, 200, None, ""),
])
def test_caps_types_and_unsupported_fields_are_400s_naming_the_field(served, fields, status, param, message):
    got, _, out = call(served.port, body={"messages": MESSAGES, "max_tokens": 2, **fields})
    assert got == status, out
    if status == 400:
        assert out["error"]["param"] == param and message in out["error"]["message"], out
        assert out["error"]["type"] == "invalid_request_error"
    else:
        assert len(out["choices"]) == fields.get("n", 1)


def slowed(served, gate: threading.Event | None = None) -> None:
    """Tokens reach serve at most one per 20 ms, and only while ``gate`` is set. on_token runs on the engine's
    thread, so this holds the engine itself, whichever engine is behind the seam."""
    submit = served.chat.engine.submit

    def slow_submit(ids, params, on_token=None):
        def paced(row, token_id):
            assert gate is None or gate.wait(30)
            time.sleep(0.02)
            on_token(row, token_id)
        return submit(ids, params, paced)

    served.chat.engine.submit = slow_submit


def recorded(engine) -> list:
    """The Requests the engine is given from now on."""
    submitted, submit = [], engine.submit
    engine.submit = lambda *args, **kwargs: submitted.append(submit(*args, **kwargs)) or submitted[-1]
    return submitted


def test_a_full_queue_answers_429_with_retry_after(loaded):
    s, gate = Served(loaded, max_queued=2), threading.Event()
    slowed(s, gate)  # the first request runs and waits at its first token; the next two queue
    try:
        with ThreadPoolExecutor(3) as pool:
            waiting = []
            for queued in (0, 1, 2):  # one at a time: the first runs (held), then two queue
                waiting.append(pool.submit(call, s.port, "/v1/chat/completions",
                                           {"messages": MESSAGES, "max_tokens": 2}))
                wait_until(lambda q=queued: (s.chat.engine.stats()["running"], s.chat.engine.stats()["queued"]) == (1, q))
            for stream in (False, True):  # a stream is refused before it begins: a JSON 429 too
                status, headers, out = call(s.port, body={"messages": MESSAGES, "max_tokens": 2, "stream": stream})
                assert status == 429 and int(headers["Retry-After"]) >= 1, out
                assert out["error"]["type"] == "rate_limit_error" and "2 requests are queued" in out["error"]["message"]
            gate.set()
            assert [w.result()[0] for w in waiting] == [200, 200, 200]
        still_served(s.port)
    finally:
        gate.set()
        s.stop()


def test_a_client_that_disconnects_cancels_its_request(loaded):
    s = Served(loaded, max_request_tokens=200)
    slowed(s)
    submitted, engine = recorded(s.chat.engine), s.chat.engine
    try:
        for stream in (True, False):
            body = json.dumps({"messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stream": stream}).encode()
            start = engine.stats()["generated_tokens"]
            with socket.create_connection(("127.0.0.1", s.port), timeout=20) as c:
                c.sendall(post_head(str(len(body))) + body)
                wait_until(lambda s0=start: engine.stats()["generated_tokens"] >= s0 + 3)  # it is generating
                if stream:
                    assert c.recv(65536).startswith(b"HTTP/1.1 200 OK")
            before = engine.stats()["generated_tokens"]
            wait_until(lambda: submitted[-1].done)  # greedy runs 200 tokens here (4 s); the close is seen in 0.1 s
            generated = engine.stats()["generated_tokens"]
            assert submitted[-1].cancelled and submitted[-1].completions is None  # stopped, its blocks freed
            assert generated - before < 50, generated
        still_served(s.port)
        assert "lmforge_requests_cancelled_total 2" in call(s.port, "/metrics")[2]
    finally:
        s.stop()


def test_request_timeout_cancels_the_request(loaded):
    s = Served(loaded, request_timeout=0.3)
    slowed(s)
    submitted = recorded(s.chat.engine)
    try:
        status, _, out = call(s.port, body={"messages": MESSAGES, "max_tokens": 60, "temperature": 0})  # 1.2 s
        assert status == 504 and out["error"]["type"] == "timeout" and "request_timeout=0.3 s" in out["error"]["message"]
        status, _, text = call(s.port, body={"messages": MESSAGES, "max_tokens": 60, "temperature": 0, "stream": True})
        events = [line[6:] for line in text.split("\n") if line]
        assert status == 200 and events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "timeout"
        wait_until(lambda: all(r.done for r in submitted))
        assert [(r.cancelled, r.completions) for r in submitted] == [(True, None), (True, None)]
        assert s.chat.engine.stats()["kv_blocks_used"] == 0  # cancelled requests hold no KV blocks
    finally:
        s.stop()


def parse_prometheus(text: str) -> tuple[dict, dict]:
    """({name: type}, {name{labels}: value}) of Prometheus' text format; every line must be well-formed."""
    types, samples = {}, {}
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif not line.startswith("# HELP "):
            found = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-z_]+="[^"]*"\})? (\S+)', line)
            assert found, line
            samples[found[1] + (found[2] or "")] = float(found[3])
    return types, samples


def test_metrics_are_prometheus_text_and_count_what_happened(loaded):
    s = Served(loaded)
    try:
        outs = [call(s.port, body={"messages": MESSAGES, "max_tokens": 3, "n": n})[2] for n in (1, 2)]
        assert call(s.port, body={"messages": MESSAGES, "tools": [{}]})[0] == 400
        wait_until(lambda: s.server.open == 0)  # the earlier connections' threads see their close and end
        status, headers, text = call(s.port, "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        types, samples = parse_prometheus(text)
        assert types == {"lmforge_queue_length": "gauge", "lmforge_running_requests": "gauge",
                         "lmforge_generated_tokens_total": "counter", "lmforge_tokens_per_second": "gauge",
                         "lmforge_open_connections": "gauge", "lmforge_requests_cancelled_total": "counter",
                         "lmforge_responses_total": "counter", "lmforge_time_to_first_token_seconds": "histogram"}
        assert samples["lmforge_queue_length"] == samples["lmforge_running_requests"] == 0
        assert samples["lmforge_generated_tokens_total"] == sum(o["usage"]["completion_tokens"] for o in outs)
        assert samples['lmforge_responses_total{code="200"}'] == 2
        assert samples['lmforge_responses_total{code="400"}'] == 1
        assert samples["lmforge_open_connections"] == 1 and samples["lmforge_tokens_per_second"] >= 0
        buckets = [v for k, v in samples.items() if k.startswith("lmforge_time_to_first_token_seconds_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == samples["lmforge_time_to_first_token_seconds_count"] == 2
        assert samples["lmforge_time_to_first_token_seconds_sum"] > 0
    finally:
        s.stop()


def test_tokens_per_second_is_over_the_last_10_s_of_scrapes():
    now = [0.0]
    metrics = Metrics(clock=lambda: now[0])
    rates = []
    for t, generated in ((0, 0), (4, 400), (8, 1200), (12, 1600), (30, 1600)):
        now[0] = t
        rates.append(metrics.tokens_per_second(generated))
    # 0 s: no rate yet; 4 s: 400 / 4; 8 s: 1200 / 8; 12 s: from the newest sample at least 10 s old (0 s),
    # 1600 / 12; 30 s: from the previous scrape (12 s), 0 / 18
    assert rates == [0.0, 100.0, 150.0, pytest.approx(1600 / 12), 0.0]


def check_stream(text: str, n: int) -> None:
    """A valid event stream: data lines of chunk JSON, each choice finished once, then [DONE]."""
    lines = [line for line in text.split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines), text
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == list(range(n))


def test_load_8_clients_x_5_requests_streamed_and_not_all_valid(loaded):
    s = Served(loaded, max_connections=16)

    def client(k: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)  # keep-alive between requests
        for i in range(5):
            stream, n = (k + i) % 2 == 0, 1 + (k * 5 + i) % 2
            body = {"messages": [{"role": "user", "content": f"Response A or B? {k} {i}"}], "max_tokens": 6,
                    "n": n, "stream": stream, "seed": k * 5 + i}
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read().decode()
            assert response.status == 200, text
            if stream:
                check_stream(text, n)
            else:
                out = json.loads(text)
                assert [c["index"] for c in out["choices"]] == list(range(n)) and out["usage"]["completion_tokens"]
        conn.close()
        return k

    try:
        with ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(client, range(8))) == list(range(8))
        _, samples = parse_prometheus(call(s.port, "/metrics")[2])
        assert samples['lmforge_responses_total{code="200"}'] == 40
        assert samples["lmforge_time_to_first_token_seconds_count"] == 40
    finally:
        s.stop()


def test_concurrent_requests_decode_together_and_each_gets_its_solo_answer(loaded):
    s = Served(loaded, max_request_tokens=400)
    prompts = [[{"role": "user", "content": text}] for text in ("Response A?", "Thank you.", "The user", "B or A?")]
    try:
        alone = [call(s.port, body={"messages": m, "max_tokens": 40, "temperature": 0})[2] for m in prompts]
        before = s.chat.engine.stats()["steps"]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda m: call(s.port, body={"messages": m, "max_tokens": 40,
                                                                   "temperature": 0})[2], prompts))
        steps = s.chat.engine.stats()["steps"] - before
        tokens = sum(out["usage"]["completion_tokens"] for out in together)
        assert [o["choices"][0]["message"]["content"] for o in together] == \
            [o["choices"][0]["message"]["content"] for o in alone]  # a request's tokens do not depend on the others
        assert steps < tokens, (steps, tokens)  # one request at a time would take a step per token
    finally:
        s.stop()
