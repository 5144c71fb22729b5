"""Losses as pure functions: tensors in, a scalar loss out, the math in each docstring."""

from lmforge.objectives.lm import fused_linear_cross_entropy

__all__ = ["fused_linear_cross_entropy"]
