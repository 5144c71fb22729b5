"""``lmforge data source=CORPUS [tokenizer=DIR]``: clean a corpus at scale, streaming, and report what was dropped.

    raw documents -> clean (NFC, newlines, control chars) -> C4 line filters -> length / letter / repetition
    filters -> Gopher quality and repetition, FineWeb rules -> language (py3langid) -> exact dedup -> MinHash LSH
    near-dedup -> clean/part_NNNNN.jsonl.gz ({"text"}) [-> token shards with a train/val split]

The same FilterConfig and code (lmforge.data.sources.iter_filtered) run under ``lmforge pretrain data.filters.*``.
Documents stream through: cleaning, filters and MinHash signatures in ``filters.workers`` processes, tokenization
in batches on all cores, nothing held in memory but the dedup index and the document lengths. Writes into
out_dir: clean/ (the kept documents, for ``lmforge pretrain data.source=OUT/clean``), tokens/ (with
tokenizer=...), data_report.json / .md (documents and tokens in and out, drops by reason, length histogram),
length_histogram.png, config.yaml. A rerun with the same source files and settings is skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from lmforge.config import parse_cli, save_config
from lmforge.data.shards import SHARD_TOKENS, StreamingShards, tokenizer_fingerprint
from lmforge.data.sources import LINE_COUNTS, FilterConfig, iter_filtered, read_documents, source_signature
from lmforge.errors import ConfigError
from lmforge.figures import save_figure
from lmforge.modelio import load_tokenizer


@dataclass
class DataStageConfig:
    source: str = ""  # file, dir, glob, builtin:NAME or hf:NAME[:CONFIG][@SPLIT]
    text_field: str = "text"
    filters: FilterConfig = field(default_factory=FilterConfig)
    tokenizer: str = ""  # a tokenizer or model directory: also write token shards (train/val)
    out_dir: str = "runs/data"
    val_fraction: float = 0.05
    seed: int = 0
    shard_docs: int = 100_000  # kept documents per clean/part_NNNNN.jsonl.gz
    shard_tokens: int = SHARD_TOKENS
    batch_docs: int = 1024  # documents per tokenization batch
    histogram_bins: int = 24

    def validate(self) -> None:
        if not self.source:
            raise ValueError("source=... is required (lmforge data source=CORPUS [tokenizer=DIR])")
        if self.shard_docs < 1 or self.batch_docs < 1 or self.histogram_bins < 2:
            raise ValueError("shard_docs and batch_docs must be >= 1, histogram_bins >= 2")


class _CleanWriter:
    """Kept documents as JSON Lines, gzipped, ``per_file`` documents to a part (written as .tmp, then renamed)."""

    def __init__(self, directory: Path, per_file: int):
        self.dir, self.per_file, self.files, self.count = directory, per_file, [], 0
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("part_*"):
            old.unlink()
        self.f = None

    def write(self, doc: str) -> None:
        if self.f is None or self.count % self.per_file == 0:
            self._finish()
            self.name = f"part_{len(self.files):05d}.jsonl.gz"
            self.f = gzip.open(self.dir / (self.name + ".tmp"), "wt", encoding="utf-8")
        self.f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        self.count += 1

    def _finish(self) -> None:
        if self.f is not None:
            self.f.close()
            os.replace(self.dir / (self.name + ".tmp"), self.dir / self.name)
            self.files.append(self.name)
            self.f = None

    def close(self) -> list[str]:
        self._finish()
        return self.files


def fingerprint(cfg: DataStageConfig, tokenizer) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir",)}
    settings["filters"] = {k: v for k, v in settings["filters"].items() if k != "workers"}  # same output
    h = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16)
    h.update(source_signature(cfg.source).encode())
    if tokenizer is not None:
        h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()


def run_data(cfg: DataStageConfig) -> dict:
    """Clean (and tokenize) cfg.source into cfg.out_dir; returns the data report."""
    out = Path(cfg.out_dir)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"tokenizer={cfg.tokenizer}: {e}") from None
    digest = fingerprint(cfg, tokenizer)
    report_path = out / "data_report.json"
    if report_path.exists():
        previous = json.loads(report_path.read_text())
        if previous.get("fingerprint") == digest:
            return previous | {"skipped": True}
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    t0 = time.time()
    stats: Counter = Counter()
    raw = _Counted(read_documents(cfg.source, text_field=cfg.text_field))
    clean = _CleanWriter(out / "clean", cfg.shard_docs)
    shards = StreamingShards(tokenizer, out / "tokens", cfg.val_fraction, cfg.seed, cfg.shard_tokens) \
        if tokenizer is not None else None
    lengths, chars_out, batch = [], 0, []
    for doc in iter_filtered(raw, cfg.filters, stats):
        clean.write(doc)
        chars_out += len(doc)
        batch.append(doc)
        if len(batch) >= cfg.batch_docs:
            lengths += shards.add(batch) if shards else [len(d) for d in batch]
            batch = []
    if batch:
        lengths += shards.add(batch) if shards else [len(d) for d in batch]
    files = clean.close()
    meta = shards.close(cfg.source, digest, dict(stats)) if shards else None
    report = data_report(cfg, stats, raw, chars_out, lengths, meta, files, time.time() - t0, digest)
    write_report(report, out)
    return report


class _Counted:
    """Passes documents through, counting them and their characters (what went in)."""

    def __init__(self, docs):
        self.docs, self.n, self.chars = docs, 0, 0

    def __iter__(self):
        for doc in self.docs:
            self.n += 1
            self.chars += len(doc)
            yield doc


def data_report(cfg, stats: Counter, raw: _Counted, chars_out: int, lengths: list[int], meta: dict | None,
                files: list[str], seconds: float, digest: str) -> dict:
    kept = stats.get("kept", 0)
    drops = {k: v for k, v in sorted(stats.items(), key=lambda kv: -kv[1]) if k != "kept" and k not in LINE_COUNTS}
    unit = "tokens" if meta else "characters"
    arr = np.asarray(lengths or [0])
    edges = np.unique(np.geomspace(max(1, arr.min()), max(2, arr.max()) + 1, cfg.histogram_bins + 1).astype(int))
    counts, edges = np.histogram(arr, bins=edges)
    report = {
        "source": cfg.source, "fingerprint": digest, "seconds": round(seconds, 2),
        "documents_in": raw.n, "documents_kept": kept, "documents_dropped": raw.n - kept,
        "documents_per_second": round(raw.n / max(seconds, 1e-9), 1), "workers": cfg.filters.workers,
        "characters_in": raw.chars, "characters_kept": chars_out,
        "drops": {k: {"documents": v, "share": round(v / max(raw.n, 1), 4)} for k, v in drops.items()},
        "line_counts": {k: stats[k] for k in LINE_COUNTS if stats.get(k)},
        "clean_files": [f"clean/{f}" for f in files],
        "length_unit": unit, "length_mean": round(float(arr.mean()), 1) if lengths else 0,
        "length_median": float(np.median(arr)) if lengths else 0,
        "length_histogram": {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]},
        "filters": asdict(cfg.filters),
    }
    if meta:
        report |= {"tokens_train": meta["train_tokens"], "tokens_val": meta["val_tokens"],
                   "docs_train": meta["train_docs"], "docs_val": meta["val_docs"], "token_shards": "tokens/"}
    return report


def write_report(report: dict, out: Path) -> None:
    (out / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Data report: `{report['source']}`", "",
             f"{report['documents_in']:,} documents in, {report['documents_kept']:,} kept "
             f"({report['documents_kept'] / max(report['documents_in'], 1):.1%}) in {report['seconds']} s "
             f"({report['documents_per_second']:,.0f} documents/s, {report['workers']} worker(s)); "
             f"{report['characters_in']:,} characters in, {report['characters_kept']:,} kept.", ""]
    if "tokens_train" in report:
        lines += [f"Tokens: {report['tokens_train']:,} train ({report['docs_train']:,} documents), "
                  f"{report['tokens_val']:,} val ({report['docs_val']:,} documents).", ""]
    lines += ["| drop reason | documents | share |", "|---|---|---|"]
    lines += [f"| {k} | {v['documents']:,} | {v['share']:.2%} |" for k, v in report["drops"].items()]
    lines += [f"| ({k}: lines) | {v:,} | |" for k, v in report["line_counts"].items()]
    h = report["length_histogram"]
    lines += ["", f"Length ({report['length_unit']} per kept document): mean {report['length_mean']:,}, "
              f"median {report['length_median']:,}.", "", f"| {report['length_unit']} | documents |", "|---|---|"]
    lines += [f"| {a:,}-{b - 1:,} | {c:,} |" for a, b, c in zip(h["edges"], h["edges"][1:], h["counts"]) if c]
    (out / "data_report.md").write_text("\n".join(lines) + "\n")
    plot_histogram(report, out / "length_histogram.png")


def plot_histogram(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = report["length_histogram"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.stairs(h["counts"], h["edges"], fill=True, alpha=0.7)
    ax.set(xscale="log", xlabel=f"{report['length_unit']} per kept document", ylabel="documents",
           title=f"{report['documents_kept']:,} kept documents")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=100, metadata={"Software": None})


def print_report(report: dict) -> None:
    table = Table(title=f"lmforge data: {report['source']}" + (" (unchanged: skipped)" if report.get("skipped") else ""))
    for col in ("", "documents", "share"):
        table.add_column(col, justify="left" if not col else "right")
    n = max(report["documents_in"], 1)
    table.add_row("in", f"{report['documents_in']:,}", "")
    table.add_row("kept", f"{report['documents_kept']:,}", f"{report['documents_kept'] / n:.1%}")
    for reason, d in report["drops"].items():
        table.add_row(f"dropped: {reason}", f"{d['documents']:,}", f"{d['share']:.1%}")
    Console().print(table)
    if "tokens_train" in report:
        print(f"tokens: {report['tokens_train']:,} train, {report['tokens_val']:,} val")
    print(f"{report['documents_per_second']:,.0f} documents/s; report: data_report.md")


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, DataStageConfig, prog="lmforge data", description=__doc__)
    print_report(run_data(cfg))
    return 0
