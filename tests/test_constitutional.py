"""Constitutional AI and RLAIF: constitutions, prompt readers, the critique/revision loop, soft labels from a
judge's probabilities, resuming from the answer cache, and a real OpenAI-style HTTP judge on 127.0.0.1."""

import hashlib
import json
import math
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lmforge.cli import main as cli_main
from lmforge.constitutional.constitution import (
    critique_turn,
    load_constitution,
    pairwise_messages,
    revision_turn,
)
from lmforge.constitutional.judges import ChatParams, Choice, LocalModel, OpenAIEndpoint, parse_choice
from lmforge.constitutional.prompts import read_prompts
from lmforge.data.chat import encode_prompt
from lmforge.errors import ConfigError, DataError, JudgeError
from lmforge.modelio import load_model_dir, load_tokenizer
from lmforge.stages.constitutional import JudgeConfig, LabelConfig, ReviseConfig, main, run_label, run_revise

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("cai")


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": f"Question number {i}: how do I do thing {i}?"} for i in range(6)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scripted_p_a(messages) -> float:
    """A judge's P(A) that depends only on what it is asked, in (0, 1)."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    return (int.from_bytes(digest[:4], "big") % 999 + 1) / 1000


class FakeJudge:
    """Scripted judge: P(A) = scripted_p_a(messages); can crash after `fail_after` answers; records what it got."""

    name = "fake-judge"

    def __init__(self, fail_after=None):
        self.fail_after, self.asked = fail_after, []

    def choose(self, conversations, labels):
        for i, messages in enumerate(conversations):
            if self.fail_after is not None and len(self.asked) >= self.fail_after:
                raise JudgeError("fake judge crashed")
            self.asked.append(messages)
            p = scripted_p_a(messages)
            yield i, Choice((p, 1 - p), "logprobs", "A" if p > 0.5 else "B", 1.0)


class ScriptedCritic:
    """Writes 'critique k' and 'revision k' and records every conversation it is shown."""

    name = "scripted-critic"

    def __init__(self):
        self.seen = []

    def chat(self, conversations, params):
        for i, messages in enumerate(conversations):
            self.seen.append(messages)
            kind = "critique" if messages[-1]["content"].startswith("Critique request:") else "revision"
            prefix = "Revision: " if kind == "revision" else ""  # models echo labels; revise drops them
            yield i, [f"{prefix}{kind} {sum(m['role'] == 'assistant' for m in messages)}"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- constitutions and prompts ----

def test_builtin_constitutions_parse_and_cover_their_topics():
    default = load_constitution("default")
    assert len(default.principles) >= 10 and all(p.choice_prompt for p in default.principles)
    names = " ".join(p.name for p in default.principles)
    assert all(topic in names for topic in ("harm", "honesty", "helpfulness"))
    cs = load_constitution("customer_service")
    assert {"brand-voice", "escalation", "privacy"} <= {p.name for p in cs.principles}
    assert default.examples and default.examples[0].principle in default.principles


def test_bad_constitution_names_file_and_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - name: x\n    critique_request: ok\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: principles\[0\]: field 'revision_request'"):
        load_constitution(str(bad))
    bad.write_text("principles:\n  - {name: x, critique_request: a, revision_request: b}\n"
                   "examples:\n  - {prompt: p, response: r, principle: y, critique: c, revision: v}\n")
    with pytest.raises(ConfigError, match=r"examples\[0\]: field 'principle' names 'y'"):
        load_constitution(str(bad))


def test_prompt_readers_keep_prompts_only(tmp_path):
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: first question\n\nAssistant: BAD ANSWER\n\nHuman: more\n\n"
                                        "Assistant: worse", "rejected": "\n\nHuman: first question\n\nAssistant: x"})
                  + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": "a completion"}]}) + "\n")
    rows = read_prompts([str(hh)])
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": "first question"}],
                                            [{"role": "user", "content": "q"}]]
    csv = tmp_path / "x.csv"
    csv.write_text("id,prompt,type,label\n1,How do I kill a process?,homonyms,safe\n2,How do I kill a man?,x,unsafe\n")
    assert [r["messages"][0]["content"] for r in read_prompts([str(csv)], label="safe")] == ["How do I kill a process?"]
    adv = tmp_path / "adv.csv"
    adv.write_text("goal,target\nDo a bad thing,\"Sure, here is\"\nDo a bad thing,\"Sure\"\n")
    assert [r["messages"][0]["content"] for r in read_prompts([str(adv)])] == ["Do a bad thing"]  # deduplicated
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: a row needs 'prompt'"):
        read_prompts([str(broken)])
    assert len(read_prompts(["builtin:red_team", "builtin:borderline_safe", "builtin:helpful"])) >= 40


# ---- revise ----

def test_revise_traces_are_complete_and_critic_sees_each_round(model_dir, prompts_file, tmp_path):
    critic = ScriptedCritic()
    cfg = ReviseConfig(model=str(model_dir), prompts=[str(prompts_file)], out_dir=str(tmp_path / "rev"), rounds=2,
                       few_shot=1, max_new_tokens=6, batch_size=4, device="cpu", format="prompt_completion")
    summary = run_revise(cfg, critic=critic)
    traces = read_jsonl(tmp_path / "rev" / "traces.jsonl")
    constitution = load_constitution("default")
    principles = {p.name: p for p in constitution.principles}
    assert summary["prompts"] == len(traces) == 6
    for t in traces:
        assert isinstance(t["initial_response"], str) and len(t["rounds"]) == 2
        for r in t["rounds"]:
            assert r["principle"] in principles and r["critique"].startswith("critique")
            assert r["critique_request"] == principles[r["principle"]].critique_request
        assert t["final_response"] == t["rounds"][-1]["revision"] == "revision 5"  # 'Revision:' label dropped
    # what the critic was shown: few-shot round, prompt, previous answer, critique request, critique, revision request
    example = constitution.examples[0]
    revision_asks = [m for m in critic.seen if m[-1]["content"].startswith("Revision request:")]
    assert len(revision_asks) == 12
    for messages in revision_asks:
        assert messages[0] == {"role": "user", "content": example.prompt}
        assert messages[2]["content"] == critique_turn(example.principle)
        assert messages[-3]["content"].startswith("Critique request:")
        assert messages[-2]["role"] == "assistant" and messages[-2]["content"].startswith("critique")
    last = revision_asks[-1]
    name = next(t for t in traces if t["prompt"] == last[6:7])["rounds"][1]["principle"]
    assert last[-1]["content"] == revision_turn(principles[name])
    sft = read_jsonl(tmp_path / "rev" / "sft.jsonl")
    assert sft[0] == {"prompt": traces[0]["prompt"], "completion": [{"role": "assistant", "content": "revision 5"}]}


def test_revise_with_the_local_model_as_its_own_critic_resumes(model_dir, prompts_file, tmp_path):
    cfg = ReviseConfig(model=str(model_dir), prompts=[str(prompts_file)], out_dir=str(tmp_path / "rev"), rounds=1,
                       max_new_tokens=5, batch_size=3, device="cpu", critic=JudgeConfig(max_new_tokens=5))
    first = run_revise(cfg)
    traces = read_jsonl(tmp_path / "rev" / "traces.jsonl")
    assert first["asked"] == 6 * 3 and all(len(t["rounds"]) == 1 for t in traces)
    assert read_jsonl(tmp_path / "rev" / "sft.jsonl")[0]["messages"][-1]["role"] == "assistant"
    again = run_revise(cfg)  # everything done: nothing is generated again
    assert again["asked"] == 0 and read_jsonl(tmp_path / "rev" / "traces.jsonl") == traces


# ---- label ----

def expected_q(record, labels=("A", "B"), both_orders=True):
    principle = next(p for p in load_constitution("default").principles if p.name == record["principle"])
    y1, y2 = record["answers"]
    p1 = scripted_p_a(pairwise_messages(record["prompt"], y1, y2, principle, labels))
    if not both_orders:
        return p1
    return (p1 + 1 - scripted_p_a(pairwise_messages(record["prompt"], y2, y1, principle, labels))) / 2


@pytest.mark.parametrize("both_orders", [True, False])
def test_labels_follow_the_judges_probabilities(model_dir, prompts_file, tmp_path, both_orders):
    cfg = LabelConfig(model=str(model_dir), prompts=[str(prompts_file)], out_dir=str(tmp_path / "lab"),
                      max_new_tokens=8, batch_size=4, device="cpu", both_orders=both_orders)
    summary = run_label(cfg, judge=FakeJudge())
    records = read_jsonl(tmp_path / "lab" / "judgments.jsonl")
    rows = {json.dumps(r["prompt"]): r for r in read_jsonl(tmp_path / "lab" / "preference.jsonl")}
    assert summary["pairs"] == len(rows) == sum(r["skipped"] is None for r in records) >= 4
    for rec in records:
        if rec["skipped"]:
            continue
        q = expected_q(rec, both_orders=both_orders)
        assert rec["p_first_better"] == pytest.approx(q, abs=1e-6)
        row = rows[json.dumps(rec["prompt"])]
        y1, y2 = rec["answers"]
        assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == ((y1, y2) if q > 0.5 else (y2, y1))
        assert row["label_confidence"] == pytest.approx(max(q, 1 - q), abs=1e-6)
    strict = run_label(LabelConfig(**{**vars(cfg), "out_dir": str(tmp_path / "strict"), "min_confidence": 0.9}),
                       judge=FakeJudge())
    kept = read_jsonl(tmp_path / "strict" / "preference.jsonl")
    assert all(r["label_confidence"] >= 0.9 for r in kept) and strict["pairs"] <= summary["pairs"]


def test_a_crashed_labelling_run_resumes_from_the_cache(model_dir, prompts_file, tmp_path):
    cfg = LabelConfig(model=str(model_dir), prompts=[str(prompts_file)], out_dir=str(tmp_path / "lab"),
                      max_new_tokens=8, batch_size=2, device="cpu")
    clean = FakeJudge()
    run_label(LabelConfig(**{**vars(cfg), "out_dir": str(tmp_path / "clean")}), judge=clean)
    total = len(clean.asked)
    crashing = FakeJudge(fail_after=5)  # chunk 1 (2 prompts = 4 requests) finishes, chunk 2 dies after 1 answer
    with pytest.raises(JudgeError, match="crashed"):
        run_label(cfg, judge=crashing)
    assert len(read_jsonl(tmp_path / "lab" / "judgments.jsonl")) == 2
    assert len(read_jsonl(tmp_path / "lab" / "cache.jsonl")) >= 5  # 5 judge answers (+ the policy's samples)
    resumed = FakeJudge()
    summary = run_label(cfg, judge=resumed)
    answered = {json.dumps(m, sort_keys=True) for m in crashing.asked}
    assert len(resumed.asked) == total - 5 == summary["asked_judge"]
    assert not answered & {json.dumps(m, sort_keys=True) for m in resumed.asked}
    assert (tmp_path / "lab" / "preference.jsonl").read_text() == (tmp_path / "clean" / "preference.jsonl").read_text()


def test_local_judge_probabilities_are_the_next_token_distribution(model_dir):
    model, tok = load_model_dir(model_dir).eval(), load_tokenizer(model_dir)
    judge = LocalModel(model, tok, batch_size=2)
    convs = [[{"role": "user", "content": "Which? A or B"}], [{"role": "user", "content": "Longer question: A or B?"}],
             [{"role": "user", "content": "1 or 2"}]]
    got = dict(judge.choose(convs, ("A", "B")))
    for i, messages in enumerate(convs):
        ids = encode_prompt(tok, messages)  # the prompt as SFT trained it (bos first)
        with torch.no_grad():
            probs = model(torch.tensor([ids]))[0, -1].softmax(-1)
        p_a = sum(float(probs[t]) for t in judge.label_token_ids("A"))
        p_b = sum(float(probs[t]) for t in judge.label_token_ids("B"))
        assert got[i].probs[0] == pytest.approx(p_a / (p_a + p_b), abs=1e-5)
        assert got[i].mass == pytest.approx(p_a + p_b, abs=1e-5) and got[i].method == "next_token"


# ---- the OpenAI-compatible endpoint ----

def test_parse_choice_uses_logprobs_then_falls_back_to_the_text():
    def response(text, top=None):
        choice = {"message": {"role": "assistant", "content": text}}
        if top is not None:
            choice["logprobs"] = {"content": [{"token": "The", "top_logprobs": [{"token": "The", "logprob": -0.1}]},
                                              {"token": text, "top_logprobs": top}]}
        return {"choices": [choice]}

    got = parse_choice(response("A", [{"token": " A", "logprob": math.log(0.6)},
                                      {"token": "A", "logprob": math.log(0.1)},
                                      {"token": "B", "logprob": math.log(0.2)}]), ("A", "B"))
    assert got.method == "logprobs" and got.probs[0] == pytest.approx(0.7 / 0.9) and got.mass == pytest.approx(0.9)
    only_a = parse_choice(response("A", [{"token": "A", "logprob": math.log(0.9)},
                                         {"token": "C", "logprob": math.log(0.05)}]), ("A", "B"))
    assert only_a.probs[0] == pytest.approx(0.9 / 0.95)  # unlisted B: at most the smallest listed probability
    parsed = parse_choice(response("Response B is better."), ("A", "B"), parsed_confidence=0.8)
    assert parsed.method == "parsed" and parsed.probs == pytest.approx((0.2, 0.8))
    assert parse_choice(response("Neither."), ("A", "B")).method == "unparsed"
    with pytest.raises(JudgeError, match="not a chat-completions response"):
        parse_choice({"error": "oops"}, ("A", "B"))


class OpenAIStub(BaseHTTPRequestHandler):
    """/v1/chat/completions with logprobs; `mode` on the server switches to slow or garbage after N requests."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.count += 1
            n = server.count
            server.bodies.append(body)
            server.auth.append(self.headers.get("Authorization"))
        if server.status_codes:  # scripted HTTP errors first (429 with Retry-After, 400, ...)
            code = server.status_codes.pop(0)
            self.send_response(code)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no")
            return
        bad = server.bad_after is not None and n > server.bad_after
        if bad and server.mode == "slow":
            time.sleep(2.0)
        if bad and server.mode == "garbage":
            payload = b"<html>502 upstream hiccup</html>"
        else:
            p = scripted_p_a(body["messages"])
            top = [{"token": "A", "logprob": math.log(p)}, {"token": "B", "logprob": math.log(1 - p)}]
            content = {"token": "A" if p > 0.5 else "B", "logprob": math.log(max(p, 1 - p)), "top_logprobs": top}
            payload = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content["token"]},
                 "logprobs": {"content": [content]}, "finish_reason": "stop"}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), OpenAIStub)
    srv.lock, srv.count, srv.bodies, srv.auth, srv.mode, srv.bad_after = threading.Lock(), 0, [], [], "ok", None
    srv.status_codes = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def endpoint_cfg(model_dir, prompts_file, out_dir, port, **judge):
    judge = JudgeConfig(**{"backend": "openai", "url": f"http://127.0.0.1:{port}/v1", "model": "judge-1",
                           "concurrency": 1, **judge})
    return LabelConfig(model=str(model_dir), prompts=[str(prompts_file)], out_dir=str(out_dir), max_new_tokens=8,
                       batch_size=2, device="cpu", judge=judge)


