"""Tokenizer round-trips and the data path: sources, filters, shards, packed batches, unigram baseline."""

import json

import numpy as np
import pytest
import torch

from lmforge.data.shards import PackedBatches, TokenDataset, build_shards, iter_eval, unigram_baseline_loss
from lmforge.data.sources import DataError, FilterConfig, clean_text, filter_documents, read_documents
from lmforge.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog.", "ROMEO: But soft, what light through yonder window?",
          "Numbers 12345 and symbols #$%&", "héllo wörld — ünïcode ✓ 🤖"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.mark.parametrize("text", ["plain ascii", "héllo 🤖 wörld", "  leading and\n\n\ttrailing  ", "", "日本語テキスト"])
def test_tokenizer_round_trips_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_have_fixed_ids_and_are_not_split(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.bos_id == 0 and tok.pad_id == 1 and tok.eos_id == 0
    assert tok.encode("<|im_start|>user") [0] == 2
    assert tok.encode("x", add_bos=True)[0] == 0


def test_saved_tokenizer_opens_in_transformers_with_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    stock = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS[:4]:
        assert stock(text)["input_ids"] == tok.encode(text)
    assert stock.pad_token_id == 1 and stock.eos_token == "<|endoftext|>"
    assert Tokenizer.load(tmp_path).encode(CORPUS[1]) == tok.encode(CORPUS[1])


def test_chatml_template_renders_exactly(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n")
    assert tok.apply_chat_template(messages[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert tok.chat_template == CHATML_TEMPLATE


def test_jsonl_bad_line_names_file_line_and_field(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'text' missing"):
        list(read_documents(str(p)))
    p.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'text' must be a str"):
        list(read_documents(str(p)))
    p.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid JSON"):
        list(read_documents(str(p)))


def test_txt_splits_on_blank_lines_and_builtin_exists(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\nline\n\n\ntwo\n")
    assert list(read_documents(str(p))) == ["one\nline", "two\n"]
    first = next(read_documents("builtin:tinyshakespeare"))
    assert first.startswith("First Citizen:")
    with pytest.raises(DataError, match="no such built-in corpus"):
        next(read_documents("builtin:nope"))


def test_filters_count_every_drop_and_dedup_exact_duplicates():
    docs = ["good document here", "good document here", "", "x", "#### $$$$ %%%% 1234", "spam\nspam\nspam\nok",
            "a" * 50]
    kept, stats = filter_documents(docs, FilterConfig(min_chars=3, max_chars=40, min_alpha_ratio=0.5,
                                                      max_duplicate_line_fraction=0.3))
    assert kept == ["good document here"]
    assert stats == {"kept": 1, "duplicate": 1, "empty": 1, "too_short": 1, "low_alpha": 1, "repetitive": 1,
                     "too_long": 1}
    assert clean_text("a\r\nb\x07  \n\n\n\nc ") == "a\nb\n\nc"


def test_shards_round_trip_and_resume_exactly(tok, tmp_path):
    docs = [f"document number {i} says {'hello ' * (i % 5)}" for i in range(200)]
    meta = build_shards(docs, tok, tmp_path, val_fraction=0.1, seed=0)
    assert meta["dtype"] == "uint16" and meta["train_tokens"] + meta["val_tokens"] > 0
    train, val = TokenDataset(tmp_path, "train"), TokenDataset(tmp_path, "val")
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    decoded = tok.decode(train.tokens().tolist(), skip_special_tokens=True)
    assert "document number 0 says" in decoded
    assert build_shards(docs, tok, tmp_path, val_fraction=0.1, seed=0) == meta  # unchanged input: skipped

    stream = PackedBatches(train, batch_size=4, seq_len=8, seed=3)
    x, y = next(stream)
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    for _ in range(stream.n_chunks // 4 - 2):  # walk to just before an epoch boundary
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(5)]
    assert stream.epoch == 1
    resumed = PackedBatches(train, batch_size=4, seq_len=8, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for (a, b), (c, d) in zip(expected, (next(resumed) for _ in range(5))):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_two_ranks_see_exactly_the_rows_of_one(tok, tmp_path):
    build_shards([f"doc {i} " * 5 for i in range(100)], tok, tmp_path, val_fraction=0.1)
    ds = TokenDataset(tmp_path, "train")
    one = PackedBatches(ds, batch_size=4, seq_len=8)
    ranks = [PackedBatches(ds, batch_size=4, seq_len=8, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, _ = next(one)
        assert torch.equal(x, torch.cat([next(r)[0] for r in ranks]))
    evals = list(iter_eval(ds, batch_size=4, seq_len=8, max_batches=2))
    assert len(evals) == 2 and evals[0][0].shape == (4, 8)


def test_unigram_baseline_by_hand(tmp_path):
    for split, toks in (("train", [0, 0, 1]), ("val", [0, 1])):
        np.asarray(toks, dtype=np.uint16).tofile(tmp_path / f"{split}_000.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 3, "dtype": "uint16",
                                                    "train_shards": ["train_000.bin"],
                                                    "val_shards": ["val_000.bin"]}))
    train, val = TokenDataset(tmp_path, "train"), TokenDataset(tmp_path, "val")
    # add-one counts: token0 3, token1 2, token2 1 -> p = 3/6, 2/6
    expected = -(np.log(3 / 6) + np.log(2 / 6)) / 2
    assert unigram_baseline_loss(train, val, 3) == pytest.approx(expected)


def test_parquet_source_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc"], "id": [1, 2]}), path)
    assert list(read_documents(str(path))) == ["first doc", "second doc"]
    with pytest.raises(DataError, match=r"docs.parquet: no column 'body' \(columns: text, id\)"):
        list(read_documents(str(path), text_field="body"))
