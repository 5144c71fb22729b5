"""`lmforge serve`: the OpenAI-compatible server on a tiny model, over real HTTP on 127.0.0.1 (a free port).

Greedy answers equal the generation engine's on the same encoded prompt; streamed chunks add up to the same text;
logprobs match the engine's; the constitutional OpenAI judge reads label probabilities from it; bad requests
get OpenAI-style errors; the API key is enforced; the chat page is served."""

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from lmforge.apps.serve import APIError, ChatModel, ServeConfig, make_server, reasoning_budgets
from lmforge.constitutional.judges import ChatParams, LocalModel, OpenAIEndpoint
from lmforge.data.chat import encode_prompt
from lmforge.generation import SamplingParams, generate
from lmforge.modelio import load_model_and_tokenizer
from lmforge.scheduler import Request

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Response A or B?"}]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    path = tiny_model_dir("serve", text="The assistant answers the user. Response A or B? Héllo, thank you.\n",
                          layers=2, max_positions=256)
    served = path.parent / "tiny-chat"  # the served name is the directory's
    path.rename(served)
    return served


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model_and_tokenizer(str(model_dir), device="cpu")


def start(cfg, loaded):
    server = make_server(cfg, *loaded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def url(model_dir, loaded):
    vocab = loaded[0].config.vocab_size
    server, base = start(ServeConfig(model=str(model_dir), port=0, max_new_tokens=8, max_top_logprobs=vocab,
                                     verbose=False), loaded)
    yield base
    server.shutdown()
    server.server_close()


def request(url, path, body=None, headers=None, raw: bytes | None = None):
    """(status, parsed JSON or text) of a GET (no body) or POST."""
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text, kind = r.status, r.read().decode(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, text, kind = e.code, e.read().decode(), e.headers.get("Content-Type", "")
    return status, json.loads(text) if kind.startswith("application/json") else text


def engine(loaded, params: SamplingParams, messages=MESSAGES):
    model, tok = loaded
    ids = encode_prompt(tok, messages)
    return ids, generate(model, [ids], params, tokenizer=tok, pad_id=tok.pad_id)[0]


def sse_chunks(text: str) -> list:
    lines = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), text
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_and_health(url):
    status, models = request(url, "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-chat"]  # the directory's name
    assert request(url, "/health") == (200, {"status": "ok", "model": "tiny-chat"})


def test_greedy_completion_is_the_engines(url, loaded):
    status, out = request(url, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 8})
    ids, (expected,) = engine(loaded, SamplingParams(max_new_tokens=8, temperature=0))
    assert status == 200 and out["object"] == "chat.completion" and out["model"] == "tiny-chat"
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason == "length" and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8,
                            "completion_tokens_details": {"reasoning_tokens": expected.thinking_tokens}}
    # max_completion_tokens is the newer name; the server default (max_new_tokens=8) applies without either
    _, short = request(url, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0,
                                                     "max_completion_tokens": 3})
    assert short["usage"]["completion_tokens"] == 3 and expected.text.startswith(short["choices"][0]["message"]["content"])
    _, default = request(url, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0})
    assert default["choices"][0]["message"]["content"] == expected.text


def test_stream_adds_up_to_the_same_text(url, loaded):
    _, (expected,) = engine(loaded, SamplingParams(max_new_tokens=8, temperature=0))
    status, text = request(url, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 8,
                                                         "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse_chunks(text)
    assert status == 200 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(deltas) == expected.text and len([d for d in deltas if d]) > 1  # streamed, not one piece
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 8


def test_stop_strings_cut_the_text_in_both_modes(url, loaded):
    _, (free,) = engine(loaded, SamplingParams(max_new_tokens=8, temperature=0))
    stop = free.text[3:5]
    assert len(stop) == 2
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 8, "stop": stop}
    _, out = request(url, "/v1/chat/completions", body)
    choice = out["choices"][0]
    assert choice["message"]["content"] == free.text[:free.text.find(stop)] and choice["finish_reason"] == "stop"
    _, text = request(url, "/v1/chat/completions", body | {"stream": True})
    chunks = sse_chunks(text)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_n_samples_with_a_seed_match_the_engine_and_replay(url, loaded):
    body = {"messages": MESSAGES, "n": 2, "seed": 7, "temperature": 1.0, "top_p": 0.9, "max_tokens": 8}
    _, out = request(url, "/v1/chat/completions", body)
    _, expected = engine(loaded, SamplingParams(max_new_tokens=8, n=2, seed=7, top_p=0.9))
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in out["choices"]] == [c.text for c in expected]
    assert out["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in expected)
    assert request(url, "/v1/chat/completions", body)[1]["choices"] == out["choices"]  # a seed replays
    _, text = request(url, "/v1/chat/completions", body | {"stream": True})
    streamed = ["", ""]
    for chunk in sse_chunks(text):
        for c in chunk["choices"]:
            streamed[c["index"]] += c["delta"].get("content", "")
    assert streamed == [c.text for c in expected]


def test_logprobs_are_the_raw_models_with_top_k(url, loaded):
    _, out = request(url, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 6,
                                                   "logprobs": True, "top_logprobs": 3})
    _, (expected,) = engine(loaded, SamplingParams(max_new_tokens=6, temperature=0, return_logprobs=True))
    content = out["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in content] == pytest.approx(expected.logprobs, abs=1e-4)
    tok = loaded[1]
    assert [e["token"] for e in content] == [tok.decode([t]) for t in expected.token_ids]
    for e in content:
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e["top_logprobs"][0]["token"] == e["token"] and tops[0] == pytest.approx(e["logprob"])  # greedy
        assert bytes(e["bytes"]).decode() == e["token"]
    _, plain = request(url, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 2,
                                                     "logprobs": True})
    assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])


