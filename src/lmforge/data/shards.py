"""Token shards on disk and packed fixed-length batches from them.

Documents become ``[bos] + tokens`` and are concatenated into flat uint16 (vocab <= 65,536) or uint32 files,
split train/val by document. Training reads them through numpy memmaps as one token stream cut into chunks of
``seq_len + 1`` tokens (inputs and next-token targets); the chunk order is a seeded permutation per epoch, and the
(epoch, index) position is the loader's state, saved in every checkpoint so a resumed run sees exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SHARD_TOKENS = 100_000_000


def fingerprint(docs: list[str], tokenizer, **settings) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokenizer.tok.to_str().encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for doc in docs:
        h.update(doc.encode())
        h.update(b"\x00")
    return h.hexdigest()


def build_shards(docs: list[str], tokenizer, out_dir: str | Path, val_fraction: float = 0.05, seed: int = 0,
                 shard_tokens: int = SHARD_TOKENS, filter_stats: dict | None = None, source: str = "") -> dict:
    """Tokenize documents into train/val shards; skipped when a complete build of the same inputs exists."""
    out_dir = Path(out_dir)
    docs = list(docs)
    fp = fingerprint(docs, tokenizer, val_fraction=val_fraction, seed=seed)
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp:
            return meta
    if not docs:
        raise ValueError(f"{source or 'corpus'}: no documents left after filtering {dict(filter_stats or {})}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.bin")) + [meta_path]:  # a different build: start clean
        old.unlink(missing_ok=True)

    is_val = np.random.default_rng(seed).random(len(docs)) < val_fraction
    if len(docs) >= 2 and val_fraction > 0:  # both splits must exist
        is_val[0] = False
        is_val[-1] |= not is_val.any()
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    writers = {"train": _ShardWriter(out_dir, "train", dtype, shard_tokens),
               "val": _ShardWriter(out_dir, "val", dtype, shard_tokens)}
    for start in range(0, len(docs), 1024):
        batch = docs[start:start + 1024]
        for i, ids in enumerate(tokenizer.encode_batch(batch, add_bos=True)):
            writers["val" if is_val[start + i] else "train"].add(ids)
    meta = {
        "source": source,
        "fingerprint": fp,
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "n_docs": len(docs),
        "val_docs": int(is_val.sum()),
        "filter_stats": dict(filter_stats or {}),
    }
    for split, writer in writers.items():
        meta[f"{split}_tokens"] = writer.close()
        meta[f"{split}_shards"] = writer.files
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)  # meta.json appears last: its presence means the build is complete
    return meta


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.total = 0
        self.files: list[str] = []

    def add(self, ids: list[int]) -> None:
        self.buffer.append(np.asarray(ids, dtype=self.dtype))
        self.buffered += len(ids)
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        name = f"{self.split}_{len(self.files):03d}.bin"
        tmp = self.out_dir / (name + ".tmp")
        np.concatenate(self.buffer).tofile(tmp)
        os.replace(tmp, self.out_dir / name)
        self.files.append(name)
        self.total += self.buffered
        self.buffer, self.buffered = [], 0

    def close(self) -> int:
        self.flush()
        return self.total


class TokenDataset:
    """A split's shards as one read-only token stream (numpy memmaps; nothing is loaded up front)."""

    def __init__(self, directory: str | Path, split: str):
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: no meta.json; build the shards first")
        meta = json.loads(meta_path.read_text())
        self.vocab_size = meta["vocab_size"]
        self.shards = [np.memmap(directory / name, dtype=meta["dtype"], mode="r") for name in meta[f"{split}_shards"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries if needed."""
        pieces, pos, end = [], start, start + length
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while pos < end:
            shard = self.shards[i]
            lo = pos - int(self.offsets[i])
            take = min(end - pos, len(shard) - lo)
            pieces.append(shard[lo:lo + take])
            pos += take
            i += 1
        return np.concatenate(pieces).astype(np.int64)

    def tokens(self) -> np.ndarray:
        return self.read(0, len(self)) if len(self) else np.zeros(0, dtype=np.int64)


class PackedBatches:
    """Infinite iterator of (inputs, targets), each (batch_size // world_size, seq_len) int64.

    batch_size is the global number of rows in one micro-step; rank r takes its contiguous slice, so a
    2-process run sees exactly the rows of a 1-process run.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.n_chunks = (len(dataset) - 1) // seq_len
        if self.n_chunks < batch_size:
            raise ValueError(f"{len(dataset):,} tokens make only {self.n_chunks} sequences of {seq_len + 1} tokens, "
                             f"fewer than one batch of {batch_size}; use more data or a smaller batch/seq_len")
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_chunks)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_chunks)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if (self.index + 1) * self.batch_size > self.n_chunks:  # drop the ragged tail, start the next epoch
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        rows_per_rank = self.batch_size // self.world_size
        first = self.index * self.batch_size + self.rank * rows_per_rank
        chunks = self._order[first:first + rows_per_rank]
        self.index += 1
        data = np.stack([self.dataset.read(int(c) * self.seq_len, self.seq_len + 1) for c in chunks])
        data = torch.from_numpy(data)
        return data[:, :-1], data[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


def iter_eval(dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int = 0, rank: int = 0,
              world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic sequential batches over a split (the same every eval); max_batches=0 means all."""
    n_chunks = (len(dataset) - 1) // seq_len
    if n_chunks == 0:
        raise ValueError(f"the validation split has {len(dataset)} tokens, fewer than one sequence of {seq_len + 1}")
    rows = max(1, batch_size // world_size)
    n_batches = max(1, n_chunks // (rows * world_size))
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        first = (b * world_size + rank) * rows
        chunks = [c % n_chunks for c in range(first, first + rows)]
        data = torch.from_numpy(np.stack([dataset.read(c * seq_len, seq_len + 1) for c in chunks]))
        yield data[:, :-1], data[:, 1:]


def unigram_baseline_loss(train: TokenDataset, val: TokenDataset, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of val under add-one-smoothed train token frequencies: what a model that
    ignores context entirely achieves. A language model has learned something only below this line."""
    counts = np.bincount(train.tokens(), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val.tokens()].mean())
