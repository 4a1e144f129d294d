"""Streaming statistics of the training loss: a bias-corrected EMA, a fixed window for robust trend and swing.

Memory is O(window), never O(steps). Everything is plain Python floats (the loss arrives as a number, one per
optimizer step); no Lightning, no tensors kept.

Example::

    stats = LossStatistics(ema_decay=0.95, window=50)
    for loss in losses:
        stats.update(loss)
    stats.smoothed, stats.relative_progress(), stats.swing_ratio()
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Dict, List, Mapping, Optional, Sequence

#: How many first losses make the "start" reference (their median), robust to one odd first batch.
START_STEPS = 5


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class LossStatistics:
    """Streaming statistics of a loss curve, one value per optimizer step.

    Args:
        ema_decay: decay of the exponential moving average (0.95 averages about the last 20 steps).
        window: how many recent losses the trend, swing and progress statistics look at.

    Quantities (all in loss units unless said otherwise):
        ``initial``: the first finite loss. ``start``: the median of the first ``START_STEPS`` losses.
        ``smoothed``: the bias-corrected EMA (Adam's correction: divide by ``1 - decay**n``).
        ``best``: the lowest ``smoothed`` so far. ``level()``: median of the window.
        ``relative_progress()``: relative drop between the medians of the older and the newer half of the window.
        ``swing()``: median absolute difference of successive losses in the window.
    """

    def __init__(self, ema_decay: float = 0.95, window: int = 50) -> None:
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in (0, 1), got {ema_decay!r}.")
        if window < 4:
            raise ValueError(f"`window` must be >= 4, got {window!r}.")
        self.ema_decay = float(ema_decay)
        self.window_size = int(window)
        self.reset()

    def reset(self) -> None:
        self.count = 0  # finite losses seen
        self.nonfinite_count = 0
        self.initial: Optional[float] = None
        self.last: Optional[float] = None
        self._start: List[float] = []  # at most START_STEPS values
        self._ema = 0.0  # biased accumulator
        self._ema_weight = 0.0  # 1 - decay**count
        self.best: Optional[float] = None
        self.window: deque = deque(maxlen=self.window_size)

    # ---- update -----------------------------------------------------------------------------------
    def update(self, value: float) -> bool:
        """Add one loss; returns ``False`` (and counts it) when it is NaN/inf, which does not enter the averages."""
        value = float(value)
        if not math.isfinite(value):
            self.nonfinite_count += 1
            return False
        self.count += 1
        self.last = value
        if self.initial is None:
            self.initial = value
        if len(self._start) < START_STEPS:
            self._start.append(value)
        d = self.ema_decay
        self._ema = d * self._ema + (1.0 - d) * value
        self._ema_weight = d * self._ema_weight + (1.0 - d)
        smoothed = self._ema / self._ema_weight
        if self.best is None or smoothed < self.best:
            self.best = smoothed
        self.window.append(value)
        return True

    # ---- compute ----------------------------------------------------------------------------------
    @property
    def smoothed(self) -> Optional[float]:
        return self._ema / self._ema_weight if self._ema_weight > 0 else None

    @property
    def start(self) -> Optional[float]:
        return median(self._start) if self._start else None

    @property
    def window_full(self) -> bool:
        return len(self.window) == self.window_size

    def level(self) -> float:
        """Median of the losses in the window."""
        return median(list(self.window))

    def recent_level(self, n: int) -> float:
        """Median of the last ``n`` losses."""
        values = list(self.window)[-n:]
        return median(values)

    def relative_progress(self) -> Optional[float]:
        """(median of older half - median of newer half) / |median of older half|; 0.1 = fell 10%. None if < 4 values."""
        values = list(self.window)
        if len(values) < 4:
            return None
        half = len(values) // 2
        older, newer = median(values[:half]), median(values[half:])
        if older == 0.0:
            return 0.0
        return (older - newer) / abs(older)

    def swing(self) -> Optional[float]:
        """Median |loss[t] - loss[t-1]| over the window: the typical step-to-step swing."""
        values = list(self.window)
        if len(values) < 3:
            return None
        return median([abs(b - a) for a, b in zip(values[:-1], values[1:])])

    def swing_ratio(self) -> Optional[float]:
        """The swing relative to both the loss level and the progress made since the start: ``min(swing/level,
        swing/(start - best))``.

        Minibatch noise of a healthy run is small against the level early on (the loss is high) and small against
        the progress made later on (the loss fell a lot), so at least one of the two ratios is small; a loss that
        swings by about its own size without having made progress has both large.
        """
        swing, start, best = self.swing(), self.start, self.best
        if swing is None or start is None or best is None:
            return None
        level = self.level()
        by_level = swing / level if level > 0 else math.inf
        progress = start - best
        by_progress = swing / progress if progress > 0 else math.inf
        return min(by_level, by_progress)

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"count": self.count, "nonfinite_count": self.nonfinite_count, "initial": self.initial,
                "last": self.last, "start": list(self._start), "ema": self._ema, "ema_weight": self._ema_weight,
                "best": self.best, "window": list(self.window)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.nonfinite_count = int(state["nonfinite_count"])
        self.initial = state["initial"]
        self.last = state["last"]
        self._start = [float(v) for v in state["start"]][:START_STEPS]
        self._ema = float(state["ema"])
        self._ema_weight = float(state["ema_weight"])
        self.best = state["best"]
        self.window = deque((float(v) for v in state["window"]), maxlen=self.window_size)
