"""Figures: the learning-rate probe's sweep as a picture, and a run's loss curve with its findings marked.

Drawing only: the numbers come from :class:`diag.probe.ProbeResult` (and the verdict the rules gave), or from the
curves a run logged. ``matplotlib`` is optional (``pip install "lightning-diag[plots]"``): without it every function
here returns ``None`` and :data:`INSTALL_HINT` says how to get the figures. Figures are drawn on matplotlib's Agg
canvas directly (no ``pyplot``): the user's backend, open figures and global state are never touched, and drawing
draws no random numbers.

Example::

    from diag.sinks.figures import probe_sweep_image
    image = probe_sweep_image(result, verdict, step=120)   # None without matplotlib
    if image is not None:
        open("lr_probe_1.png", "wb").write(image.png)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import struct
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

INSTALL_HINT = 'pip install "lightning-diag[plots]" (or: pip install "matplotlib>=3.7")'
# TensorBoard image tag of the n-th probe figure of a run (n = 1, 2, ...): ``diag/lr_probe/<n>``; on disk, next to the
# findings, ``<log_dir>/diag/lr_probe_<n>.png``.
PROBE_FIGURE_TAG = "diag/lr_probe"

# The probe's figure: 7 x 5.6 inches at 100 dpi, the legend below; fonts large enough to read at half size
# (TensorBoard's Images tab shrinks images to its card unless 'Show actual image size' is ticked).
PROBE_FIGURE_INCHES = (7.0, 5.6)
LOSS_FIGURE_INCHES = (10.0, 3.8)
DPI = 100
# Loss after the probe's steps relative to before: values outside [FLOOR, CEILING] are drawn at the edge (a fit to
# 1e-26 of the start, or a rise by 1e5, says nothing more than "fitted" / "blew up" at this scale).
RATIO_FLOOR = 1e-4
RATIO_CEILING = 1e2

# Colours: matplotlib's default cycle (colour-blind safe enough, and what users know from their own plots).
REAL, ZEROED, FRESH, DIVERGED = "#1f77b4", "#ff7f0e", "#9467bd", "#d62728"
CURRENT_LR, SUGGESTED_LR = "#444444", "#2ca02c"
SEVERITY_COLOURS = {"error": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}

# What the title's second line says for each verdict (the first line names the code, as the findings do).
VERDICT_TITLES = {
    "lr_too_high": "learning rate too high",
    "lr_too_low": "learning rate too low",
    "lr_ok": "the current learning rate fits the batch",
    "suspected_code_bug": "no learning rate fits the batch",
    "dead_units": "dead units stop the learning",
    "saturated_activations": "saturated units stop the learning",
    "bad_initialization": "the initial weights stop the learning",
}


@dataclasses.dataclass(frozen=True)
class Image:
    """A rendered figure: PNG bytes and the pixel size (TensorBoard's image summary needs both)."""

    png: bytes
    width: int
    height: int


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(inches: Tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=inches, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


@contextlib.contextmanager
def _drawing() -> Iterator[None]:
    """matplotlib's default style while drawing: the user's rcParams (a dark style, huge fonts) do not leak into our
    figures, and theirs are put back after (``style.context`` leaves the backend alone)."""
    import matplotlib.style

    with matplotlib.style.context("default"):
        yield


def _render(figure: Any) -> Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    png = buffer.getvalue()
    width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR chunk: width, height
    return Image(png, int(width), int(height))


# ---- the learning-rate probe ---------------------------------------------------------------------------------
def _ratio(value: float, start: float) -> Optional[float]:
    """``value / start`` (None when either is not a finite positive number)."""
    if not (math.isfinite(value) and math.isfinite(start)) or start <= 0 or value < 0:
        return None
    return value / start


def _fresh_init_ratios(evidence: Mapping[str, Any]) -> List[Tuple[float, Optional[float]]]:
    """(factor, loss fraction or None when diverged) of the fresh-initialization control, from a verdict's evidence."""
    points = []
    prefix = "fresh_init_loss_fraction@x"
    for key, value in evidence.items():
        if not key.startswith(prefix):
            continue
        try:
            factor = float(key[len(prefix):])
        except ValueError:
            continue
        points.append((factor, float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None))
    return sorted(points)


def _suggested(verdict: Any) -> float:
    value = getattr(verdict, "suggested_lr", math.nan)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        value = (getattr(verdict, "evidence", None) or {}).get("suggested_lr", math.nan)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else math.nan


def probe_title(result: Any, verdict: Any, step: Optional[int]) -> str:
    """The figure's title: the verdict's code, then in words with the suggested and the current learning rate."""
    code = getattr(verdict, "code", None)
    where = f" at step {step}" if step is not None else ""
    first = f"Learning-rate probe{where}: {code or 'no verdict'}"
    if code and getattr(verdict, "severity", None) == "info":
        first += " (unconfirmed)"
    what = VERDICT_TITLES.get(code, code or "the processes disagreed, or the probe gave none")
    suggested = _suggested(verdict)
    rate = f": use about {suggested:.2g} (now {result.base_lr:.3g})" if math.isfinite(suggested) \
        else f" (learning rate {result.base_lr:.3g})"
    return f"{first}\n{what}{rate}"


def probe_sweep_image(result: Any, verdict: Any = None, step: Optional[int] = None) -> Optional[Image]:
    """The probe's sweep: loss after its steps (relative to before) against the learning rate, log-log.

    One line per sweep the probe ran: the real inputs (the fitted half, and the held-out half dotted), the zeroed
    inputs (one point, at the factor they were fitted at), and the freshly initialized copy when the code-bug
    control ran (from the verdict's ``fresh_init_loss_fraction@x...`` evidence). A diverged run is a red cross at the
    top. The current learning rate and the suggested one are marked; the verdict is the title.

    Args:
        result: a :class:`diag.probe.ProbeResult`.
        verdict: what the rules made of it (``.code``, ``.suggested_lr``, ``.evidence``, ``.severity``), or ``None``.
        step: the training step the probe ran at (for the title).

    Returns:
        The PNG, or ``None`` when matplotlib is not installed or the sweep has no factor.
    """
    if not result.factors or not matplotlib_available():
        return None
    with _drawing():
        return _draw_probe_sweep(result, verdict, step)


def _draw_probe_sweep(result: Any, verdict: Any, step: Optional[int]) -> Image:
    from matplotlib.ticker import LogLocator

    figure = _new_figure(PROBE_FIGURE_INCHES)
    ax = figure.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    factors = sorted(result.factors, key=lambda r: r.factor)
    base = float(result.base_lr)
    finite: List[float] = []  # every ratio drawn, for the y range
    diverged_x: List[float] = []

    def clip(v: float) -> float:
        return min(max(v, RATIO_FLOOR), RATIO_CEILING)

    def line(xs_ys: Sequence[Tuple[float, Optional[float]]], **style: Any) -> None:
        xs = [x for x, y in xs_ys if y is not None]
        ys = [clip(y) for _, y in xs_ys if y is not None]
        finite.extend(ys)
        if xs:
            ax.plot(xs, ys, **style)
        diverged_x.extend(x for x, y in xs_ys if y is None)

    fitted = [(r.lr, None if r.diverged else _ratio(r.final_loss, r.start_loss)) for r in factors]
    line(fitted, color=REAL, marker="o", linewidth=2, label="real inputs, fitted half")
    held = [(r.lr, None if r.diverged else _ratio(r.heldout_loss, r.heldout_start_loss)) for r in factors]
    if any(y is not None for _, y in held):
        xs = [x for x, y in held if y is not None]
        ys = [clip(y) for _, y in held if y is not None]
        finite.extend(ys)
        ax.plot(xs, ys, color=REAL, linestyle=":", marker=".", linewidth=1.2, alpha=0.8,
                label="real inputs, held-out half")
    zero = _ratio(result.zero_input_final_loss, result.start_loss)
    if zero is not None and math.isfinite(result.zero_input_factor):
        x = base * result.zero_input_factor
        finite.append(clip(zero))
        ax.plot([x], [clip(zero)], linestyle="none", marker="s", markersize=9, color=ZEROED,
                label=f"zeroed inputs (fitted at x{result.zero_input_factor:g})")
    fresh = _fresh_init_ratios(getattr(verdict, "evidence", None) or {})
    if fresh:
        line([(base * f, y) for f, y in fresh], color=FRESH, marker="^", linestyle="--", linewidth=1.5,
             label="fresh initialization (to its own start)")
    low = max(min(finite, default=0.1) / 2.0, RATIO_FLOOR / 2.0)
    high = min(max(max(finite, default=1.0), 1.0) * 3.0, RATIO_CEILING * 3.0)
    low = min(low, 0.3)
    ax.set_ylim(low, high)
    if diverged_x:
        ax.plot(diverged_x, [high / 1.6] * len(diverged_x), linestyle="none", marker="x", markersize=11,
                markeredgewidth=2.5, color=DIVERGED, label="diverged (loss not finite)")
    ax.axhline(1.0, color="#888888", linewidth=1, linestyle="-", zorder=0)
    ax.text(min(r.lr for r in factors), 1.0, " loss before the probe", color="#666666", fontsize=10, va="bottom")
    ax.axvline(base, color=CURRENT_LR, linewidth=1.5, label=f"current learning rate {base:.3g}")
    suggested = _suggested(verdict)
    if math.isfinite(suggested):
        ax.axvline(suggested, color=SUGGESTED_LR, linewidth=2, linestyle="--", label=f"suggested {suggested:.2g}")
    xs_all = [r.lr for r in factors] + ([suggested] if math.isfinite(suggested) else [])
    ax.set_xlim(min(xs_all) / 2.5, max(xs_all) * 2.5)
    ax.xaxis.set_major_locator(LogLocator(base=10.0))
    samples = f" on {result.samples_fit} samples of one batch" if getattr(result, "samples_fit", 0) else ""
    note = "\nfrom the last healthy snapshot of the weights" if getattr(result, "from_snapshot", False) else ""
    ax.set_xlabel(f"learning rate\n(each point: {result.steps} steps{samples}{note})", fontsize=10)
    ax.set_ylabel("loss after / loss before", fontsize=12)
    ax.tick_params(labelsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(probe_title(result, verdict, step), fontsize=13, loc="left")
    figure.legend(loc="outside lower center", ncol=2, fontsize=11, framealpha=0.9)
    return _render(figure)


# ---- a run's loss curve with its findings ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Marker:
    """A finding on the loss curve: its step, severity and code."""

    step: int
    severity: str
    label: str


def loss_curve_image(steps: Sequence[float], values: Sequence[float], markers: Sequence[Marker] = (),
                     title: str = "", name: str = "training loss",
                     validation: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> Optional[Image]:
    """The training loss against the step (log y when it spans more than two decades), one vertical mark per finding.

    ``validation``: (steps, values) of the validation loss, drawn on the same axes. Non-finite losses are drawn as red
    crosses at the top. ``None`` without matplotlib or without a finite value.
    """
    if not matplotlib_available():
        return None
    with _drawing():
        return _draw_loss_curve(steps, values, markers, title, name, validation)


def _draw_loss_curve(steps: Sequence[float], values: Sequence[float], markers: Sequence[Marker], title: str,
                     name: str, validation: Optional[Tuple[Sequence[float], Sequence[float]]]) -> Optional[Image]:
    points = [(float(s), float(v)) for s, v in zip(steps, values)]
    good = [(s, v) for s, v in points if math.isfinite(v)]
    if not good:
        return None
    figure = _new_figure(LOSS_FIGURE_INCHES)
    ax = figure.add_subplot(1, 1, 1)
    ax.plot([s for s, _ in good], [v for _, v in good], color=REAL, linewidth=1.5, label=name)
    if validation is not None:
        val = [(float(s), float(v)) for s, v in zip(*validation) if math.isfinite(float(v))]
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], color=ZEROED, marker="o", markersize=4, linewidth=1.5,
                    label="validation loss")
            good += val
    ys = [v for _, v in good]
    if min(ys) > 0 and max(ys) / min(ys) > 100:
        ax.set_yscale("log")
    bad = [s for s, v in points if not math.isfinite(v)]
    if bad:
        top = max(ys)
        ax.plot(bad, [top] * len(bad), linestyle="none", marker="x", color=DIVERGED, label="NaN / inf")
    seen: Dict[str, bool] = {}
    by_step: Dict[int, List[Marker]] = {}
    for m in markers:
        by_step.setdefault(int(m.step), []).append(m)
    for step, group in sorted(by_step.items()):
        worst = max(group, key=lambda m: {"error": 2, "warning": 1}.get(m.severity, 0))
        colour = SEVERITY_COLOURS.get(worst.severity, "#888888")
        label = None if worst.severity in seen else f"{worst.severity} finding"
        seen[worst.severity] = True
        ax.axvline(step, color=colour, linewidth=1.2, linestyle="--", alpha=0.9, label=label)
        text = ", ".join(sorted({m.label for m in group}))
        ax.annotate(text[:60], xy=(step, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    va="top", ha="right", color=colour)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    return _render(figure)
