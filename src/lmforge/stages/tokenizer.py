"""``lmforge tokenizer``: train a byte-level BPE tokenizer on a corpus and save it in Hugging Face's format.

Documents are cleaned (NFC, control characters, newlines) as the pretraining data will be, then fed to the BPE
trainer; a sample of ``max_docs`` documents or ``max_chars`` characters is enough for a good vocabulary. The
directory it writes (tokenizer.json, tokenizer_config.json with the ChatML template) opens in
``transformers.AutoTokenizer``. A rerun with the same settings and unchanged data reuses it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

TRAINING_FILE = "tokenizer_training.json"  # settings + data signature of the tokenizer in out_dir


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


def training_texts(cfg: TokenizerStageConfig) -> Iterator[str]:
    """Cleaned, non-empty documents of the corpus, stopping at max_docs documents or max_chars characters."""
    from lmforge.data.sources import clean_text, read_documents

    docs = chars = 0
    for raw in read_documents(cfg.data, text_field=cfg.text_field):
        doc = clean_text(raw)
        if not doc:
            continue
        if cfg.max_chars and chars + len(doc) > cfg.max_chars:
            doc = doc[:cfg.max_chars - chars]
            if not doc:
                return
        yield doc
        docs, chars = docs + 1, chars + len(doc)
        if (cfg.max_docs and docs >= cfg.max_docs) or (cfg.max_chars and chars >= cfg.max_chars):
            return


def _signature(cfg: TokenizerStageConfig) -> dict:
    from lmforge.data.sources import source_signature

    settings = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
    return {"settings": settings, "data_signature": source_signature(cfg.data)}


def run_tokenizer(cfg: TokenizerStageConfig):
    """Train and save into cfg.out_dir; returns the Tokenizer.

    Reused without training when out_dir holds a tokenizer trained with the same settings on unchanged data
    (recorded in tokenizer_training.json); otherwise (re)trained.
    """
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    out = Path(cfg.out_dir)
    signature = _signature(cfg)
    record = out / TRAINING_FILE
    if (out / "tokenizer.json").exists() and record.exists():
        try:
            done = json.loads(record.read_text())
        except json.JSONDecodeError:
            done = {}
        if {k: done.get(k) for k in signature} == signature:
            return Tokenizer.load(out)
    stats = {"docs": 0, "chars": 0}

    def counted() -> Iterator[str]:
        for doc in training_texts(cfg):
            stats["docs"] += 1
            stats["chars"] += len(doc)
            yield doc

    tok = train_tokenizer(counted(), cfg.vocab_size, cfg.min_frequency, think_tokens=cfg.think_tokens)
    if stats["docs"] == 0:
        from lmforge.data.sources import DataError

        raise DataError(f"{cfg.data}: no non-empty documents to train a tokenizer on")
    tok.save(out)
    record.write_text(json.dumps({**signature, "trained_on": stats, "vocab_size": tok.vocab_size}, indent=2) + "\n")
    return tok


def compression(tok, cfg: TokenizerStageConfig, sample_chars: int = 200_000) -> tuple[float, str]:
    """Characters per token on the first ``sample_chars`` characters of the corpus, and that sample."""
    from dataclasses import replace

    sample = list(training_texts(replace(cfg, max_docs=0, max_chars=sample_chars)))
    n_tokens = sum(len(ids) for ids in tok.encode_batch(sample))
    return sum(map(len, sample)) / max(n_tokens, 1), "\n\n".join(sample)


def main(argv: list[str]) -> int:
    from lmforge.config import parse_cli

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
