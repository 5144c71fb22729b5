"""`lmforge chat`: one-shot and piped multi-turn conversations on a tiny model; history, system prompt, errors."""

import io
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lmforge.generation import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, load_tokenizer, save_model_dir
from lmforge.stages.chat import ChatConfig, ChatSession, run_chat
from lmforge.tokenizer import train_tokenizer

FAST = ["max_new_tokens=6", "temperature=1.0", "top_p=1.0", "device=cpu"]


def lmforge(*args, input=None):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          input=input, timeout=600)


class Piped(io.StringIO):
    def isatty(self):
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer(["Hello there, how are you today? I am fine, thank you. " * 20], vocab_size=300,
                          min_frequency=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=256))
    path = tmp_path_factory.mktemp("chat") / "model"
    save_model_dir(path, model, tok)
    return path


@pytest.fixture
def session(model_dir):
    tok = load_tokenizer(model_dir)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0)
    return ChatSession(load_model_dir(model_dir).eval(), tok, params, system="Be brief.")


def test_history_and_system_prompt_are_rendered_every_turn(session):
    first = session.reply("Hello there")
    second_streamed = []
    second = session.reply("how are you", on_text=second_streamed.append)
    prompt = session.last_prompt
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert f"<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n{first}<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n")
    assert "".join(second_streamed).strip() == second  # what streamed is the answer
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_answers_are_capped_at_half_a_short_context(session):
    """chat's default max_new_tokens (512) on a model with 256 positions answers in up to 128 tokens, not an error."""
    short = ChatSession(session.model, session.tokenizer, replace(session.params, max_new_tokens=512), max_context=256)
    assert short.params.max_new_tokens == 128
    assert session.params.max_new_tokens == 6  # the fixture's own setting fits: untouched


def test_oldest_turns_are_dropped_when_the_context_is_full(session):
    session.max_context = 60
    for text in ("Hello there", "how are you", "I am fine", "thank you"):
        session.reply(text)
    assert session.messages[0]["role"] == "system" and session.messages[-2]["content"] == "thank you"
    assert len(session.tokenizer.encode(session.last_prompt)) + 6 <= 60
    assert "Hello there" not in session.last_prompt
    with pytest.raises(ValueError, match="exceeds the context"):
        session.reply("Hello there " * 40)
    assert session.messages[-1]["role"] == "assistant"  # the oversized turn was not kept


def test_one_shot_message_prints_the_answer_and_a_seed_replays_it(model_dir):
    cfg = ChatConfig(model=str(model_dir), message="Hello there", max_new_tokens=6, device="cpu")
    out = io.StringIO()
    [[user, assistant]] = run_chat(cfg, stdin=Piped("never read\n"), stdout=out)
    assert user == {"role": "user", "content": "Hello there"}
    assert out.getvalue().endswith("\n") and out.getvalue().strip() == assistant["content"]
    assert run_chat(cfg, stdin=Piped(""), stdout=io.StringIO()) == [[user, assistant]]


def test_piped_turns_keep_history_reset_starts_over_and_exit_stops(model_dir, tmp_path):
    out, save = io.StringIO(), tmp_path / "chats.jsonl"
    stdin = Piped("Hello there\n\nhow are you\n/reset\nthank you\n/exit\nnever asked\n")
    cfg = ChatConfig(model=str(model_dir), system="Be brief.", max_new_tokens=6, seed=1, save=str(save),
                     device="cpu")
    conversations = run_chat(cfg, stdin=stdin, stdout=out)
    assert [[m["role"] for m in c] for c in conversations] == [
        ["system", "user", "assistant", "user", "assistant"], ["system", "user", "assistant"]]
    assert [m["content"] for c in conversations for m in c if m["role"] == "user"] == [
        "Hello there", "how are you", "thank you"]
    rows = [json.loads(line) for line in save.read_text().splitlines()]
    assert [r["messages"] for r in rows] == conversations
    answers = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    assert out.getvalue().strip().startswith(answers[0]) and all(a in out.getvalue() for a in answers)


def test_cli_one_shot_and_piped(model_dir, tmp_path):
    proc = lmforge("chat", str(model_dir), "message=Hello there", "seed=3", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    proc = lmforge("chat", str(model_dir), f"save={tmp_path / 'c.jsonl'}", "system=Be brief.", *FAST,
                   input="Hello there\nhow are you\n")
    assert proc.returncode == 0, proc.stderr
    [row] = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_a_checkpoint_without_chat_template_is_a_clear_error_unless_chatml_is_asked(model_dir, tmp_path):
    tok = load_tokenizer(model_dir)
    tok.chat_template = None
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("config.json", "model.safetensors"):
        (plain / f).write_bytes((model_dir / f).read_bytes())
    tok.save(plain)
    proc = lmforge("chat", str(plain), "message=Hi", *FAST)
    assert proc.returncode == 2 and "no chat template" in proc.stderr and "template=chatml" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = lmforge("chat", str(plain), "message=Hi", "template=chatml", *FAST)
    assert proc.returncode == 0, proc.stderr
