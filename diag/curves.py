"""The curves a run logged, read back from disk: TensorBoard event files and Lightning ``CSVLogger`` ``metrics.csv``.

``diag analyze`` diagnoses runs from these curves, and ``diag report --html`` draws a run's loss curve from them.
Event files are read with TensorBoard's own ``EventAccumulator``; ``metrics.csv`` with the ``csv`` module (a
``CSVLogger`` writes one row per logging call, with empty cells for the metrics not logged in it).

Example::

    from diag.curves import find_logged_runs, read_curves, training_loss_tag
    for log_dir, source in find_logged_runs("lightning_logs"):
        curves = read_curves(log_dir, source)
        tag = training_loss_tag(curves)
        print(log_dir, tag, curves[tag].values[-1] if tag else None)
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import math
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from diag.detectors.fit import find_training_loss_epoch, find_validation_loss

EVENT_FILE_MARK = "tfevents"
CSV_FILE = "metrics.csv"
TENSORBOARD, CSV = "tensorboard", "csv"

# The step-level training loss under the names people log it by (Lightning adds "_step"/"_epoch" to a metric logged
# with on_step=True, on_epoch=True), most specific first. Epoch-level names come after: a curve with one point per
# epoch is too coarse for the loss-curve rules, but better than none.
TRAINING_LOSS_NAMES = ("train_loss_step", "train/loss_step", "train_loss", "train/loss", "training_loss_step",
                       "training_loss", "training/loss", "loss/train", "trn_loss", "loss_step", "loss", "train/nll",
                       "train_nll")
_VAL_OR_TEST = {"val", "valid", "validation", "eval", "test"}
_TRAIN = {"train", "training", "trn"}


@dataclasses.dataclass
class Curve:
    """One logged scalar: its steps and values in step order (NaN and inf kept: a NaN loss is a finding)."""

    tag: str
    steps: List[int]
    values: List[float]

    def __len__(self) -> int:
        return len(self.values)


Curves = Dict[str, Curve]


class CurveError(Exception):
    """A log folder whose curves cannot be read (the message names the path and what to do)."""


def find_logged_runs(root: str) -> List[Tuple[str, str]]:
    """Every folder below ``root`` (``root`` included) with TensorBoard event files or a ``metrics.csv``, as
    ``(folder, source)``; a folder with both is read from its event files. Sorted by folder.

    Raises:
        CurveError: ``root`` does not exist.
    """
    if os.path.isfile(root):
        folder = os.path.dirname(root) or "."
        return [(folder, CSV if os.path.basename(root) == CSV_FILE else TENSORBOARD)]
    if not os.path.isdir(root):
        raise CurveError(f"{root}: no such directory. Give the log directory of your runs (e.g. lightning_logs).")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        if any(EVENT_FILE_MARK in name for name in filenames):
            found.append((dirpath, TENSORBOARD))
        elif CSV_FILE in filenames:
            found.append((dirpath, CSV))
    return sorted(found)


def read_curves(log_dir: str, source: Optional[str] = None) -> Curves:
    """The scalars of one run: from its event files (``source="tensorboard"``) or its ``metrics.csv``; ``None``:
    whichever is there (event files first). Empty when the folder has neither."""
    if source is None:
        names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
        source = TENSORBOARD if any(EVENT_FILE_MARK in n for n in names) else CSV if CSV_FILE in names else None
    if source == TENSORBOARD:
        return read_event_files(log_dir)
    if source == CSV:
        return read_metrics_csv(os.path.join(log_dir, CSV_FILE))
    return {}


def read_event_files(log_dir: str) -> Curves:
    """Every scalar in the event files of ``log_dir`` (not its subfolders), all points (no downsampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 1, "images": 1, "histograms": 1,
                                                           "compressedHistograms": 1, "audio": 1})
    try:
        accumulator.Reload()
    except Exception as exc:  # a truncated or foreign file
        raise CurveError(f"{log_dir}: cannot read the event files ({type(exc).__name__}: {exc}).") from None
    curves: Curves = {}
    for tag in accumulator.Tags().get("scalars", []):
        events = sorted(accumulator.Scalars(tag), key=lambda e: e.step)
        curves[tag] = Curve(tag, [int(e.step) for e in events], [float(e.value) for e in events])
    return curves


