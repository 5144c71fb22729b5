"""``lmforge serve MODEL``: an OpenAI-compatible chat-completions server, with a web chat page at ``/``.

    lmforge serve runs/tiny/sft port=8000
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (messages, max_tokens / max_completion_tokens,
temperature, top_p, n, stop, seed, stream, logprobs + top_logprobs; top_k, min_p and repetition_penalty as
vLLM's extra parameters; for models with a think block ``reasoning_effort`` low / medium / high and
``max_thinking_tokens``, budgets the engine enforces, with ``usage.completion_tokens_details.reasoning_tokens``),
``GET /health``, ``GET /metrics`` (Prometheus text) and ``GET /`` (the chat page). Prompts are the chat template's
render of the messages (data.chat.encode_prompt, exactly as SFT trained).

What a request may cost is bounded: the body (``max_body``, 413 unread), its arrival (``read_timeout`` for the
headers and body, ``idle_timeout`` between bytes and between keep-alive requests), the open connections and so
the handler threads (``max_connections``; beyond it a 503 and close), the work (``max_n``, ``max_request_tokens`` =
n x max_tokens, the context), the wait (``max_queued`` requests queued, then 429 + Retry-After) and the time
(``request_timeout``; a client that goes away cancels its request). Unknown fields and fields that would change
the output but are not implemented (tools, response_format, logit_bias, penalties) are 400s naming the field.

Requests go to the engine through a small seam (``submit`` -> Request, ``wait``, ``cancel``, ``stats``): the
continuous-batching scheduler (lmforge.scheduler), so many requests decode together, each streamed, joining and
leaving the batch between decode steps, with their KV cache in blocks under ``kv_tokens``. The standard library is
the whole HTTP stack (see bench/bench_http_stack.py and the README for why).

Log-probabilities are those of the raw model (temperature 1), from one teacher-forced forward pass over prompt
+ completion; ``top_logprobs`` lists the k most likely tokens at each generated position, so the OpenAI judge
of ``lmforge constitutional`` can read label probabilities from this server as it does from any other.
"""

from __future__ import annotations

import collections
import hmac
import io
import json
import math
import os
import queue
import re
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from lmforge.config import parse_cli
from lmforge.data.chat import check_messages, encode_prompt
from lmforge.errors import DataError
from lmforge.generation import SamplingParams
from lmforge.modelio import DTYPES, load_model_and_tokenizer
from lmforge.scheduler import Request, Scheduler
from lmforge.tokenizer import CHATML_TEMPLATE

CHAT_PAGE = Path(__file__).resolve().parent.parent / "assets" / "chat.html"
EFFORTS = ("low", "medium", "high")
REASONING_BUDGETS = {"low": 16, "medium": 48, "high": 160}  # thinking tokens: roughly 1x / 3x / 10x
# the request fields read (the rest of OpenAI's are answered below); "model", "user", "store", "metadata" and
# "service_tier" change nothing here and are accepted as any client sends them
KNOWN_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                "seed", "stream", "stream_options", "logprobs", "top_logprobs", "top_k", "min_p", "repetition_penalty",
                "reasoning_effort", "max_thinking_tokens", "presence_penalty", "frequency_penalty", "user", "store",
                "metadata", "service_tier"}
# fields that would change the output but are not implemented -> 400, unless given their no-op value
UNSUPPORTED = {"tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
               "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},), "logit_bias": ({},),
               "audio": (), "modalities": (["text"],), "prediction": (), "web_search_options": ()}


