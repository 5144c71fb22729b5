"""Scaling-law figures (matplotlib, Agg backend, imported only when a plot is drawn).

* ``fit.png``: measured loss vs tokens D, one colour per model size N, with the fitted L(N, D) through them;
* ``isoflop.png``: loss vs N at each compute budget, the parabola in log N and its minimum (approach 2);
* ``frontier.png``: compute-optimal N and D vs C from every approach, and loss vs C with the L(C) law;
* ``density.png`` (the density study): each run's capability density N_eff / N against N, one colour per training
  set, with bootstrap intervals and each set's geometric mean, one panel per held-out set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.figures import save_figure
from lmforge.scaling.laws import ChinchillaLaw, ComputeLaw, IsoFlopFit, tokens_per_param_rule


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _span(x, pad: float = 1.5) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return np.logspace(np.log10(x.min() / pad), np.log10(x.max() * pad), 100)


def plot_fit(path: Path, N, D, L, law: ChinchillaLaw) -> Path:
    plt = _pyplot()
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    sizes = np.unique(N)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ds = _span(D)
    for n, c in zip(sizes, colors):
        sel = N == n
        ax.scatter(D[sel], L[sel], color=c, s=28, zorder=3, label=f"N = {n:.3g}")
        ax.plot(ds, law.loss(n, ds), color=c, lw=1.2)
    ax.set(xscale="log", xlabel="tokens D", ylabel="validation loss (nats/token)",
           title=f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, path)


def plot_isoflop(path: Path, N, C, L, iso: IsoFlopFit) -> Path:
    plt = _pyplot()
    N, C, L = (np.asarray(x, dtype=float) for x in (N, C, L))
    budgets = np.unique(C)
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(budgets)))
    profiles = {p.budget: p for p in iso.profiles}
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for budget, c in zip(budgets, colors):
        sel = C == budget
        ax.scatter(N[sel], L[sel], color=c, s=28, zorder=3, label=f"C = {budget:.2g}")
        p = profiles.get(float(budget))
        if p is not None:
            ns = _span(N[sel], 1.2)
            ax.plot(ns, np.polyval(p.coeffs, np.log(ns)), color=c, lw=1.2)
            ax.scatter([p.n_opt], [p.loss_opt], color=c, marker="*", s=160, edgecolor="k", zorder=4)
    ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss (nats/token)",
           title="IsoFLOP profiles (★ = parabola minimum)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, path)


def plot_frontier(path: Path, C, L, *, law: ChinchillaLaw | None, iso: IsoFlopFit | None,
                  compute_law: ComputeLaw | None) -> Path:
    plt = _pyplot()
    C, L = np.asarray(C, dtype=float), np.asarray(L, dtype=float)
    cs = _span(C, 3)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    n20, d20 = tokens_per_param_rule(cs)
    left.plot(cs, n20, "k:", lw=1, label="N, 20 tokens/param")
    left.plot(cs, d20, "k--", lw=1, label="D, 20 tokens/param")
    if iso is not None:
        pc = np.array([p.budget for p in iso.profiles])
        left.scatter(pc, [p.n_opt for p in iso.profiles], color="C0", zorder=3)
        left.scatter(pc, [p.d_opt for p in iso.profiles], color="C1", zorder=3)
        n_fit, d_fit = iso.optimal(cs)
        left.plot(cs, n_fit, color="C0", label=f"N_opt ∝ C^{iso.n_exp:.2f} (IsoFLOP)")
        left.plot(cs, d_fit, color="C1", label=f"D_opt ∝ C^{iso.d_exp:.2f} (IsoFLOP)")
    if law is not None and law.alpha > 0 and law.beta > 0:
        n3, d3 = law.optimal(cs)
        a, b = law.exponents
        left.plot(cs, n3, color="C0", ls="-.", label=f"N_opt ∝ C^{a:.2f} (L(N,D) fit)")
        left.plot(cs, d3, color="C1", ls="-.", label=f"D_opt ∝ C^{b:.2f} (L(N,D) fit)")
    left.set(xscale="log", yscale="log", xlabel="training FLOPs C = 6ND", ylabel="parameters / tokens",
             title="compute-optimal allocation")
    left.legend(fontsize=7)
    left.grid(alpha=0.3, which="both")

    right.scatter(C, L, color="0.6", s=16, label="runs")
    if iso is not None:
        right.scatter([p.budget for p in iso.profiles], [p.loss_opt for p in iso.profiles], color="C3",
                      marker="*", s=120, zorder=3, label="IsoFLOP minima")
    if compute_law is not None:
        form = f"{compute_law.E:.3g} + " if compute_law.E else ""
        right.plot(cs, compute_law.loss(cs), color="C3",
                   label=f"L = {form}({compute_law.C_c:.2g}/C)^{compute_law.alpha_C:.3f}")
    if law is not None and law.alpha > 0 and law.beta > 0:
        right.plot(cs, law.loss(*law.optimal(cs)), color="C2", ls="-.", label="L(N_opt, D_opt) from L(N,D) fit")
    right.set(xscale="log", xlabel="training FLOPs C", ylabel="validation loss (nats/token)",
              title="loss vs compute")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, which="both")
    return _save(plt, fig, path)


def plot_density(path: Path, study: dict) -> Path:
    """Density vs N per variant (intervals clipped at the axis where a refit's floor made them infinite)."""
    plt = _pyplot()
    panels = list(study["analysis"].items())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    names = [v["name"] for v in study["variants"]]
    for ax, (held, a) in zip(axes[0], panels):
        finite = [x for p in a["runs"] for x in (p["density"], *p["density_ci"]) if np.isfinite(x) and x > 0]
        top = max(finite) * 3 if finite else 10.0
        for i, (name, c) in enumerate(zip(names, plt.cm.tab10.colors)):
            runs = [p for p in a["runs"] if p["variant"] == name]
            x = np.array([p["N"] for p in runs]) * 1.06 ** (i - (len(names) - 1) / 2)  # side by side
            y = np.array([min(p["density"], top) for p in runs])
            lo = np.array([min(p["density_ci"][0], top) for p in runs])
            hi = np.array([min(p["density_ci"][1], top) for p in runs])
            ax.errorbar(x, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], fmt="o", ms=4, color=c,
                        capsize=2, lw=0.8, label=f"{name}: {_geo(a['summary'][name]['density'])}")
            ax.axhline(min(a["summary"][name]["density"], top), color=c, ls="--", lw=0.8)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="density N_eff / N",
               title=f"held-out {held}: reference law = {study['reference']} runs")
        sizes = sorted({p["N"] for p in a["runs"]})  # the sizes trained: a sweep of tiny models spans no decade
        ax.set_xticks(sizes, [f"{n / 1e3:.0f}k" if n < 1e6 else f"{n / 1e6:.1f}M" for n in sizes])
        ax.legend(fontsize=7, title="geometric mean", title_fontsize=7)
        ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, path)


def _geo(x: float) -> str:
    return "∞" if not np.isfinite(x) else f"{x:.2f}x"


def _save(plt, fig, path: Path) -> Path:
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:  # label decades only: minor labels on a log axis collide
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_minor_formatter(NullFormatter())
    return save_figure(fig, path)
