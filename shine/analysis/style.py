"""Shared plotting style of the figure scripts: SciencePlots without LaTeX, Agg backend.

Usage in a figure script (colours and labels of the methods: :mod:`shine.analysis.methods`)::

    from shine.analysis.style import figure, save

    fig, axes = figure(ncols=2)
    ...
    save(fig, "figures/fig_X")        # writes figures/fig_X.pdf and figures/fig_X.png
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or clusters

import matplotlib.pyplot as plt  # noqa: E402

with warnings.catch_warnings():
    # scienceplots 2.2 triggers a matplotlib deprecation warning on import
    warnings.simplefilter("ignore")
    import scienceplots  # noqa: E402, F401  (registers the 'science' styles)

# 'science' alone needs a LaTeX installation; 'no-latex' keeps the look with mathtext
STYLE = ["science", "no-latex"]
COLUMN_WIDTH_IN = 3.3  # one column of a two-column paper


def figure(
    nrows: int = 1, ncols: int = 1, width: float | None = None, height: float = 2.4, **kwargs
):
    """Create a figure with the shared style; ``width`` defaults to one column per panel.

    Args:
        nrows: rows of panels.
        ncols: columns of panels.
        width: figure width in inches (default: :data:`COLUMN_WIDTH_IN` per column).
        height: figure height in inches.
        **kwargs: passed to ``plt.subplots`` (e.g. ``sharey=True``).

    Returns:
        ``(fig, axes)`` with ``axes`` always 2-D.
    """
    plt.style.use(STYLE)
    width = width if width is not None else COLUMN_WIDTH_IN * ncols
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kwargs)


def save(fig, stem: str | Path) -> list[Path]:
    """Write ``<stem>.pdf`` and ``<stem>.png`` (300 dpi), creating the directory; close ``fig``.

    No creation date or software version is embedded, so the same table gives the same bytes
    (regenerated figures show no spurious diff).

    Returns:
        The two written paths.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    metadata = {
        ".pdf": {"CreationDate": None, "Producer": None, "Creator": None},
        ".png": {"Software": None},
    }
    for path in paths:
        fig.savefig(path, dpi=300, bbox_inches="tight", metadata=metadata[path.suffix])
    plt.close(fig)
    return paths
