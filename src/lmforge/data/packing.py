"""Tokenized conversations -> padding-free training batches, packed or one example per row.

An example of L tokens (ids, assistant mask) is shifted once into L - 1 next-token pairs: inputs ids[:-1] and
labels ids[1:], with labels -100 wherever the target is not an assistant token. A row holds at most
``seq_len`` pairs. Examples longer than that are cut to ``seq_len`` (``truncation="truncate"``) or left out
(``"drop"``); either way they are counted in :class:`PackingStats`, never lost silently.

Packing puts several examples in one row by best-fit decreasing bin packing (each example, longest first,
goes into the fullest row that still has room). Every row carries ``document_ids``, so the model's attention
never crosses from one example into another and positions restart at 0 in each (see model.build_attention_mask
and positions_from_documents): a packed example's logits are exactly its logits alone. Only a row's tail is
padding (labels -100, a document of its own), and a batch is only as wide as its longest row.

:class:`SFTBatches` serves the rows in a seeded order per epoch with a resumable (epoch, index) state, split
across ranks like data.shards.PackedBatches.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

IGNORE = -100


@dataclass
class PackingStats:
    examples: int = 0  # tokenized examples offered
    kept: int = 0  # examples in the rows (truncated ones included)
    truncated: int = 0  # longer than seq_len and cut to it
    dropped_too_long: int = 0  # longer than seq_len with truncation="drop"
    dropped_no_target: int = 0  # no assistant token left to learn (e.g. truncation cut every one of them)
    rows: int = 0
    tokens: int = 0  # real (non-padding) input tokens in all rows
    target_tokens: int = 0  # tokens with a loss (assistant tokens)
    capacity: int = 0  # rows x seq_len

    @property
    def fill(self) -> float:
        """Share of row capacity holding real tokens (1.0 = no padding at all)."""
        return self.tokens / self.capacity if self.capacity else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "fill": round(self.fill, 4)}


class Examples:
    """Shifted examples in flat arrays: inputs/labels of example i are ``inputs[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self.inputs, self.labels, self.offsets = inputs, labels, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.inputs[a:b], self.labels[a:b]


def prepare_examples(examples: Iterable[tuple[list[int], list[int]]], seq_len: int,
                     truncation: str = "truncate") -> tuple[Examples, PackingStats]:
    """(ids, assistant_mask) pairs -> shifted (inputs, labels) examples of at most ``seq_len`` pairs, + counts."""
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    stats = PackingStats()
    inputs, labels, offsets = [], [], [0]
    for ids, mask in examples:
        stats.examples += 1
        if len(ids) != len(mask):
            raise ValueError(f"example {stats.examples}: {len(ids)} ids but {len(mask)} mask entries")
        ids_a = np.asarray(ids, dtype=np.int64)
        x = ids_a[:-1]
        y = np.where(np.asarray(mask[1:], dtype=bool), ids_a[1:], IGNORE)
        if len(x) > seq_len:
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            x, y = x[:seq_len], y[:seq_len]
            stats.truncated += 1
        if not (y != IGNORE).any():
            stats.dropped_no_target += 1
            continue
        inputs.append(x)
        labels.append(y)
        offsets.append(offsets[-1] + len(x))
        stats.kept += 1
        stats.tokens += len(x)
        stats.target_tokens += int((y != IGNORE).sum())
    cat = (lambda parts: np.concatenate(parts)) if inputs else (lambda parts: np.zeros(0, dtype=np.int64))
    return Examples(cat(inputs), cat(labels), np.asarray(offsets, dtype=np.int64)), stats


def best_fit_pack(lengths: Iterable[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity, by best-fit decreasing.

    Items go longest first into the bin with the least room that still fits them (a new bin if none does).
    Bins are found through a sorted list of the distinct free-space values (at most capacity + 1 of them), so
    packing n items costs O(n log n + n * capacity) in the worst case and far less in practice.
    """
    lengths = list(lengths)
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item is longer than the capacity {capacity}")
    bins: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free-space values that have bins
    by_free: dict[int, list[int]] = {}  # free space -> bin indices with exactly that much room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(free_values, n)
        if k < len(free_values):
            free = free_values[k]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_values.pop(k)
        else:
            b, free = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        left = free - n
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_values, left)
            by_free[left].append(b)
    return bins


def make_rows(examples: Examples, seq_len: int, packing: bool) -> list[list[int]]:
    """Rows of example indices: best-fit packed into ``seq_len``, or one example per row."""
    if not packing:
        return [[i] for i in range(len(examples))]
    return best_fit_pack(examples.lengths().tolist(), seq_len)


def collate(examples: Examples, rows: list[list[int]], pad_id: int = 0, packed: bool = True) -> dict:
    """A batch dict from rows of example indices, as wide as its longest row (the tail padded).

    input_ids, labels (-100 on padding and non-assistant targets), num_tokens (real tokens, a 0-dim tensor),
    and, for packed rows, document_ids (one per example; the padding tail is its own document). Unpacked rows
    need no document ids: right padding never influences the tokens before it under causal attention.
    """
    lengths = [sum(int(examples.offsets[i + 1] - examples.offsets[i]) for i in row) for row in rows]
    width = max(lengths) if lengths else 0
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    docs = np.full((len(rows), width), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for d, i in enumerate(row):
            x, y = examples.get(i)
            ids[r, pos:pos + len(x)] = x
            labels[r, pos:pos + len(x)] = y
            docs[r, pos:pos + len(x)] = d
            pos += len(x)
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
             "num_tokens": torch.tensor(sum(lengths))}
    if packed:
        batch["document_ids"] = torch.from_numpy(docs)
    return batch


class SFTBatches:
    """Infinite iterator of batch dicts over ``rows``, ``batch_size`` rows per global batch.

    Each epoch visits the rows in a permutation seeded by (seed, epoch); a ragged tail smaller than a global
    batch is served too when there are fewer rows than one batch (small datasets), else skipped, as in
    PackedBatches. Rank r takes rows [r * b, (r + 1) * b) of each global batch (b = batch_size // world_size).
    state_dict() = {"epoch", "index"}: where the stream stands, the same for any number of processes.
    """

    def __init__(self, examples: Examples, rows: list[list[int]], batch_size: int, pad_id: int = 0,
                 packed: bool = True, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if not rows:
            raise ValueError("no training rows: every example was dropped (see the packing counts)")
        self.examples, self.rows, self.batch_size, self.pad_id, self.packed = examples, rows, batch_size, pad_id, packed
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.rows) // self.batch_size)

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        per_rank = self.batch_size // self.world_size
        first = self.index * self.batch_size + self.rank * per_rank
        picked = [self._order[(first + k) % len(self.rows)] for k in range(per_rank)]
        self.index += 1
        return collate(self.examples, [self.rows[i] for i in picked], self.pad_id, self.packed)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


def iter_rows(examples: Examples, rows: list[list[int]], batch_size: int, pad_id: int = 0, packed: bool = True,
              max_batches: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Every row once, in order, ``batch_size`` (global) rows per batch (evaluation); max_batches=0 = all.
    Each rank yields its share; a short last batch is served as it is."""
    per_rank = max(1, batch_size // world_size)
    n_batches = -(-len(rows) // (per_rank * world_size))
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        first = (b * world_size + rank) * per_rank
        picked = rows[first:first + per_rank]
        if picked:
            yield collate(examples, picked, pad_id, packed)
