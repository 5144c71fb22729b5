"""Scaling laws: their forms, fitting them to runs, and the compute-optimal allocation they imply.

Three views of the same question, "how should a compute budget C be split between parameters N and tokens D",
all with training compute C ≈ 6·N·D (Kaplan et al. 2020, §2.1: 2N FLOPs per token forward, 4N backward):

* **Approach 3** of Chinchilla (Hoffmann et al. 2022, §3.3): a parametric loss

      L(N, D) = E + A / N^α + B / D^β

  fitted by minimising the Huber loss (δ = 1e-3) of log-loss residuals, with the prediction written as a
  log-sum-exp so every parameter is unconstrained: log L̂ = LSE(a − α log N, b − β log D, e), A = e^a,
  B = e^b, E = e^e; L-BFGS from a grid of initialisations, keeping the best. Minimising L(N, C/(6N)) over N
  gives the closed form (their eq. 4):

      G = (αA / (βB))^(1/(α+β)),   N_opt = G (C/6)^(β/(α+β)),   D_opt = G⁻¹ (C/6)^(α/(α+β)).

* **Approach 2** (IsoFLOP profiles, §3.2): for each budget C, fit a parabola of loss in log N through runs of
  equal compute, take its vertex as N_opt(C) and D_opt = C / (6 N_opt), then fit N_opt ∝ C^a, D_opt ∝ C^b.

* **Kaplan-style** compute law (Kaplan et al. 2020, eq. 1.3): L(C) = (C_c / C)^α_C on the compute-optimal
  frontier, or L(C) = E + (C_c / C)^α_C with an irreducible term.

* **Capability density** (Xiao et al. 2024/2025, "Densing Law of LLMs", arXiv:2412.04315): a model's effective
  parameter count N_eff is the size a *reference* scaling law needs to reach the model's measured capability,
  here the loss L at the model's own training tokens D, so L(N_eff, D) = L:

      N_eff = (A / (L − E − B/D^β))^(1/α),   density ρ = N_eff / N,

  defined only above the law's floor at D, E + B/D^β (no size reaches a loss at or below it). The paper measures
  capability by task scores mapped to a loss through a fitted sigmoid S(L), and finds the best open models'
  density doubling about every 3.5 months (Feb 2023 to Apr 2025): the trend behind ``project_params``.

Uncertainty comes from the bootstrap: resample runs with replacement, refit, take percentile intervals.
Everything here is numpy + scipy on arrays; nothing trains.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

# ---------------------------------------------------------------------------------------------- law forms


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^α + B / D^β (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt ∝ C^a and D_opt ∝ C^b: a = β/(α+β), b = α/(α+β)."""
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    def optimal(self, C):
        """Compute-optimal (N, D) under C = 6ND, in closed form (Hoffmann et al. 2022, eq. 4)."""
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(f"no compute-optimal allocation: α={self.alpha:.3g}, β={self.beta:.3g} must be > 0")
        C = np.asarray(C, dtype=float)
        a, b = self.exponents
        return self.G * (C / 6) ** a, (C / 6) ** b / self.G

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ChinchillaLaw:
        missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in d]
        if missing:
            raise ValueError(f"a Chinchilla law needs E, A, B, alpha, beta; missing {', '.join(missing)}")
        return cls(**{k: float(d[k]) for k in ("E", "A", "B", "alpha", "beta")})


# Approach 3 as published (Hoffmann et al. 2022, eq. 10), N = parameters, D = tokens, L in nats/token.
CHINCHILLA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def tokens_per_param_rule(C, ratio: float = 20.0):
    """The "20 tokens per parameter" rule of thumb from Chinchilla: D = ratio·N and C = 6ND ⇒ N = √(C/(6·ratio))."""
    N = np.sqrt(np.asarray(C, dtype=float) / (6 * ratio))
    return N, ratio * N


# ---------------------------------------------------------------------------------------------- approach 3

# Hoffmann et al. 2022, appendix D.2: α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}.
DEFAULT_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
_ORDER = ("a", "b", "e", "alpha", "beta")  # θ layout
# Box bounds for L-BFGS-B, far outside any plausible optimum: they only stop unidentified directions (a few
# runs, a bootstrap resample) from running off to exp overflow. α, β ≥ 0 as in the paper's grid.
_BOUNDS = ((-30.0, 80.0), (-30.0, 80.0), (-30.0, 5.0), (0.0, 5.0), (0.0, 5.0))