def test_endpoint_judge_speaks_chat_completions_with_logprobs(model_dir, prompts_file, tmp_path, server,
                                                              monkeypatch):
    monkeypatch.setenv("LMFORGE_JUDGE_API_KEY", "sk-test")
    cfg = endpoint_cfg(model_dir, prompts_file, tmp_path / "lab", server.server_address[1], concurrency=3)
    summary = run_label(cfg)
    assert summary["judge_methods"] == {"logprobs": server.count} and server.count == 2 * summary["pairs"]
    body = server.bodies[0]
    assert body["model"] == "judge-1" and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["messages"][0]["role"] == "user" and set(server.auth) == {"Bearer sk-test"}
    for rec in read_jsonl(tmp_path / "lab" / "judgments.jsonl"):  # same probabilities as the scripted judge
        if not rec["skipped"]:
            assert rec["p_first_better"] == pytest.approx(expected_q(rec), abs=1e-5)


def test_endpoint_retries_rate_limits_and_server_errors_but_not_bad_requests(server):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge = OpenAIEndpoint(url, "m", max_retries=3, backoff=0.01, requests_per_minute=6000)
    messages = [[{"role": "user", "content": "A or B?"}]]
    server.status_codes = [429, 503]
    ((_, choice),) = judge.choose(messages, ("A", "B"))
    assert server.count == 3 and choice.probs[0] == pytest.approx(scripted_p_a(messages[0]))
    server.status_codes = [400]
    with pytest.raises(JudgeError, match=r"chat/completions: HTTP 400: no"):
        list(judge.choose(messages, ("A", "B")))
    assert server.count == 4  # a bad request is not retried
    server.status_codes = [500] * 5
    with pytest.raises(JudgeError, match=r"no answer after 4 tries \(HTTP 500"):
        list(judge.chat(messages, ChatParams()))


