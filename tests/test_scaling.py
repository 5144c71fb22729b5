"""Scaling laws: the fitters recover known laws, the closed-form optimum is the true minimum, the CLI works."""

import csv
import json
import math

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data.sources import builtin_path
from lmforge.scaling.laws import (
    CHINCHILLA,
    ChinchillaLaw,
    bootstrap_chinchilla,
    bootstrap_isoflop,
    fit_chinchilla,
    fit_compute_law,
    fit_isoflop,
    fit_parabola_min,
    tokens_per_param_rule,
)
from lmforge.stages.scaling import main as scaling_main
from lmforge.train.sweep import COLUMNS

TRUE = ChinchillaLaw(E=1.8, A=300.0, B=900.0, alpha=0.33, beta=0.38)


def grid_runs(law, noise=0.004, seed=0):
    """An 8 x 8 grid of (N, D) runs from ``law`` with multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    N, D = (a.ravel() for a in np.meshgrid(np.logspace(6, 9, 8), np.logspace(8, 11, 8)))
    return N, D, law.loss(N, D) * np.exp(rng.normal(0, noise, N.size))


def isoflop_runs(law, budgets=(1e17, 1e18, 1e19, 1e20), noise=0.002, seed=0):
    """For each budget, 7 sizes spread over 0.1x..10x the law's optimum, each trained on D = C / 6N."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n_opt, _ = law.optimal(C)
        for n in n_opt * np.logspace(-1, 1, 7):
            rows.append((n, C / (6 * n), C, float(law.loss(n, C / (6 * n))) * math.exp(rng.normal(0, noise))))
    N, D, C, L = map(np.array, zip(*rows))
    return N, D, C, L


def test_fit_recovers_known_coefficients():
    N, D, L = grid_runs(TRUE)
    law = fit_chinchilla(N, D, L).law
    assert abs(law.alpha - TRUE.alpha) < 0.03 and abs(law.beta - TRUE.beta) < 0.03, law
    assert law.E == pytest.approx(TRUE.E, rel=0.05)
    assert law.A == pytest.approx(TRUE.A, rel=0.4) and law.B == pytest.approx(TRUE.B, rel=0.4)
    # and the fit predicts held-out losses far better than the noise would allow by chance
    assert np.abs(np.log(law.loss(N, D) / L)).mean() < 0.006


def test_fit_rejects_too_few_runs():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_chinchilla([1e6, 1e7], [1e9, 1e9], [3.0, 2.9])


@pytest.mark.parametrize("law", [CHINCHILLA, TRUE])
@pytest.mark.parametrize("C", [1e19, 1e23])
def test_closed_form_optimum_is_the_numeric_minimum(law, C):
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda x: law.loss(math.exp(x), C / (6 * math.exp(x))), bounds=(5, 45),
                          method="bounded", options={"xatol": 1e-10})
    n_opt, d_opt = law.optimal(C)
    assert n_opt == pytest.approx(math.exp(res.x), rel=1e-3)
    assert 6 * n_opt * d_opt == pytest.approx(C, rel=1e-9)


def test_twenty_tokens_rule_at_1e23():
    N, D = tokens_per_param_rule(1e23)
    assert f"{N:.2g}" == "2.9e+10" and f"{D:.2g}" == "5.8e+11"
    assert D / N == pytest.approx(20)


def test_parabola_recovers_an_exact_vertex_and_refuses_an_unbracketed_one():
    n_star = 3.7e8
    N = n_star * np.logspace(-1, 1, 9)
    L = 2.0 + 0.05 * (np.log(N) - math.log(n_star)) ** 2
    _, n_opt, l_opt = fit_parabola_min(N, L)
    assert n_opt == pytest.approx(n_star, rel=1e-6) and l_opt == pytest.approx(2.0, abs=1e-9)
    with pytest.raises(ValueError, match="outside the sampled sizes"):
        fit_parabola_min(N[:4], L[:4])  # only sizes below the optimum: the vertex would be extrapolated


def test_isoflop_recovers_the_laws_allocation_exponent():
    N, D, C, L = isoflop_runs(TRUE)
    iso = fit_isoflop(N, C, L)
    a, b = TRUE.exponents
    assert len(iso.profiles) == 4
    assert abs(iso.n_exp - a) < 0.03 and abs(iso.d_exp - b) < 0.03
    for p in iso.profiles:  # each vertex near the true optimum (a parabola only approximates the profile)
        assert p.n_opt == pytest.approx(TRUE.optimal(p.budget)[0], rel=0.15)
    law = fit_compute_law([p.budget for p in iso.profiles], [p.loss_opt for p in iso.profiles], offset=True)
    assert law.E == pytest.approx(TRUE.E, rel=0.1)


