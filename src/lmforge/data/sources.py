"""Raw text in, clean documents out: reading, cleaning, quality filters and exact dedup.

Sources: a .txt/.md file (documents split on blank lines), .jsonl / .json / .parquet (a text field), a directory
or glob of those (.gz too), ``builtin:NAME`` for text that ships inside lmforge, and ``hf:NAME[:CONFIG][@SPLIT]``
for Hugging Face datasets. A bad record is one error naming the file, the line and the field; a dropped document
is counted under its reason, never silently lost.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
SUPPORTED = ".txt, .md, .jsonl, .json, .parquet (text and JSON optionally .gz)"


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


def builtin_path(name: str) -> Path:
    """``builtin:tinyshakespeare`` -> the text file packaged in lmforge/assets."""
    assets = resources.files("lmforge") / "assets"
    path = assets / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".txt") for p in assets.iterdir() if p.name.endswith(".txt"))
        raise DataError(f"builtin:{name}: no such built-in corpus (built-in: {', '.join(known)})")
    return Path(str(path))


def read_documents(spec: str, text_field: str = "text", split_txt_on_blank_lines: bool = True) -> Iterator[str]:
    """Yield raw documents from a file, directory, glob, ``builtin:NAME`` or ``hf:NAME[:CONFIG][@SPLIT]``.

    Text files hold one document per blank-line-separated block (or one per file with
    ``split_txt_on_blank_lines=False``); JSON Lines, JSON arrays and parquet hold one per record, in ``text_field``.
    """
    if spec.startswith("builtin:"):
        yield from _read_file(builtin_path(spec.removeprefix("builtin:")), text_field, split_txt_on_blank_lines)
        return
    if spec.startswith("hf:"):
        yield from _read_hf(spec.removeprefix("hf:"), text_field)
        return
    files = source_files(spec)
    if not files:
        if Path(spec).is_dir():
            raise DataError(f"{spec}: directory holds no supported files ({SUPPORTED})")
        raise DataError(f"{spec}: no such file, directory or glob match")
    for f in files:
        yield from _read_file(f, text_field, split_txt_on_blank_lines)


def source_files(spec: str) -> list[Path]:
    """The local files a spec reads, in reading order ([] for ``hf:`` specs)."""
    if spec.startswith("builtin:"):
        return [builtin_path(spec.removeprefix("builtin:"))]
    if spec.startswith("hf:"):
        return []
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if path.exists():
        return [path]
    return sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())


def source_signature(spec: str) -> str:
    """A cheap hash of a spec and its files' names, sizes and modification times: changes when the data does
    (for ``hf:`` specs, only when the spec does). Lets a stage skip work whose inputs are unchanged."""
    h = hashlib.blake2b(spec.encode(), digest_size=16)
    for f in source_files(spec):
        st = f.stat()
        h.update(f"\0{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_bytes(path: Path) -> bytes:
    with _open_binary(path) as f:
        return f.read()


def _decode(data: bytes, path, lineno: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno if lineno is not None else data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {data[e.start:e.start + 1]!r})") from None


def _read_file(path: Path, text_field: str, split_blank: bool) -> Iterator[str]:
    kind = _kind(path)
    if kind == "text":
        text = _decode(_read_bytes(path), path).removeprefix("\ufeff")
        if not split_blank:
            yield text
            return
        yield from (doc for doc in re.split(r"\n\s*\n", text) if doc.strip())
    elif kind == "json":
        yield from _read_json(path, text_field)
    elif kind == "parquet":
        yield from _read_parquet(path, text_field)
    else:
        raise DataError(f"{path}: unsupported file type (use {SUPPORTED})")


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    """JSON Lines (one object per line), or a .json file holding one array of objects."""
    if path.name.lower().removesuffix(".gz").endswith(".json") and _first_byte(path) == b"[":
        data = _read_bytes(path)
        try:
            rows = json.loads(_decode(data, path).removeprefix("\ufeff"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
            yield field_of(row, text_field, path, f"record {i}")
        return
    with _open_binary(path) as f:  # streamed line by line: JSON Lines files can be larger than memory
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                line = _decode(raw, path, lineno).removeprefix("\ufeff")
                yield field_of(parse_json_line(line, path, lineno), text_field, path, lineno)


def _first_byte(path: Path) -> bytes:
    with _open_binary(path) as f:
        return f.read(4096).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()[:1]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):  # row groups stream; no full load
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: field {text_field!r} must be a string, got {value!r:.40}")
            yield value


def parse_json_line(line: str, path, lineno: int) -> dict:
    """One JSON Lines record; errors name ``file:line``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def field_of(row: dict, name: str, path, lineno: int | str, kind: type = str):
    """``row[name]``, checked: a missing field or a wrong type is an error naming ``file:line`` and the field."""
    where = f"{path}:{lineno}" if isinstance(lineno, int) else f"{path}: {lineno}"
    if name not in row:
        raise DataError(f"{where}: field {name!r} missing (fields: {', '.join(map(str, row)) or 'none'})")
    value = row[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} must be a {kind.__name__}, got {value!r:.40}")
    return value


