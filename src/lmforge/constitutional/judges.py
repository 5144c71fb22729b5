"""Backends that write and judge text, behind one interface: a local lmforge model or an OpenAI-compatible server.

Every backend has two methods, both taking a list of chat conversations and yielding ``(index, result)`` as
results arrive (in any order), so a caller can save each one before the next comes back:

    chat(conversations, params)  -> (i, [text, ...])   params.n samples per conversation
    choose(conversations, labels) -> (i, Choice)       which of two labels ("A"/"B") the judge answers

A ``Choice`` holds normalised probabilities of the two labels, ``p_a + p_b = 1``:

- local model: the next-token distribution after the chat template's assistant prefix; p(label) sums the
  label's single-token spellings ("A" and " A"), then the two are renormalised (method "next_token");
- endpoint: ``top_logprobs`` at the first generated position that is one of the labels, renormalised the same
  way (method "logprobs"); a label missing from the list gets the smallest listed probability, an upper bound
  on its mass, so the judge never looks more certain than its listing shows;
- endpoint without logprobs: the parsed answer with a stated confidence, ``parsed_confidence`` (method "parsed");
  an answer that names neither label gives (0.5, 0.5) with method "unparsed".

Endpoints are called with urllib only: timeouts, retries with exponential backoff (and ``Retry-After`` on 429),
a requests-per-minute limit and a few concurrent requests. The API key comes from the environment.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.chat import encode_prompt
from lmforge.errors import JudgeError
from lmforge.generation import SamplingParams, generate, last_logits
from lmforge.modelio import load_model_and_tokenizer
from lmforge.scoring import left_pad

Messages = list[dict]


@dataclass
class ChatParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    n: int = 1
    seed: int = 0


@dataclass
class Choice:
    probs: tuple[float, float]  # normalised probability of labels[0], labels[1]
    method: str  # next_token | logprobs | parsed | unparsed
    text: str = ""  # what the judge said (endpoints) or the most likely label (local)
    mass: float | None = None  # probability the judge put on the two labels before normalising

    def to_json(self) -> dict:
        return {"probs": list(self.probs), "method": self.method, "text": self.text, "mass": self.mass}

    @classmethod
    def from_json(cls, d: dict) -> Choice:
        return cls(tuple(d["probs"]), d["method"], d.get("text", ""), d.get("mass"))


def normalise(p_a: float, p_b: float) -> tuple[float, float]:
    total = p_a + p_b
    return (0.5, 0.5) if total <= 0 else (p_a / total, p_b / total)


# ---- the local lmforge model ----

def weights_signature(path: str) -> str:
    """The model directory plus its weights' size and mtime: cached answers die with the weights they came from."""
    stats = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(Path(path).glob("*.safetensors"))]
    return f"{os.path.abspath(path)}[{','.join(stats)}]"


class LocalModel:
    """A model directory run by lmforge's generation engine; it can be the policy, the critic and the judge."""

    def __init__(self, model, tokenizer, name: str = "local", batch_size: int = 8):
        self.model, self.tokenizer, self.name, self.batch_size = model.eval(), tokenizer, name, batch_size

    @classmethod
    def load(cls, path: str, device: str = "auto", dtype: str = "float32", batch_size: int = 8) -> LocalModel:
        model, tokenizer = load_model_and_tokenizer(path, device, dtype)
        return cls(model, tokenizer, name=f"local:{weights_signature(path)}", batch_size=batch_size)

    def encode(self, messages: Messages, reserve: int = 0) -> list[int]:
        """Chat-template tokens ending in the assistant's turn, cut from the left to leave ``reserve`` positions."""
        ids = encode_prompt(self.tokenizer, messages)
        room = self.model.config.max_position_embeddings - reserve
        return ids[-room:] if len(ids) > room else ids

    def chat(self, conversations: list[Messages], params: ChatParams) -> Iterator[tuple[int, list[str]]]:
        sampling = SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p, n=params.n, seed=params.seed)
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start:start + self.batch_size]
            prompts = [self.encode(m, reserve=params.max_new_tokens) for m in chunk]
            out = generate(self.model, prompts, sampling, tokenizer=self.tokenizer, pad_id=self.tokenizer.pad_id)
            for j, completions in enumerate(out):
                yield start + j, [(c.text or "").strip() for c in completions]

    def label_token_ids(self, label: str) -> list[int]:
        """The single tokens that spell ``label`` (with and without a leading space)."""
        ids = {ids[0] for text in (label, " " + label) if len(ids := self.tokenizer.encode(text)) == 1}
        if not ids:
            raise JudgeError(f"{self.name}: the choice label {label!r} is not a single token of this tokenizer; "
                             "use labels that are (e.g. A/B or 1/2)")
        return sorted(ids)

    def choose(self, conversations: list[Messages], labels: tuple[str, str]) -> Iterator[tuple[int, Choice]]:
        ids_a, ids_b = self.label_token_ids(labels[0]), self.label_token_ids(labels[1])
        device = self.model.lm_head.weight.device
        for start in range(0, len(conversations), self.batch_size):
            prompts = [self.encode(m) for m in conversations[start:start + self.batch_size]]
            input_ids, mask, positions = left_pad(prompts, self.tokenizer.pad_id, device)
            with torch.inference_mode():
                probs = last_logits(self.model, input_ids, attention_mask=mask, position_ids=positions).softmax(-1)
            for j, row in enumerate(probs):
                p_a, p_b = float(row[ids_a].sum()), float(row[ids_b].sum())
                text = labels[0] if p_a >= p_b else labels[1]
                yield start + j, Choice(normalise(p_a, p_b), "next_token", text, p_a + p_b)


