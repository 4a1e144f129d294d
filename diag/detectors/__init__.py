"""The rules: one module per monitor, every threshold a named constant with its source.

Every rule returns a :class:`Verdict` (or ``None``); a monitor reports it with ``Monitor.report_verdict``. A rule also
says when it applies (the ``*_applies`` / eligibility functions next to it) and whether it wants more evidence
(``Verdict.probe``, or a function that returns a probe reason): the monitors never read a threshold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a rule concluded; ``Monitor.report_verdict`` reports it as a finding.

    Args:
        code: the finding code (a key of :mod:`diag.codes`).
        message: what was seen, with the numbers.
        advice: what to do; ``None``: the catalogue's advice for ``code``.
        evidence: the numbers the rule used (the finding's evidence).
        severity: ``"info"``, ``"warning"`` or ``"error"``; ``None``: the catalogue's severity for ``code``.
        layer: the layer the verdict is about, if any.
        probe: the reason with which the rule asks the learning-rate probe to run (e.g. ``"loss_diverging"``), or
            ``None``. The reporting monitor asks once per reason and fit.
        suggested_lr: the learning rate the probe's verdict suggests (NaN: none).
    """

    code: str
    message: str
    advice: Optional[str] = None
    evidence: Dict[str, Any] = dataclasses.field(default_factory=dict)
    severity: Optional[str] = None
    layer: Optional[str] = None
    probe: Optional[str] = None
    suggested_lr: float = math.nan
