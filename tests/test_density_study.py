"""The density study: the dirty corpus and what lmforge's cleaning keeps of it, the density analysis on runs from
a known law, and `lmforge scaling density-study` end to end on a micro grid."""

import json
from dataclasses import replace

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data.noisy import KINDS, NoiseConfig, clean_report, make_noisy
from lmforge.data.sources import FilterConfig, filter_documents, read_documents
from lmforge.data.tinyworld import quiz_pages
from lmforge.scaling.laws import ChinchillaLaw
from lmforge.train.density_study import DensityStudyConfig, StudyVariant, analyse

CLEANING = FilterConfig(min_chars=16, min_alpha_ratio=0.7, max_duplicate_line_fraction=0.3)


def shakespeare(n_chars=60_000):
    docs, total = [], 0
    for d in read_documents("builtin:tinyshakespeare"):
        docs.append(d)
        total += len(d)
        if total > n_chars:
            return docs


def test_noise_comes_in_the_configured_shares_and_cleaning_removes_what_its_filters_can_see():
    docs = shakespeare()
    cfg = NoiseConfig(boilerplate=0.2, markup=0.2, fragment=0.02, exact_dup=0.3, near_dup=0.1, seed=3)
    noisy = make_noisy(docs, cfg)
    assert noisy == make_noisy(docs, cfg) and noisy[:len(docs)] == [("clean", d) for d in docs]
    total = sum(map(len, docs))
    for kind in KINDS:
        chars = sum(len(t) for k, t in noisy if k == kind)
        assert getattr(cfg, kind) * total <= chars < getattr(cfg, kind) * total * 1.3 + 3000, kind
    kept, report = clean_report(noisy, CLEANING)
    assert kept == filter_documents([t for _, t in noisy], CLEANING)[0]  # exactly what pretraining's filters keep

    def share(kind, reason):
        cells = report[kind]
        return cells.get(reason, {"chars": 0})["chars"] / sum(c["chars"] for c in cells.values())

    assert share("exact_dup", "kept") == 0 and share("exact_dup", "duplicate") > 0.9
    assert share("boilerplate", "repetitive") > 0.7 and share("markup", "low_alpha") > 0.7
    assert share("fragment", "kept") < 0.05
    assert share("near_dup", "kept") > 0.9  # exact dedup cannot see them: the cleaned side still has these
    assert share("clean", "kept") > 0.98  # and the filters cost the real text almost nothing

    near = replace(CLEANING, near_dedup=True)  # MinHash near-dedup sees what exact dedup cannot
    kept, report = clean_report(noisy, near)
    assert kept == filter_documents([t for _, t in noisy], near, progress=False)[0]
    assert share("near_dup", "near_duplicate") > 0.5 and share("clean", "kept") > 0.98


LAW = ChinchillaLaw(E=1.5, A=40.0, B=300.0, alpha=0.35, beta=0.3)


def runs_from(law, variant, size_factor=1.0, noise=0.0, seed=0):
    """A 4 x 3 grid whose losses are what ``law`` says a model ``size_factor`` times larger would reach."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (1e4, 2e4, 4e4, 8e4):
        for d in (1e6, 3e6, 1e7):
            loss = float(law.loss(n * size_factor, d)) * float(np.exp(rng.normal(0, noise)))
            rows.append({"variant": variant, "name": f"n{n:g}-d{d:g}", "n_params": n, "tokens": d,
                         "heldout_text": loss})
    return rows


def test_analysis_finds_the_parameter_multiple_a_better_training_set_is_worth():
    cfg = DensityStudyConfig(variants=[StudyVariant("raw", "raw", 0.0), StudyVariant("clean", "clean", 0.0)],
                             n_boot=6, level=0.9)
    rows = runs_from(LAW, "raw", noise=0.002) + runs_from(LAW, "clean", size_factor=3.0)
    a = analyse(rows, cfg, "heldout_text")
    raw, clean = a["summary"]["raw"], a["summary"]["clean"]
    assert raw["density"] == pytest.approx(1.0, rel=0.15) and raw["ci"][0] <= 1.0 <= raw["ci"][1] * 1.05
    # clean runs reach the losses of models 3x their size: density 3, the interval around it
    assert clean["density"] == pytest.approx(3.0, rel=0.25) and clean["ci"][0] < 3.0 * 1.1 and clean["ci"][1] > 2.7
    run = next(p for p in a["runs"] if p["variant"] == "clean")
    assert run["N_eff"] == pytest.approx(3 * run["N"], rel=0.3)


@pytest.mark.slow
def test_density_study_cli_micro_grid(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(shakespeare(30_000)))
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(json.dumps({"text": p}) + "\n" for p in quiz_pages(120)))
    out = tmp_path / "study"
    args = ["scaling", "density-study", f"out_dir={out}", f"text_source={text}", f"quiz_source={quiz}",
            "budgets=[2.0e8, 4.0e8]", "min_steps=4", "n_boot=3", "heldout_fraction=0.1",
            "models=[{hidden_size: 8, num_hidden_layers: 1}, {hidden_size: 16, num_hidden_layers: 1}, "
            "{hidden_size: 24, num_hidden_layers: 1}]",
            "variants=[{name: raw, text: raw, quiz_weight: 0.2}, {name: clean, text: clean, quiz_weight: 0.2}]",
            "pretrain.vocab_size=300", "pretrain.seq_len=32", "pretrain.train.batch_size=4",
            "pretrain.train.micro_batch_size=4", "pretrain.train.eval_batches=1", "pretrain.train.log_every=4"]
    assert main(args) == 0
    study = json.loads((out / "study.json").read_text())
    assert len(study["rows"]) == 12 and {r["variant"] for r in study["rows"]} == {"raw", "clean"}
    for r in study["rows"]:
        assert r["heldout_text"] > 0 and r["heldout_quiz"] > 0
    pairs = {}
    for r in study["rows"]:  # each (size, budget) reads the same number of tokens on either side
        pairs.setdefault(r["name"], set()).add(r["tokens"])
    assert all(len(t) == 1 for t in pairs.values())
    corpus = study["corpus"]
    assert corpus["chars"]["text_raw"] > 1.5 * corpus["chars"]["text_clean"]
    def texts(name):
        return {json.loads(line)["text"] for line in (out / "corpus" / f"{name}.jsonl").read_text().splitlines()}

    held, quiz_pool = texts("heldout_text"), texts("quiz_train")
    assert held and not held & (texts("train_raw") | texts("train_clean"))
    assert quiz_pool <= texts("train_raw") and quiz_pool <= texts("train_clean")  # the same quiz pages both sides
    for name in ("text", "quiz"):
        a = study["analysis"][name]
        assert a["n_ref_runs"] == 6 and set(a["summary"]) == {"raw", "clean"}
    report = (out / "report.md").read_text()
    assert "| clean |" in report and "exact_dup" in report and (out / "density.png").stat().st_size > 5000
    assert "density (geometric mean)" in capsys.readouterr().out
    assert main(args) == 0  # a rerun trains nothing
    assert "done already" in capsys.readouterr().out
    assert main([*args, "noise.markup=0.3"]) == 2  # other data under the same runs: an error, not a silent reuse
    assert "holds runs trained on another version" in capsys.readouterr().err
