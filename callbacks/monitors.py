"""The monitors as Lightning callbacks: each is its :mod:`diag.monitors` class with Lightning's ``Callback`` mixed in
(hooks, state and rules are the monitor's; :class:`~diag.callbacks.base.Monitor` sends the findings to the loggers)."""

from __future__ import annotations

from diag import monitors as _core

from .base import Monitor


class LossCurveMonitor(_core.LossCurveMonitor, Monitor):
    __doc__ = _core.LossCurveMonitor.__doc__


class LearningRateProbe(_core.LearningRateProbe, Monitor):
    __doc__ = _core.LearningRateProbe.__doc__


class GradientMonitor(_core.GradientMonitor, Monitor):
    __doc__ = _core.GradientMonitor.__doc__


class ActivationMonitor(_core.ActivationMonitor, Monitor):
    __doc__ = _core.ActivationMonitor.__doc__


class FitMonitor(_core.FitMonitor, Monitor):
    __doc__ = _core.FitMonitor.__doc__


class SetupCheck(_core.SetupCheck, Monitor):
    __doc__ = _core.SetupCheck.__doc__


class DataMonitor(_core.DataMonitor, Monitor):
    __doc__ = _core.DataMonitor.__doc__
