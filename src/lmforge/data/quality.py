"""Document quality heuristics from the papers that defined them, as pure functions of the text.

Each ``*_reason(text)`` returns why a document fails (a short reason name, counted in the data report) or None.
The thresholds are the published ones:

- Gopher quality filter (Rae et al. 2021, "Scaling Language Models", App. A.1.1): 50..100,000 words; mean word
  length 3..10 characters; '#' and ellipses each at most 0.1 per word; at most 90% of lines starting with a bullet
  and 30% ending in an ellipsis; at least 80% of words containing a letter; at least 2 of the stop words
  the, be, to, of, and, that, have, with.
- Gopher repetition filter (ibid., Table A1): duplicate lines / paragraphs at most 30% of lines / paragraphs and 20%
  of characters; the most frequent 2-, 3-, 4-gram at most 20%, 18%, 16% of characters; characters inside
  duplicated 5..10-grams at most 15%, 14%, 13%, 12%, 11%, 10%.
- C4 (Raffel et al. 2020, Sec. 2.2): line-level: keep lines that end in terminal punctuation and have at least 3
  words, drop lines mentioning javascript; document-level: drop pages with "lorem ipsum", a curly bracket, or
  fewer than 5 sentences left. (C4's bad-words list is not applied.)
- FineWeb (Penedo et al. 2024, Sec. 3.4): drop documents where at most 12% of lines end in punctuation, where
  duplicated lines hold at least 10% of the characters, or where at least 67% of lines are shorter than 30 chars.

Words are whitespace-separated tokens (no tokenizer model needed); n-grams for the repetition filter are over
lower-cased words stripped of punctuation.
"""

from __future__ import annotations

import re
from collections import Counter

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "●", "◦", "▪", "‣", "–", "·")
ELLIPSES = ("...", "…")
TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_PUNCT = re.compile(r"[^\w\s]")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def words_of(text: str) -> list[str]:
    return text.split()


def normalized_words(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (for n-gram statistics and shingles)."""
    return [w for w in _PUNCT.sub(" ", text.lower()).split() if w]


# ---- Gopher quality ----

def gopher_quality_reason(text: str, min_words: int = 50, max_words: int = 100_000) -> str | None:
    words = words_of(text)
    n = len(words)
    if n < min_words:
        return "gopher_few_words"
    if n > max_words:
        return "gopher_many_words"
    mean_len = sum(len(w) for w in words) / n
    if not 3 <= mean_len <= 10:
        return "gopher_word_length"
    if text.count("#") / n > 0.1 or sum(text.count(e) for e in ELLIPSES) / n > 0.1:
        return "gopher_symbols"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines) > 0.9:
        return "gopher_bullets"
    if lines and sum(line.rstrip().endswith(ELLIPSES) for line in lines) / len(lines) > 0.3:
        return "gopher_ellipsis"
    if sum(any(c.isalpha() for c in w) for w in words) / n < 0.8:
        return "gopher_alpha_words"
    if len(STOP_WORDS.intersection(w.strip(".,;:!?\"'()").lower() for w in words)) < 2:
        return "gopher_stop_words"
    return None


# ---- Gopher repetition ----

TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def _duplicates(parts: list[str]) -> tuple[float, float]:
    """(share of parts that repeat an earlier one, share of characters in those repeats)."""
    if not parts:
        return 0.0, 0.0
    seen, dup, dup_chars = set(), 0, 0
    for p in parts:
        if p in seen:
            dup += 1
            dup_chars += len(p)
        seen.add(p)
    return dup / len(parts), dup_chars / max(sum(len(p) for p in parts), 1)


def top_ngram_fraction(words: list[str], n: int) -> float:
    """Characters of the most frequent n-gram (counted each time it occurs) over all words' characters."""
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return count * sum(len(w) for w in gram) / max(sum(len(w) for w in words), 1)


def duplicate_ngram_fraction(words: list[str], n: int) -> float:
    """Characters of words covered by an n-gram that occurs more than once, over all words' characters
    (each word counted once, however many duplicated n-grams cover it)."""
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if counts[tuple(words[i:i + n])] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / max(sum(len(w) for w in words), 1)


def gopher_repetition_reason(text: str) -> str | None:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    line_dup, line_chars = _duplicates(lines)
    para_dup, para_chars = _duplicates(paragraphs)
    if line_dup > 0.3 or para_dup > 0.3:
        return "gopher_dup_lines" if line_dup > 0.3 else "gopher_dup_paragraphs"
    if line_chars > 0.2 or para_chars > 0.2:
        return "gopher_dup_line_chars" if line_chars > 0.2 else "gopher_dup_paragraph_chars"
    words = normalized_words(text)
    for n, limit in TOP_NGRAM_MAX.items():
        if top_ngram_fraction(words, n) > limit:
            return f"gopher_top_{n}gram"
    for n, limit in DUP_NGRAM_MAX.items():
        covered = duplicate_ngram_fraction(words, n)
        if covered > limit:
            return f"gopher_dup_{n}gram"
        if covered <= min(DUP_NGRAM_MAX.values()):  # longer n-grams cover no more: none of them can fail
            return None
    return None


# ---- C4 ----

def c4_clean(text: str, min_words: int = 3, min_sentences: int = 5) -> tuple[str, str | None, int]:
    """(the text with C4's line filters applied, why the page is dropped or None, lines removed)."""
    low = text.lower()
    if "lorem ipsum" in low:
        return text, "c4_lorem_ipsum", 0
    if "{" in text:
        return text, "c4_curly_bracket", 0
    kept, removed = [], 0
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            kept.append("")
            continue
        if (stripped.endswith(TERMINAL) and len(stripped.split()) >= min_words
                and "javascript" not in stripped.lower()):
            kept.append(line)
        else:
            removed += 1
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    if len(_SENTENCE_END.findall(cleaned)) < min_sentences:
        return cleaned, "c4_few_sentences", removed
    return cleaned, None, removed


# ---- FineWeb ----

def fineweb_reason(text: str) -> str | None:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return None
    if sum(line.endswith(TERMINAL) for line in lines) / len(lines) <= 0.12:
        return "fineweb_line_punct"
    if _duplicates(lines)[1] >= 0.1:
        return "fineweb_dup_line_chars"
    if sum(len(line) < 30 for line in lines) / len(lines) >= 0.67:
        return "fineweb_short_lines"
    return None


# ---- language ----

_IDENTIFIER = None


def language_of(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid (langid.py's model, normalised probabilities)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise ImportError("data.filters.languages needs py3langid: pip install py3langid") from None
        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, prob = _IDENTIFIER.classify(text[:4000].replace("\n", " "))  # the first 4,000 characters decide
    return lang, float(prob)
