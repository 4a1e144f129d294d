"""The rules: one module per monitor, every threshold a named constant with its source."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a rule concluded; the callback reports it as a finding (``Monitor.report_verdict``)."""

    code: str
    severity: str
    message: str
    advice: str
    evidence: Dict[str, Any]
    layer: Optional[str] = None
