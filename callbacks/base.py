"""Lightning's side of every monitor: a ``Callback`` whose findings go where the Trainer's loggers write.

The monitors themselves (statistics, schedule, rules, checkpoints) are in :mod:`diag.monitors` and import no
Lightning; a Lightning ``Trainer`` is their host (see :class:`diag.monitors.base.Monitor`).
"""

from __future__ import annotations

from typing import Any

from diag.monitors.base import Monitor as _Monitor

from ._compat import CALLBACK_BASES
from .outputs import make_sinks


class Monitor(_Monitor, *CALLBACK_BASES):  # type: ignore[misc]
    __doc__ = _Monitor.__doc__

    def _make_sinks(self, trainer: Any) -> list:
        if not getattr(trainer, "is_global_zero", True):
            return []  # findings are emitted once, on rank zero
        return make_sinks(trainer, console=self._console, jsonl=self._jsonl, tensorboard=self._tensorboard)
