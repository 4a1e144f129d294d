"""GradientMonitor (work in progress: being written now)."""

from __future__ import annotations

from .base import Monitor


class GradientMonitor(Monitor):
    def __init__(self) -> None:
        super().__init__()