def _read_hf(spec: str, text_field: str) -> Iterator[str]:
    """``NAME[:CONFIG][@SPLIT]`` through `datasets` (streaming, so large corpora need no full download)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hf:{spec}: Hugging Face datasets need `pip install datasets`") from e
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    if not name:
        raise DataError(f"hf:{spec}: expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:roneneldan/TinyStories@train")
    ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    for i, row in enumerate(ds, 1):
        yield field_of(row, text_field, f"hf:{spec}", f"row {i}")


# C0/C1 control characters except \t and \n (\r, \f, \v and the Unicode separators become newlines first),
# zero-width no-break spaces (byte-order marks pasted mid-text) and lone surrogates.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_NEWLINES = re.compile("\r\n|[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def clean_text(text: str) -> str:
    """NFC-normalise, unify newlines, drop control characters, trim trailing spaces and blank-line runs.

    Spaces inside a line are kept: indentation is meaning in code and poetry.
    """
    text = _NEWLINES.sub("\n", unicodedata.normalize("NFC", text))
    text = _CONTROL.sub("", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@dataclass
class FilterConfig:
    """Heuristic quality filters (all off by default except dropping empty documents and exact duplicates)."""

    min_chars: int = 1
    max_chars: int = 1_000_000
    min_alpha_ratio: float = 0.0  # share of letters among non-space characters (drops tables of numbers, markup)
    max_duplicate_line_fraction: float = 1.0  # share of non-blank lines that repeat an earlier line (spam)
    dedup: bool = True  # exact duplicates after cleaning

    def validate(self) -> None:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        for name in ("min_alpha_ratio", "max_duplicate_line_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")


def filter_documents(docs: Iterable[str], cfg: FilterConfig) -> tuple[list[str], Counter]:
    """Clean every document and keep the ones that pass; stats count 'kept' and each drop reason.

    Reasons: empty, too_short, too_long, low_alpha, repetitive, duplicate (same text after cleaning as an
    earlier kept document; the first copy is kept).
    """
    stats: Counter = Counter()
    seen: set[bytes] = set()
    kept = []
    for raw in docs:
        doc = clean_text(raw)
        reason = drop_reason(doc, cfg)
        if reason is None and cfg.dedup:
            digest = hashlib.blake2b(doc.encode(), digest_size=16).digest()
            reason = "duplicate" if digest in seen else None
            seen.add(digest)
        stats[reason or "kept"] += 1
        if reason is None:
            kept.append(doc)
    return kept, stats


def drop_reason(doc: str, cfg: FilterConfig) -> str | None:
    """Why a cleaned document fails the filters, or None when it passes."""
    if not doc:
        return "empty"
    if len(doc) < cfg.min_chars:
        return "too_short"
    if len(doc) > cfg.max_chars:
        return "too_long"
    if cfg.min_alpha_ratio > 0:
        visible = len(doc) - sum(c.isspace() for c in doc)
        if visible and sum(c.isalpha() for c in doc) / visible < cfg.min_alpha_ratio:
            return "low_alpha"
    if cfg.max_duplicate_line_fraction < 1.0:
        lines = [line for line in doc.split("\n") if line.strip()]
        if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > cfg.max_duplicate_line_fraction:
            return "repetitive"
    return None
