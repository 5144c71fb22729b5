"""``lmforge tokenizer``: train a byte-level BPE tokenizer on a corpus and save it in Hugging Face's format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TokenizerStageConfig:
    data: str = "builtin:tinyshakespeare"  # file, dir, glob, builtin:NAME or hf:NAME[:CONFIG][@SPLIT]
    text_field: str = "text"
    vocab_size: int = 2048
    min_frequency: int = 2
    max_docs: int = 0  # train on at most this many documents (0 = all); BPE needs a sample, not everything
    out_dir: str = "runs/tiny/tokenizer"

    def validate(self) -> None:
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size {self.vocab_size} is too small: 256 bytes + 4 special tokens at least")


def run_tokenizer(cfg: TokenizerStageConfig):
    """Train and save; returns the Tokenizer. Skipped when out_dir already holds a tokenizer."""
    import itertools

    from lmforge.data.sources import clean_text, read_documents
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    out = Path(cfg.out_dir)
    if (out / "tokenizer.json").exists():
        return Tokenizer.load(out)
    docs = read_documents(cfg.data, text_field=cfg.text_field)
    if cfg.max_docs:
        docs = itertools.islice(docs, cfg.max_docs)
    tok = train_tokenizer((clean_text(d) for d in docs), cfg.vocab_size, cfg.min_frequency)
    tok.save(out)
    return tok


def main(argv: list[str]) -> int:
    from lmforge.config import parse_cli
    from lmforge.data.sources import read_documents

    cfg = parse_cli(argv, TokenizerStageConfig, prog="lmforge tokenizer", description=__doc__,
                    default_recipe="tiny", section="tokenizer")
    tok = run_tokenizer(cfg)
    sample = next(iter(read_documents(cfg.data, text_field=cfg.text_field)))[:200]
    ids = tok.encode(sample)
    print(f"tokenizer: {tok.vocab_size:,} tokens -> {cfg.out_dir}")
    print(f"compression on a sample: {len(sample) / max(len(ids), 1):.2f} characters/token")
    print("example:", " | ".join(tok.decode([i]) for i in ids[:24]))
    return 0
