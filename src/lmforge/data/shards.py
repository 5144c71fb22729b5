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
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from lmforge.atomic import atomic_open, write_atomic
from lmforge.errors import DataError

SHARD_TOKENS = 100_000_000  # ~200 MB of uint16 per shard file
_READ_TOKENS = 1 << 24  # tokens per block when a whole split is scanned (unigram counts)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the vocabulary, merges or special tokens change (the shards would be stale)."""
    h = hashlib.blake2b(tokenizer.tok.to_str().encode(), digest_size=16)
    h.update(f"{tokenizer.doc_start_id}".encode())
    return h.hexdigest()


def fingerprint(docs: list[str], tokenizer, **settings) -> str:
    """One hash of everything a build depends on: the documents, the tokenizer and the split settings."""
    h = hashlib.blake2b(digest_size=16)
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for doc in docs:
        h.update(doc.encode())
        h.update(b"\x00")
    return h.hexdigest()


def is_val_doc(doc: str, val_fraction: float, seed: int = 0) -> bool:
    """A document's split depends only on its text and the seed, not on its position in the corpus."""
    return _unit_hash(doc, seed) < val_fraction


def _unit_hash(doc: str, seed: int) -> float:
    digest = hashlib.blake2b(doc.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") / 2**64


def build_shards(docs: Iterable[str], tokenizer, out_dir: str | Path, val_fraction: float = 0.05, seed: int = 0,
                 shard_tokens: int = SHARD_TOKENS, filter_stats: dict | None = None, source: str = "") -> dict:
    """Tokenize documents into train/val shards and return meta.json's contents.

    Skipped (the existing meta is returned) when a complete build of the same documents, tokenizer and
    settings is already in ``out_dir``. Shards are written to ``*.tmp`` and renamed; meta.json is written
    last, so a killed build never looks finished. With two or more documents both splits are non-empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    docs = list(docs)
    fp = fingerprint(docs, tokenizer, val_fraction=val_fraction, seed=seed)
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("fingerprint") == fp:
            return meta
    if not docs:
        raise DataError(f"{source or 'corpus'}: no documents left after filtering {dict(filter_stats or {})}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("*.bin"), *out_dir.glob("*.tmp"), meta_path]:  # a different build: start clean
        old.unlink(missing_ok=True)

    is_val = [is_val_doc(d, val_fraction, seed) for d in docs] if val_fraction > 0 else [False] * len(docs)
    if len(docs) >= 2 and val_fraction > 0 and (all(is_val) or not any(is_val)):
        # both splits must exist: move the document nearest the threshold across it
        nearest = min(range(len(docs)), key=lambda i: abs(_unit_hash(docs[i], seed) - val_fraction))
        is_val[nearest] = not is_val[nearest]

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
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "bos_id": tokenizer.doc_start_id,
        "val_fraction": val_fraction,
        "seed": seed,
        "n_docs": len(docs),
        "train_docs": len(docs) - sum(is_val),
        "val_docs": sum(is_val),
        "filter_stats": dict(filter_stats or {}),
    }
    for split, writer in writers.items():
        meta[f"{split}_tokens"] = writer.close()
        meta[f"{split}_shards"] = writer.files
    write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")  # last: its presence means the build is complete
    return meta


class StreamingShards:
    """Token shards written as documents stream in, for corpora that do not fit in memory (``lmforge data``).

    ``add(docs)`` tokenizes a batch (the tokenizers library runs it on all cores) and routes each document to
    train or val by its hash (is_val_doc), returning the token counts; ``close()`` writes meta.json last, as
    build_shards does, so a killed build never looks finished. Unlike build_shards it cannot move a document
    across the split afterwards: a tiny corpus may end with an empty val split (meta.json says so).
    """

    def __init__(self, tokenizer, out_dir: str | Path, val_fraction: float = 0.05, seed: int = 0,
                 shard_tokens: int = SHARD_TOKENS):
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokenizer, self.out_dir, self.val_fraction, self.seed = tokenizer, Path(out_dir), val_fraction, seed
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for old in [*self.out_dir.glob("*.bin"), *self.out_dir.glob("*.tmp"), self.out_dir / "meta.json"]:
            old.unlink(missing_ok=True)
        self.dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        self.writers = {split: _ShardWriter(self.out_dir, split, self.dtype, shard_tokens) for split in ("train", "val")}
        self.docs = {"train": 0, "val": 0}

    def add(self, docs: list[str]) -> list[int]:
        lengths = []
        for doc, ids in zip(docs, self.tokenizer.encode_batch(docs, add_bos=True)):
            split = "val" if self.val_fraction > 0 and is_val_doc(doc, self.val_fraction, self.seed) else "train"
            self.writers[split].add(ids)
            self.docs[split] += 1
            lengths.append(len(ids))
        return lengths

    def close(self, source: str = "", fingerprint: str = "", filter_stats: dict | None = None) -> dict:
        meta = {"source": source, "fingerprint": fingerprint,
                "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
                "vocab_size": self.tokenizer.vocab_size, "dtype": np.dtype(self.dtype).name,
                "bos_id": self.tokenizer.doc_start_id, "val_fraction": self.val_fraction, "seed": self.seed,
                "n_docs": sum(self.docs.values()), "train_docs": self.docs["train"], "val_docs": self.docs["val"],
                "filter_stats": dict(filter_stats or {})}
        for split, writer in self.writers.items():
            meta[f"{split}_tokens"] = writer.close()
            meta[f"{split}_shards"] = writer.files
        write_atomic(self.out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: the build is complete
        return meta


class _ShardWriter:
    """Buffers a split's documents and writes a shard file each time ``shard_tokens`` have gathered."""

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
        with atomic_open(self.out_dir / name, "wb") as f:
            np.concatenate(self.buffer).tofile(f)
        self.files.append(name)
        self.total += self.buffered
        self.buffer, self.buffered = [], 0

    def close(self) -> int:
        self.flush()
        return self.total


class TokenDataset:
    """A split's shards as one read-only token stream (numpy memmaps; nothing is loaded up front).

    ``len(ds)`` tokens; ``ds[i]`` is one token, ``ds[a:b]`` an int64 array, across shard boundaries.
    """

    def __init__(self, directory: str | Path, split: str):
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: no meta.json; build the shards first")
        meta = json.loads(meta_path.read_text())
        if f"{split}_shards" not in meta:
            raise ValueError(f"{meta_path}: no split {split!r} "
                           f"(splits: {', '.join(k.removesuffix('_shards') for k in meta if k.endswith('_shards'))})")
        self.split, self.vocab_size, self.dtype = split, meta["vocab_size"], np.dtype(meta["dtype"])
        self.shards = []
        for name in meta[f"{split}_shards"]:
            path = directory / name
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard listed in {meta_path} is missing; rebuild the shards")
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        expected = meta.get(f"{split}_tokens")
        if expected is not None and expected != len(self):
            raise ValueError(f"{meta_path}: {split} shards hold {len(self):,} tokens, meta.json says {expected:,} "
                             "(a shard was changed or truncated); rebuild the shards")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | slice) -> int | np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("TokenDataset slices must have step 1")
            return self.read(start, max(stop - start, 0))
        i = key + len(self) if key < 0 else key
        if not 0 <= i < len(self):
            raise IndexError(f"token {key} out of range for {len(self):,} tokens")
        return int(self.read(i, 1)[0])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries if needed."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) out of range for {len(self):,} tokens")
        pieces, pos, end = [np.zeros(0, dtype=self.dtype)], start, start + length
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while pos < end:
            shard = self.shards[i]
            lo = pos - int(self.offsets[i])
            take = min(end - pos, len(shard) - lo)
            pieces.append(shard[lo:lo + take])
            pos += take
            i += 1
        return np.concatenate(pieces).astype(np.int64)

    def blocks(self, size: int = _READ_TOKENS) -> Iterator[np.ndarray]:
        """The whole split in int64 blocks of at most ``size`` tokens (bounded memory for big corpora)."""
        for start in range(0, len(self), size):
            yield self.read(start, min(size, len(self) - start))

    def tokens(self) -> np.ndarray:
        """The whole split as one int64 array (small splits only)."""
        return self.read(0, len(self))