def huber(r, delta: float):
    """Huber_δ(r) = r²/2 for |r| ≤ δ, else δ(|r| − δ/2) (Huber 1964)."""
    r = np.abs(r)
    return np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))


def _lse_terms(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
    """(..., n, 3) terms a − α log N, b − β log D, e for θ of shape (..., 5)."""
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    return np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, np.broadcast(a, logN).shape)], -1)


def _objective(theta: np.ndarray, logN, logD, logL, delta: float) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(LSE(θ) − log L) and its gradient: ∂LSE/∂(a, b, e) = softmax weights w, ∂/∂α = −w₁ log N, …"""
    t = _lse_terms(theta, logN, logD)
    m = t.max(-1, keepdims=True)
    ex = np.exp(t - m)
    s = ex.sum(-1)
    r = m[..., 0] + np.log(s) - logL
    w = ex / s[..., None]
    psi = np.clip(r, -delta, delta)  # Huber'(r)
    grad = np.array([(psi * w[:, 0]).sum(), (psi * w[:, 1]).sum(), (psi * w[:, 2]).sum(),
                     -(psi * w[:, 0] * logN).sum(), -(psi * w[:, 1] * logD).sum()])
    return float(huber(r, delta).sum()), grad


def _grid_losses(grid: np.ndarray, logN, logD, logL, delta: float) -> np.ndarray:
    t = _lse_terms(grid, logN, logD)
    m = t.max(-1)
    pred = m + np.log(np.exp(t - m[..., None]).sum(-1))
    return huber(pred - logL, delta).sum(-1)


@dataclass
class ChinchillaFit:
    law: ChinchillaLaw
    objective: float  # Σ Huber at the optimum
    n_points: int
    n_starts: int
    converged: bool

    def to_dict(self) -> dict:
        return {**self.law.to_dict(), "objective": self.objective, "n_points": self.n_points,
                "n_starts": self.n_starts, "converged": self.converged}


def make_grid(grid: dict | None = None) -> np.ndarray:
    grid = grid or DEFAULT_GRID
    return np.array(list(itertools.product(*(grid[k] for k in _ORDER))), dtype=float)


def fit_chinchilla(N, D, L, *, delta: float = 1e-3, n_starts: int = 16, grid: dict | None = None,
                   extra_starts: list | None = None) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^α + B/D^β (approach 3 of Hoffmann et al. 2022).

    Minimises Σ Huber_δ(LSE(a − α log N, b − β log D, e) − log L) with L-BFGS from initialisations on a grid
    (theirs by default). The objective is evaluated at every grid point at once and L-BFGS starts from the
    ``n_starts`` best of them (0 = from all, as in the paper) plus ``extra_starts`` (θ = a, b, e, α, β);
    the lowest optimum wins. L-BFGS-B's box (``_BOUNDS``) is the one departure from the paper.
    """
    from scipy.optimize import minimize

    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    if not (N.shape == D.shape == L.shape) or N.ndim != 1:
        raise ValueError("N, D and L must be 1-d arrays of the same length")
    if len(N) < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 runs, got {len(N)}")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise ValueError("N, D and L must all be positive")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    starts = make_grid(grid)
    if n_starts:
        losses = _grid_losses(starts, logN, logD, logL, delta)
        starts = starts[np.argsort(losses, kind="stable")[:n_starts]]
    if extra_starts:
        starts = np.concatenate([np.asarray(extra_starts, dtype=float).reshape(-1, 5), starts])
    best = None
    for x0 in starts:
        res = minimize(_objective, x0, args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B",
                       bounds=_BOUNDS, options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-10})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    a, b, e, alpha, beta = best.x
    law = ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))
    return ChinchillaFit(law, float(best.fun), len(N), len(starts), bool(best.success))


def theta_of(law: ChinchillaLaw) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


# ---------------------------------------------------------------------------------------------- approach 2


@dataclass
class IsoFlopProfile:
    """One budget's parabola L ≈ p₂ x² + p₁ x + p₀ in x = log N, and its vertex."""

    budget: float
    coeffs: tuple[float, float, float]  # p₂, p₁, p₀
    n_opt: float
    d_opt: float
    loss_opt: float
    n_runs: int


