"""What data quality buys, in parameters: the Densing Law's measurement on models small enough for a laptop.

``lmforge scaling density-study --config density_tiny`` trains the same grid of tiny model sizes and compute budgets
(as ``scaling sweep`` does) on several training sets built from one corpus, then measures each model's capability
density against a reference law fitted to one of them (Xiao et al. 2024, "Densing Law of LLMs"):

    raw         the corpus as a crawl delivers it: the text plus boilerplate pages, markup, fragments, exact and
                near duplicates (``lmforge.data.noisy``), mixed with the arithmetic quiz pages (every variant's
                mixture holds each training quiz page once; see ``variant_corpus``)
    clean       the same raw text through lmforge's cleaning, quality filters and exact dedup (``filter_documents``,
                as pretraining runs them), with the same quiz share
    clean_quiz  the clean text with the quiz upweighted (as mid-training does)

Fairness. Every model uses one tokenizer (trained on the clean text) and is scored on the same held-out sets, cut
from the corpus before any noise is added and never trained on: ``text`` (held-out documents of the text) and
``quiz`` (held-out quiz pages), both clean. Every run of a (size, budget) pair reads the same number of tokens D.

Density. L(N, D) = E + A/N^α + B/D^β is fitted to the reference variant's runs on each held-out set (bootstrap
refits for intervals); each model's N_eff inverts it at the model's own D (``laws.effective_params``) and
density = N_eff / N. A variant's summary is the geometric mean density of its runs, with the interval of that
mean over the same refits. A loss below a refit's floor counts as an infinite N_eff in that refit.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lmforge.config import save_config, to_dict
from lmforge.data.mix import MixSource, mix_documents
from lmforge.data.noisy import KINDS, NoiseConfig, clean_report, make_noisy
from lmforge.data.shards import is_val_doc, tokenizer_fingerprint
from lmforge.data.sources import FilterConfig, clean_text, read_documents
from lmforge.errors import ConfigError
from lmforge.evaluation import perplexity
from lmforge.modelio import load_model_and_tokenizer, load_tokenizer
from lmforge.scaling.laws import (
    BelowFloorError,
    bootstrap_chinchilla,
    effective_params,
    effective_params_samples,
    fit_chinchilla,
    interval_with_inf,
    laws_from_samples,
)
from lmforge.scaling.plots import plot_density
from lmforge.train.sweep import (
    ScalingConfig,
    SweepModel,
    plan_run,
    shared_tokenizer,
    train_run,
    write_table,
)

HELDOUT_SALT = 7919  # the held-out split's hash key is seed + this, independent of pretraining's own val split


@dataclass
class StudyVariant:
    name: str = "raw"
    text: str = "raw"  # raw | clean: which text side it trains on
    quiz_weight: float = 0.2  # share of training tokens from the quiz pages (0 = text only)

    def validate(self) -> None:
        if self.text not in ("raw", "clean"):
            raise ValueError(f"variant {self.name!r}: text must be raw or clean, got {self.text!r}")
        if not 0 <= self.quiz_weight < 1:
            raise ValueError(f"variant {self.name!r}: quiz_weight must be in [0, 1)")


def _default_variants() -> list[StudyVariant]:
    return [StudyVariant("raw", "raw", 0.2), StudyVariant("clean", "clean", 0.2),
            StudyVariant("clean_quiz", "clean", 0.5)]


def _default_cleaning() -> FilterConfig:
    return FilterConfig(min_chars=16, min_alpha_ratio=0.7, max_duplicate_line_fraction=0.3, dedup=True)


@dataclass
class DensityStudyConfig:
    out_dir: str = "runs/density_tiny"
    models: list[SweepModel] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)  # training FLOPs per run, C = 6·N·D
    variants: list[StudyVariant] = field(default_factory=_default_variants)
    reference: str = "raw"  # the variant whose runs fit the reference law
    text_source: str = "builtin:tinyshakespeare"
    quiz_source: str = "builtin:tinyworld/quiz"
    heldout_fraction: float = 0.05  # of text documents and of quiz pages, held out before anything else
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    cleaning: FilterConfig = field(default_factory=_default_cleaning)  # raw text -> the clean side
    n_column: str = "n_params"
    min_steps: int = 10
    warmup_fraction: float = 0.1
    n_boot: int = 50
    level: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names) or self.reference not in names:
            raise ValueError(f"variants need distinct names and must include reference={self.reference!r}")
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError("heldout_fraction must be in (0, 0.5)")
        if self.n_column not in ("n_params", "n_params_non_embedding"):
            raise ValueError("n_column must be n_params or n_params_non_embedding")

    def sweep(self, variant: str) -> ScalingConfig:
        return ScalingConfig(out_dir=str(Path(self.out_dir) / variant), models=self.models, budgets=self.budgets,
                             n_column=self.n_column, min_steps=self.min_steps,
                             warmup_fraction=self.warmup_fraction, n_boot=self.n_boot, seed=self.seed)


# ---------------------------------------------------------------------------------------------- the corpora


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def build_corpora(cfg: DensityStudyConfig) -> dict:
    """Held-out sets first, then raw and clean text and the training quiz pages, as files under out_dir/corpus;
    returns corpus.json (paths, sizes, and what cleaning kept of each kind of noise). Built once per config."""
    folder = Path(cfg.out_dir) / "corpus"
    meta_path = folder / "corpus.json"
    settings = {k: to_dict(cfg)[k] for k in ("text_source", "quiz_source", "heldout_fraction", "noise",
                                              "cleaning", "seed")}
    if meta_path.exists() and json.loads(meta_path.read_text()).get("settings") == settings:
        return json.loads(meta_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    key = cfg.seed + HELDOUT_SALT
    text = [d for d in (clean_text(t) for t in read_documents(cfg.text_source)) if d]
    quiz = [d for d in (clean_text(t) for t in read_documents(cfg.quiz_source)) if d]
    held_text = [d for d in text if is_val_doc(d, cfg.heldout_fraction, key)]
    held_quiz = [d for d in quiz if is_val_doc(d, cfg.heldout_fraction, key)]
    train_text = [d for d in text if not is_val_doc(d, cfg.heldout_fraction, key)]
    train_quiz = [d for d in quiz if not is_val_doc(d, cfg.heldout_fraction, key)]
    noisy = make_noisy(train_text, cfg.noise)
    cleaned, report = clean_report(noisy, cfg.cleaning)
    files = {"text_raw": [{"text": t, "kind": k} for k, t in noisy], "text_clean": [{"text": t} for t in cleaned],
             "quiz_train": [{"text": t} for t in train_quiz], "heldout_text": [{"text": t} for t in held_text],
             "heldout_quiz": [{"text": t} for t in held_quiz]}
    for name, rows in files.items():
        _write_jsonl(folder / f"{name}.jsonl", rows)
    meta = {"settings": settings, "files": {k: str(folder / f"{k}.jsonl") for k in files},
            "docs": {k: len(v) for k, v in files.items()},
            "chars": {k: sum(len(r["text"]) for r in v) for k, v in files.items()}, "cleaning": report}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def variant_corpus(variant: StudyVariant, corpus: dict, tokenizer, seed: int) -> tuple[str, dict]:
    """The variant's training set, mixed once by token share (``mix_documents``: the raw or clean text, and the
    quiz pages at ``quiz_weight``) and written as one file that every run of the variant reads as it is; returns
    (its path, the stamp that identifies its contents).

    Sized so the mixture holds every training quiz page exactly once (total = quiz tokens / quiz_weight) and the
    text fills the rest, repeated as often as that takes: every variant sees the same quiz pages, so a difference
    on the held-out quiz comes from the shares and the text, not from one side seeing fewer distinct pages."""
    text = corpus["files"]["text_raw" if variant.text == "raw" else "text_clean"]
    mix, total = [MixSource(text, 1 - variant.quiz_weight)], 0
    if variant.quiz_weight > 0:
        quiz = corpus["files"]["quiz_train"]
        mix.append(MixSource(quiz, variant.quiz_weight))
        pages = [json.loads(line)["text"] for line in Path(quiz).read_text(encoding="utf-8").splitlines()]
        total = round(sum(len(ids) + 1 for ids in tokenizer.encode_batch(pages)) / variant.quiz_weight)
    path = Path(corpus["files"]["text_raw"]).parent / f"train_{variant.name}.jsonl"
    meta = path.with_suffix(".json")
    stamp = {"variant": variant.__dict__, "corpus": corpus["settings"], "seed": seed, "total_tokens": total,
             "tokenizer": tokenizer_fingerprint(tokenizer)}
    if path.exists() and meta.exists() and json.loads(meta.read_text()).get("stamp") == stamp:
        return str(path), stamp
    no_filters = FilterConfig(dedup=False)  # raw keeps its duplicates; the clean side was filtered already
    docs, _, report = mix_documents(mix, tokenizer, no_filters, seed, total)
    _write_jsonl(path, [{"text": d} for d in docs])
    meta.write_text(json.dumps({"stamp": stamp, "sources": {k: {x: y for x, y in v.items() if x != "documents"}
                                                             for k, v in report.items()}}, indent=2) + "\n")
    return str(path), stamp


def check_runs_match(folder: Path, stamp: dict) -> None:
    """A variant's folder keeps the stamp of the data its runs trained on; other data is an error, not a reuse."""
    record = folder / "data_stamp.json"
    if record.exists() and json.loads(record.read_text()) != json.loads(json.dumps(stamp)):
        raise ConfigError(f"{folder} holds runs trained on another version of this variant's data (the corpus, "
                          "noise, cleaning or mix changed); delete it or use another study.out_dir")
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(stamp, indent=2) + "\n")


