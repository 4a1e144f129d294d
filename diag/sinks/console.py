"""Console sink: each new warning/error once, and a summary table when the fit ends.

The sinks exist on global rank zero only, so each line is printed once per run.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

from diag.findings import Finding, Severity
from diag.sinks.base import Sink
from diag.sinks.table import text_table

log = logging.getLogger("diag")


class ConsoleSink(Sink):
    def __init__(self, summary: bool = True, write: Optional[Callable[[str], None]] = None,
                 min_severity: Severity = Severity.WARNING) -> None:
        self.summary = summary
        self.min_severity = Severity(min_severity)
        self._write = write or log.warning
        self._summary_write = write or log.info

    def on_finding(self, finding: Finding, findings: Sequence[Finding]) -> None:
        if finding.severity.rank < self.min_severity.rank:
            return
        where = f" [{finding.layer}]" if finding.layer else ""
        self._write(f"lightning-diag {finding.severity.value.upper()} {finding.code}{where} at step {finding.step}: "
                    f"{finding.message} -> {finding.advice}")

    def close(self, findings: Sequence[Finding]) -> None:
        if self.summary:
            self._summary_write("lightning-diag summary:\n" + text_table(findings))