@dataclass
class ServeConfig:
    model: str = ""  # lmforge or Hugging Face Llama-family model directory (or hub id)
    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    port: int = 8000  # 0 = any free port
    model_name: str = ""  # the name /v1/models reports; "" = the directory's name (its parent's for .../model)
    max_new_tokens: int = 256  # when a request sets no max_tokens (always capped by the context left)
    max_top_logprobs: int = 20  # the largest top_logprobs a request may ask for (OpenAI allows 20)
    # reasoning_effort low / medium / high -> thinking budgets (1x / 3x / 10x); [] = the model's
    # generation_config.json "reasoning_effort_budgets" ({"low": N, ...}), else REASONING_BUDGETS
    reasoning_budgets: list[int] = field(default_factory=list)
    api_key: str = ""  # if set (or env LMFORGE_API_KEY), /v1/* requests need `Authorization: Bearer <api_key>`
    # ---- what one request, or many, may cost ----
    max_n: int = 16  # the largest n (choices) a request may ask for
    max_request_tokens: int = 4096  # n x max_tokens (after the context cap) of one request
    max_body: int = 8 << 20  # bytes of a request body; larger -> 413, not read
    max_queued: int = 32  # requests waiting for the engine; one more -> 429 with Retry-After
    max_connections: int = 64  # open connections = handler threads; one more -> 503 and close
    read_timeout: float = 30.0  # seconds for a request's headers and body to arrive, from its first byte
    idle_timeout: float = 15.0  # seconds a connection may send nothing (keep-alive, or a stalled read / write)
    request_timeout: float = 600.0  # seconds a request may queue + generate; then it is cancelled (504)
    # ---- the continuous-batching scheduler (lmforge.scheduler) every request runs on ----
    kv_tokens: int = 16384  # the KV cache's budget in tokens (fixed-size blocks); a request that cannot fit -> 400
    max_running: int = 32  # sequences (a request's n samples count n) decoding together
    prefill_chunk: int = 512  # prompt tokens prefilled per step, so running streams keep decoding
    device: str = "auto"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    verbose: bool = True  # log one line per request to stderr

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model=... is required (lmforge serve MODEL)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_new_tokens < 1 or self.max_top_logprobs < 0:
            raise ValueError("max_new_tokens must be >= 1 and max_top_logprobs >= 0")
        if self.reasoning_budgets and (len(self.reasoning_budgets) != 3 or min(self.reasoning_budgets) < 0):
            raise ValueError(f"reasoning_budgets must be three budgets >= 0 (low, medium, high), got "
                             f"{self.reasoning_budgets}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for key in ("max_n", "max_request_tokens", "max_body", "max_queued", "max_connections", "kv_tokens",
                    "max_running", "prefill_chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("read_timeout", "idle_timeout", "request_timeout"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0 seconds, got {getattr(self, key)}")


class APIError(Exception):
    """A request the server answers with an OpenAI-style error body (``param``: the field at fault)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers or {}


class ClientGone(Exception):
    """The client closed its connection while its request ran (its request is cancelled)."""


# ---- requests: JSON body -> (prompt ids, sampling params, options) ----

def _field(body: dict, key: str, default, kind: type | tuple, check=None, rule: str = ""):
    value = body.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind) or (check and not check(value)):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise APIError(400, f"'{key}' must be {rule or name}, got {value!r:.60}", param=key)
    return value


def check_fields(body: dict) -> None:
    """400s for what this server would otherwise answer wrongly: fields it does not implement (tools ...) unless
    given their no-op value, penalties other than 0, unknown fields (OpenAI: "Unrecognized request argument"),
    and wrong types of the fields that pick the response's shape."""
    for key, value in body.items():
        if key in UNSUPPORTED:
            if value is not None and value not in UNSUPPORTED[key]:
                raise APIError(400, f"'{key}' is not supported by this server (no tool calling, structured "
                                    f"output, audio or logit bias)", param=key)
        elif key in ("presence_penalty", "frequency_penalty"):
            if value not in (None, 0, 0.0) or isinstance(value, bool):
                raise APIError(400, f"'{key}' other than 0 is not supported (repetition_penalty is)", param=key)
        elif key not in KNOWN_FIELDS:
            raise APIError(400, f"Unrecognized request argument supplied: {key:.60}", param=key)
    _field(body, "stream", False, bool)
    _field(body, "model", "", str)
    _field(body, "user", "", str)
    options = _field(body, "stream_options", {}, dict, rule="an object")
    if set(options) - {"include_usage"}:
        raise APIError(400, f"'stream_options' may only hold include_usage, got {sorted(options)!r:.60}",
                       param="stream_options")
    _field(options, "include_usage", False, bool)