class PackedBatches:
    """Infinite iterator of (inputs, targets), each (batch_size // world_size, seq_len) int64.

    The stream is cut into ``n_chunks`` non-overlapping chunks of seq_len + 1 tokens at stride seq_len (a chunk's
    last token is the next chunk's first: every token is a target exactly once per epoch). Each epoch visits
    the chunks in the order of a permutation seeded by (seed, epoch), in global batches of ``batch_size`` rows;
    a ragged tail smaller than a batch is skipped. Rank r takes rows [r * b, (r + 1) * b) of every global batch
    (b = batch_size // world_size), so an N-process run sees exactly the rows of a 1-process run, and the
    state (epoch, index of the next global batch) means the same thing whatever the number of processes.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n_chunks = max(len(dataset) - 1, 0) // seq_len
        if self.n_chunks < batch_size:
            raise ValueError(f"{len(dataset):,} tokens make only {self.n_chunks} sequences of {seq_len + 1} tokens, "
                             f"fewer than one batch of {batch_size}; use more data or a smaller batch/seq_len")
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    @property
    def batches_per_epoch(self) -> int:
        return self.n_chunks // self.batch_size

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_chunks)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_chunks)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= self.batches_per_epoch:  # drop the ragged tail, start the next epoch
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        rows_per_rank = self.batch_size // self.world_size
        first = self.index * self.batch_size + self.rank * rows_per_rank
        chunks = self._order[first:first + rows_per_rank]
        self.index += 1
        return _rows(self.dataset, chunks, self.seq_len)

    def state_dict(self) -> dict:
        """Where the stream stands: the epoch and the index of the next global batch in it (JSON-safe)."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


