"""Tokenizer: exact round-trips, fixed special ids, ChatML, Hugging Face parity both ways, the tokenizer stage."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken

from lmforge.stages.tokenizer import TokenizerStageConfig, main, run_tokenizer
from lmforge.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "ROMEO: But soft, what light through yonder window?",
          "Numbers 12345 and symbols #$%&", "héllo wörld — ünïcode ✓ 🤖"] * 20
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
CHATML = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
          "<|im_start|>assistant\n4<|im_end|>\n")


STREAM_TOK = train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def tok():
    return STREAM_TOK


@pytest.mark.parametrize("text", [
    "plain ascii", "héllo 🤖 wörld", "  leading and\n\n\ttrailing  ", "", "日本語テキスト", "\r\n\x00\x7f",
    "e\u0301 (not NFC) and 👩‍👩‍👧 (ZWJ)", "<|im_start|> inside text <|im_end|>", "    indented\n        code()",
])
def test_tokenizer_round_trips_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def assert_streams_to_decode(tok, ids):
    decode = tok.stream_decoder()
    pieces = [decode(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any(p.endswith("\ufffd") for p in pieces)  # a split character waits until it is whole


@pytest.mark.parametrize("text", ["héllo 🤖 wörld", "日本語テキスト", "e\u0301 and 👩‍👩‍👧", "a<|im_end|>b  c"])
def test_the_stream_decoder_pieces_concatenate_to_the_decoded_text(tok, text):
    assert_streams_to_decode(tok, tok.encode(text))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_the_stream_decoder_fuzzed_with_any_text(text):
    assert_streams_to_decode(STREAM_TOK, STREAM_TOK.encode(text))


def test_special_tokens_have_fixed_ids_and_are_not_split(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 1)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 2 and ids[-1] == 3 and ids.count(2) == 1 and ids.count(3) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.encode("x", add_bos=True) == [0] + tok.encode("x")
    assert tok.encode_batch(["x", "yz"], add_bos=True) == [[0] + tok.encode("x"), [0] + tok.encode("yz")]
    assert 260 <= tok.vocab_size <= 300


def test_training_learns_merges_and_rejects_a_vocab_without_room_for_bytes(tok):
    assert len(tok.encode("The quick brown fox")) < len(b"The quick brown fox")  # merges were learned
    with pytest.raises(ValueError, match="at least 256 bytes"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_chatml_template_renders_exactly(tok):
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.apply_chat_template(MESSAGES) == CHATML
    assert tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(tok.apply_chat_template(MESSAGES)).count(2) == 3  # role markers stay single tokens
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with a 'role'"):
        tok.apply_chat_template([MESSAGES[0], {"content": "no role"}])


def test_saved_tokenizer_opens_in_transformers_with_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    stock = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [*CORPUS[:4], "<|im_start|>user\nhi<|im_end|>", "  spaces\n\n"]:
        assert stock(text)["input_ids"] == tok.encode(text)
        assert stock.decode(tok.encode(text)) == text
    assert (stock.bos_token, stock.eos_token, stock.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert stock.pad_token_id == 1 and stock.eos_token_id == 0
    assert stock.apply_chat_template(MESSAGES, tokenize=False) == CHATML
    again = Tokenizer.load(tmp_path)
    assert again.encode(CORPUS[3]) == tok.encode(CORPUS[3])
    assert (again.bos_id, again.eos_id, again.pad_id, again.chat_template) == (0, 0, 1, CHATML_TEMPLATE)


def test_loads_hugging_face_style_directories(tok, tmp_path):
    """Dict-valued tokens, no pad (pad = eos), no bos (Qwen), a chat_template.jinja file, a 1e30 max length."""
    inner = train_tokenizer(CORPUS, vocab_size=300).tok
    inner.add_special_tokens([AddedToken("</s>", special=True)])
    (tmp_path / "tokenizer.json").write_text(inner.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": {"content": "</s>", "lstrip": False}, "model_max_length": 1e30}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}]{% endfor %}")
    hf = Tokenizer.load(tmp_path)
    eos = inner.token_to_id("</s>")
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (None, eos, eos)
    assert hf.encode("hi", add_bos=True)[0] == 0  # no bos: documents start with <|endoftext|>, as Qwen's do
    assert hf.apply_chat_template(MESSAGES[:2]) == "[system][user]"
    assert hf.model_max_length == 10**12

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|nope|>", "eos_token": "</s>"}))
    with pytest.raises(ValueError, match="bos token '<|nope|>' is not in the vocabulary"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{\n  broken")
    with pytest.raises(ValueError, match=r"tokenizer_config.json:2: invalid JSON"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "missing")


def test_tokenizer_stage_trains_reuses_and_retrains_on_change(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} of a small corpus about tokens"}) + "\n"
                              for i in range(50)))
    out = tmp_path / "tok"
    assert main([f"data={corpus}", "vocab_size=300", f"out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "characters/token" in printed and "trained on 50 documents" in printed
    first = (out / "tokenizer.json").stat().st_mtime_ns
    tok = run_tokenizer(TokenizerStageConfig(data=str(corpus), vocab_size=300, out_dir=str(out)))
    assert (out / "tokenizer.json").stat().st_mtime_ns == first  # same settings, same data: reused
    assert tok.decode(tok.encode("line 7 of")) == "line 7 of"
    smaller = run_tokenizer(TokenizerStageConfig(data=str(corpus), vocab_size=270, out_dir=str(out)))
    assert smaller.vocab_size == 270 < tok.vocab_size  # settings changed: retrained, not silently reused
    assert Tokenizer.load(out).vocab_size == 270
    few = run_tokenizer(TokenizerStageConfig(data=str(corpus), max_docs=3, out_dir=str(tmp_path / "few")))
    assert json.loads((tmp_path / "few" / "tokenizer_training.json").read_text())["trained_on"]["docs"] == 3
    assert few.vocab_size < 300
