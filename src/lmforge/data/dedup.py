"""Near-duplicate removal with MinHash LSH (Broder 1997; as in GPT-3, The Pile, RefinedWeb and FineWeb).

A document is the set of its word n-grams (lower-cased, punctuation dropped; 5-grams by default, as FineWeb).
MinHash (datasketch) estimates the Jaccard similarity of two such sets from ``num_perm`` hashes; LSH bands those
hashes so that only pairs likely to be above ``threshold`` are compared. A candidate counts as a near duplicate
when its estimated Jaccard similarity with an earlier kept document reaches ``threshold``; LSH's bands are
chosen for recall (its false positives are removed by that check); the first copy is kept. Signatures can be computed anywhere (worker processes:
:func:`signature`), the index lives in one process (:class:`NearDuplicateIndex`), so the result does not depend
on the number of workers. Memory: about ``num_perm * 4`` bytes per kept document plus the LSH tables; beyond one
machine's memory, see the README (datatrove's disk-based MinHash stages).
"""

from __future__ import annotations

import numpy as np

from lmforge.data.quality import normalized_words

SCHEME = "affine32"  # datasketch >= 2: 32-bit hash values, so a signature is num_perm uint32s


def _datasketch():
    try:
        import datasketch
    except ImportError:
        raise ImportError("data.filters.near_dedup needs datasketch: pip install datasketch") from None
    return datasketch


def shingles(text: str, ngram: int = 5) -> list[bytes]:
    """The document's word n-grams as bytes (one shingle of all its words when it has fewer than ``ngram``)."""
    words = normalized_words(text)
    if len(words) < ngram:
        return [" ".join(words).encode()] if words else []
    return list({" ".join(words[i:i + ngram]).encode() for i in range(len(words) - ngram + 1)})


def signature(text: str, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> np.ndarray | None:
    """The MinHash signature (uint32[num_perm]) of a document; None when it has no words."""
    grams = shingles(text, ngram)
    if not grams:
        return None
    m = _datasketch().MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME)
    m.update_batch(grams)
    return m.hashvalues.astype(np.uint32)  # 32-bit values kept in uint64 by datasketch


class NearDuplicateIndex:
    """Kept documents' signatures in an LSH index; ``is_duplicate(sig)`` checks one and adds it if it is new."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"minhash_threshold must be in (0, 1], got {threshold}")
        ds = _datasketch()
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        # bands tuned for few false negatives (16 bands x 8 rows at 0.8 / 128): every candidate is checked
        # against the threshold below, so the false positives LSH lets through cost time, not precision
        self.lsh = ds.MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
        self.signatures: list[np.ndarray] = []
        self._minhash = ds.MinHash

    def is_duplicate(self, sig: np.ndarray | None) -> bool:
        if sig is None:
            return False
        m = self._minhash(num_perm=self.num_perm, seed=self.seed, hashvalues=sig.astype(np.uint64), scheme=SCHEME)
        for key in self.lsh.query(m):
            if float(np.mean(self.signatures[key] == sig)) >= self.threshold:
                return True
        self.lsh.insert(len(self.signatures), m, check_duplication=False)
        self.signatures.append(sig)
        return False
