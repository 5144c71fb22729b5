"""Raw text in, clean documents out: reading, cleaning, quality filters and exact dedup.

Sources: a .txt (documents split on blank lines), .jsonl / .parquet (a text field), a directory or glob of those
(.gz too), ``builtin:NAME`` for text that ships inside lmforge, and ``hf:NAME[:CONFIG][@SPLIT]`` for Hugging
Face datasets. A bad record is one error naming the file, the line and the field; a dropped document is counted
under its reason, never silently lost.
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


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


def builtin_path(name: str) -> Path:
    path = resources.files("lmforge") / "assets" / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".txt") for p in (resources.files("lmforge") / "assets").iterdir()
                       if p.name.endswith(".txt"))
        raise DataError(f"builtin:{name}: no such built-in corpus (built-in: {', '.join(known)})")
    return Path(str(path))


def read_documents(spec: str, text_field: str = "text", split_txt_on_blank_lines: bool = True) -> Iterator[str]:
    """Yield raw documents from a file, directory, glob, ``builtin:NAME`` or ``hf:NAME[:CONFIG][@SPLIT]``."""
    if spec.startswith("builtin:"):
        yield from _read_file(builtin_path(spec.removeprefix("builtin:")), text_field, split_txt_on_blank_lines)
        return
    if spec.startswith("hf:"):
        yield from _read_hf(spec.removeprefix("hf:"), text_field)
        return
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
    elif path.exists():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec))
    if not files:
        raise DataError(f"{spec}: no such file, directory or glob match")
    for f in files:
        yield from _read_file(f, text_field, split_txt_on_blank_lines)


def _kind(path: Path) -> str | None:
    name = path.name.removesuffix(".gz")
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _read_file(path: Path, text_field: str, split_blank: bool) -> Iterator[str]:
    kind = _kind(path)
    if kind == "text":
        with _open_text(path) as f:
            text = f.read()
        yield from (re.split(r"\n\s*\n", text) if split_blank else [text])
    elif kind == "jsonl":
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield field_of(parse_json_line(line, path, lineno), text_field, path, lineno)
    elif kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
        for row, value in enumerate(table.column(text_field).to_pylist(), 1):
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: field {text_field!r} must be a string, got {value!r:.40}")
            yield value
    else:
        raise DataError(f"{path}: unsupported file type (use .txt, .md, .jsonl, .json, .parquet, optionally .gz)")


def parse_json_line(line: str, path, lineno: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def field_of(row: dict, name: str, path, lineno: int, kind: type = str):
    if name not in row:
        raise DataError(f"{path}:{lineno}: field {name!r} missing (fields: {', '.join(row) or 'none'})")
    value = row[name]
    if not isinstance(value, kind):
        raise DataError(f"{path}:{lineno}: field {name!r} must be a {kind.__name__}, got {value!r:.40}")
    return value


def _read_hf(spec: str, text_field: str) -> Iterator[str]:
    """``NAME[:CONFIG][@SPLIT]`` through `datasets` (streaming, so large corpora need no full download)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hf:{spec}: Hugging Face datasets need `pip install datasets`") from e
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    for i, row in enumerate(ds, 1):
        yield field_of(row, text_field, f"hf:{spec}", i)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """NFC-normalise, drop control characters, unify newlines, trim trailing spaces and blank-line runs."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@dataclass
class FilterConfig:
    min_chars: int = 1
    max_chars: int = 1_000_000
    min_alpha_ratio: float = 0.0  # share of letters among non-space characters
    max_duplicate_line_fraction: float = 1.0  # boilerplate/spam: share of lines that repeat within a document
    dedup: bool = True  # exact duplicates after cleaning

    def validate(self) -> None:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")


def filter_documents(docs: Iterable[str], cfg: FilterConfig) -> tuple[list[str], Counter]:
    """Clean every document and keep the ones that pass; stats count 'kept' and each drop reason."""
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
    if not doc:
        return "empty"
    if len(doc) < cfg.min_chars:
        return "too_short"
    if len(doc) > cfg.max_chars:
        return "too_long"
    if cfg.min_alpha_ratio > 0:
        visible = [c for c in doc if not c.isspace()]
        if visible and sum(c.isalpha() for c in visible) / len(visible) < cfg.min_alpha_ratio:
            return "low_alpha"
    if cfg.max_duplicate_line_fraction < 1.0:
        lines = [line for line in doc.split("\n") if line.strip()]
        if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > cfg.max_duplicate_line_fraction:
            return "repetitive"
    return None