def test_the_constitutional_openai_judge_works_against_it(url, loaded):
    """The judge's choose() reads top_logprobs over the label tokens: with every token listed, its probabilities
    are the local judge's next-token ones; chat() gets n answers."""
    judge = OpenAIEndpoint(url + "/v1", model="tiny-chat", top_logprobs=loaded[0].config.vocab_size, concurrency=2,
                           max_retries=0)
    conversations = [MESSAGES, [{"role": "user", "content": "A or B? Answer with one letter."}]]
    remote = dict(judge.choose(conversations, ("A", "B")))
    local = dict(LocalModel(*loaded).choose(conversations, ("A", "B")))
    for i in range(2):
        assert remote[i].method == "logprobs"
        assert remote[i].probs == pytest.approx(local[i].probs, abs=1e-4)
        assert remote[i].mass == pytest.approx(local[i].mass, rel=1e-3)
    answers = dict(judge.chat(conversations, ChatParams(max_new_tokens=4, n=2, seed=1)))
    assert sorted(answers) == [0, 1] and all(len(a) == 2 for a in answers.values())


@pytest.mark.parametrize("body, message", [
    (None, "not valid JSON"),
    ({}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "bad role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "'content' must be a string"),
    ({"messages": MESSAGES, "max_tokens": 0}, "'max_tokens' must be an integer >= 1"),
    ({"messages": MESSAGES, "temperature": "hot"}, "'temperature' must be a number >= 0"),
    ({"messages": MESSAGES, "n": True}, "'n' must be an integer in [1, 16]"),
    ({"messages": MESSAGES, "stop": [""]}, "'stop' must be"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 10_000}, "'top_logprobs' must be an integer in"),
    ({"messages": MESSAGES, "logprobs": True, "stream": True}, "not supported with stream"),
    ({"messages": [{"role": "user", "content": "thank you " * 200}]}, "the model's context is 256"),
])
def test_bad_requests_get_openai_style_400s(url, body, message):
    status, out = request(url, "/v1/chat/completions", body, raw=b"{not json" if body is None else None)
    assert status == 400, out
    assert set(out["error"]) >= {"message", "type"} and message in out["error"]["message"]
    assert out["error"]["type"] in ("invalid_request_error", "context_length_exceeded")


def test_unknown_paths_are_404s(url):
    assert request(url, "/v1/completions", {"prompt": "hi"})[0] == 404
    status, out = request(url, "/nope")
    assert status == 404 and out["error"]["type"] == "not_found_error"


def test_content_parts_are_accepted(url):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Response A"}, {"type": "text", "text": " or B?"}]}]
    plain = [{"role": "user", "content": "Response A or B?"}]
    body = {"temperature": 0, "max_tokens": 4}
    assert request(url, "/v1/chat/completions", body | {"messages": parts})[1]["choices"] == \
        request(url, "/v1/chat/completions", body | {"messages": plain})[1]["choices"]


