"""Chat data: reading SFT rows, clear errors on bad ones, and the assistant-token mask under several templates."""

import copy
import json

import pytest

from lmforge.data.chat import (
    encode_chat_prompt,
    read_sft_rows,
    tokenize_conversation,
    tokenize_prompt_completion,
)
from lmforge.data.rows import read_rows
from lmforge.errors import DataError
from lmforge.tokenizer import CHATML_TEMPLATE, train_tokenizer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello there, friend!"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "The answer is 4."},
]

# Llama-3's structure (bos from the template, a header per turn, content trimmed, an end-of-turn token, nothing
# after it) written with the special tokens our test tokenizer has.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}<|pad|>\n\n{{ m['content'] | trim }}"
    "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant<|pad|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    texts = ["You are terse. Say hello. Hello there, friend! What is 2 + 2? The answer is 4."] * 20
    return train_tokenizer(texts, vocab_size=300)


def masked_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_mask_covers_exactly_the_assistant_turns_chatml(tok):
    ids, mask = tokenize_conversation(tok, CHAT)
    assert len(ids) == len(mask)
    assert masked_text(tok, ids, mask) == "Hello there, friend!<|im_end|>The answer is 4.<|im_end|>"
    assert tok.decode(ids) == "<|endoftext|>" + tok.apply_chat_template(CHAT)
    # every unmasked token is template framing, system, or user text
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Hello there" not in unmasked and "The answer" not in unmasked and "You are terse." in unmasked


def test_mask_with_a_llama3_style_template_and_no_double_bos(tok):
    tok3 = train_tokenizer(["You are terse. Say hello. Hello there, friend!"] * 20, vocab_size=300)
    tok3.chat_template = LLAMA3_STYLE
    ids, mask = tokenize_conversation(tok3, CHAT)
    assert ids[0] == tok3.bos_id and ids[1] != tok3.bos_id and ids.count(tok3.bos_id) == 1
    assert masked_text(tok3, ids, mask) == "Hello there, friend!<|im_end|>The answer is 4.<|im_end|>"


def test_one_bos_when_the_template_has_none(tok):
    ids, _ = tokenize_conversation(tok, CHAT)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    prompt = encode_chat_prompt(tok, CHAT[:2])
    assert tok.decode(prompt) == "<|endoftext|><|im_start|>system\nYou are terse.<|im_end|>\n" \
                                 "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_completion_split_at_the_token_boundary(tok):
    p, c = tokenize_prompt_completion(tok, "What is 2 + 2?", "The answer is 4.")
    assert tok.decode(p).endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(c) == "The answer is 4.<|im_end|>"
    full, mask = tokenize_conversation(tok, [{"role": "user", "content": "What is 2 + 2?"},
                                             {"role": "assistant", "content": "The answer is 4."}])
    assert p + c == full[:len(p) + len(c)] and sum(mask) == len(c)
    # conversational prompt (with an earlier assistant turn): the completion is only the last turn
    p2, c2 = tokenize_prompt_completion(tok, CHAT[:4], [{"role": "assistant", "content": "The answer is 4."}])
    assert tok.decode(c2) == "The answer is 4.<|im_end|>" and "Hello there, friend!" in tok.decode(p2)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_both_trl_formats(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": CHAT},
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
    ])
    rows = list(read_sft_rows(str(path)))
    assert rows[0] == CHAT
    assert rows[1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert rows[2] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    _, mask = tokenize_conversation(tok, rows[1])
    assert sum(mask) == 2  # "4" and <|im_end|>


def test_reads_parquet_and_json_arrays(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a?", "b?"], "completion": ["A", "B"]}), tmp_path / "d.parquet")
    assert [r[-1]["content"] for r in read_sft_rows(str(tmp_path / "d.parquet"))] == ["A", "B"]
    (tmp_path / "d.json").write_text(json.dumps([{"messages": CHAT}]))
    assert list(read_sft_rows(str(tmp_path / "d.json"))) == [CHAT]
    assert next(read_rows(str(tmp_path / "d.parquet")))[1].endswith("d.parquet: row 1")


@pytest.mark.parametrize("row, message", [
    ({"text": "hi"}, "field 'messages' missing"),
    ({"messages": []}, "field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "field 'messages'[0]: bad role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "field 'messages'[0]: 'content' must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "field 'messages'[1]: empty assistant response"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"prompt": "q"}, "field 'completion' missing"),
    ({"prompt": "q", "completion": ""}, "field 'completion': empty assistant response"),
    ({"prompt": "q", "completion": [{"role": "user", "content": "x"}]}, "may only hold assistant messages"),
    ("{not json", "invalid JSON"),
])
def test_malformed_rows_are_one_clear_error_with_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, row])
    with pytest.raises(DataError) as e:
        list(read_sft_rows(str(path)))
    assert f"{path}:2" in str(e.value) and message in str(e.value)


def test_template_that_rewrites_history_is_an_error(tok):
    t = copy.copy(tok)
    # drops every assistant turn but the last: earlier renders are not prefixes of the whole
    t.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                       "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="does not render conversations in order"):
        tokenize_conversation(t, CHAT)
    assert t.chat_template != CHATML_TEMPLATE
