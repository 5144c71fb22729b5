"""The data path: sources, cleaning, counted filters, shards on disk, packed batches, exact resume, unigram baseline."""

import gzip
import json
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch

from lmforge.data.shards import (
    PackedBatches,
    TokenDataset,
    build_shards,
    is_val_doc,
    iter_eval,
    unigram_baseline_loss,
)
from lmforge.data.sources import FilterConfig, clean_text, filter_documents, read_documents
from lmforge.errors import DataError
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["The quick brown fox jumps over the lazy dog.", "document number says hello"] * 20,
                           vocab_size=300)


# ---------------------------------------------------------------------------------------------------- sources

def test_jsonl_bad_line_names_file_line_and_field(tmp_path):
    p = tmp_path / "data.jsonl"
    cases = [('{"txt": "oops"}', r"data.jsonl:2: field 'text' missing \(fields: txt\)"),
             ('{"text": 5}', r"data.jsonl:2: field 'text' must be a str"),
             ("{broken", r"data.jsonl:2: invalid JSON"),
             ('["a list"]', r"data.jsonl:2: expected a JSON object, got list")]
    for line, message in cases:
        p.write_text('{"text": "ok"}\n' + line + "\n")
        with pytest.raises(DataError, match=message):
            list(read_documents(str(p)))
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(DataError, match=r"data.jsonl:2: not UTF-8 text"):
        list(read_documents(str(p)))
    p.write_text('{"text": "a"}\n\n{"body": "b", "text": "c"}\n')  # blank lines are skipped, not errors
    assert list(read_documents(str(p))) == ["a", "c"]
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'body' missing"):
        list(read_documents(str(p), text_field="body"))


