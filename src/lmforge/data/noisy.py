"""A deliberately dirty copy of a clean corpus: what a crawl looks like before cleaning, for measuring what cleaning
is worth (``lmforge scaling density-study``).

Every original document is kept once, in order, and noise is added in the shares of the clean corpus's characters
that ``NoiseConfig`` names, each kind the sort of thing web pipelines spend most of their effort removing:

    boilerplate  navigation / cookie / newsletter pages: a few lines, most repeated (the repetitive-line filter)
    markup       HTML and CSS soup, JSON tracking blobs, hex dumps: mostly symbols and digits (the letter-share filter)
    fragment     leftovers like "Read more »" or "Page 3 of 12" (the minimum-length filter)
    exact_dup    verbatim copies of real documents, a few documents many times as reposts are (exact dedup)
    near_dup     copies of real documents with a byline, a share bar or changed case: exact dedup misses them

Some noise gets through today's filters on purpose: boilerplate pages whose lines do not repeat, markup with enough
words in it, and every near duplicate. ``clean_report`` counts which kind survived which filter, so a study can say
what its "cleaned" side still holds.
Deterministic in ``seed``. Written for lmforge; every line of noise is generated here.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from lmforge.data.dedup import NearDuplicateIndex
from lmforge.data.sources import check_document

KINDS = ("boilerplate", "markup", "fragment", "exact_dup", "near_dup")

_NAV = ["Home", "Shop", "About us", "Contact", "Blog", "Login", "Register", "Cart (0)", "Help", "Sitemap"]
_BOILER = [
    "We use cookies to improve your experience. By continuing you accept our cookie policy.",
    "Accept all cookies | Manage preferences",
    "Subscribe to our newsletter and get 10% off your first order!",
    "Copyright © 2023 All rights reserved.",
    "Terms of use | Privacy policy | Cookie settings",
    "Follow us on Facebook, Twitter and Instagram",
    "Sign in to see your recommendations",
    "Free shipping on orders over $50",
    "You may also like",
    "Click here to read more",
    "This site is protected by reCAPTCHA.",
    "Share this: Facebook | Twitter | Email | Print",
]
_FRAGMENTS = ["Read more »", "Page 3 of 12", "Next »", "« Previous", "Loading...", "Back to top", "Advertisement",
              "Reply", "12 comments", "Posted in Uncategorized", "Tags: none", "Skip to content"]
_BYLINES = ["Posted by admin on 12 March 2021", "Originally published at example.org", "Updated: 2022-11-04",
            "From the archive", "Guest post", "Share this: Facebook | Twitter | Email | Print",
            "Tags: poetry, drama, classic", "0 comments - leave a reply"]


@dataclass
class NoiseConfig:
    """Characters of each kind of noise, as a share of the clean corpus's characters."""

    boilerplate: float = 0.15
    markup: float = 0.15
    fragment: float = 0.01
    exact_dup: float = 0.25
    near_dup: float = 0.10
    seed: int = 0

    def validate(self) -> None:
        if any(getattr(self, k) < 0 for k in KINDS):
            raise ValueError(f"noise shares must be >= 0 ({', '.join(KINDS)})")


def boilerplate_page(rng: random.Random) -> str:
    """A page of site furniture: a nav bar at top and bottom and banner lines, most of them repeated; one in five
    pages has no repeats (the repetitive-line filter cannot see it)."""
    nav = " | ".join(rng.sample(_NAV, rng.randint(4, 8)))
    lines = rng.sample(_BOILER, rng.randint(3, 6))
    if rng.random() < 0.2:
        return "\n".join([nav, *lines])
    body = [rng.choice(lines) for _ in range(rng.randint(4, 10))]
    return "\n".join([nav, *lines, *body, nav])