def _rows(dataset: TokenDataset, chunks: Iterable[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.from_numpy(np.stack([dataset.read(int(c) * seq_len, seq_len + 1) for c in chunks]))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def iter_eval(dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int = 0, rank: int = 0,
              world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic sequential batches over a split (the same every eval); max_batches=0 means all.

    ``batch_size`` is global, as in PackedBatches; every rank yields the same number of batches. A split
    smaller than one global batch repeats its chunks to fill it.
    """
    n_chunks = max(len(dataset) - 1, 0) // seq_len
    if n_chunks == 0:
        raise ValueError(f"the {dataset.split} split has {len(dataset)} tokens, fewer than one sequence of "
                         f"{seq_len + 1}; use more data, a larger val_fraction or a smaller seq_len")
    rows = max(1, batch_size // world_size)
    n_batches = max(1, n_chunks // (rows * world_size))
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        first = (b * world_size + rank) * rows
        yield _rows(dataset, [c % n_chunks for c in range(first, first + rows)], seq_len)


def unigram_baseline_loss(train: TokenDataset, val: TokenDataset, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of val under add-one-smoothed train token frequencies: what a model that
    ignores context entirely achieves. A language model has learned something only below this line.

    p(t) = (count_train(t) + 1) / (n_train + vocab_size);  loss = -mean over val tokens of log p(t).
    """
    if len(val) == 0:
        raise ValueError("the val split is empty: no unigram baseline")
    counts = np.ones(vocab_size, dtype=np.float64)
    for block in train.blocks():
        counts += np.bincount(_checked(block, vocab_size, train.split), minlength=vocab_size)
    logp = np.log(counts / counts.sum())
    total = sum(float(logp[_checked(block, vocab_size, val.split)].sum()) for block in val.blocks())
    return -total / len(val)


def _checked(tokens: np.ndarray, vocab_size: int, split: str) -> np.ndarray:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"the {split} split holds token id {int(tokens.max())}, outside a vocabulary of {vocab_size}")
    return tokens