def request_messages(body: dict) -> list[dict]:
    """The checked messages; content given as a list of parts keeps its text parts."""
    messages = body.get("messages")
    if isinstance(messages, list):
        messages = [{**m, "content": "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))}
                    if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in messages]
    try:
        return check_messages(messages, "request", need_assistant=False)
    except DataError as e:
        raise APIError(400, str(e), param="messages") from None


def sampling_params(body: dict, prompt_len: int, context: int, cfg: ServeConfig):
    """SamplingParams from the request's fields, max_new_tokens capped at the context left after the prompt;
    n at most cfg.max_n, and n x max_new_tokens at most cfg.max_request_tokens."""
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"the messages are {prompt_len} tokens with the chat template; the model's context is "
                            f"{context}", "context_length_exceeded", "messages")
    positive = dict(check=lambda v: v >= 1, rule="an integer >= 1")
    max_tokens = _field(body, "max_completion_tokens", None, int, **positive)
    max_tokens = _field(body, "max_tokens", max_tokens or cfg.max_new_tokens, int, **positive)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a non-empty string or a list of them, got {body.get('stop')!r:.60}",
                       param="stop")
    n = _field(body, "n", 1, int, lambda v: 1 <= v <= cfg.max_n, f"an integer in [1, {cfg.max_n}]")
    new_tokens = min(max_tokens, room)
    if n * new_tokens > cfg.max_request_tokens:
        raise APIError(400, f"n x max_tokens = {n} x {new_tokens} = {n * new_tokens} tokens is over this server's "
                            f"limit of {cfg.max_request_tokens} per request; ask for fewer", param="max_tokens")
    params = SamplingParams(
        max_new_tokens=new_tokens,
        temperature=float(_field(body, "temperature", 1.0, (int, float), lambda v: v >= 0, "a number >= 0")),
        top_p=float(_field(body, "top_p", 1.0, (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]")),
        top_k=_field(body, "top_k", 0, int, lambda v: v >= 0, "an integer >= 0"),
        min_p=float(_field(body, "min_p", 0.0, (int, float), lambda v: 0 <= v < 1, "a number in [0, 1)")),
        repetition_penalty=float(_field(body, "repetition_penalty", 1.0, (int, float), lambda v: v > 0,
                                        "a number > 0")),
        n=n,
        stop_strings=stop,
        seed=_field(body, "seed", None, int))
    return params


def thinking_budget(body: dict, budgets: dict[str, int]) -> int | None:
    """The request's thinking budget: ``max_thinking_tokens``, else its ``reasoning_effort`` mapped through
    ``budgets``; None when it asks for neither (the model thinks as long as it likes)."""
    explicit = _field(body, "max_thinking_tokens", None, int, lambda v: v >= 0, "an integer >= 0")
    if explicit is not None:
        return explicit
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in budgets:
        raise APIError(400, f"'reasoning_effort' must be one of {', '.join(budgets)}, got {effort!r:.40}")
    return budgets[effort]


def reasoning_budgets(cfg: ServeConfig) -> dict[str, int]:
    """low / medium / high budgets: the config's, the model directory's generation_config.json, or the default."""
    if cfg.reasoning_budgets:
        return dict(zip(EFFORTS, cfg.reasoning_budgets))
    path = Path(cfg.model) / "generation_config.json"
    try:
        given = json.loads(path.read_text()).get("reasoning_effort_budgets") if path.is_file() else None
    except (OSError, ValueError):
        given = None
    if isinstance(given, dict) and all(isinstance(given.get(e), int) for e in EFFORTS):
        return {e: given[e] for e in EFFORTS}
    return dict(REASONING_BUDGETS)


def usage(prompt_len: int, completions) -> dict:
    """OpenAI's usage block; thinking tokens as completion_tokens_details.reasoning_tokens."""
    used = sum(len(c.token_ids) for c in completions)
    thinking = sum(c.thinking_tokens or 0 for c in completions)
    return {"prompt_tokens": prompt_len, "completion_tokens": used, "total_tokens": prompt_len + used,
            "completion_tokens_details": {"reasoning_tokens": thinking}}


# ---- the engine seam: submit -> scheduler.Request; wait / cancel; stats ----

class Cancelled(Exception):
    """The error of a request cancelled before it finished."""


# ---- /metrics ----

class Metrics:
    """Counters for ``GET /metrics``, in Prometheus' text format (version 0.0.4)."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
    RATE_WINDOW = 10.0  # seconds over which lmforge_tokens_per_second is averaged

    def __init__(self, clock=time.monotonic):
        self.lock, self.clock = threading.Lock(), clock
        self.ttft = [0] * len(self.TTFT_BUCKETS)
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.responses: collections.Counter[int] = collections.Counter()
        self.cancelled = 0
        self.samples: collections.deque[tuple[float, int]] = collections.deque()  # (time, generated tokens)

    def first_token(self, seconds: float) -> None:
        with self.lock:
            for i, bound in enumerate(self.TTFT_BUCKETS):
                self.ttft[i] += seconds <= bound
            self.ttft_sum += seconds
            self.ttft_count += 1

    def response(self, status: int) -> None:
        with self.lock:
            self.responses[status] += 1

    def cancel(self) -> None:
        with self.lock:
            self.cancelled += 1

    def tokens_per_second(self, generated: int) -> float:
        """Tokens generated per second since the newest earlier sample at least RATE_WINDOW old (each call is a
        sample, i.e. a scrape), else since the oldest: over the last 10 s or a little more when scraped more often,
        else since the previous scrape."""
        now = self.clock()
        with self.lock:
            self.samples.append((now, generated))
            while len(self.samples) > 2 and self.samples[1][0] < now - self.RATE_WINDOW:
                self.samples.popleft()
            (t0, g0) = self.samples[0]
        return (generated - g0) / (now - t0) if now > t0 else 0.0

    def render(self, stats: dict, connections: int) -> str:
        rate = self.tokens_per_second(stats["generated_tokens"])
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                         for labels, value in samples)

        with self.lock:
            metric("lmforge_queue_length", "gauge", "Requests waiting for the engine.", [("", stats["queued"])])
            metric("lmforge_running_requests", "gauge", "Requests the engine is generating.",
                   [("", stats["running"])])
            metric("lmforge_generated_tokens_total", "counter", "Tokens generated since the server started.",
                   [("", stats["generated_tokens"])])
            metric("lmforge_tokens_per_second", "gauge", f"Tokens generated per second over the last "
                   f"{self.RATE_WINDOW:g} s.", [("", float(rate))])
            metric("lmforge_open_connections", "gauge", "Open HTTP connections (each a handler thread).",
                   [("", connections)])
            metric("lmforge_requests_cancelled_total", "counter", "Requests cancelled: client gone or timed out.",
                   [("", self.cancelled)])
            metric("lmforge_responses_total", "counter", "Chat-completion responses by HTTP status.",
                   [(f'{{code="{code}"}}', count) for code, count in sorted(self.responses.items())])
            buckets = [(f'{{le="{bound:g}"}}', count) for bound, count in zip(self.TTFT_BUCKETS, self.ttft)]
            lines.extend(["# HELP lmforge_time_to_first_token_seconds Seconds from a request's arrival to its "
                          "first generated token.", "# TYPE lmforge_time_to_first_token_seconds histogram"])
            lines.extend(f"lmforge_time_to_first_token_seconds_bucket{labels} {count}"
                         for labels, count in buckets + [('{le="+Inf"}', self.ttft_count)])
            lines.append(f"lmforge_time_to_first_token_seconds_sum {self.ttft_sum:g}")
            lines.append(f"lmforge_time_to_first_token_seconds_count {self.ttft_count}")
        return "\n".join(lines) + "\n"


# ---- the model behind the endpoints ----

@dataclass
class Job:
    """A submitted request as its handler thread follows it: tokens arrive in ``events`` from the engine."""
    request: Request
    events: queue.SimpleQueue
    started: float


class ChatModel:
    """A loaded model answering chat-completion requests through an engine (submit / wait / cancel / stats)."""

    def __init__(self, model, tokenizer, cfg: ServeConfig, engine=None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        path = Path(cfg.model).resolve()  # runs/tiny/sft/model is served as "sft"
        self.name = cfg.model_name or (path.parent.name if path.name == "model" else path.name)
        self.created = int(time.time())
        self.engine = engine or Scheduler(model, tokenizer, pad_id=tokenizer.pad_id, kv_tokens=cfg.kv_tokens,
                                          max_running=cfg.max_running, prefill_chunk=cfg.prefill_chunk)
        self.metrics = Metrics()
        self.lock = threading.Lock()  # the logprobs forward passes, one at a time
        self.admit = threading.Lock()  # the queue-length check and the submit, as one step
        self.mean_seconds = 1.0  # a running mean of request durations, for Retry-After
        self.budgets = reasoning_budgets(cfg)
        self.stop_strings = []  # ChatML over a vocabulary without its end-of-turn token: stop at its text
        if "<|im_end|>" in (tokenizer.chat_template or CHATML_TEMPLATE) and tokenizer.token_to_id("<|im_end|>") is None:
            self.stop_strings = ["<|im_end|>"]

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                             "owned_by": "lmforge"}]}

    def prepare(self, body: dict):
        """(prompt ids, SamplingParams, top_logprobs or None) of a request; APIError when it is malformed."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        check_fields(body)
        ids = encode_prompt(self.tokenizer, request_messages(body))
        params = sampling_params(body, len(ids), self.model.config.max_position_embeddings, self.cfg)
        params.stop_strings = params.stop_strings + self.stop_strings
        params.thinking_budget = thinking_budget(body, self.budgets)
        top = None
        if _field(body, "logprobs", False, bool):
            top = _field(body, "top_logprobs", 0, int, lambda v: 0 <= v <= self.cfg.max_top_logprobs,
                         f"an integer in [0, {self.cfg.max_top_logprobs}]")
        elif body.get("top_logprobs"):
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if top is not None and body.get("stream"):
            raise APIError(400, "logprobs are not supported with stream=true (ask without streaming)",
                           param="logprobs")
        return ids, params, top

    def submit(self, ids: list[int], params: SamplingParams) -> Job:
        """Queue a request, or a 429 with Retry-After (the queue's expected wait) when max_queued wait already."""
        events, started = queue.SimpleQueue(), time.monotonic()
        first = []

        def on_token(row: int, token_id: int) -> None:  # the engine's thread: hand over, never block
            if not first:
                first.append(True)
                self.metrics.first_token(time.monotonic() - started)
            events.put((row, token_id))

        with self.admit:
            queued = self.engine.stats()["queued"]
            if queued >= self.cfg.max_queued:
                wait = min(600, max(1, math.ceil(self.mean_seconds * (queued + 1))))
                raise APIError(429, f"the server is busy: {queued} requests are queued; retry in {wait} s",
                               "rate_limit_error", headers={"Retry-After": str(wait)})
            try:
                return Job(self.engine.submit(ids, params, on_token), events, started)
            except ValueError as e:  # the engine's own checks: a request larger than the whole KV budget
                raise APIError(400, str(e), "invalid_request_error") from None

    def wait(self, job: Job, on_token=None, alive=lambda: True) -> list:
        """The completions of a submitted job; on_token(row, token) is called on this (the handler's) thread as
        tokens arrive. The request is cancelled if alive() turns false (ClientGone), request_timeout passes (504)
        or on_token raises; an engine failure is raised here."""
        deadline = job.started + self.cfg.request_timeout
        request = job.request
        try:
            while True:
                done = request.wait(0.05) if on_token is None else self._relay(job, on_token)
                if done:
                    break
                if not alive():
                    raise ClientGone()
                if time.monotonic() > deadline:
                    raise APIError(504, f"the request took over request_timeout={self.cfg.request_timeout:g} s "
                                        "and was cancelled", "timeout")
        except BaseException:
            request.cancel()
            self.metrics.cancel()
            raise
        self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.monotonic() - job.started)
        if request.error is not None:
            raise request.error
        if request.completions is None:  # cancelled by the engine (an on_token failure), not by this thread
            raise Cancelled("the request was cancelled")
        return request.completions

    @staticmethod
    def _relay(job: Job, on_token) -> bool:
        """Pass on the tokens that arrive within 50 ms; True once the request is done and they are all passed."""
        try:
            on_token(*job.events.get(timeout=0.05))
        except queue.Empty:
            pass
        if not job.request.done:
            return False
        while not job.events.empty():
            on_token(*job.events.get())
        return True

    def logprobs(self, ids: list[int], completion_ids: list[int], top: int) -> dict:
        """OpenAI's ``logprobs.content`` of a completion: each generated token's raw log p and the ``top`` most
        likely tokens at its position, from one forward pass over prompt + completion."""
        tokens = torch.tensor([ids + completion_ids], device=self.model.lm_head.weight.device)
        with self.lock, torch.inference_mode():
            hidden = self.model(tokens, return_hidden=True)[0, len(ids) - 1:-1]
            logp = self.model.lm_head(hidden).float().log_softmax(-1)
            chosen = logp.gather(-1, tokens[0, len(ids):, None]).squeeze(-1).tolist()
            best = logp.topk(top, dim=-1) if top else None
        content = []
        for i, (tok, lp) in enumerate(zip(completion_ids, chosen)):
            entry = self._token(tok, lp)
            entry["top_logprobs"] = [self._token(t, v) for t, v in zip(best.indices[i].tolist(),
                                                                        best.values[i].tolist())] if best else []
            content.append(entry)
        return {"content": content}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def complete(self, body: dict, alive=lambda: True) -> dict:
        """The chat.completion response of a non-streaming request."""
        ids, params, top = self.prepare(body)
        completions = self.wait(self.submit(ids, params), alive=alive)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(ids, c.token_ids, top) if top is not None else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": usage(len(ids), completions)}

    def stream(self, body: dict, send, alive=lambda: True) -> None:
        """A streaming request: ``send(chunk)`` for each chat.completion.chunk, text as it is generated.

        A row's new text is sent once its characters are whole and it cannot be the start of a stop string;
        after generation each row gets the rest of its final text, so the chunks concatenate to it exactly.
        """
        ids, params, _ = self.prepare(body)
        job = self.submit(ids, params)  # a 429 comes before the stream begins
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.name}

        def chunk(index: int, delta: dict, finish: str | None = None) -> dict:
            return head | {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        hold = max(map(len, params.stop_strings), default=1) - 1
        decoders = [self.tokenizer.stream_decoder() for _ in range(params.n)]
        texts, shown = [""] * params.n, [""] * params.n

        def on_token(row: int, token_id: int) -> None:
            texts[row] += decoders[row](token_id)
            text = texts[row]  # a stop string cannot start inside what is shown: it would have been cut then
            cut = [j for j in (text.find(s, len(shown[row])) for s in params.stop_strings) if j >= 0]
            text = text[:min(cut)] if cut else text[:len(text) - hold]
            if len(text) > len(shown[row]):
                send(chunk(row, {"content": text[len(shown[row]):]}))
                shown[row] = text

        try:
            for i in range(params.n):
                send(chunk(i, {"role": "assistant", "content": ""}))
        except BaseException:
            job.request.cancel()
            raise
        completions = self.wait(job, on_token, alive)
        for i, c in enumerate(completions):
            if c.text.startswith(shown[i]) and len(c.text) > len(shown[i]):
                send(chunk(i, {"content": c.text[len(shown[i]):]}))
            send(chunk(i, {}, c.finish_reason))
        if (body.get("stream_options") or {}).get("include_usage"):
            send(head | {"choices": [], "usage": usage(len(ids), completions)})


# ---- HTTP ----

class DeadlineReader(io.RawIOBase):
    """A socket's input with each recv bounded by ``idle`` seconds and all of them by ``deadline`` (a
    time.monotonic() value, or None): a client sending a byte a second cannot hold a request open."""

    def __init__(self, sock: socket.socket, idle: float):
        self.sock, self.idle, self.deadline = sock, idle, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        timeout = self.idle
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("the request did not arrive within read_timeout")
        self.sock.settimeout(timeout)
        return self.sock.recv_into(buffer)


BUSY = json.dumps({"error": {"message": "the server has max_connections open connections; retry later",
                             "type": "server_overloaded", "param": None, "code": None}}).encode()


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most ``max_connections`` connections (each one handler thread): one more is
    answered 503 and closed, from the accepting thread, without reading it."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog

    def __init__(self, address, handler, max_connections: int):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_connections, self.open, self.open_lock = max_connections, 0, threading.Lock()
        super().__init__(address, handler)

    def _count(self, change: int) -> None:
        with self.open_lock:
            self.open += change

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(BUSY), BUSY))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self._count(1)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._count(-1)
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._count(-1)
            self.slots.release()

    def server_close(self):
        super().server_close()
        self.RequestHandlerClass.chat.engine.stop()


