"""``lmforge tokenizer``: train a byte-level BPE tokenizer on a corpus and save it in Hugging Face's format.

Documents are cleaned (NFC, control characters, newlines) as the pretraining data will be, then fed to the BPE
trainer; a sample of ``max_docs`` documents or ``max_chars`` characters is enough for a good vocabulary. The
directory it writes (tokenizer.json, tokenizer_config.json with the ChatML template) opens in
``transformers.AutoTokenizer``. A rerun with the same settings and unchanged data reuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import parse_cli
from lmforge.tokenizer import TRAINING_FILE, Tokenizer, train_corpus_tokenizer, training_texts


@dataclass
class TokenizerStageConfig:
    data: str = "builtin:tinyshakespeare"  # file, dir, glob, builtin:NAME or hf:NAME[:CONFIG][@SPLIT]
    text_field: str = "text"
    vocab_size: int = 2048
    min_frequency: int = 2  # a pair must occur this often to become a merge
    max_docs: int = 0  # train on at most this many documents (0 = all); BPE needs a sample, not everything
    max_chars: int = 0  # ... and at most this many characters (0 = no limit)
    think_tokens: bool = False  # add <think> / </think> as single tokens, with the thinking chat template
    out_dir: str = "runs/tiny/tokenizer"

    def validate(self) -> None:
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size {self.vocab_size} is too small: 256 bytes + 4 special tokens at least")
        for name in ("min_frequency", "max_docs", "max_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def run_tokenizer(cfg: TokenizerStageConfig) -> Tokenizer:
    """Train and save into cfg.out_dir (tokenizer.train_corpus_tokenizer); returns the Tokenizer. Reused without
    training when out_dir holds one trained with the same settings on unchanged data."""
    return train_corpus_tokenizer(cfg.data, cfg.out_dir, cfg.vocab_size, text_field=cfg.text_field,
                                  min_frequency=cfg.min_frequency, max_docs=cfg.max_docs, max_chars=cfg.max_chars,
                                  think_tokens=cfg.think_tokens)


def compression(tok, cfg: TokenizerStageConfig, sample_chars: int = 200_000) -> tuple[float, str]:
    """Characters per token on the first ``sample_chars`` characters of the corpus, and that sample."""
    sample = list(training_texts(cfg.data, cfg.text_field, max_chars=sample_chars))
    n_tokens = sum(len(ids) for ids in tok.encode_batch(sample))
    return sum(map(len, sample)) / max(n_tokens, 1), "\n\n".join(sample)


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, TokenizerStageConfig, prog="lmforge tokenizer", description=__doc__,
                    default_recipe="tiny", section="tokenizer")
    tok = run_tokenizer(cfg)
    record = json.loads((Path(cfg.out_dir) / TRAINING_FILE).read_text())
    ratio, sample = compression(tok, cfg)
    trained = record.get("trained_on", {})
    print(f"tokenizer: {tok.vocab_size:,} tokens (asked for {cfg.vocab_size:,}) -> {cfg.out_dir}")
    print(f"trained on {trained.get('docs', 0):,} documents, {trained.get('chars', 0):,} characters of {cfg.data}")
    if tok.vocab_size < cfg.vocab_size:
        print(f"  (this corpus yields only {tok.vocab_size:,} tokens at min_frequency={cfg.min_frequency})")
    print(f"compression: {ratio:.2f} characters/token")
    example = sample[:80]
    ids = tok.encode(example)
    print(f"example: {example!r}")
    print(f"  -> {len(ids)} tokens: " + " | ".join(repr(tok.decode([i]))[1:-1] for i in ids))
    return 0
