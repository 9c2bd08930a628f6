"""`TrainingCharts.save_png` and `save_svg`: the charts as files, drawn on the server.

No browser is needed: the pictures are drawn from the charts' History by
`ftwidgets.ui.figures` (matplotlib), the same drawing as the run report's.
matplotlib is imported at the first save, so the panel does not load it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftwidgets.engine.events import Best
    from ftwidgets.engine.history import History

__all__ = ["ChartFiles"]


class ChartFiles:
    """Saves the charts of a run as PNG or SVG (mixed into `TrainingCharts`).

    It reads ``history`` (the run's `History`), ``_best`` (the best epoch the charts
    were told of) and ``max_points``. Safe to call from any thread while the run trains.
    """

    history: History
    max_points: int
    _best: Best | None

    def save_png(self, path: str | os.PathLike[str], charts: Sequence[str] | None = None) -> Path:
        """Write the charts to ``path`` as a PNG image, stacked on one epoch axis: loss,
        every other metric, the learning rate (or those ``charts`` names, see
        `ftwidgets.ui.figures.chart_names`). Returns the path.

        Example:

        >>> import tempfile, pathlib
        >>> from ftwidgets.ui.charts import TrainingCharts
        >>> from ftwidgets.engine.history import History
        >>> charts = TrainingCharts(History())
        >>> path = charts.save_png(pathlib.Path(tempfile.mkdtemp()) / "run.png")
        >>> path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
        >>> charts.close()
        """
        return self._save(path, "png", charts)

    def save_svg(self, path: str | os.PathLike[str], charts: Sequence[str] | None = None) -> Path:
        """Write the charts to ``path`` as an SVG image, as `save_png` draws them.

        Each epoch curve is an SVG group named ``curve-<metric>`` (``curve-val_loss``).

        Example:

        >>> import tempfile, pathlib
        >>> from ftwidgets.ui.charts import TrainingCharts
        >>> from ftwidgets.engine.history import History
        >>> charts = TrainingCharts(History())
        >>> path = charts.save_svg(pathlib.Path(tempfile.mkdtemp()) / "run.svg")
        >>> path.read_text().startswith("<svg")
        True
        >>> charts.close()
        """
        return self._save(path, "svg", charts)

    def _save(self, path: str | os.PathLike[str], fmt: str, charts: Sequence[str] | None) -> Path:
        from ftwidgets.ui import figures

        figure = figures.run_figure(
            self.history, best=self._best, charts=charts, max_points=self.max_points
        )
        return figures.save_figure(figure, path, fmt)
