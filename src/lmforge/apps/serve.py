"""``lmforge serve MODEL``: an OpenAI-compatible chat-completions server, with a web chat page at ``/``.

    lmforge serve runs/tiny/sft port=8000
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (messages, max_tokens / max_completion_tokens,
temperature, top_p, n, stop, seed, stream, logprobs + top_logprobs; top_k, min_p and repetition_penalty as
vLLM's extra parameters; for models with a think block ``reasoning_effort`` low / medium / high and
``max_thinking_tokens``, budgets the engine enforces, with ``usage.completion_tokens_details.reasoning_tokens``),
``GET /health``, and ``GET /`` (the chat page). Prompts are the chat template's render
of the messages (data.chat.encode_prompt, exactly as SFT trained); one request generates at a time (a lock),
while the threads of the HTTP server accept and parse others. The standard library is the whole HTTP stack.

Log-probabilities are those of the raw model (temperature 1), from one teacher-forced forward pass over prompt
+ completion; ``top_logprobs`` lists the k most likely tokens at each generated position, so the OpenAI judge
of ``lmforge constitutional`` can read label probabilities from this server as it does from any other.
"""

from __future__ import annotations

import hmac
import json
import os
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
from lmforge.generation import SamplingParams, generate
from lmforge.modelio import DTYPES, load_model_and_tokenizer
from lmforge.tokenizer import CHATML_TEMPLATE

CHAT_PAGE = Path(__file__).resolve().parent.parent / "assets" / "chat.html"
EFFORTS = ("low", "medium", "high")
REASONING_BUDGETS = {"low": 16, "medium": 48, "high": 160}  # thinking tokens: roughly 1x / 3x / 10x
MAX_BODY = 8 << 20  # bytes of a request body


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