# ---- any OpenAI-compatible chat-completions server ----

def parse_choice(response: dict, labels: tuple[str, str], parsed_confidence: float = 0.75) -> Choice:
    """A Choice from a chat-completions response (raises JudgeError when it is not one)."""
    try:
        choice = response["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise JudgeError(f"not a chat-completions response (no choices[0].message): {json.dumps(response)[:200]}") from None
    positions = ((choice.get("logprobs") or {}).get("content") or []) if isinstance(choice, dict) else []
    for position in positions:
        top = {}
        for entry in position.get("top_logprobs") or []:
            token = str(entry.get("token", "")).strip()
            top[token] = top.get(token, 0.0) + math.exp(float(entry["logprob"]))
        if labels[0] in top or labels[1] in top:
            floor = min(top.values())  # an unlisted label has at most the smallest listed probability
            p_a, p_b = top.get(labels[0], floor), top.get(labels[1], floor)
            return Choice(normalise(p_a, p_b), "logprobs", text, p_a + p_b)
    found = re.findall(rf"(?<![\w])({re.escape(labels[0])}|{re.escape(labels[1])})(?![\w])", text)
    if not found:
        return Choice((0.5, 0.5), "unparsed", text)
    q = parsed_confidence if found[0] == labels[0] else 1.0 - parsed_confidence
    return Choice((q, 1.0 - q), "parsed", text)


class OpenAIEndpoint:
    """POST {url}/chat/completions, as llama.cpp's server, vLLM, OpenAI and lmforge serve speak it."""

    def __init__(self, url: str, model: str = "", api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, requests_per_minute: float = 0.0,
                 concurrency: int = 4, logprobs: bool = True, top_logprobs: int = 20,
                 parsed_confidence: float = 0.75):
        self.url = url.rstrip("/")
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.concurrency = max_retries, backoff, max(1, concurrency)
        self.interval = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self.logprobs, self.top_logprobs, self.parsed_confidence = logprobs, top_logprobs, parsed_confidence
        self.name = f"openai:{self.url}#{model}"
        self._lock, self._next_slot = threading.Lock(), 0.0

    @classmethod
    def from_env(cls, url: str, model: str = "", api_key_env: str = "LMFORGE_JUDGE_API_KEY", **kwargs):
        """The key from ``api_key_env``, else OPENAI_API_KEY, else none (local servers need none)."""
        key = os.environ.get(api_key_env) or os.environ.get("OPENAI_API_KEY")
        return cls(url, model, api_key=key, **kwargs)

    def _throttle(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self.interval
        time.sleep(max(0.0, slot - now))

    def post(self, body: dict) -> dict:
        """One request, retried on timeouts, connection errors, 429 and 5xx; JudgeError when it cannot succeed."""
        url = f"{self.url}/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps({"model": self.model, **body}).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self._throttle()
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code} {detail}"
                    if e.code == 429 and (wait_s := e.headers.get("Retry-After", "")).replace(".", "").isdigit():
                        time.sleep(min(float(wait_s), 60.0))
                    continue
                raise JudgeError(f"{url}: HTTP {e.code}: {detail}") from None
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"timed out after {self.timeout:g} s" if "timed out" in str(reason) else f"{reason}"
                continue
            try:
                return json.loads(raw)
            except ValueError:
                raise JudgeError(f"{url}: the answer is not JSON: {raw[:200]!r}") from None
        raise JudgeError(f"{url}: no answer after {self.max_retries + 1} tries ({last})")

    def _map(self, fn, items: list) -> Iterator[tuple[int, object]]:
        """fn over items with a few requests in flight; yields (index, result) as each arrives."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            pending = {pool.submit(fn, item): i for i, item in enumerate(items)}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield pending.pop(future), future.result()
            finally:
                for future in pending:
                    future.cancel()

    def chat(self, conversations: list[Messages], params: ChatParams) -> Iterator[tuple[int, list[str]]]:
        def one(messages):
            body = {"messages": messages, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p, "n": params.n, "seed": params.seed}
            response = self.post(body)
            try:
                return [(c["message"].get("content") or "").strip() for c in response["choices"]]
            except (KeyError, TypeError, AttributeError):
                raise JudgeError(f"{self.url}: not a chat-completions response: {json.dumps(response)[:200]}") \
                    from None

        yield from self._map(one, conversations)

    def choose(self, conversations: list[Messages], labels: tuple[str, str]) -> Iterator[tuple[int, Choice]]:
        def one(messages):
            body = {"messages": messages, "max_tokens": 8, "temperature": 0.0}
            if self.logprobs:
                body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
            response = self.post(body)
            try:
                return parse_choice(response, labels, self.parsed_confidence)
            except JudgeError as e:
                raise JudgeError(f"{self.url}: {e}") from None

        yield from self._map(one, conversations)
