"""What monitors share while watching one run: the findings collector and a few published measurements.

One monitor measures, another judges with it: the loss monitor publishes whether the loss is still
improving, the gradient monitor whether updates zig-zag, the probe its verdict. Monitors composed in
``Diagnostics`` share one context; a monitor used alone has its own (and then sees only its own signals).
Keys are the constants in :mod:`diag.signals`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from diag.collector import FindingsCollector


class DiagContext:
    def __init__(self, collector: Optional[FindingsCollector] = None) -> None:
        self.collector = collector if collector is not None else FindingsCollector()
        self.signals: Dict[str, Any] = {}
        self.probe_requests: List[str] = []
        # set by the router that drives the monitors: a new request wakes the monitors that act on requests
        self.on_probe_request: Optional[Callable[[], None]] = None

    def publish(self, key: str, value: Any) -> None:
        self.signals[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self.signals.get(key, default)

    def request_probe(self, reason: str) -> None:
        """Ask the learning-rate probe (if one is attached) to run at the next opportunity, e.g. ``"loss_diverging"``."""
        if reason not in self.probe_requests:
            self.probe_requests.append(reason)
            if self.on_probe_request is not None:
                self.on_probe_request()
