"""Scaling laws: ``laws`` (forms, fits, compute-optimal allocation) and ``plots``. The sweep that trains the grid
and the predict-then-verify run are lmforge.train.sweep; the CLI is ``lmforge scaling`` (lmforge.stages.scaling)."""

from lmforge.scaling.laws import (
    CHINCHILLA,
    ChinchillaLaw,
    ComputeLaw,
    IsoFlopFit,
    analyze,
    fit_chinchilla,
    fit_compute_law,
    fit_isoflop,
    tokens_per_param_rule,
)

__all__ = ["CHINCHILLA", "ChinchillaLaw", "ComputeLaw", "IsoFlopFit", "analyze", "fit_chinchilla",
           "fit_compute_law", "fit_isoflop", "tokens_per_param_rule"]
