"""Property-based fuzzing of every data reader: any file either loads or raises DataError naming the file.

The inputs: JSON Lines, JSON arrays, gzipped JSON Lines and parquet files of random rows (dicts over the field
names the readers look for, with values of every JSON type, NaN and infinities included, nested), the same
bytes cut off at a random point or with a random line of garbage spliced in, rows json.loads itself chokes
on (nesting deeper than the recursion limit, integers of thousands of digits), and random bytes under every
supported extension. No exception type other than lmforge.errors.DataError may escape a reader, and its message
must name the file (JSON Lines errors: file:line). 60 examples per reader, derandomized, so the suite stays
fast and reproducible; LMFORGE_FUZZ_EXAMPLES=N runs N random ones instead.
"""

import gzip
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.data.chat import read_sft_rows
from lmforge.data.preference import read_pairs, read_unpaired
from lmforge.data.prompts import read_prompt_rows, read_rl_prompts
from lmforge.data.sources import read_documents
from lmforge.data.stepwise import read_stepwise
from lmforge.errors import DataError

FIELDS = ["text", "messages", "role", "content", "prompt", "completion", "chosen", "rejected", "label", "score",
          "answer", "label_confidence", "id", "completions", "labels"]
ROLES = ["user", "assistant", "system", "tool", "", " "]

scalars = (st.none() | st.booleans() | st.integers(-2, 2) | st.floats() | st.sampled_from(ROLES)
           | st.text(max_size=6))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3), max_leaves=10)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=6)})
                    | st.dictionaries(st.sampled_from(["role", "content"]), values), max_size=3)
rows = st.lists(st.dictionaries(st.sampled_from(FIELDS), values | messages, max_size=4) | values, max_size=4)


def jsonl(rows_: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows_).encode()  # NaN/Infinity as JSON's common extension


def parquet(rows_: list) -> bytes:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    dicts = [r for r in rows_ if isinstance(r, dict) and r]
    buf = io.BytesIO()
    try:
        pq.write_table(pa.Table.from_pylist(dicts), buf)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):  # mixed types: columns of JSON strings
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{k: json.dumps(v) for k, v in r.items()} for r in dicts]), buf)
    return buf.getvalue()


@st.composite
def files(draw, suffixes=(".jsonl", ".json", ".jsonl.gz", ".parquet")):
    """(file name, bytes): well-formed files of random rows, damaged copies of them, and random bytes."""
    suffix = draw(st.sampled_from(suffixes))
    kind = draw(st.sampled_from(["rows", "rows", "cut", "spliced", "hostile", "bytes"]))
    if kind == "bytes":
        return "data" + suffix, draw(st.binary(max_size=200))
    if kind == "hostile" and suffix != ".parquet":  # what json.loads itself chokes on, inside a row
        depth, digits = draw(st.integers(1, 3000)), draw(st.integers(1, 6000))
        value = draw(st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth, "1" * digits,
                                      "-" + "9" * digits, "1e" + "9" * digits]))
        field = draw(st.sampled_from(FIELDS))
        line = f'{{"{field}": {value}}}\n'.encode()
        data = jsonl(draw(rows))
        data = line + data if draw(st.booleans()) else data + line
        return "data" + suffix, gzip.compress(data, mtime=0) if suffix.endswith(".gz") else data
    body = draw(rows)
    if suffix == ".parquet":
        data = parquet(body)
    elif suffix == ".json" and draw(st.booleans()):
        data = json.dumps(body).encode()
    elif suffix == ".txt":
        data = "\n\n".join(v if isinstance(v, str) else json.dumps(v) for v in body).encode()
    else:
        data = jsonl(body)
    if kind == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif kind == "spliced":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=12)) + b"\n" + data[at:]
    if suffix.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
        if kind == "cut":
            data = data[:draw(st.integers(0, len(data)))]  # a truncated download
    return "data" + suffix, data


def check(read, name: str, data: bytes) -> None:
    """``read(path)`` loads the file, or raises DataError naming it; nothing else escapes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            read(str(path))
        except DataError as e:
            assert str(path) in str(e), e


DEEP = int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "0"))  # e.g. 2000: a long, randomized hunt; default: 60 fixed
FUZZ = settings(max_examples=DEEP or 60, deadline=None, database=None, derandomize=not DEEP,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(files(suffixes=(".txt", ".jsonl", ".json", ".jsonl.gz", ".txt.gz", ".parquet")))
def test_pretrain_documents(file):
    check(lambda p: [len(doc) for doc in read_documents(p)], *file)


@FUZZ
@given(files())
def test_sft_messages_and_prompt_completion_rows(file):
    check(lambda p: list(read_sft_rows(p)), *file)


@FUZZ
@given(files())
def test_preference_pairs(file):
    check(read_pairs, *file)


@FUZZ
@given(files())
def test_unpaired_kto_rows(file):
    check(read_unpaired, *file)


@FUZZ
@given(files())
def test_rl_prompts(file):
    check(read_rl_prompts, *file)


@FUZZ
@given(files())
def test_stepwise_prm_rows(file):
    check(read_stepwise, *file)


@FUZZ
@given(files())
def test_prompt_files_for_generate_and_think(file):
    check(read_prompt_rows, *file)