class Handler(BaseHTTPRequestHandler):
    server_version = "lmforge"
    protocol_version = "HTTP/1.1"  # keep-alive; an event stream ends with the connection
    chat: ChatModel  # set by make_server on a subclass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body: no Nagle wait
        self.reader = DeadlineReader(self.connection, self.chat.cfg.idle_timeout)
        self.rfile = io.BufferedReader(self.reader)
        self.unread = False  # a body left unread: the connection is closed with a lingering close

    def finish(self):
        super().finish()
        if self.unread:
            self.linger()

    def linger(self) -> None:
        """Close with unread input and the kernel sends a reset, which can destroy the answer before the client
        reads it; so shut our side first, then read and drop what the client still sends, at most 1 MiB / 1 s
        (a lingering close, as nginx's lingering_close)."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            end, dropped = time.monotonic() + 1.0, 0
            while dropped < 1 << 20 and (left := end - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

    def handle_one_request(self):
        """Wait idle_timeout for a request to begin; from its first byte, read_timeout for its headers + body."""
        self.reader.deadline = None
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # idle past idle_timeout, or reset
            self.close_connection = True
            return
        self.reader.deadline = time.monotonic() + self.chat.cfg.read_timeout
        super().handle_one_request()

    def log_message(self, format, *args):
        if self.chat.cfg.verbose:
            super().log_message(format, *args)

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, e: APIError) -> None:
        self.send_json(e.status, {"error": {"message": e.message, "type": e.type, "param": e.param, "code": None}},
                       e.headers)

    def send_text(self, status: int, text: str, kind: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorized(self) -> bool:
        key = self.chat.cfg.api_key
        given = self.headers.get("Authorization", "")
        return not key or hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def alive(self) -> bool:
        """False once the client has closed its end (readable with nothing to read) or reset it."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return True
            return self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def route(self, method: str) -> None:
        path = self.path.split("?")[0].rstrip("/") or "/"
        self.streaming = False  # once the event stream has begun, an error can only be one more event
        if method != "POST" and (self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding")):
            self.close_connection = self.unread = True  # a body we do not read would be taken for the next request
        chat = path == "/v1/chat/completions"
        try:
            if path.startswith("/v1/") and not self.authorized():
                raise APIError(401, "a valid API key is needed: Authorization: Bearer <api_key>",
                               "authentication_error")
            if (method, path) == ("GET", "/"):
                self.send_text(200, CHAT_PAGE.read_text(), "text/html; charset=utf-8")
            elif (method, path) == ("GET", "/health"):
                self.send_json(200, {"status": "ok", "model": self.chat.name})
            elif (method, path) == ("GET", "/metrics"):
                text = self.chat.metrics.render(self.chat.engine.stats(), self.server.open)
                self.send_text(200, text, "text/plain; version=0.0.4; charset=utf-8")
            elif (method, path) == ("GET", "/v1/models"):
                self.send_json(200, self.chat.models())
            elif (method, path) == ("POST", "/v1/chat/completions"):
                body = self.read_json()
                if body.get("stream") is True if isinstance(body, dict) else False:
                    self.stream(body)
                else:
                    self.send_json(200, self.chat.complete(body, self.alive))
                self.chat.metrics.response(200)
            else:
                raise APIError(404, f"no route {method} {path}", "not_found_error")
        except APIError as e:
            if chat:
                self.chat.metrics.response(e.status)
            if self.streaming:  # past the first chunk (a timeout): the error is the last event
                self.end_stream({"error": {"message": e.message, "type": e.type}})
            else:
                self.send_error_json(e)
        except (ClientGone, BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away or stalled (a closed chat tab mid-stream)
        except Exception as e:  # a bug or a model failure: the client gets a 500, the log the traceback
            traceback.print_exc()
            if chat:
                self.chat.metrics.response(500)
            error = {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
            if self.streaming:
                self.end_stream(error)
            else:
                self.send_json(500, error)

    def body_length(self) -> int:
        """The Content-Length of a POST: 411 without one (chunked bodies are not taken), 400 unless it is one
        non-negative decimal integer, 413 over max_body."""
        if self.headers.get("Transfer-Encoding"):
            raise APIError(411, "Transfer-Encoding is not accepted: send the body with a Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise APIError(411, "a POST needs a Content-Length header")
        if len(set(v.strip() for v in values)) > 1 or not re.fullmatch(r"[0-9]{1,19}", values[0].strip()):
            raise APIError(400, f"Content-Length must be one non-negative integer, got {', '.join(values)!r:.60}")
        length = int(values[0])
        if length > self.chat.cfg.max_body:
            raise APIError(413, f"the request body is {length} bytes, over this server's max_body of "
                                f"{self.chat.cfg.max_body}")
        return length

    def read_json(self):
        try:
            length = self.body_length()
        except APIError:
            self.close_connection = self.unread = True  # the body is not read: no next request on this one
            raise
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = self.unread = True
            raise APIError(408, f"the request body did not arrive within read_timeout="
                                f"{self.chat.cfg.read_timeout:g} s", "timeout") from None
        self.reader.deadline = None
        self.connection.settimeout(self.chat.cfg.idle_timeout)  # writes to a client that stopped reading
        if len(data) < length:
            self.close_connection = True
            raise APIError(400, f"the body ended after {len(data)} of its Content-Length {length} bytes")
        try:
            return json.loads(data or b"null")
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def handle_expect_100(self):
        """``Expect: 100-continue``: the length is checked before the client is told to send the body."""
        try:
            self.body_length()
        except APIError as e:
            self.close_connection = self.unread = True
            self.send_error_json(e)
            return False
        return super().handle_expect_100()

    def stream(self, body: dict) -> None:
        def send(payload: dict) -> None:
            if not self.streaming:  # errors found before the first chunk are still plain JSON errors
                self.streaming = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
            self.wfile.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        self.chat.stream(body, send, self.alive)
        self.end_stream()

    def end_stream(self, error: dict | None = None) -> None:
        if error is not None:
            self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")


def make_server(cfg: ServeConfig, model=None, tokenizer=None, engine=None,
                start_engine: bool = True) -> BoundedHTTPServer:
    """A bound (not yet serving) server for cfg.model, or for an already loaded model and tokenizer; its engine
    (a scheduler.Scheduler unless given) is started on a thread of its own unless start_engine is False (then
    the caller runs it: ``engine.run()``), and stopped by server_close()."""
    cfg.validate()
    cfg = replace(cfg, api_key=cfg.api_key or os.environ.get("LMFORGE_API_KEY", ""))  # env: kept out of `ps`
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    chat = ChatModel(model, tokenizer, cfg, engine)
    handler = type("ChatHandler", (Handler,), {"chat": chat})
    server = BoundedHTTPServer((cfg.host, cfg.port), handler, cfg.max_connections)
    if start_engine:
        chat.engine.start()
    return server


def run_serve(cfg: ServeConfig) -> dict:
    """Serve until interrupted; returns {"url", "model"}.

    The engine steps on the main thread and HTTP is served from another: a decode step on CPU runs ~1.45x
    slower off the main thread (Scheduler.start says why), and the engine is what the time goes to."""
    server = make_server(cfg, start_engine=False)
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}"
    chat = server.RequestHandlerClass.chat
    print(f"serving {chat.name!r} at {url}/v1 (OpenAI-compatible); chat page at {url}/ ; Ctrl-C stops",
          file=sys.stderr, flush=True)
    http = threading.Thread(target=server.serve_forever, name="lmforge-http", daemon=True)
    http.start()
    try:
        chat.engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return {"url": url, "model": chat.name}


def main(argv: list[str]) -> int:
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv = [f"model={argv[0]}", *argv[1:]]  # `lmforge serve MODEL ...`
    cfg = parse_cli(argv, ServeConfig, prog="lmforge serve", description=__doc__)
    try:
        run_serve(cfg)
    except (FileNotFoundError, ValueError, OSError) as e:  # no such model, bad config, port in use
        print(f"lmforge serve: error: {e}", file=sys.stderr)
        return 2
    return 0