def fit_parabola_min(N, L) -> tuple[tuple[float, float, float], float, float]:
    """Least-squares parabola of L in log N; returns (coefficients, N at the vertex, L at the vertex).

    Raises ValueError when the parabola opens downwards or its vertex lies outside the sampled sizes: the
    sizes do not bracket the optimum, and an extrapolated vertex would be a guess.
    """
    x, L = np.log(np.asarray(N, dtype=float)), np.asarray(L, dtype=float)
    if len(np.unique(x)) < 3:
        raise ValueError(f"a parabola needs at least 3 distinct model sizes, got {len(np.unique(x))}")
    p2, p1, p0 = np.polyfit(x, L, 2)
    if p2 <= 0:
        raise ValueError("the loss is not convex in log N at this budget (no minimum); widen the size grid")
    x_min = -p1 / (2 * p2)
    if not x.min() <= x_min <= x.max():
        raise ValueError(f"the minimum (N ≈ {math.exp(x_min):.3g}) lies outside the sampled sizes "
                         f"[{math.exp(x.min()):.3g}, {math.exp(x.max()):.3g}]; move the size grid towards it")
    return (float(p2), float(p1), float(p0)), float(math.exp(x_min)), float(p0 - p1**2 / (4 * p2))


def fit_power(x, y) -> tuple[float, float]:
    """y = k·x^p by least squares in log-log space; returns (k, p)."""
    p, logk = np.polyfit(np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float)), 1)
    return float(math.exp(logk)), float(p)


@dataclass
class IsoFlopFit:
    profiles: list[IsoFlopProfile]
    n_coef: float  # N_opt = n_coef · C^n_exp
    n_exp: float
    d_coef: float  # D_opt = d_coef · C^d_exp
    d_exp: float
    skipped: dict = field(default_factory=dict)  # budget -> why it has no profile

    def optimal(self, C):
        C = np.asarray(C, dtype=float)
        return self.n_coef * C**self.n_exp, self.d_coef * C**self.d_exp

    def to_dict(self) -> dict:
        return {"n_coef": self.n_coef, "n_exp": self.n_exp, "d_coef": self.d_coef, "d_exp": self.d_exp,
                "profiles": [asdict(p) for p in self.profiles],
                "skipped": {str(k): v for k, v in self.skipped.items()}}


def fit_isoflop(N, C, L) -> IsoFlopFit:
    """Approach 2: a parabola per budget (runs sharing a value of C), then power laws N_opt(C), D_opt(C)."""
    N, C, L = (np.asarray(x, dtype=float) for x in (N, C, L))
    profiles, skipped = [], {}
    for budget in np.unique(C):
        sel = C == budget
        try:
            coeffs, n_opt, l_opt = fit_parabola_min(N[sel], L[sel])
        except ValueError as e:
            skipped[float(budget)] = str(e)
            continue
        profiles.append(IsoFlopProfile(float(budget), coeffs, n_opt, float(budget) / (6 * n_opt), l_opt,
                                       int(sel.sum())))
    if len(profiles) < 2:
        why = "; ".join(f"C={k:.3g}: {v}" for k, v in skipped.items())
        raise ValueError(f"IsoFLOP fit needs minima at ≥ 2 budgets, got {len(profiles)}" + (f" ({why})" if why else ""))
    cs = [p.budget for p in profiles]
    n_coef, n_exp = fit_power(cs, [p.n_opt for p in profiles])
    d_coef, d_exp = fit_power(cs, [p.d_opt for p in profiles])
    return IsoFlopFit(profiles, n_coef, n_exp, d_coef, d_exp, skipped)


# ---------------------------------------------------------------------------------------------- Kaplan L(C)


@dataclass(frozen=True)
class ComputeLaw:
    """L(C) = E + (C_c / C)^α_C (Kaplan et al. 2020, eq. 1.3 has E = 0)."""

    C_c: float
    alpha_C: float
    E: float = 0.0

    def loss(self, C):
        return self.E + (self.C_c / np.asarray(C, dtype=float)) ** self.alpha_C

    def to_dict(self) -> dict:
        return asdict(self)


def fit_compute_law(C, L, *, offset: bool = False) -> ComputeLaw:
    """Fit L(C) = (C_c/C)^α_C by log-log regression, or with an offset E by least squares on log L."""
    C, L = np.asarray(C, dtype=float), np.asarray(L, dtype=float)
    if len(C) < (3 if offset else 2):
        raise ValueError(f"a compute law {'with an offset ' if offset else ''}needs at least "
                         f"{3 if offset else 2} points, got {len(C)}")
    k, p = fit_power(C, L)  # L = k C^p with p = −α_C, k = C_c^α_C
    alpha_C = -p
    base = ComputeLaw(C_c=k ** (1 / alpha_C), alpha_C=alpha_C) if alpha_C > 0 else None
    if not offset:
        if base is None:
            raise ValueError("loss does not fall with compute; no power law to fit")
        return base
    from scipy.optimize import least_squares

    logC0 = float(np.log(C).mean())  # fit log C_c relative to the data's scale for conditioning

    def resid(q):
        logCc, aC, E = q
        return np.log(E + np.exp(aC * (logCc + logC0 - np.log(C)))) - np.log(L)

    x0 = [math.log(base.C_c) - logC0 if base else 0.0, max(alpha_C, 0.05), 0.5 * float(L.min())]
    res = least_squares(resid, x0, bounds=([-np.inf, 1e-4, 0.0], [np.inf, 5.0, float(L.min()) * (1 - 1e-9)]))
    logCc, aC, E = res.x
    return ComputeLaw(C_c=float(math.exp(logCc + logC0)), alpha_C=float(aC), E=float(E))


