"""Capability density (the Densing Law): N_eff inverts L(N, D) at the model's tokens, checked by hand; a loss at or
below the law's floor is one clear error; intervals come from the fit's bootstrap; the projection is the trend."""

import json
import math

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.scaling.laws import (
    CHINCHILLA,
    BelowFloorError,
    ChinchillaLaw,
    ScoreCurve,
    density,
    effective_params,
    effective_params_samples,
    fit_score_curve,
    interval_with_inf,
    laws_from_samples,
    loss_floor,
    project_params,
)

# chosen so every step is exact by hand: B / D^β = 1000 / (10^6)^0.5 = 1, so the floor at D = 10^6 is 2 + 1 = 3
LAW = ChinchillaLaw(E=2.0, A=100.0, B=1000.0, alpha=0.5, beta=0.5)


def test_effective_params_by_hand():
    assert loss_floor(LAW, 1e6) == pytest.approx(3.0)
    # loss 3.1: A / N_eff^α = 3.1 − 3 = 0.1  ⇒  N_eff^0.5 = 100 / 0.1 = 1000  ⇒  N_eff = 10^6
    assert effective_params(LAW, 3.1, 1e6) == pytest.approx(1e6, rel=1e-9)
    # a 250k-parameter model at that loss does what the law needs 10^6 for: density 4
    assert density(LAW, 3.1, 2.5e5, 1e6) == pytest.approx(4.0, rel=1e-9)
    # loss 3.5: A / N^α = 0.5 ⇒ N = 200² = 40,000; and the law's own prediction inverts to its own size
    assert effective_params(LAW, 3.5, 1e6) == pytest.approx(4e4, rel=1e-9)
    assert effective_params(LAW, float(LAW.loss(1234.0, 5e7)), 5e7) == pytest.approx(1234.0, rel=1e-9)


@pytest.mark.parametrize("loss", [3.0, 2.9, 1.0])
def test_a_loss_at_or_below_the_floor_is_one_clear_error(loss):
    with pytest.raises(BelowFloorError, match=r"at or below the law's floor at D = 1e\+06 tokens.*= 3\.0000"):
        effective_params(LAW, loss, 1e6)


def test_bootstrap_interval_keeps_refits_whose_floor_is_above_the_loss_as_infinite():
    laws = [LAW, ChinchillaLaw(2.0, 100.0, 1000.0, 0.5, 0.5), ChinchillaLaw(3.05, 100.0, 1000.0, 0.5, 0.5)]
    samples = effective_params_samples(laws, 3.1, 1e6)
    assert samples[:2] == pytest.approx([1e6, 1e6]) and math.isinf(samples[2])  # floor 4.05 > 3.1
    assert interval_with_inf(samples, 0.3) == pytest.approx((1e6, 1e6))  # the middle one of three, twice
    lo, hi = interval_with_inf(samples, 0.95)
    assert lo == pytest.approx(1e6) and hi == math.inf  # not NaN, and not the infinite tail silently dropped
    lo, hi = interval_with_inf(np.arange(1.0, 101.0), 0.9)
    assert (lo, hi) == (5.0, 95.0)
    boot = laws_from_samples([[2.0, 100.0, 1000.0, 0.5, 0.5]])
    assert boot == [LAW] and laws_from_samples({"E": [2.0], "A": [100.0], "B": [1000.0], "alpha": [0.5],
                                                "beta": [0.5]}) == [LAW]


def test_projection_halves_every_doubling_time():
    assert project_params(70e9, 0) == 70e9
    assert project_params(70e9, 3.5) == pytest.approx(35e9)
    assert project_params(70e9, 7.0, doubling_months=3.5) == pytest.approx(17.5e9)
    assert project_params(1e9, 12, doubling_months=6) == pytest.approx(0.25e9)


