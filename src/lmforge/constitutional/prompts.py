"""Prompt files for constitutional AI, read as PROMPTS ONLY: no completion from any of them is ever kept.

Each prompt becomes ``{"id", "messages", "source"[, "label"]}``; ``messages`` ends with a user turn. Readers:

- ``.jsonl`` / ``.jsonl.gz`` rows with ``"prompt"`` (a string, or a list of messages) or ``"messages"``
  (trailing assistant turns are dropped), or Anthropic HH-RLHF rows (``"chosen"`` dialogues
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``): only the FIRST human turn is kept, since later turns quote the
  dialogue's possibly harmful assistant replies;
- ``.csv`` with a ``goal`` column (AdvBench harmful_behaviors.csv) or a ``prompt`` column (XSTest; its
  ``label`` column, ``safe`` or ``unsafe``, is kept so evaluation can take the safe or the unsafe half);
- ``builtin:NAME``: small prompt sets written for lmforge, shipped in lmforge/assets/constitutional/
  (``red_team``, ``borderline_safe``, ``helpful``).

``id`` is a hash of the messages, so runs can be resumed and prompts deduplicated across files.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from importlib import resources
from pathlib import Path

from lmforge.data.chat import check_messages
from lmforge.data.rows import read_rows
from lmforge.errors import DataError


def builtin_prompts() -> list[str]:
    folder = resources.files("lmforge") / "assets" / "constitutional"
    return sorted(f.name.removesuffix(".jsonl") for f in folder.iterdir() if f.name.endswith(".jsonl"))


def resolve(spec: str) -> Path:
    if spec.startswith("builtin:"):
        path = resources.files("lmforge") / "assets" / "constitutional" / f"{spec.removeprefix('builtin:')}.jsonl"
        if not path.is_file():
            raise DataError(f"{spec}: no such built-in prompt set (built-in: {', '.join(builtin_prompts())})")
        return Path(str(path))
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: no such file")
    return path


def prompt_id(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def read_prompts(specs: list[str] | str, limit: int = 0, label: str | None = None) -> list[dict]:
    """Prompts from every file in order, deduplicated; ``limit`` caps each file; ``label`` keeps only rows
    with that label (``safe``/``unsafe``) among files that have labels."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise DataError("no prompt files given (prompts=[FILE, ...] or prompts=builtin:red_team)")
    out, seen = [], set()
    for spec in specs:
        rows = [r for r in _read_file(resolve(spec)) if label is None or r.get("label") in (None, label)]
        for row in rows[:limit] if limit else rows:
            if row["id"] not in seen:
                seen.add(row["id"])
                out.append(row)
    return out


def _read_file(path: Path) -> list[dict]:
    name = path.name.removesuffix(".gz")
    if name.endswith(".csv"):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            return _read_csv(f.read(), path)
    if name.endswith((".jsonl", ".json")):
        return [_row(_messages(r, where), where, r.get("label")) for r, where in read_rows(str(path))]
    raise DataError(f"{path}: prompts must be .jsonl, .jsonl.gz or .csv")


def _row(messages: list[dict], where: str, label=None) -> dict:
    row = {"id": prompt_id(messages), "messages": messages, "source": where}
    return row | ({"label": label} if label else {})


def _read_csv(text: str, path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    column = next((c for c in ("goal", "prompt") if c in (reader.fieldnames or [])), None)
    if column is None:
        raise DataError(f"{path}:1: a prompts CSV needs a 'goal' (AdvBench) or 'prompt' (XSTest) column, "
                        f"found {', '.join(reader.fieldnames or [])}")
    rows = []
    for lineno, r in enumerate(reader, 2):
        if not (r.get(column) or "").strip():
            raise DataError(f"{path}:{lineno}: field {column!r} is empty")
        rows.append(_row([{"role": "user", "content": r[column].strip()}], f"{path}:{lineno}", r.get("label")))
    return rows


def _messages(r: dict, where: str) -> list[dict]:
    if isinstance(r.get("chosen"), str) and "Human:" in r["chosen"]:
        return [{"role": "user", "content": first_human_turn(r["chosen"], where)}]
    value = r.get("messages", r.get("prompt"))
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return [{"role": "user", "content": value}]
    field = "messages" if "messages" in r else "prompt"
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: a row needs 'prompt' (string or messages), 'messages', or an HH-RLHF "
                        f"'chosen' dialogue (fields: {', '.join(r) or 'none'})")

    messages = [{"role": m["role"], "content": m["content"]}
                for m in check_messages(value, where, field, need_assistant=False)]
    while messages and messages[-1]["role"] == "assistant":  # a prompt ends with the user's turn
        messages.pop()
    if not messages:
        raise DataError(f"{where}: field '{field}' has no user turn")
    return messages


def first_human_turn(dialogue: str, where: str) -> str:
    """'\\n\\nHuman: q\\n\\nAssistant: a ...' -> 'q'."""
    start = dialogue.find("Human:")
    end = dialogue.find("\n\nAssistant:", start)
    turn = dialogue[start + len("Human:"):end if end >= 0 else None].strip()
    if not turn:
        raise DataError(f"{where}: field 'chosen' has an empty first Human turn")
    return turn
