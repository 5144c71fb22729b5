"""lmforge: raw text to an aligned, evaluated, servable language model."""

__version__ = "0.1.0"
