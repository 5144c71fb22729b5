"""Scaling laws: ``laws`` (forms, fits, compute-optimal allocation), ``sweep`` (training the grid, predict then
verify) and ``plots``. The CLI is ``lmforge scaling`` (:mod:`lmforge.stages.scaling`)."""

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
