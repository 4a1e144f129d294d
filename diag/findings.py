"""The unit of output: a :class:`Finding` and its :class:`Severity`."""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Any, Dict, Mapping, Optional, Union

EvidenceValue = Union[float, int, str]

# A finding is read in a terminal, a TensorBoard table cell and a CI log: its text stays short whatever produced it
# (an exception's text can run to 14,000 characters, e.g. a sparse-gradient NotImplementedError listing every
# dispatch key). The longest message and advice the rules wrote across the test suite's runs: 506 and 503 characters.
MAX_TEXT_CHARS = 1000
MAX_EVIDENCE_TEXT_CHARS = 500


def clip_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


class Severity(str, Enum):
    """How sure and how serious a finding is.

    ``info`` is a hint that may not apply; ``warning`` and ``error`` must be right: a healthy run raises none.
    """

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def __str__(self) -> str:  # "warning", not "Severity.WARNING", in messages and tables
        return self.value

    @classmethod
    def parse(cls, value: Union[str, "Severity"]) -> "Severity":
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(s.value) for s in cls)
            raise ValueError(f"severity must be one of {allowed}, got {value!r}") from None


_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


def _clean_evidence_value(value: Any) -> EvidenceValue:
    """Evidence holds plain numbers and strings, so that JSON and TensorBoard can take it as it is."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:  # 0-d tensors / numpy scalars
        return _clean_evidence_value(value.item())
    return clip_text(str(value), MAX_EVIDENCE_TEXT_CHARS)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One diagnosis: what was seen, with the numbers, and what to do.

    Example::

        Finding(code="lr_too_high", severity=Severity.WARNING, step=120, epoch=1,
                message="At 1/10 of the learning rate the loss on a fixed batch falls 80%; at the current one it rises.",
                advice="Lower the learning rate to about 3e-4.", evidence={"suggested_lr": 3e-4})
    """

    code: str
    severity: Severity
    step: int
    epoch: int
    message: str
    advice: str
    evidence: Dict[str, EvidenceValue] = dataclasses.field(default_factory=dict)
    layer: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "severity", Severity.parse(self.severity))
        object.__setattr__(self, "step", int(self.step))
        object.__setattr__(self, "epoch", int(self.epoch))
        object.__setattr__(self, "message", clip_text(str(self.message)))
        object.__setattr__(self, "advice", clip_text(str(self.advice)))
        object.__setattr__(self, "evidence", {str(k): _clean_evidence_value(v) for k, v in dict(self.evidence).items()})

    @property
    def key(self) -> tuple:
        """Findings are raised once per ``(code, layer)``."""
        return (self.code, self.layer)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "step": self.step,
            "epoch": self.epoch,
            "message": self.message,
            "advice": self.advice,
            "evidence": dict(self.evidence),
            "layer": self.layer,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Finding":
        missing = [k for k in ("code", "severity", "step", "epoch", "message", "advice") if k not in data]
        if missing:
            raise ValueError(f"a finding needs the keys {missing}; got only {sorted(data)}")
        return cls(
            code=str(data["code"]),
            severity=Severity.parse(data["severity"]),
            step=int(data["step"]),
            epoch=int(data["epoch"]),
            message=str(data["message"]),
            advice=str(data["advice"]),
            evidence=dict(data.get("evidence") or {}),
            layer=data.get("layer"),
        )
