"""Scalar logging for training runs: a CSV that is always there, TensorBoard when installed.

``run_dir/scalars.csv`` is in long format, one row per scalar::

    step,name,value
    100,loss/total,0.4213
    100,lr,0.0003

It is flushed on every :meth:`ScalarLogger.log`, so it can be read (or
plotted with :func:`plot_curves`) while the run is going, and it is appended
to on resume. If a run resumes from an earlier step than it had logged, the
rows after that step are superseded: :func:`read_scalars` keeps, per name,
only the rows of the latest pass over each step.

TensorBoard event files (``run_dir/tensorboard/``) are written in addition
when ``torch.utils.tensorboard`` imports, which needs the optional
``tensorboard`` package; without it the logger silently writes the CSV only.
``ScalarLogger.backends`` says which are active.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_SMOOTHING",
    "SCALARS_FILENAME",
    "TENSORBOARD_DIRNAME",
    "ScalarLogger",
    "plot_curves",
    "read_scalars",
]

SCALARS_FILENAME = "scalars.csv"
TENSORBOARD_DIRNAME = "tensorboard"
CSV_HEADER = ("step", "name", "value")
# Weight of the exponential smoothing drawn over raw curves (TensorBoard's default).
DEFAULT_SMOOTHING = 0.6
# Separates a scalar's group from the rest of its name: "loss/total" -> "loss".
GROUP_SEPARATOR = "/"
# Figure layout: subplots per row and the size of one subplot in inches.
PLOT_COLUMNS = 3
SUBPLOT_SIZE_INCHES = (5.0, 3.5)
PLOT_DPI = 100
# Opacity of the raw curve drawn behind the smoothed one.
RAW_CURVE_ALPHA = 0.3


class ScalarLogger:
    """Append scalars to ``run_dir/scalars.csv`` (and TensorBoard when available).

    Args:
        run_dir: The run's folder (created if needed).
        tensorboard: Also write TensorBoard event files, if the package imports.

    Attributes:
        backends: Active backends, ``("csv",)`` or ``("csv", "tensorboard")``.
        csv_path: The CSV file.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / SCALARS_FILENAME
        is_new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        needs_newline = False
        if not is_new:
            with open(self.csv_path, newline="") as file:
                header = next(csv.reader(file), None)
            if tuple(header or ()) != CSV_HEADER:
                raise ValueError(
                    f"{self.csv_path} exists but its header is {header}, not {list(CSV_HEADER)}; "
                    "not a scalars file of this logger"
                )
            with open(self.csv_path, "rb") as file:
                file.seek(-1, os.SEEK_END)
                # A crash mid-row leaves no final newline: start a fresh row.
                needs_newline = file.read(1) != b"\n"
        self._file = open(self.csv_path, "a", newline="")  # noqa: SIM115 (closed in close())
        self._writer = csv.writer(self._file)
        if needs_newline:
            self._file.write("\n")
        if is_new:
            self._writer.writerow(CSV_HEADER)
        self._file.flush()

        self._tensorboard: Any = None
        backends = ["csv"]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional ``tensorboard`` package is absent
                pass
            else:
                self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIRNAME))
                backends.append("tensorboard")
        self.backends: tuple[str, ...] = tuple(backends)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` (name -> number or one-element tensor) at ``step``."""
        if self._file.closed:
            raise ValueError("ScalarLogger is closed")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {step!r}")
        rows = []
        for name, value in scalars.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"scalar names must be non-empty strings, got {name!r}")
            rows.append((step, name, float(value)))
        self._writer.writerows(rows)
        self._file.flush()
        if self._tensorboard is not None:
            for _, name, value in rows:
                self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close every backend; safe to call twice."""
        if not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> ScalarLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_scalars(csv_path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """Read a scalars CSV into ``{name: [(step, value), ...]}`` with steps increasing.

    When a step repeats or goes back (a resumed run), the earlier rows from
    that step on are dropped, so each curve shows the run that continued.
    Malformed rows (a line cut by a crash) are skipped with a warning.
    """
    csv_path = Path(csv_path)
    curves: dict[str, list[tuple[int, float]]] = {}
    num_malformed = 0
    with open(csv_path, newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if tuple(header or ()) != CSV_HEADER:
            raise ValueError(f"{csv_path}: header {header} is not {list(CSV_HEADER)}")
        for row in reader:
            if not row:
                continue
            try:
                step_text, name, value_text = row
                step, value = int(step_text), float(value_text)
            except ValueError:
                num_malformed += 1
                continue
            curve = curves.setdefault(name, [])
            while curve and curve[-1][0] >= step:
                curve.pop()
            curve.append((step, value))
    if num_malformed:
        warnings.warn(f"{csv_path}: skipped {num_malformed} malformed row(s)", stacklevel=2)
    return curves


def plot_curves(
    csv_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    *,
    names: Iterable[str] | None = None,
    smooth: float = DEFAULT_SMOOTHING,
) -> Path:
    """Plot scalars from a CSV into a PNG, one subplot per group, and return its path.

    Names are grouped by the part before the first ``/`` (``loss/total`` and
    ``loss/kl`` share a subplot). A subplot uses a log y-axis when all its
    finite values are positive and not all equal. With ``smooth > 0`` the raw curve is drawn
    faintly under a debiased exponential moving average of weight ``smooth``.

    Args:
        csv_path: A file written by :class:`ScalarLogger`.
        png_path: Output image (folders are created).
        names: Scalars to plot; None plots all.
        smooth: Smoothing weight in [0, 1); 0 draws the raw curves only.

    Raises:
        ValueError: a requested name is absent, nothing to plot, or bad ``smooth``.
    """
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no GUI,
    # and safe in a training process that may use pyplot elsewhere.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    curves = read_scalars(csv_path)
    if names is not None:
        names = list(names)
        missing = [name for name in names if name not in curves]
        if missing:
            raise ValueError(f"{csv_path} has no scalars {missing}; it has {sorted(curves)}")
        curves = {name: curves[name] for name in names}
    curves = {name: curve for name, curve in curves.items() if curve}
    if not curves:
        raise ValueError(f"{csv_path}: no scalars to plot")

    groups: dict[str, list[str]] = {}
    for name in sorted(curves):
        groups.setdefault(name.split(GROUP_SEPARATOR, 1)[0], []).append(name)
    num_columns = min(PLOT_COLUMNS, len(groups))
    num_rows = math.ceil(len(groups) / num_columns)
    width, height = SUBPLOT_SIZE_INCHES
    figure = Figure(figsize=(width * num_columns, height * num_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(num_rows, num_columns, squeeze=False).ravel()
    for ax, (group, group_names) in zip(axes, groups.items(), strict=False):
        all_values = []
        for index, name in enumerate(group_names):
            steps = [step for step, _ in curves[name]]
            values = [value for _, value in curves[name]]
            all_values.extend(value for value in values if math.isfinite(value))
            color = f"C{index % 10}"
            if smooth > 0:
                ax.plot(steps, values, color=color, alpha=RAW_CURVE_ALPHA, linewidth=1)
                ax.plot(steps, _smoothed(values, smooth), color=color, label=name)
            else:
                ax.plot(steps, values, color=color, label=name)
        # A flat line gains nothing from a log axis (and makes matplotlib warn).
        if all_values and 0 < min(all_values) < max(all_values):
            ax.set_yscale("log")
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.grid(True, alpha=RAW_CURVE_ALPHA)
        ax.legend(fontsize="small")
    for ax in axes[len(groups) :]:
        ax.set_visible(False)

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=PLOT_DPI)
    return png_path


def _smoothed(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard); non-finite values are held over."""
    smoothed = []
    average = 0.0
    num_finite = 0
    for value in values:
        if math.isfinite(value):
            average = weight * average + (1.0 - weight) * value
            num_finite += 1
        # Dividing by 1 - weight**n removes the bias towards the zero start.
        smoothed.append(average / (1.0 - weight**num_finite) if num_finite else math.nan)
    return smoothed