def read_metrics_csv(path: str) -> Curves:
    """The columns of a Lightning ``CSVLogger`` ``metrics.csv`` as curves over its ``step`` column (row order when
    there is none); ``epoch`` becomes a curve too."""
    columns: Dict[str, Tuple[List[int], List[float]]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for row_number, row in enumerate(reader):
                step_text = (row.get("step") or "").strip()
                try:
                    step = int(float(step_text)) if step_text else row_number
                except ValueError:
                    step = row_number
                for key, cell in row.items():
                    if key is None or key == "step" or cell is None or not cell.strip():
                        continue
                    try:
                        value = float(cell)
                    except ValueError:
                        continue
                    steps, values = columns.setdefault(key, ([], []))
                    steps.append(step)
                    values.append(value)
    except OSError as exc:
        raise CurveError(f"{path}: cannot read ({exc.strerror or exc}).") from None
    except csv.Error as exc:
        raise CurveError(f"{path}: not a CSV file ({exc}).") from None
    curves: Curves = {}
    for key, (steps, values) in columns.items():
        order = sorted(range(len(steps)), key=lambda i: steps[i])  # stable: rows of one step keep their order
        curves[key] = Curve(key, [steps[i] for i in order], [values[i] for i in order])
    return curves


# ---- which curves are the losses ----------------------------------------------------------------------------------
def _tokens(tag: str) -> List[str]:
    return [t for t in re.split(r"[/_.\-\s]+", tag.lower()) if t]


def user_tags(curves: Curves) -> List[str]:
    """The tags the user logged (not lightning-diag's own ``diag/...``)."""
    return [tag for tag in curves if not tag.startswith("diag/")]


def training_loss_tag(curves: Curves, given: Optional[str] = None) -> Optional[str]:
    """The step-level training loss among ``curves`` (``given`` when it names one): the usual names first, then any
    tag with "loss" and "train" in it and no validation or test word; an epoch-level one last."""
    if given is not None:
        return given if given in curves else None
    tags = user_tags(curves)
    for name in TRAINING_LOSS_NAMES:
        if name in tags:
            return name
    step_level = sorted((t for t in tags if "loss" in _tokens(t) and _TRAIN & set(_tokens(t))
                         and not _VAL_OR_TEST & set(_tokens(t)) and _tokens(t)[-1] != "epoch"),
                        key=lambda t: (len(t), t))
    if step_level:
        return step_level[0]
    epoch_level = find_training_loss_epoch(tags)
    if epoch_level is not None:
        return epoch_level
    return "diag/loss" if "diag/loss" in curves else None  # a run watched by lightning-diag: its own reading


def validation_loss_tag(curves: Curves, given: Optional[str] = None) -> Optional[str]:
    """The validation loss among ``curves`` (``given`` when it names one): the names the live fit monitor knows."""
    if given is not None:
        return given if given in curves else None
    return find_validation_loss(user_tags(curves))


def training_epoch_loss_tag(curves: Curves, train_tag: Optional[str]) -> Optional[str]:
    """The epoch-aggregated training loss (``train_loss_epoch``, ...), when it is not the training curve itself."""
    tag = find_training_loss_epoch(user_tags(curves))
    return tag if tag != train_tag else None


def value_at(curve: Optional[Curve], step: int, default: float = math.nan) -> float:
    """The curve's last value at or before ``step`` (``default`` before its first point)."""
    if curve is None:
        return default
    i = bisect.bisect_right(curve.steps, step)  # steps are sorted: O(log n)
    return curve.values[i - 1] if i else default


def finite(values: Iterable[float]) -> List[float]:
    return [v for v in values if math.isfinite(v)]


def describe(tags: Sequence[str], limit: int = 20) -> str:
    shown = sorted(tags)[:limit]
    return ", ".join(shown) + (f", ... ({len(tags) - limit} more)" if len(tags) > limit else "") if shown else "none"