@pytest.mark.parametrize("mode,message", [("slow", "timed out"), ("garbage", "not JSON")])
def test_a_failing_endpoint_is_a_clear_error_and_loses_no_finished_label(model_dir, prompts_file, tmp_path, server,
                                                                         mode, message, capsys):
    server.mode, server.bad_after = mode, 6  # chunk 1 (4 requests) and 2 answers of chunk 2, then trouble
    out, port = tmp_path / "lab", server.server_address[1]
    args = ["label", f"model={model_dir}", f"prompts=[{prompts_file}]", f"out_dir={out}", "max_new_tokens=8",
            "batch_size=2", "device=cpu", "judge.backend=openai", f"judge.url=http://127.0.0.1:{port}/v1",
            "judge.concurrency=1", f"judge.timeout={0.5 if mode == 'slow' else 30}", "judge.max_retries=1",
            "judge.backoff=0.01"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "judge error" in err and message in err and f"127.0.0.1:{port}" in err
    assert "rerun the same command to resume" in err
    assert len(read_jsonl(out / "judgments.jsonl")) == 2
    answered = {json.dumps(b["messages"]) for b in server.bodies[:6]}
    before = len(server.bodies)
    server.mode = "ok"
    assert main(args) == 0
    capsys.readouterr()
    # the rerun asks only what had no answer: all 12 requests minus the 6 answered ones (a retry repeats one)
    asked_again = {json.dumps(b["messages"]) for b in server.bodies[before:]}
    assert len(asked_again) == 12 - 6 and not asked_again & answered
    assert len(read_jsonl(out / "judgments.jsonl")) == 6


# ---- the CLI ----

@pytest.mark.slow
def test_cli_revise_label_eval_end_to_end(model_dir, tmp_path, capsys):
    common = [f"model={model_dir}", "prompts=[builtin:red_team]", "limit=2", "max_new_tokens=4", "device=cpu"]
    proc = subprocess.run([sys.executable, "-m", "lmforge", "constitutional", "revise", *common, "rounds=1",
                           "few_shot=1", "critic.max_new_tokens=4", f"out_dir={tmp_path / 'rev'}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "revised" in proc.stdout, proc.stdout + proc.stderr
    assert len(read_jsonl(tmp_path / "rev" / "sft.jsonl")) == 2
    assert (tmp_path / "rev" / "config.yaml").exists() and (tmp_path / "rev" / "metrics.jsonl").exists()
    assert cli_main(["constitutional", "label", *common, f"out_dir={tmp_path / 'lab'}",
                 "constitution=customer_service"]) == 0
    assert json.loads((tmp_path / "lab" / "summary.json").read_text())["prompts"] == 2
    assert cli_main(["constitutional", "eval", f"models=[{model_dir},{model_dir}]", "limit=2", "max_new_tokens=4",
                 "device=cpu", f"out_dir={tmp_path / 'ev'}"]) == 0
    assert "over-refusal" in capsys.readouterr().out
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [set(m) >= {"harmless", "refusal", "over_refusal", "helpful"} for m in result["models"]] == [True, True]
    assert result["models"][0]["harmless"] == result["models"][1]["harmless"]  # same model, same greedy answers
    assert cli_main(["constitutional", "label", f"model={model_dir}", "prompts=[nope.jsonl]"]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert cli_main(["constitutional", "label", f"model={model_dir}", "judge.backend=openai"]) == 2
    assert "backend=openai needs url" in capsys.readouterr().err