def test_json_arrays_gz_directories_globs_and_unknown_types(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps([{"text": "from array"}, {"text": "second"}]))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write('{"text": "from gz"}\n')
    (tmp_path / "c.txt").write_text("one\n\n  \n\ntwo")
    (tmp_path / "notes.csv").write_text("ignored in a directory")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden files are skipped")
    assert list(read_documents(str(tmp_path))) == ["from gz", "from array", "second", "one", "two"]
    assert list(read_documents(str(tmp_path / "*.json*"))) == ["from gz", "from array", "second"]
    assert list(read_documents(str(tmp_path / "c.txt"), split_txt_on_blank_lines=False)) == ["one\n\n  \n\ntwo"]
    with pytest.raises(DataError, match=r"notes.csv: unsupported file type \(use .txt"):
        list(read_documents(str(tmp_path / "notes.csv")))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "ok"}, {"title": "no text"}]))
    with pytest.raises(DataError, match=r"b.json: record 2: field 'text' missing"):
        list(read_documents(str(tmp_path / "b.json")))
    with pytest.raises(DataError, match=r"nothing\*.txt: no such file, directory or glob match"):
        list(read_documents(str(tmp_path / "nothing*.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory holds no supported files"):
        list(read_documents(str(tmp_path / "empty")))


def test_txt_splits_on_blank_lines_and_builtin_exists(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\n\none\nline\n\n\ntwo\n \n")
    assert list(read_documents(str(p))) == ["one\nline", "two"]
    first = next(read_documents("builtin:tinyshakespeare"))
    assert first == "First Citizen:\nBefore we proceed any further, hear me speak."
    with pytest.raises(DataError, match=r"builtin:nope: no such built-in corpus \(built-in: .*tinyshakespeare, tinyworld/quiz"):
        next(read_documents("builtin:nope"))


def test_parquet_source_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc"], "id": [1, 2]}), path)
    assert list(read_documents(str(path))) == ["first doc", "second doc"]
    with pytest.raises(DataError, match=r"docs.parquet: no column 'body' \(columns: text, id\)"):
        list(read_documents(str(path), text_field="body"))
    pq.write_table(pa.table({"text": ["fine", None]}), path)
    with pytest.raises(DataError, match=r"docs.parquet: row 2: field 'text' must be a string, got None"):
        list(read_documents(str(path)))


def test_clean_text_normalises_without_touching_indentation():
    assert clean_text("a\r\nb\x07  \n\n\n\nc ") == "a\nb\n\nc"
    assert clean_text("\ufeffcafe\u0301\x00\x9b") == "caf\u00e9"  # BOM, NFC, C0 and C1 controls
    assert clean_text("line\u2028next\rlast\x0cpage") == "line\nnext\nlast\npage"
    assert clean_text("def f():\n    return 1\t# tab kept\n") == "def f():\n    return 1\t# tab kept"


def test_filters_count_every_drop_and_dedup_exact_duplicates():
    docs = ["good document here", "good document here", "", "x", "#### $$$$ %%%% 1234", "spam\nspam\nspam\nok",
            "a" * 50, "good document here  \r\n"]
    kept, stats = filter_documents(docs, FilterConfig(min_chars=3, max_chars=40, min_alpha_ratio=0.5,
                                                      max_duplicate_line_fraction=0.3))
    assert kept == ["good document here"]
    assert stats == {"kept": 1, "duplicate": 2, "empty": 1, "too_short": 1, "low_alpha": 1, "repetitive": 1,
                     "too_long": 1}
    assert sum(stats.values()) == len(docs)  # every document is counted somewhere
    kept, stats = filter_documents(["same", "same", "other"], FilterConfig(dedup=False))
    assert kept == ["same", "same", "other"] and stats == {"kept": 3}
    with pytest.raises(ValueError, match="min_alpha_ratio must be between 0 and 1"):
        FilterConfig(min_alpha_ratio=2.0).validate()


# ----------------------------------------------------------------------------------------------------- shards

def docs_for(n):
    return [f"document number {i} says {'hello ' * (i % 5)}" for i in range(n)]


def test_shards_hold_exactly_bos_plus_tokens_per_document(tok, tmp_path):
    docs = docs_for(200)
    meta = build_shards(docs, tok, tmp_path, val_fraction=0.1, seed=0, shard_tokens=500)
    train, val = TokenDataset(tmp_path, "train"), TokenDataset(tmp_path, "val")
    assert meta["dtype"] == "uint16" and len(meta["train_shards"]) > 1  # several shards, one stream
    assert meta["n_docs"] == 200 and 0 < meta["val_docs"] < 200
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    # the split decides by document; each document appears once, whole, after a bos, in corpus order
    streams = {"train": [], "val": []}
    for d in docs:
        streams["val" if is_val_doc(d, 0.1, seed=0) else "train"] += [0] + tok.encode(d)
    assert meta["val_docs"] == sum(is_val_doc(d, 0.1, seed=0) for d in docs)
    assert train.tokens().tolist() == streams["train"] and val.tokens().tolist() == streams["val"]
    assert train[3:700].tolist() == streams["train"][3:700]  # slicing across shard boundaries
    assert train[-1] == streams["train"][-1] and len(train[5:5]) == 0
    with pytest.raises(IndexError):
        train.read(len(train) - 2, 5)


def test_val_split_is_never_empty_and_split_is_by_content(tok, tmp_path):
    meta = build_shards(["only two", "documents here"], tok, tmp_path / "a", val_fraction=0.01)
    assert meta["train_docs"] == 1 and meta["val_docs"] == 1
    forward = build_shards(docs_for(100), tok, tmp_path / "b", val_fraction=0.2, seed=5)
    backward = build_shards(docs_for(100)[::-1], tok, tmp_path / "c", val_fraction=0.2, seed=5)
    assert forward["val_docs"] == backward["val_docs"]  # a document's split does not depend on its position
    assert forward["val_tokens"] == backward["val_tokens"]
    with pytest.raises(DataError, match="no documents left after filtering"):
        build_shards([], tok, tmp_path / "d", filter_stats={"too_short": 3})


def test_complete_build_is_skipped_and_a_killed_one_is_redone(tok, tmp_path):
    docs = docs_for(50)
    meta = build_shards(docs, tok, tmp_path, val_fraction=0.1)
    stamp = (tmp_path / "meta.json").stat().st_mtime_ns
    assert build_shards(docs, tok, tmp_path, val_fraction=0.1) == meta  # unchanged input: skipped
    assert (tmp_path / "meta.json").stat().st_mtime_ns == stamp
    changed = build_shards(docs[:-1], tok, tmp_path, val_fraction=0.1)  # changed input: rebuilt
    assert changed["fingerprint"] != meta["fingerprint"] and changed["n_docs"] == 49
    # a build killed mid-way leaves shards and temporaries but no meta.json: it does not count as done
    (tmp_path / "meta.json").unlink()
    (tmp_path / "train_007.bin.tmp").write_bytes(b"\x01\x02")
    with pytest.raises(FileNotFoundError, match="no meta.json; build the shards first"):
        TokenDataset(tmp_path, "train")
    again = build_shards(docs, tok, tmp_path, val_fraction=0.1)
    assert again["fingerprint"] == meta["fingerprint"] and not list(tmp_path.glob("*.tmp"))
    with open(tmp_path / again["train_shards"][0], "r+b") as f:  # a truncated shard is caught on open
        f.truncate(10)
    with pytest.raises(ValueError, match="meta.json says"):
        TokenDataset(tmp_path, "train")


class BigVocab:
    """A tokenizer with more than 65,536 ids, to see shards switch to uint32."""

    vocab_size, doc_start_id = 70_000, 69_999

    class tok:
        @staticmethod
        def to_str():
            return "big-vocab"

    def encode_batch(self, texts, add_bos=False):
        return [[self.doc_start_id] + [66_000 + len(t)] for t in texts]


def test_large_vocabularies_use_uint32(tmp_path):
    meta = build_shards(["a", "bb", "ccc"], BigVocab(), tmp_path, val_fraction=0.3)
    tokens = TokenDataset(tmp_path, "train").tokens().tolist() + TokenDataset(tmp_path, "val").tokens().tolist()
    assert meta["dtype"] == "uint32" and sorted(tokens) == [66_001, 66_002, 66_003, 69_999, 69_999, 69_999]


# ---------------------------------------------------------------------------------------------------- batches

@pytest.fixture(scope="module")
def stream_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    build_shards(docs_for(200), tok, d, val_fraction=0.1, seed=0, shard_tokens=700)
    return d


def test_packed_batches_are_shifted_chunks_covering_each_epoch_once(stream_dir):
    train = TokenDataset(stream_dir, "train")
    tokens = train.tokens().tolist()
    chunks = [tuple(tokens[c * 8:c * 8 + 9]) for c in range((len(tokens) - 1) // 8)]  # stride 8, 9 tokens
    plain = PackedBatches(train, batch_size=4, seq_len=8, shuffle=False)
    for b in range(3):
        x, y = next(plain)
        assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert [tuple(r) + (int(t[-1]),) for r, t in zip(x.tolist(), y)] == chunks[b * 4:b * 4 + 4]

    stream = PackedBatches(train, batch_size=4, seq_len=8, seed=3)
    rows = []
    for _ in range(stream.batches_per_epoch):
        x, y = next(stream)
        rows += [tuple(r) + (int(t[-1]),) for r, t in zip(x.tolist(), y)]
    assert stream.epoch == 0 and len(rows) == stream.batches_per_epoch * 4 > len(chunks) - 4
    assert not Counter(rows) - Counter(chunks)  # every row is a chunk, none used twice in an epoch
    assert rows != chunks[:len(rows)]  # shuffled
    x, y = next(stream)
    assert [tuple(r) + (int(t[-1]),) for r, t in zip(x.tolist(), y)] != rows[:4]  # a new order every epoch
    assert stream.epoch == 1 and stream.state_dict() == {"epoch": 1, "index": 1}


def test_resume_from_state_dict_matches_uninterrupted_across_epochs(stream_dir):
    train = TokenDataset(stream_dir, "train")
    stream = PackedBatches(train, batch_size=4, seq_len=8, seed=3)
    for _ in range(stream.batches_per_epoch - 2):  # walk to just before an epoch boundary
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))  # checkpoints store it as JSON
    expected = [next(stream) for _ in range(5)]
    assert stream.epoch == 1
    resumed = PackedBatches(train, batch_size=4, seq_len=8, seed=3)
    resumed.load_state_dict(state)
    for (a, b), (c, d) in zip(expected, (next(resumed) for _ in range(5)), strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    other_seed = PackedBatches(train, batch_size=4, seq_len=8, seed=4)
    other_seed.load_state_dict(state)
    assert not torch.equal(next(other_seed)[0], expected[0][0])


def test_two_ranks_see_exactly_the_rows_of_one(stream_dir):
    ds = TokenDataset(stream_dir, "train")
    one = PackedBatches(ds, batch_size=4, seq_len=8)
    ranks = [PackedBatches(ds, batch_size=4, seq_len=8, rank=r, world_size=2) for r in range(2)]
    for _ in range(one.batches_per_epoch + 3):  # across an epoch boundary
        x, y = next(one)
        parts = [next(r) for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    resumed = PackedBatches(ds, batch_size=4, seq_len=8, rank=1, world_size=2)
    resumed.load_state_dict(one.state_dict())  # the state means the same whatever the number of processes
    assert torch.equal(next(resumed)[0], next(one)[0][2:])
    with pytest.raises(ValueError, match="not divisible by world_size"):
        PackedBatches(ds, batch_size=3, seq_len=8, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch of 10000"):
        PackedBatches(ds, batch_size=10_000, seq_len=8)


def test_eval_batches_are_sequential_deterministic_and_split_by_rank(stream_dir):
    val = TokenDataset(stream_dir, "val")
    evals = list(iter_eval(val, batch_size=4, seq_len=8, max_batches=2))
    assert len(evals) == 2 and evals[0][0].shape == (4, 8)
    assert evals[0][0][0].tolist() == val[0:8].tolist() and evals[0][0][1].tolist() == val[8:16].tolist()
    again = list(iter_eval(val, batch_size=4, seq_len=8, max_batches=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(evals, again))
    halves = [list(iter_eval(val, batch_size=4, seq_len=8, max_batches=2, rank=r, world_size=2)) for r in range(2)]
    for b in range(2):
        assert torch.equal(torch.cat([halves[0][b][0], halves[1][b][0]]), evals[b][0])
    with pytest.raises(ValueError, match="fewer than one sequence"):
        next(iter_eval(val, batch_size=4, seq_len=len(val) + 5))


def test_unigram_baseline_by_hand(tmp_path):
    for split, toks in (("train", [0, 0, 1]), ("val", [0, 1, 1, 2])):
        np.asarray(toks, dtype=np.uint16).tofile(tmp_path / f"{split}_000.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 4, "dtype": "uint16",
                                                    "train_shards": ["train_000.bin"],
                                                    "val_shards": ["val_000.bin"]}))
    train, val = TokenDataset(tmp_path, "train"), TokenDataset(tmp_path, "val")
    # add-one counts over a vocabulary of 4: token0 3, token1 2, token2 1, token3 1 -> total 7
    expected = -(np.log(3 / 7) + 2 * np.log(2 / 7) + np.log(1 / 7)) / 4
    assert unigram_baseline_loss(train, val, 4) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="token id 2, outside a vocabulary of 2"):
        unigram_baseline_loss(train, val, 2)


def test_hf_source_streams_rows_through_datasets(monkeypatch):
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split, streaming: iter([{"text": "one"}, {"txt": "two"}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = read_documents("hf:org/corpus:cfg@train")
    assert next(docs) == "one"
    with pytest.raises(DataError, match=r"hf:org/corpus:cfg@train: row 2: field 'text' missing"):
        next(docs)