def compute_frontier(C, L) -> tuple[np.ndarray, np.ndarray]:
    """The lower envelope: runs whose loss beats every run with less compute, sorted by C."""
    order = np.argsort(np.asarray(C, dtype=float), kind="stable")
    C, L = np.asarray(C, dtype=float)[order], np.asarray(L, dtype=float)[order]
    keep = L < np.minimum.accumulate(np.concatenate([[np.inf], L[:-1]]))
    return C[keep], L[keep]


# ---------------------------------------------------------------------------------------------- bootstrap


def bootstrap_indices(n: int, n_boot: int, seed: int = 0, groups=None):
    """Yield ``n_boot`` resamples of range(n) with replacement; within each group when ``groups`` is given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, n)
        return
    members = [np.flatnonzero(np.asarray(groups) == g) for g in np.unique(groups)]
    for _ in range(n_boot):
        yield np.concatenate([rng.choice(m, len(m), replace=True) for m in members])


def percentile_ci(samples, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, §13.3); NaN where nothing was sampled."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan")
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_chinchilla(N, D, L, fit: ChinchillaFit, *, n_boot: int = 50, seed: int = 0, delta: float = 1e-3,
                         n_starts: int = 2, level: float = 0.95) -> dict:
    """Percentile CIs for E, A, B, α, β and the allocation exponents a, b by refitting resampled runs.

    Each refit starts from the full-data optimum plus the ``n_starts`` best grid points of its resample.
    Returns {name: (lo, hi)} and the raw samples under "samples".
    """
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    names = ("E", "A", "B", "alpha", "beta", "a", "b")
    samples: dict[str, list[float]] = {k: [] for k in names}
    for idx in bootstrap_indices(len(N), n_boot, seed):
        if len(np.unique(N[idx])) < 2 or len(np.unique(D[idx])) < 2:
            continue
        law = fit_chinchilla(N[idx], D[idx], L[idx], delta=delta, n_starts=n_starts,
                             extra_starts=[theta_of(fit.law)]).law
        s = law.alpha + law.beta
        for k, v in zip(names, (law.E, law.A, law.B, law.alpha, law.beta, law.beta / s, law.alpha / s)):
            samples[k].append(v)
    return {**{k: percentile_ci(v, level) for k, v in samples.items()}, "samples": samples}


def bootstrap_isoflop(N, C, L, *, n_boot: int = 50, seed: int = 0, level: float = 0.95, offset: bool = False) -> dict:
    """CIs for the IsoFLOP exponents and the compute law, resampling runs within each budget."""
    N, C, L = (np.asarray(x, dtype=float) for x in (N, C, L))
    samples: dict[str, list[float]] = {k: [] for k in ("n_exp", "d_exp", "alpha_C", "C_c", "E_C")}
    for idx in bootstrap_indices(len(N), n_boot, seed, groups=C):
        try:
            iso = fit_isoflop(N[idx], C[idx], L[idx])
            law = fit_compute_law([p.budget for p in iso.profiles], [p.loss_opt for p in iso.profiles],
                                  offset=offset and len(iso.profiles) >= 4)
        except ValueError:
            continue
        for k, v in zip(samples, (iso.n_exp, iso.d_exp, law.alpha_C, law.C_c, law.E)):
            samples[k].append(v)
    return {**{k: percentile_ci(v, level) for k, v in samples.items()}, "samples": samples}


# ---------------------------------------------------------------------------------------------- all at once


@dataclass
class Analysis:
    """Every fit of one table of runs, with bootstrap intervals; a fit that could not be made says why."""

    chinchilla: ChinchillaFit | None = None
    chinchilla_ci: dict = field(default_factory=dict)
    isoflop: IsoFlopFit | None = None
    isoflop_ci: dict = field(default_factory=dict)
    compute_law: ComputeLaw | None = None
    compute_points: str = ""  # which (C, L) points the compute law was fitted to
    errors: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        def ci(d):
            return {k: list(v) for k, v in d.items() if k != "samples"}

        samples = self.chinchilla_ci.get("samples", {})
        boot = [list(row) for row in zip(*(samples[k] for k in ("E", "A", "B", "alpha", "beta")))] if samples else []
        return {
            "law": {"form": "chinchilla", **self.chinchilla.to_dict()} if self.chinchilla else None,
            "law_ci": ci(self.chinchilla_ci),
            "law_boot": boot,  # each bootstrap refit's [E, A, B, alpha, beta]: intervals for anything derived
            "isoflop": self.isoflop.to_dict() if self.isoflop else None,
            "isoflop_ci": ci(self.isoflop_ci),
            "compute_law": {**self.compute_law.to_dict(), "points": self.compute_points} if self.compute_law else None,
            "errors": self.errors,
        }


def analyze(N, D, budget, L, *, n_boot: int = 50, seed: int = 0, level: float = 0.95,
            delta: float = 1e-3) -> Analysis:
    """Approach 3, approach 2 and the compute law on one table of runs (``budget`` groups IsoFLOP runs).

    The compute law is fitted to the IsoFLOP minima when there are profiles (with an offset E from 4 of them
    on), else to the lower envelope of the runs' (6ND, L).
    """
    N, D, budget, L = (np.asarray(x, dtype=float) for x in (N, D, budget, L))
    out = Analysis()
    try:
        out.chinchilla = fit_chinchilla(N, D, L, delta=delta)
        if n_boot:
            out.chinchilla_ci = bootstrap_chinchilla(N, D, L, out.chinchilla, n_boot=n_boot, seed=seed,
                                                     delta=delta, level=level)
    except ValueError as e:
        out.errors["law"] = str(e)
    try:
        out.isoflop = fit_isoflop(N, budget, L)
        offset = len(out.isoflop.profiles) >= 4
        out.compute_law = fit_compute_law([p.budget for p in out.isoflop.profiles],
                                          [p.loss_opt for p in out.isoflop.profiles], offset=offset)
        out.compute_points = "IsoFLOP minima"
        if n_boot:
            out.isoflop_ci = bootstrap_isoflop(N, budget, L, n_boot=n_boot, seed=seed, level=level, offset=offset)
    except ValueError as e:
        out.errors["isoflop"] = str(e)
        try:
            fc, fl = compute_frontier(6 * N * D, L)
            out.compute_law = fit_compute_law(fc, fl, offset=len(fc) >= 4)
            out.compute_points = "lower envelope of runs"
        except ValueError as e2:
            out.errors["compute_law"] = str(e2)
    return out


# ---------------------------------------------------------------------------------------------- density


class BelowFloorError(ValueError):
    """A loss at or below what L(N, D) reaches with infinitely many parameters at this D: no finite N_eff."""


def loss_floor(law: ChinchillaLaw, D) -> float:
    """E + B/D^β: the loss L(N, D) approaches as N → ∞ at D training tokens (the irreducible term E plus what
    D tokens cannot teach)."""
    return float(law.E + law.B / np.asarray(D, dtype=float) ** law.beta)


def effective_params(law: ChinchillaLaw, loss: float, D: float) -> float:
    """N_eff with L(N_eff, D) = loss: the reference law's size for this loss at D tokens (Xiao et al. 2024,
    "Densing Law of LLMs", §2: the effective parameter size, here on loss rather than on a task score).

        loss = E + A/N_eff^α + B/D^β   ⇒   N_eff = (A / (loss − E − B/D^β))^(1/α)

    Raises BelowFloorError when loss ≤ E + B/D^β (a size the law cannot name, not an infinite one).
    """
    if law.alpha <= 0 or law.A <= 0:
        raise ValueError(f"the law cannot be inverted in N: A={law.A:.3g}, α={law.alpha:.3g} must be > 0")
    if not (np.isfinite(loss) and D > 0):
        raise ValueError(f"loss must be finite and D positive, got loss={loss}, D={D}")
    floor = loss_floor(law, D)
    gap = loss - floor
    if gap <= 0:
        raise BelowFloorError(
            f"loss {loss:.4f} is at or below the law's floor at D = {D:.3g} tokens, E + B/D^β = {law.E:.4f} + "
            f"{floor - law.E:.4f} = {floor:.4f}: no parameter count reaches it under this law (a better model "
            "than the law can describe, or a loss measured on other text or with another tokenizer)")
    return float((law.A / gap) ** (1 / law.alpha))


def density(law: ChinchillaLaw, loss: float, N: float, D: float) -> float:
    """Capability density ρ = N_eff / N (Xiao et al. 2024): > 1 when the model does better than the
    reference law predicts for its size and data, < 1 when worse."""
    return effective_params(law, loss, D) / N


def effective_params_samples(laws, loss: float, D: float) -> np.ndarray:
    """N_eff under each law of a bootstrap sample; +inf where the loss is below that law's floor."""
    out = []
    for law in laws:
        try:
            out.append(effective_params(law, loss, D))
        except BelowFloorError:
            out.append(math.inf)
    return np.array(out, dtype=float)