def variant_base(base, source: str, tok_dir: Path):
    """The pretrain config of a variant: its mixed training file, read without filters or dedup."""
    data = replace(base.data, source=source, mix=[], mix_tokens=0, filters=FilterConfig(dedup=False))
    return replace(base, data=data, tokenizer=str(tok_dir))


# ---------------------------------------------------------------------------------------------- running


def heldout_losses(run_dir: Path, corpus: dict, seq_len: int) -> dict:
    """Loss (nats/token) of a run's model on each held-out set; cached in run_dir/heldout.json."""
    cache = run_dir / "heldout.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, tok = load_model_and_tokenizer(run_dir / "model", device="cpu")
    out = {}
    for name in ("text", "quiz"):
        docs = [json.loads(line)["text"] for line in Path(corpus["files"][f"heldout_{name}"]).read_text().splitlines()]
        out[f"heldout_{name}"] = perplexity(model, tok, docs, seq_len=seq_len, batch_size=32)["loss"]
    cache.write_text(json.dumps(out) + "\n")
    return out


def run_density_study(cfg: DensityStudyConfig, base) -> dict:
    """Build the corpora, train every (variant, size, budget) run not done yet, score it on the held-out sets,
    then fit, measure and report. Returns study.json's content."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "study.yaml")
    save_config(base, out / "pretrain.yaml")
    t0 = time.time()
    corpus = build_corpora(cfg)
    tok_dir = shared_tokenizer(replace(base, data=replace(base.data, source=corpus["files"]["text_clean"])), out)
    tokenizer = load_tokenizer(tok_dir)
    rows, total = [], len(cfg.variants) * len(cfg.models) * len(cfg.budgets)
    for variant in cfg.variants:
        source, stamp = variant_corpus(variant, corpus, tokenizer, cfg.seed)
        vbase, scfg = variant_base(base, source, tok_dir), cfg.sweep(variant.name)
        check_runs_match(Path(scfg.out_dir), stamp)
        for budget in cfg.budgets:
            for size in cfg.models:
                print(f"[density] run {len(rows) + 1}/{total}: {variant.name}", flush=True)
                spec = plan_run(size, budget, vbase, tokenizer.vocab_size, scfg)
                row = train_run(spec, vbase, Path(scfg.out_dir), tok_dir, scfg)
                row.update(variant=variant.name, **heldout_losses(Path(scfg.out_dir) / "runs" / spec.name, corpus,
                                                                  base.seq_len))
                rows.append(row)
                write_table(rows, out / "study.csv", columns=STUDY_COLUMNS)
    print(f"[density] {len(rows)} runs in {time.time() - t0:.0f} s", flush=True)
    result = {"reference": cfg.reference, "level": cfg.level, "n_boot": cfg.n_boot, "corpus": corpus,
              "variants": [v.__dict__ for v in cfg.variants], "rows": rows,
              "analysis": {name: analyse(rows, cfg, f"heldout_{name}") for name in ("text", "quiz")}}
    (out / "study.json").write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    result["plot"] = str(plot_density(out / "density.png", result))
    (out / "report.md").write_text(study_markdown(result))
    return result


STUDY_COLUMNS = ("variant", "name", "n_params", "n_params_non_embedding", "tokens", "steps", "budget", "flops",
                 "val_loss", "heldout_text", "heldout_quiz", "seconds")


def _json_default(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


# ---------------------------------------------------------------------------------------------- analysis


def analyse(rows: list[dict], cfg: DensityStudyConfig, column: str) -> dict:
    """The reference law on ``column`` (fitted to the reference variant's runs, with bootstrap refits), every
    run's N_eff and density with intervals, and each variant's geometric-mean density with its interval."""
    ref = [r for r in rows if r["variant"] == cfg.reference]
    N, D, L = (np.array([r[k] for r in ref], dtype=float) for k in (cfg.n_column, "tokens", column))
    fit = fit_chinchilla(N, D, L)
    boot = laws_from_samples(bootstrap_chinchilla(N, D, L, fit, n_boot=cfg.n_boot, seed=cfg.seed)["samples"])
    per_run, log_samples = [], {}
    for r in rows:
        n, d = float(r[cfg.n_column]), float(r["tokens"])
        try:
            n_eff = effective_params(fit.law, r[column], d)
        except BelowFloorError:
            n_eff = math.inf
        samples = effective_params_samples(boot, r[column], d) / n
        lo, hi = interval_with_inf(samples, cfg.level)
        per_run.append({"variant": r["variant"], "name": r["name"], "N": n, "D": d, "loss": r[column],
                        "predicted": float(fit.law.loss(n, d)), "N_eff": n_eff, "density": n_eff / n,
                        "density_ci": [lo, hi]})
        log_samples.setdefault(r["variant"], []).append(np.log(samples))
    summary = {}
    for v in cfg.variants:
        runs = [p for p in per_run if p["variant"] == v.name]
        point = math.exp(float(np.mean([math.log(p["density"]) for p in runs])))
        lo, hi = interval_with_inf(np.exp(np.mean(log_samples[v.name], axis=0)), cfg.level)
        summary[v.name] = {"density": point, "ci": [lo, hi], "runs": len(runs),
                           "mean_loss": float(np.mean([p["loss"] for p in runs]))}
    return {"column": column, "law": fit.law.to_dict(), "n_ref_runs": len(ref), "n_boot": len(boot),
            "runs": per_run, "summary": summary}


def _x(value: float) -> str:
    return "∞" if not math.isfinite(value) else f"{value:.2f}"


def study_markdown(result: dict, per_run: bool = True) -> str:
    """report.md: what each training set holds, each variant's summary, every run's densities (``per_run``),
    the plot."""
    corpus, level = result["corpus"], f"{result['level']:.0%}"
    lines = ["# Capability density: what cleaner data is worth in parameters", "",
             f"Reference law fitted to the `{result['reference']}` runs; densities N_eff / N with {level} "
             f"percentile intervals over {result['n_boot']} bootstrap refits (Xiao et al. 2024, the Densing Law).",
             "", "## The training text", "", "| kind | raw docs | raw chars | kept by cleaning | dropped (reason) |",
             "|---|---:|---:|---:|---|"]
    for kind in ("clean", *KINDS):
        cells = corpus["cleaning"].get(kind, {})
        docs = sum(c["docs"] for c in cells.values())
        chars = sum(c["chars"] for c in cells.values())
        kept = cells.get("kept", {"chars": 0})["chars"]
        dropped = ", ".join(f"{r} {c['docs']}" for r, c in cells.items() if r != "kept") or "—"
        lines.append(f"| {kind} | {docs:,} | {chars:,} | {kept / max(chars, 1):.0%} of chars | {dropped} |")
    lines += ["", f"Held out before any noise (never trained on): {corpus['docs']['heldout_text']} text documents, "
                  f"{corpus['docs']['heldout_quiz']} quiz pages.", ""]
    for name, a in result["analysis"].items():
        law = a["law"]
        lines += [f"## Held-out {name}", "",
                  f"Reference L(N, D) = {law['E']:.3f} + {law['A']:.4g}/N^{law['alpha']:.3f} + "
                  f"{law['B']:.4g}/D^{law['beta']:.3f} ({a['n_ref_runs']} runs).", "",
                  "| variant | runs | mean loss | density (geometric mean) |", "|---|---:|---:|---|"]
        for v, s in a["summary"].items():
            lines.append(f"| {v} | {s['runs']} | {s['mean_loss']:.4f} | {_x(s['density'])} "
                         f"[{_x(s['ci'][0])}, {_x(s['ci'][1])}] |")
        lines.append("")
        if not per_run:
            continue
        lines += ["| variant | run | N | D | loss | law predicts | N_eff | density |", "|---|---|---:|---:|---:|"
                  "---:|---:|---|"]
        for p in a["runs"]:
            lo, hi = p["density_ci"]
            n_eff = "∞" if not math.isfinite(p["N_eff"]) else f"{p['N_eff']:,.0f}"
            lines.append(f"| {p['variant']} | {p['name']} | {p['N']:,.0f} | {p['D']:,.0f} | {p['loss']:.4f} | "
                         f"{p['predicted']:.4f} | {n_eff} | {_x(p['density'])} [{_x(lo)}, {_x(hi)}] |")
        lines.append("")
    if per_run:
        lines += ["![density](density.png)", ""]
    return "\n".join(lines)
