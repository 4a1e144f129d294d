"""The monitors as Lightning callbacks: each is its :mod:`diag.monitors` class with Lightning's ``Callback`` mixed in
(hooks, schedule, state and rules are the monitor's; :class:`~diag.callbacks.base.Monitor` sends the findings to the
Trainer's loggers)."""

from __future__ import annotations

from typing import Type, TypeVar

from diag import monitors as _core

from .base import Monitor

M = TypeVar("M", bound=type)


def _as_callback(core: M) -> M:
    """``core`` as a Lightning callback class of the same name (the name is the monitor's ``state_key`` too)."""
    return type(core.__name__, (core, Monitor), {"__doc__": core.__doc__, "__module__": __name__,  # type: ignore
                                                 "__qualname__": core.__name__})


LossCurveMonitor: Type[_core.LossCurveMonitor] = _as_callback(_core.LossCurveMonitor)
LearningRateProbe: Type[_core.LearningRateProbe] = _as_callback(_core.LearningRateProbe)
GradientMonitor: Type[_core.GradientMonitor] = _as_callback(_core.GradientMonitor)
ActivationMonitor: Type[_core.ActivationMonitor] = _as_callback(_core.ActivationMonitor)
FitMonitor: Type[_core.FitMonitor] = _as_callback(_core.FitMonitor)
SetupCheck: Type[_core.SetupCheck] = _as_callback(_core.SetupCheck)
DataMonitor: Type[_core.DataMonitor] = _as_callback(_core.DataMonitor)