def test_score_curve_inverts_and_fits():
    curve = ScoreCurve(c=0.8, gamma=2.0, l0=3.0, d=0.1)
    assert curve.score(3.0) == pytest.approx(0.5)  # halfway at l0
    assert curve.loss(0.5) == pytest.approx(3.0)
    # S = 0.3: 0.8 / 0.2 − 1 = 3  ⇒  L = 3 + ln 3 / 2
    assert curve.loss(0.3) == pytest.approx(3 + math.log(3) / 2)
    with pytest.raises(ValueError, match="outside the curve's open range"):
        curve.loss(0.95)
    L = np.linspace(1.5, 4.5, 10)
    fitted = fit_score_curve(L, curve.score(L))
    assert fitted.gamma == pytest.approx(2.0, rel=1e-3) and fitted.l0 == pytest.approx(3.0, rel=1e-3)


def write_fit(path, law, boot):
    path.write_text(json.dumps({"law": {"form": "chinchilla", **law.to_dict()},
                                "law_boot": [[b.E, b.A, b.B, b.alpha, b.beta] for b in boot]}))


def test_density_cli_reads_a_fit_prints_intervals_and_refuses_a_loss_below_the_floor(tmp_path, capsys):
    boot = [ChinchillaLaw(2.0, a, 1000.0, 0.5, 0.5) for a in (80.0, 90.0, 100.0, 110.0, 120.0)]
    write_fit(tmp_path / "fit.json", LAW, boot)
    args = ["scaling", "density", "--law", str(tmp_path / "fit.json"), "--params", "2.5e5", "--tokens", "1e6"]
    assert main([*args, "--loss", "3.1", "--json", "--level", "0.5"]) == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    assert r["N_eff"] == pytest.approx(1e6) and r["density"] == pytest.approx(4.0)
    # N_eff = (A / 0.1)² for each refit: the 2nd and 4th of 5 (A = 90, 110) bound the 50% interval
    assert r["N_eff_ci"] == pytest.approx([900.0**2, 1100.0**2]) and r["density_ci"][0] == pytest.approx(3.24)
    assert main([*args, "--loss", "3.1"]) == 0
    out = capsys.readouterr().out
    assert "1e+06" in out or "1M" in out
    assert main([*args, "--loss", "2.95"]) == 2
    err = capsys.readouterr().err
    assert "at or below the law's floor" in err and "Traceback" not in err

    (tmp_path / "runs.csv").write_text("name,n_params,tokens,val_loss\na,250000,1000000,3.1\nb,40000,1000000,3.5\n")
    assert main(["scaling", "density", "--law", str(tmp_path / "fit.json"), "--table", str(tmp_path / "runs.csv"),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["name"] for r in rows] == ["a", "b"] and rows[1]["density"] == pytest.approx(1.0)

    (tmp_path / "curve.json").write_text(json.dumps({"c": 0.8, "gamma": 2.0, "l0": 3.0, "d": 0.1}))
    # score 0.3 -> loss 3 + ln(3)/2 ≈ 3.549 -> N_eff = (100 / 0.549)²
    assert main([*args, "--score", "0.3", "--score-curve", str(tmp_path / "curve.json"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    assert r["N_eff"] == pytest.approx((100 / (math.log(3) / 2)) ** 2)


def test_density_cli_published_law_and_projection(capsys):
    # the published Chinchilla law at its own prediction for 70B params, 1.4T tokens: density 1, no interval
    loss = float(CHINCHILLA.loss(70e9, 1.4e12))
    assert main(["scaling", "density", "--loss", str(loss), "--params", "7e10", "--tokens", "1.4e12",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    assert r["density"] == pytest.approx(1.0, rel=1e-6) and r["N_eff_ci"] is None
    assert main(["scaling", "density", "--project", "--model", "llama-2-70b", "--months", "7", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["rows"][0]["N"] == pytest.approx(17.5e9) and p["rows"][0]["date"] == "2024-02"
    assert "not a measurement" in p["label"]
    assert main(["scaling", "density", "--project", "--model", "llama-2-70b", "--months", "24"]) == 0
    out = capsys.readouterr().out
    assert "PUBLISHED TREND" in out and "604M" in out  # 70B / 2^(24/3.5)
    assert main(["scaling", "density", "--project", "--model", "gpt-9"]) == 2
    assert main(["scaling", "density", "--params", "1e6"]) == 2
