"""Weighted mixtures of sources for pre- and mid-training, with weights as shares of training tokens.

    mix: [{source: builtin:tinyshakespeare, weight: 0.7}, {source: builtin:tinyworld/quiz, weight: 0.3}]

Each source is cleaned, filtered and deduplicated on its own, then each gets ``weight / sum(weights)`` of the
mixture's tokens (counted with the run's tokenizer, a document-start token included). The mixture's size is
``total_tokens``, or by default the largest size at which no source repeats: the source that is scarcest for its
weight is used exactly once and the others are subsampled. A larger ``total_tokens`` repeats documents (epochs),
which is how a small curated source gets upweighted. Documents are drawn in a seeded order and the result is
shuffled, so the shards interleave sources; the split into train and val (by document hash) happens afterwards,
as for a single source, so every source has its share of the val set too.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from lmforge.data.sources import FilterConfig, filter_documents, read_documents
from lmforge.errors import DataError


@dataclass
class MixSource:
    source: str  # file, dir, glob, builtin:NAME or hf:NAME[:CONFIG][@SPLIT]
    weight: float = 1.0  # share of the mixture's tokens, after normalizing the weights to sum to 1
    text_field: str = "text"

    def validate(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"weight must be positive, got {self.weight}")


def source_overrides_mix(overrides: list[str]) -> list[str]:
    """Command-line overrides with ``data.mix=[]`` appended when they set ``data.source`` but not ``data.mix``.

    A recipe's ``data.mix`` decides the training documents (``data.source`` then only trains the tokenizer), so
    ``lmforge pretrain data.source=my.jsonl`` under the built-in recipe would train on its mix and say nothing:
    a source named on the command line is the data, unless the command line gives a mix too."""
    keys = {o.split("=", 1)[0].strip() for o in overrides if "=" in o and not o.startswith("-")}
    if "data.source" in keys and not any(k == "data.mix" or k.startswith("data.mix.") for k in keys):
        return [*overrides, "data.mix=[]"]
    return list(overrides)


def mix_name(mix: list[MixSource]) -> str:
    """``builtin:tinyshakespeare=0.7+builtin:tinyworld/quiz=0.3``: one string naming a mixture (meta.json)."""
    return "+".join(f"{m.source}={m.weight:g}" for m in mix)


def mix_documents(mix: list[MixSource], tokenizer, filters: FilterConfig, seed: int = 0,
                  total_tokens: int = 0) -> tuple[list[str], Counter, dict]:
    """The mixture's documents (shuffled), the filter counts over all sources, and a report per source:
    {source: {weight, available_tokens, tokens, docs, epochs, documents}} ("documents": the chosen texts).
    """
    if not mix:
        raise ValueError("a mix needs at least one source")
    stats: Counter = Counter()
    pools = []
    for m in mix:
        kept, counts = filter_documents(read_documents(m.source, text_field=m.text_field), filters)
        stats.update(counts)
        if not kept:
            raise DataError(f"{m.source}: no documents left after filtering {dict(counts)}")
        lengths = [len(ids) + 1 for ids in tokenizer.encode_batch(kept)]  # +1: the document-start token
        pools.append((kept, lengths))
    total_weight = sum(m.weight for m in mix)
    shares = [m.weight / total_weight for m in mix]
    available = [sum(lengths) for _, lengths in pools]
    total = total_tokens or min(a / s for a, s in zip(available, shares, strict=True))

    rng = random.Random(f"mix/{seed}")
    docs, report = [], {}
    for m, share, (kept, lengths), avail in zip(mix, shares, pools, available, strict=True):
        target = share * total
        chosen, tokens = [], 0
        while tokens < target - 0.5:  # whole documents, in a fresh seeded order each pass
            order = list(range(len(kept)))
            rng.shuffle(order)
            for i in order:
                if tokens >= target - 0.5:
                    break
                chosen.append(kept[i])
                tokens += lengths[i]
        docs += chosen
        report[m.source] = {"weight": share, "available_tokens": avail, "tokens": tokens, "docs": len(chosen),
                            "epochs": round(tokens / avail, 3), "documents": chosen}
    rng.shuffle(docs)
    return docs, stats, report