def test_bootstrap_intervals_contain_the_true_values():
    N, D, L = grid_runs(TRUE, seed=1)
    fit = fit_chinchilla(N, D, L)
    ci = bootstrap_chinchilla(N, D, L, fit, n_boot=20, seed=0)
    for name in ("alpha", "beta", "E"):
        lo, hi = ci[name]
        assert lo <= getattr(TRUE, name) <= hi, (name, lo, hi)
        assert hi - lo < 0.5 * getattr(TRUE, name)  # and say something
    a, b = TRUE.exponents
    assert ci["a"][0] <= a <= ci["a"][1]
    N, D, C, L = isoflop_runs(TRUE, seed=2)
    ci = bootstrap_isoflop(N, C, L, n_boot=100, seed=0)
    assert ci["n_exp"][0] <= a <= ci["n_exp"][1], ci["n_exp"]


def write_csv(path, N, D, C, L):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "n_params", "tokens", "budget", "val_loss"])
        for i, row in enumerate(zip(N, D, C, L)):
            w.writerow([f"run{i}", *row])


def test_fit_cli_writes_summary_plots_and_a_law_optimal_reads(tmp_path, capsys):
    N, D, C, L = isoflop_runs(TRUE, noise=0.002)
    write_csv(tmp_path / "sweep.csv", N, D, C, L)
    assert main(["scaling", "fit", "--table", str(tmp_path / "sweep.csv"), "--n-boot", "4"]) == 0
    out = tmp_path / "fit"
    summary = json.loads((out / "fit.json").read_text())
    assert abs(summary["law"]["alpha"] - TRUE.alpha) < 0.05 and abs(summary["law"]["beta"] - TRUE.beta) < 0.05
    assert len(summary["isoflop"]["profiles"]) == 4 and summary["compute_law"]["alpha_C"] > 0
    assert set(summary["law_ci"]) >= {"E", "A", "B", "alpha", "beta"}
    for name in ("fit.png", "isoflop.png", "frontier.png", "fit.md"):
        assert (out / name).stat().st_size > 1000, name
    assert "approach 3" in (out / "fit.md").read_text()

    capsys.readouterr()
    assert main(["scaling", "optimal", "--flops", "1e19", "--law", str(out / "fit.json"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["law"].split(":")[0] for r in rows[:2]] == ["fit.json", "fit.json"]
    n_true, _ = TRUE.optimal(1e19)
    assert rows[0]["N"] == pytest.approx(n_true, rel=0.3) and rows[1]["N"] == pytest.approx(n_true, rel=0.3)


def test_optimal_cli_prints_both_rules(capsys):
    assert main(["scaling", "optimal", "--flops", "1e23", "--gpus", "1024"]) == 0
    out = capsys.readouterr().out
    assert "Chinchilla approach 3" in out and "20 tokens/param" in out
    assert "28.9B" in out and "577B" in out  # the rule: N = √(C/120), D = 20N
    assert "14.6B" in out and "2.005" in out  # published approach 3: N_opt and its predicted loss
    assert "68.6 h (2.9 d)" in out  # 1e23 / (989e12 x 0.4 x 1024) s
    assert main(["scaling", "optimal", "--flops", "1e23", "--law", "nope.json"]) == 2
    assert "expected chinchilla, 20tokens or a JSON file" in capsys.readouterr().err


def test_fit_cli_names_a_missing_column(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("n_params,tokens\n1,2\n")
    assert main(["scaling", "fit", "--table", str(tmp_path / "t.csv")]) == 2
    assert "missing column(s) val_loss" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_micro_grid_writes_the_table_and_resumes(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(builtin_path("tinyshakespeare").read_text()[:40_000])
    args = ["sweep", f"out_dir={tmp_path / 'sw'}", "budgets=[1.0e6]", "min_steps=8", "n_boot=0",
            "models=[{hidden_size: 16, num_hidden_layers: 1}, {hidden_size: 32, num_hidden_layers: 1}]",
            f"pretrain.data.source={corpus}", "pretrain.vocab_size=300", "pretrain.seq_len=32",
            "pretrain.train.batch_size=4", "pretrain.train.micro_batch_size=4", "pretrain.train.eval_batches=2",
            "pretrain.train.log_every=4"]
    assert scaling_main(args) == 0
    with open(tmp_path / "sw" / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 2
    assert [int(r["steps"]) for r in rows] == [8, 8] and int(rows[0]["n_params"]) < int(rows[1]["n_params"])
    for r in rows:
        assert float(r["val_loss"]) > 0 and int(r["tokens"]) == 8 * 4 * 32
        assert float(r["flops"]) == 6 * int(r["n_params"]) * int(r["tokens"])
        assert float(r["flops_with_attention"]) > float(r["flops"])
    assert len((tmp_path / "sw" / "sweep.jsonl").read_text().splitlines()) == 2
    summary = tmp_path / "sw" / "runs" / rows[0]["name"] / "summary.json"
    before = summary.stat().st_mtime_ns
    capsys.readouterr()
    assert scaling_main(args) == 0  # a rerun skips finished runs
    assert "done already" in capsys.readouterr().out and summary.stat().st_mtime_ns == before