def interval_with_inf(samples, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of samples that may hold +inf (a resample's law whose floor is above the loss):
    order statistics, so an upper end past the finite samples is inf rather than NaN or a dropped tail."""
    s = np.sort(np.asarray(samples, dtype=float))
    s = s[~np.isnan(s)]
    if not len(s):
        return math.nan, math.nan
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


def laws_from_samples(samples: dict) -> list[ChinchillaLaw]:
    """The bootstrap's refitted laws from ``bootstrap_chinchilla``'s samples (or fit.json's ``law_boot``)."""
    if isinstance(samples, list):  # fit.json: [[E, A, B, alpha, beta], ...]
        return [ChinchillaLaw(*map(float, row)) for row in samples]
    return [ChinchillaLaw(E, A, B, alpha, beta) for E, A, B, alpha, beta in
            zip(samples["E"], samples["A"], samples["B"], samples["alpha"], samples["beta"])]


# The Densing Law's trend (Xiao et al., Nature Machine Intelligence 2025): the highest capability density among
# open models doubled about every 3.5 months from February 2023 to April 2025 (the 2024 preprint: about 3).
DENSING_DOUBLING_MONTHS = 3.5


def project_params(n_params: float, months: float, doubling_months: float = DENSING_DOUBLING_MONTHS) -> float:
    """Parameters a model released ``months`` later needs to match one of ``n_params`` today, if density keeps
    doubling every ``doubling_months``: N(t) = N · 2^(−t / T). A projection of the published trend, not a
    measurement (Xiao et al. 2025)."""
    if n_params <= 0 or doubling_months <= 0:
        raise ValueError("n_params and doubling_months must be positive")
    return float(n_params * 2.0 ** (-months / doubling_months))


# ---------------------------------------------------------------------------------------------- score vs loss


@dataclass(frozen=True)
class ScoreCurve:
    """Task score against loss, S(L) = d + c / (1 + exp(γ (L − l0))), the sigmoid Xiao et al. 2024 fit to map a
    reference model's loss to its downstream score (γ > 0: the score falls from d + c at low loss to d at high
    loss, steepest at L = l0)."""

    c: float
    gamma: float
    l0: float  # the paper's l
    d: float

    def score(self, L):
        return self.d + self.c / (1 + np.exp(self.gamma * (np.asarray(L, dtype=float) - self.l0)))

    def loss(self, S: float) -> float:
        """The inverse: L = l0 + ln(c / (S − d) − 1) / γ, for S strictly between d and d + c."""
        lo, hi = sorted((self.d, self.d + self.c))
        if not lo < S < hi:
            raise ValueError(f"score {S:g} is outside the curve's open range ({lo:.4g}, {hi:.4g}): it maps to no "
                             "finite loss")
        return float(self.l0 + math.log(self.c / (S - self.d) - 1) / self.gamma)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_score_curve(L, S) -> ScoreCurve:
    """Least-squares S(L) through (loss, score) pairs of reference models (at least 4, for 4 parameters)."""
    from scipy.optimize import curve_fit

    L, S = np.asarray(L, dtype=float), np.asarray(S, dtype=float)
    if len(L) < 4 or len(L) != len(S):
        raise ValueError(f"a score curve needs at least 4 (loss, score) pairs, got {len(L)}")
    spread = float(np.ptp(L)) or 1.0
    p0 = (float(np.ptp(S)) or 1.0, 4.0 / spread, float(np.median(L)), float(S.min()))
    (c, gamma, l0, d), _ = curve_fit(lambda x, c, g, l0, d: d + c / (1 + np.exp(g * (x - l0))), L, S, p0=p0,
                                     maxfev=20000)
    return ScoreCurve(float(c), float(gamma), float(l0), float(d))