def markup_blob(rng: random.Random) -> str:
    """HTML / CSS / JSON / hex left in extracted text; about one in six has enough words to pass a letter filter."""
    kind = rng.choice(("html", "css", "json", "hex", "html", "wordy"))
    rows = rng.randint(4, 12)
    if kind == "html":
        return "\n".join(f'<div class="c-{rng.randint(1, 99)}__i" id="n{rng.randint(100, 9999)}"><a href="/p/'
                         f'{rng.randint(1000, 99999)}?ref={rng.randint(1, 9)}">{rng.choice(_NAV)}</a></div>'
                         for _ in range(rows))
    if kind == "css":
        return "\n".join(f".b{rng.randint(1, 99)}{{margin:{rng.randint(0, 9)}px {rng.randint(0, 20)}px;"
                         f"z-index:{rng.randint(1, 999)};color:#{rng.randint(0, 0xFFFFFF):06x}}}" for _ in range(rows))
    if kind == "json":
        return "\n".join(f'{{"ev":"pv","ts":{rng.randint(1_600_000_000, 1_700_000_000)},"uid":"'
                         f'{rng.randint(0, 16**8):08x}","v":[{rng.randint(0, 99)},{rng.randint(0, 99)}]}}'
                         for _ in range(rows))
    if kind == "hex":
        return "\n".join(" ".join(f"{rng.randint(0, 255):02x}" for _ in range(16)) for _ in range(rows))
    return "\n".join(f"<p>{rng.choice(_BOILER)}</p>" for _ in range(rows))  # markup with words: passes


def near_copy(doc: str, rng: random.Random) -> str:
    """The document with a byline above or a share bar below, or in upper case: not an exact duplicate."""
    r = rng.random()
    if r < 0.4:
        return f"{rng.choice(_BYLINES)}\n{doc}"
    if r < 0.8:
        return f"{doc}\n{rng.choice(_BYLINES)}"
    return doc.upper()


def make_noisy(docs: list[str], cfg: NoiseConfig) -> list[tuple[str, str]]:
    """(kind, text) for every document of the dirty corpus: each of ``docs`` once as "clean", in order, then the
    noise in the configured shares of their characters. Originals come first, so exact dedup keeps them and drops
    the copies (whichever copy it keeps, the text is the same); training shuffles documents anyway."""
    rng = random.Random(f"noisy/{cfg.seed}")
    total = sum(len(d) for d in docs)
    out = [("clean", d) for d in docs]
    makers = {"boilerplate": lambda: [boilerplate_page(rng)], "markup": lambda: [markup_blob(rng)],
              "fragment": lambda: [rng.choice(_FRAGMENTS)],
              "exact_dup": lambda: [rng.choice(docs)] * rng.randint(2, 40),  # reposts: few documents, many times
              "near_dup": lambda: [near_copy(rng.choice(docs), rng)]}
    for kind in KINDS:
        budget, made = getattr(cfg, kind) * total, 0
        while made < budget:
            for text in makers[kind]():
                out.append((kind, text))
                made += len(text)
    return out


def clean_report(noisy: list[tuple[str, str]], filters) -> tuple[list[str], dict]:
    """Run the dirty corpus through lmforge's cleaning, filters, exact dedup and (``near_dedup``) MinHash dedup (``check_document``, as
    pretraining's ``filter_documents`` does) and count, for each kind, documents and characters kept and dropped by reason.
    Returns (kept documents, {kind: {reason: {"docs", "chars"}}})."""
    report: dict = {}
    kept_all = []
    seen: set[bytes] = set()
    near = NearDuplicateIndex(filters.minhash_threshold, filters.minhash_num_perm) if filters.near_dedup else None
    for kind, text in noisy:
        doc, reason, sig, _ = check_document(text, filters)  # one document at a time: no progress bar per call
        reason = reason or "kept"
        if reason == "kept" and filters.dedup:
            digest = hashlib.blake2b(doc.encode(), digest_size=16).digest()
            reason = "duplicate" if digest in seen else reason
            seen.add(digest)
        if reason == "kept" and near is not None and near.is_duplicate(sig):
            reason = "near_duplicate"
        if reason == "kept":
            kept_all.append(doc)
        cell = report.setdefault(kind, {}).setdefault(reason, {"docs": 0, "chars": 0})
        cell["docs"] += 1
        cell["chars"] += len(text)
    return kept_all, report
