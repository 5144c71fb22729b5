"""Rows of any source as (row dict, where): the one reader behind chat, preference, prompt and benchmark data.

    read_rows(spec)     a jsonl / json / parquet file, directory or glob, ``hf:NAME[:CONFIG][@SPLIT]``,
                        ``builtin:NAME`` (lmforge/assets/NAME.jsonl) or ``builtin:tinyworld/NAME`` (generated)
    json_rows(path)     JSON Lines (streamed) or a .json array of objects, gzipped or not
    parquet_rows(path)  row groups streamed through pyarrow

``where`` is "file:line" (or "file: record N" / "file: row N") so that a bad field is an error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from lmforge.data.sources import (
    GENERATED,
    decode,
    file_kind,
    generated_rows,
    hf_rows,
    open_binary,
    parse_json_line,
    source_files,
)
from lmforge.errors import DataError


def read_rows(spec: str) -> Iterator[tuple[dict, str]]:
    """Every record of a jsonl / json / parquet file, directory, glob, ``hf:`` or ``builtin:`` spec, as
    (row dict, where) with ``where`` = "file:line" (or "file: row N") for error messages."""
    if spec.startswith("hf:"):
        yield from hf_rows(spec.removeprefix("hf:"))
        return
    if spec.startswith(GENERATED):  # generated in code by data/tinyworld.py
        for i, row in enumerate(generated_rows(spec), 1):
            yield row, f"{spec}: row {i}"
        return
    if spec.startswith("builtin:"):
        files = [builtin_rows_path(spec.removeprefix("builtin:"))]
    else:
        files = source_files(spec)
        if not files:
            raise DataError(f"{spec}: no such file, directory or glob match")
    for path in files:
        kind = file_kind(path)
        if kind == "json":
            yield from json_rows(path)
        elif kind == "parquet":
            yield from parquet_rows(path)
        else:
            raise DataError(f"{path}: chat data must be .jsonl, .json or .parquet (rows with 'messages' or "
                            "'prompt'/'completion' fields)")


def builtin_rows_path(name: str) -> Path:
    """``builtin:NAME`` -> lmforge/assets/NAME.jsonl (chat and preference data that ships with lmforge)."""
    assets = resources.files("lmforge") / "assets"
    path = assets / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".jsonl") for p in assets.iterdir() if p.name.endswith(".jsonl"))
        raise DataError(f"builtin:{name}: no such built-in dataset (built-in: {', '.join(known) or 'none'})")
    return Path(str(path))


def json_rows(path: Path) -> Iterator[tuple[dict, str]]:
    """(row, where) of a JSON Lines file, streamed line by line, or of a .json file holding one array of objects."""
    if path.name.lower().removesuffix(".gz").endswith(".json"):
        with open_binary(path) as f:
            data = f.read()
        if data.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"[":
            try:
                rows = json.loads(decode(data, path).removeprefix("\ufeff"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            for i, row in enumerate(rows, 1):
                if not isinstance(row, dict):
                    raise DataError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
                yield row, f"{path}: record {i}"
            return
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                line = decode(raw, path, lineno).removeprefix("\ufeff")
                yield parse_json_line(line, path, lineno), f"{path}:{lineno}"


def parquet_rows(path: Path) -> Iterator[tuple[dict, str]]:
    """(row, "file: row N") of a parquet file, a row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield row, f"{path}: row {n}"