class APIError(Exception):
    """A request the server answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


# ---- requests: JSON body -> (prompt ids, sampling params, options) ----

def _field(body: dict, key: str, default, kind: type | tuple, check=None, rule: str = ""):
    value = body.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind) or (check and not check(value)):
        raise APIError(400, f"'{key}' must be {rule or kind.__name__}, got {value!r:.60}")
    return value


def request_messages(body: dict) -> list[dict]:
    """The checked messages; content given as a list of parts keeps its text parts."""
    messages = body.get("messages")
    if isinstance(messages, list):
        messages = [{**m, "content": "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))}
                    if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in messages]
    try:
        return check_messages(messages, "request", need_assistant=False)
    except DataError as e:
        raise APIError(400, str(e)) from None


def sampling_params(body: dict, prompt_len: int, context: int, cfg: ServeConfig):
    """SamplingParams from the request's fields, max_new_tokens capped at the context left after the prompt."""
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"the messages are {prompt_len} tokens with the chat template; the model's context is "
                            f"{context}", "context_length_exceeded")
    positive = dict(check=lambda v: v >= 1, rule="an integer >= 1")
    max_tokens = _field(body, "max_completion_tokens", None, int, **positive)
    max_tokens = _field(body, "max_tokens", max_tokens or cfg.max_new_tokens, int, **positive)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a non-empty string or a list of them, got {body.get('stop')!r:.60}")
    params = SamplingParams(
        max_new_tokens=min(max_tokens, room),
        temperature=float(_field(body, "temperature", 1.0, (int, float), lambda v: v >= 0, "a number >= 0")),
        top_p=float(_field(body, "top_p", 1.0, (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]")),
        top_k=_field(body, "top_k", 0, int, lambda v: v >= 0, "an integer >= 0"),
        min_p=float(_field(body, "min_p", 0.0, (int, float), lambda v: 0 <= v < 1, "a number in [0, 1)")),
        repetition_penalty=float(_field(body, "repetition_penalty", 1.0, (int, float), lambda v: v > 0,
                                        "a number > 0")),
        n=_field(body, "n", 1, int, **positive),
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


# ---- the model behind the endpoints ----

class ChatModel:
    """A loaded model answering chat-completion requests, one generate at a time."""

    def __init__(self, model, tokenizer, cfg: ServeConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        path = Path(cfg.model).resolve()  # runs/tiny/sft/model is served as "sft"
        self.name = cfg.model_name or (path.parent.name if path.name == "model" else path.name)
        self.created = int(time.time())
        self.lock = threading.Lock()
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
        ids = encode_prompt(self.tokenizer, request_messages(body))
        params = sampling_params(body, len(ids), self.model.config.max_position_embeddings, self.cfg)
        params.stop_strings = params.stop_strings + self.stop_strings
        params.thinking_budget = thinking_budget(body, self.budgets)
        top = None
        if _field(body, "logprobs", False, bool):
            top = _field(body, "top_logprobs", 0, int, lambda v: 0 <= v <= self.cfg.max_top_logprobs,
                         f"an integer in [0, {self.cfg.max_top_logprobs}]")
        elif body.get("top_logprobs"):
            raise APIError(400, "'top_logprobs' needs 'logprobs': true")
        if top is not None and body.get("stream"):
            raise APIError(400, "logprobs are not supported with stream=true (ask without streaming)")
        return ids, params, top

    def generate(self, ids: list[int], params, on_token=None):
        with self.lock:
            return generate(self.model, [ids], params, tokenizer=self.tokenizer, pad_id=self.tokenizer.pad_id,
                            on_token=on_token)[0]

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

    def complete(self, body: dict) -> dict:
        """The chat.completion response of a non-streaming request."""
        ids, params, top = self.prepare(body)
        completions = self.generate(ids, params)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(ids, c.token_ids, top) if top is not None else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": usage(len(ids), completions)}

    def stream(self, body: dict, send) -> None:
        """A streaming request: ``send(chunk)`` for each chat.completion.chunk, text as it is generated.

        A row's new text is sent once its characters are whole and it cannot be the start of a stop string;
        after generation each row gets the rest of its final text, so the chunks concatenate to it exactly.
        """
        ids, params, _ = self.prepare(body)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.name}

        def chunk(index: int, delta: dict, finish: str | None = None) -> dict:
            return head | {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        hold = max(map(len, params.stop_strings), default=1) - 1
        generated: list[list[int]] = [[] for _ in range(params.n)]
        shown = [""] * params.n
        for i in range(params.n):
            send(chunk(i, {"role": "assistant", "content": ""}))

        def on_token(row: int, token_id: int) -> None:
            generated[row].append(token_id)
            text = self.tokenizer.decode(generated[row], skip_special_tokens=True)
            cut = [j for j in (text.find(s) for s in params.stop_strings) if j >= 0]
            text = text[:min(cut)] if cut else text[:len(text) - hold]
            if not text.endswith("\ufffd") and len(text) > len(shown[row]) and text.startswith(shown[row]):
                send(chunk(row, {"content": text[len(shown[row]):]}))
                shown[row] = text

        completions = self.generate(ids, params, on_token)
        for i, c in enumerate(completions):
            if c.text.startswith(shown[i]) and len(c.text) > len(shown[i]):
                send(chunk(i, {"content": c.text[len(shown[i]):]}))
            send(chunk(i, {}, c.finish_reason))
        if (body.get("stream_options") or {}).get("include_usage"):
            send(head | {"choices": [], "usage": usage(len(ids), completions)})


# ---- HTTP ----

class Handler(BaseHTTPRequestHandler):
    server_version = "lmforge"
    chat: ChatModel  # set by make_server on a subclass

    def log_message(self, format, *args):
        if self.chat.cfg.verbose:
            super().log_message(format, *args)

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, e: APIError) -> None:
        self.send_json(e.status, {"error": {"message": e.message, "type": e.type, "param": None, "code": None}})

    def authorized(self) -> bool:
        key = self.chat.cfg.api_key
        given = self.headers.get("Authorization", "")
        return not key or hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def route(self, method: str) -> None:
        path = self.path.split("?")[0].rstrip("/") or "/"
        self.streaming = False  # once the event stream has begun, an error can only be one more event
        try:
            if path.startswith("/v1/") and not self.authorized():
                raise APIError(401, "a valid API key is needed: Authorization: Bearer <api_key>",
                               "authentication_error")
            if (method, path) == ("GET", "/"):
                page = CHAT_PAGE.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
            elif (method, path) == ("GET", "/health"):
                self.send_json(200, {"status": "ok", "model": self.chat.name})
            elif (method, path) == ("GET", "/v1/models"):
                self.send_json(200, self.chat.models())
            elif (method, path) == ("POST", "/v1/chat/completions"):
                body = self.read_json()
                if body.get("stream") if isinstance(body, dict) else False:
                    self.stream(body)
                else:
                    self.send_json(200, self.chat.complete(body))
            else:
                raise APIError(404, f"no route {method} {path}", "not_found_error")
        except APIError as e:
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a closed chat tab mid-stream): nothing to answer
        except Exception as e:  # a bug or a model failure: the client gets a 500, the log the traceback
            traceback.print_exc()
            error = {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}}
            if self.streaming:
                self.wfile.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                self.close_connection = True
            else:
                self.send_json(500, error)

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY} bytes")
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def stream(self, body: dict) -> None:
        def send(payload: dict) -> None:
            if not self.streaming:  # errors found before the first chunk are still plain JSON errors
                self.streaming = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
            self.wfile.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        self.chat.stream(body, send)
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


def make_server(cfg: ServeConfig, model=None, tokenizer=None) -> ThreadingHTTPServer:
    """A bound (not yet serving) server for cfg.model, or for an already loaded model and tokenizer."""
    cfg.validate()
    cfg = replace(cfg, api_key=cfg.api_key or os.environ.get("LMFORGE_API_KEY", ""))  # env: kept out of `ps`
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    handler = type("ChatHandler", (Handler,), {"chat": ChatModel(model, tokenizer, cfg)})
    server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    server.daemon_threads = True
    return server


def run_serve(cfg: ServeConfig) -> dict:
    """Serve until interrupted; returns {"url", "model"}."""
    server = make_server(cfg)
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}"
    name = server.RequestHandlerClass.chat.name
    print(f"serving {name!r} at {url}/v1 (OpenAI-compatible); chat page at {url}/ ; Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return {"url": url, "model": name}


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
