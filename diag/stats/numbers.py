"""One test for "a usable number", shared by the statistics, the rules and the monitors."""

from __future__ import annotations

import math
import numbers
from typing import Any


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a real, finite number: ``None``, a bool, a tensor or a string is not (read a tensor first).

    Example::

        finite_number(0.5) and not finite_number(float("nan")) and not finite_number(None)
    """
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return math.isfinite(value)  # the common case first: the ABC check below is slow
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
