"""Saving a matplotlib figure, the one way every plot in lmforge ends."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path, dpi: int = 120, **savefig_kwargs) -> Path:
    """Lay out ``fig``, write it to ``path`` (parent directories made), close it; returns the path.

    ``savefig_kwargs`` go to ``fig.savefig`` (e.g. ``metadata={"Software": None}`` for byte-stable PNGs)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **savefig_kwargs)
    plt.close(fig)
    return path
