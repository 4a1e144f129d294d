"""A time budget for sampled work: keeps a monitor's cost a bounded share of the training time on any model."""

from __future__ import annotations

import time
from typing import Optional


class TimeBudget:
    """Allows a sample while the time spent on samples is at most ``fraction`` of the wall time since :meth:`start`.

    A fixed sampling interval costs a fixed time per sample, so its share of the fit depends on the model: on a 70 ms
    step it is nothing, on a 3 ms MLP step (mostly Lightning's own overhead) the same work is a tenth of the run. The
    first ``free_samples`` samples are always taken, so that short runs are still diagnosed; after that a sampled
    step is skipped whenever taking it would put the spending above its share, which stretches the effective
    interval on cheap models only.

    Example::

        budget = TimeBudget(fraction=0.03, free_samples=10)
        budget.start()
        if budget.allows():
            with budget.charge():
                measure()
    """

    def __init__(self, fraction: float, free_samples: int) -> None:
        self.fraction = float(fraction)
        self.free_samples = int(free_samples)
        self.spent = 0.0
        self.samples = 0
        self.last = 0.0  # the cost of the latest charged block
        self._started: Optional[float] = None

    def start(self) -> None:
        self._started = time.perf_counter()
        self.spent = 0.0
        self.samples = 0

    def allows(self, free: bool = True) -> bool:
        """``free=False``: the first samples are not free either (for work that is expensive on every model); the
        sample is then taken only when its expected cost (that of the previous one) fits into the share too."""
        if self._started is None or (free and self.samples < self.free_samples):
            return True
        expected = 0.0 if free else self.last
        return self.spent + expected <= self.fraction * (time.perf_counter() - self._started)

    def charge(self, sample: bool = True) -> "_Charge":
        """Context manager that adds the time of its block to the spending (and counts a sample)."""
        return _Charge(self, sample)


class _Charge:
    def __init__(self, budget: TimeBudget, sample: bool) -> None:
        self.budget, self.sample = budget, sample

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.budget.last = time.perf_counter() - self._t0
        self.budget.spent += self.budget.last
        self.budget.samples += int(self.sample)