def test_api_key_is_required_on_the_api_only(model_dir, loaded):
    server, base = start(ServeConfig(model=str(model_dir), port=0, api_key="s3cret", max_new_tokens=2,
                                     verbose=False), loaded)
    try:
        body = {"messages": MESSAGES}
        status, out = request(base, "/v1/chat/completions", body)
        assert status == 401 and out["error"]["type"] == "authentication_error"
        assert request(base, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(base, "/v1/chat/completions", body, {"Authorization": "Bearer s3cret"})[0] == 200
        assert request(base, "/health")[0] == 200 and request(base, "/")[0] == 200  # the page asks for the key
    finally:
        server.shutdown()
        server.server_close()


def test_chat_page_is_served(url):
    status, page = request(url, "/")
    assert status == 200 and page.startswith("<!doctype html>")
    assert '<form id="chat-form">' in page and "<textarea" in page and "/v1/chat/completions" in page
    assert "getReader()" in page and "[DONE]" in page  # streams the answer with an SSE reader
    assert not re.search(r"<(script|link)[^>]+(src|href)=\"https?:", page)  # self-contained: no CDN


def test_cli_serves_until_stopped(model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model_dir), "port=0", "device=cpu"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        found = re.search(r"at (http://[\d.]+:\d+)/v1", line)
        assert found, line
        assert request(found[1], "/health") == (200, {"status": "ok", "model": "tiny-chat"})
        status, out = request(found[1], "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
        assert status == 200 and out["usage"]["completion_tokens"] <= 2
        proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the main thread, where the engine steps: a clean stop
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_cli_errors_are_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(tmp_path / "missing"), "port=0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "lmforge serve" in out.stderr


class FailingEngine:
    """The engine seam (submit / start / stop / stats), failing every request after one token as a model that ran
    out of memory would."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def submit(self, prompt_ids, params, on_token=None):
        request = Request(prompt_ids, params, streams=[], stop_ids=set(), on_token=on_token)
        on_token(0, self.token_id)
        request._finish(error=RuntimeError("out of memory"))
        return request

    def start(self):
        pass

    def stop(self):
        pass

    def stats(self):
        return {"queued": 0, "running": 0, "generated_tokens": 1}


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(model_dir, loaded, capsys):
    server = make_server(ServeConfig(model=str(model_dir), port=0, verbose=False), *loaded,
                         engine=FailingEngine(loaded[1].encode("A")[0]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, text = request(base, "/v1/chat/completions", {"messages": MESSAGES, "stream": True})
        chunks = sse_chunks(text)
        assert status == 200 and chunks[-1]["error"] == {"message": "RuntimeError: out of memory",
                                                         "type": "server_error"}
        status, out = request(base, "/v1/chat/completions", {"messages": MESSAGES})
        assert status == 500 and out["error"]["type"] == "server_error"
    finally:
        server.shutdown()
        server.server_close()


def test_reasoning_effort_and_max_thinking_tokens_set_the_engines_budget(model_dir, loaded, tmp_path):
    chat = ChatModel(*loaded, ServeConfig(model=str(model_dir), verbose=False))
    ask = {"messages": MESSAGES}
    assert chat.prepare(ask)[1].thinking_budget is None  # no budget unless asked
    assert chat.prepare({**ask, "reasoning_effort": "low"})[1].thinking_budget == 16
    assert chat.prepare({**ask, "reasoning_effort": "high"})[1].thinking_budget == 160
    assert chat.prepare({**ask, "reasoning_effort": "high", "max_thinking_tokens": 5})[1].thinking_budget == 5
    with pytest.raises(APIError, match="reasoning_effort"):
        chat.prepare({**ask, "reasoning_effort": "extreme"})
    with pytest.raises(APIError, match="max_thinking_tokens"):
        chat.prepare({**ask, "max_thinking_tokens": -1})
    assert reasoning_budgets(ServeConfig(model=str(model_dir), reasoning_budgets=[1, 2, 3]))["medium"] == 2
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"reasoning_effort_budgets": {"low": 4, "medium": 12, "high": 40}}))
    assert reasoning_budgets(ServeConfig(model=str(tmp_path)))["high"] == 40


def test_usage_counts_reasoning_tokens_as_the_engine_does(url, loaded):
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 8, "max_thinking_tokens": 3}
    status, out = request(url, "/v1/chat/completions", body)
    _, (expected,) = engine(loaded, SamplingParams(max_new_tokens=8, temperature=0, thinking_budget=3))
    assert status == 200 and out["choices"][0]["message"]["content"] == expected.text
    assert out["usage"]["completion_tokens_details"] == {"reasoning_tokens": expected.thinking_tokens}
    assert expected.thinking_tokens <= 3
