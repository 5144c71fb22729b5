"""Corpus cleaning: documents/s of each filter family, and precision / recall of MinHash near-dedup on planted
near-duplicates, in one run.

    python bench/bench_data.py [--copies 400] [--threshold 0.8] [--seed 0] [--workers 2]

Corpus: WikiText-2 validation + test (/work/shared/data/wikitext-2; 2,480 paragraphs of Wikipedia text, CC BY-SA),
plus ``--copies`` planted near-duplicates: a randomly chosen paragraph of at least 50 words, edited by replacing
or deleting a random share of its words (0.2% to 8%: one edited word changes up to 5 shingles, so the
pairs span the threshold), inserted at a random
place. Each pair's true Jaccard similarity is computed exactly from the two sets of word 5-grams (the shingles the
dedup uses). A pair is a true near-duplicate when that similarity reaches --threshold:

    recall     = true pairs with one copy dropped / true pairs
    precision  = drops that remove one copy of a true pair / all near-duplicate drops

Drops that the clean corpus already has on its own (WikiText repeats a few paragraphs nearly verbatim) are
counted apart and left out of both. Throughput: the same corpus through lmforge.data.sources.filter_documents
under each configuration; the load average is printed, as other jobs share the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

from lmforge.data.dedup import shingles
from lmforge.data.sources import FilterConfig, clean_text, filter_documents, read_documents

WIKITEXT = Path("/work/shared/data/wikitext-2")
FILLERS = ["the", "a", "river", "city", "year", "army", "song", "team", "was", "new"]


def corpus() -> list[str]:
    docs = []
    for split in ("valid", "test"):
        docs += [clean_text(d) for d in read_documents(str(WIKITEXT / f"{split}.txt.gz"))]
    return [d for d in docs if d]


def edit(text: str, share: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(share * len(words)))):
        words[i] = rng.choice(FILLERS) if rng.random() < 0.7 else ""
    return " ".join(w for w in words if w)


def jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / max(len(sa | sb), 1)


def plant(docs: list[str], copies: int, seed: int) -> tuple[list[str], list[tuple[str, str, float]]]:
    """The corpus with near-copies inserted, and the (original, copy, true Jaccard) pairs."""
    rng = random.Random(seed)
    candidates = [d for d in docs if len(d.split()) >= 50]
    out, pairs = list(docs), []
    for original in rng.sample(candidates, copies):
        copy = edit(original, rng.choice([0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08]), rng)
        out.insert(rng.randrange(len(out) + 1), copy)
        pairs.append((original, copy, jaccard(original, copy)))
    return out, pairs


def dedup_quality(docs, pairs, threshold: float, natural: set[str]) -> dict:
    kept, stats = filter_documents(docs, FilterConfig(near_dedup=True, minhash_threshold=threshold), progress=False)
    kept_set = set(kept)
    dropped = [d for d in set(docs) - kept_set if d not in natural]  # exact duplicates are none here
    true_pairs = [(a, b) for a, b, j in pairs if j >= threshold]
    found = sum((a not in kept_set) != (b not in kept_set) for a, b in true_pairs)
    in_true = {x for a, b in true_pairs for x in (a, b)}
    buckets = {}
    for lo, hi in ((0.0, 0.5), (0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)):
        inside = [(a, b) for a, b, j in pairs if lo <= j < hi]
        hit = sum((a not in kept_set) != (b not in kept_set) for a, b in inside)
        buckets[f"{lo:.1f}-{min(hi, 1.0):.1f}"] = (len(inside), hit)
    tp = sum(d in in_true for d in dropped)
    return {"recall": found / max(len(true_pairs), 1), "precision": tp / max(len(dropped), 1),
            "true_pairs": len(true_pairs), "found": found, "drops": len(dropped), "buckets": buckets,
            "stats": stats}


def throughput(docs: list[str], workers: int) -> list[tuple[str, float, dict]]:
    heuristics = dict(gopher_quality=True, gopher_repetition=True, fineweb=True, c4=True)
    configs = [("clean + exact dedup (default)", FilterConfig()),
               ("+ Gopher, C4, FineWeb heuristics", FilterConfig(**heuristics)),
               ("+ language (py3langid)", FilterConfig(**heuristics, languages=["en"])),
               ("near-dedup only", FilterConfig(near_dedup=True)),
               ("everything, 1 process", FilterConfig(**heuristics, languages=["en"], near_dedup=True)),
               (f"everything, {workers} processes",
                FilterConfig(**heuristics, languages=["en"], near_dedup=True, workers=workers))]
    rows = []
    for name, cfg in configs:
        t0 = time.perf_counter()
        _, stats = filter_documents(docs, cfg, progress=False)
        rows.append((name, len(docs) / (time.perf_counter() - t0), stats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=400)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    base = corpus()
    natural_kept, _ = filter_documents(base, FilterConfig(near_dedup=True, minhash_threshold=args.threshold),
                                       progress=False)
    natural = set(base) - set(natural_kept)
    docs, pairs = plant(base, args.copies, args.seed)
    q = dedup_quality(docs, pairs, args.threshold, natural)
    print(f"corpus: {len(base):,} WikiText-2 paragraphs + {args.copies} planted near-copies = {len(docs):,} "
          f"documents; {len(natural)} near-duplicates the clean corpus has on its own (left out)")
    print(f"\nnear-dedup, MinHash LSH (datasketch), 128 permutations, word 5-grams, threshold {args.threshold}:")
    print(f"  recall {q['recall']:.3f} ({q['found']}/{q['true_pairs']} pairs with true Jaccard >= "
          f"{args.threshold}), precision {q['precision']:.3f} ({q['drops']} drops)")
    print("\n| true Jaccard | planted pairs | found |\n|---|---|---|")
    for bucket, (n, hit) in q["buckets"].items():
        print(f"| {bucket} | {n} | {hit} ({hit / max(n, 1):.0%}) |")
    print(f"\nthroughput (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):\n")
    print("| filters | documents/s | vs default | kept |\n|---|---|---|---|")
    rows = throughput(docs, args.workers)
    for name, rate, stats in rows:
        print(f"| {name} | {rate:,.0f} | {rate / rows[0][1]:.2f}x | {stats['kept']:,} |")


if __name__ == "__main__":
    main()
