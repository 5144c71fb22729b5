"""An on-disk answer cache: a crashed or interrupted run resumes without asking a backend anything twice.

The cache is a JSON Lines file, one ``{"key", "value"}`` per answered request, appended and flushed as each
answer arrives. The key is the SHA-256 of the request (backend name, method, messages, parameters) in
canonical JSON, so the same question to the same backend is answered from disk. A line cut short by a crash
is ignored (that request is simply asked again).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from lmforge.constitutional.judges import ChatParams, Choice, Messages


def request_key(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class AnswerCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.answers: dict[str, object] = {}
        if self.path.exists():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self.answers[row["key"]] = row["value"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a crash: ask again
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def __len__(self) -> int:
        return len(self.answers)

    def get(self, key: str):
        return self.answers.get(key)

    def put(self, key: str, value) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
            if self._file.tell() and not self.path.read_bytes().endswith(b"\n"):
                self._file.write("\n")  # end a line a crash cut short, so the next one stands alone
        self.answers[key] = value
        self._file.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Cached:
    """A backend whose answers are kept in an AnswerCache; ``asked`` counts the requests that reached it."""

    def __init__(self, backend, cache: AnswerCache):
        self.backend, self.cache, self.name, self.asked = backend, cache, backend.name, 0

    def _run(self, method: str, conversations: list[Messages], extra: dict, call, decode) -> Iterator:
        keys = [request_key({"backend": self.name, "method": method, "messages": m, **extra})
                for m in conversations]
        missing = []
        for i, key in enumerate(keys):
            if (hit := self.cache.get(key)) is not None:
                yield i, decode(hit)
            else:
                missing.append(i)
        if not missing:
            return
        self.asked += len(missing)
        for j, value in call([conversations[i] for i in missing]):
            i = missing[j]
            encoded = value.to_json() if isinstance(value, Choice) else value
            self.cache.put(keys[i], encoded)
            yield i, value

    def chat(self, conversations: list[Messages], params: ChatParams) -> Iterator[tuple[int, list[str]]]:
        extra = {"params": vars(params)}
        yield from self._run("chat", conversations, extra, lambda convs: self.backend.chat(convs, params), list)

    def choose(self, conversations: list[Messages], labels: tuple[str, str]) -> Iterator[tuple[int, Choice]]:
        yield from self._run("choose", conversations, {"labels": list(labels)},
                             lambda convs: self.backend.choose(convs, labels), Choice.from_json)


def collect(results: Iterator[tuple[int, object]], n: int) -> list:
    """Results yielded as (index, value) in any order -> a list in index order."""
    out = [None] * n
    for i, value in results:
        out[i] = value
    return out
