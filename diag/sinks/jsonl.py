"""JSONL sink: one finding per line at ``<log_dir>/diag/findings.jsonl``."""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Sequence

from diag.findings import Finding
from diag.sinks.base import Sink

log = logging.getLogger("diag")

FILE_NAME = "findings.jsonl"

# Monitors used side by side (each a callback of its own, each with its own sinks) write to the same file: they
# share one handle, opened (truncated) by the first and closed by the last, so that their lines never overwrite
# each other. Absolute path -> [file, number of sinks using it].
_SHARED: Dict[str, list] = {}


def findings_path(log_dir: str) -> str:
    return os.path.join(log_dir, "diag", FILE_NAME)


class JsonlSink(Sink):
    """Writes each new (or more severe) finding as one JSON line; a reader keeps the last line per (code, layer).

    A directory that cannot be written is reported once as a warning and the sink switches itself off:
    training goes on.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = None
        self._failed = False

    def open(self, findings: Sequence[Finding]) -> None:
        try:
            key = os.path.abspath(self.path)
            shared = _SHARED.get(key)
            if shared is None or shared[0].closed:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                shared = _SHARED[key] = [open(self.path, "w", encoding="utf-8"), 0]
            shared[1] += 1
            self._file = shared[0]
            for f in findings:  # restored from a checkpoint: the file holds the whole run's findings
                self._write(f)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if not self._failed:
            log.warning(
                "lightning-diag: cannot write findings to %s (%s). Findings still reach the console, "
                "TensorBoard and `.findings`; give the Trainer a writable `default_root_dir` or logger save_dir.",
                self.path, exc,
            )
        self._failed = True
        self._file = None

    def _write(self, finding: Finding) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(finding.to_dict(), ensure_ascii=False) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def on_finding(self, finding: Finding, findings: Sequence[Finding]) -> None:
        self._write(finding)

    def close(self, findings: Sequence[Finding]) -> None:
        if self._file is not None:
            key = os.path.abspath(self.path)
            shared = _SHARED.get(key)
            if shared is not None and shared[0] is self._file:
                shared[1] -= 1
                if shared[1] > 0:  # another sink still writes to it
                    self._file = None
                    return
                _SHARED.pop(key, None)
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None


def read_findings(path: str) -> list:
    """Read a ``findings.jsonl``; the last line per ``(code, layer)`` wins. Raises ``ValueError`` naming a bad line."""
    found: dict = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                f = Finding.from_dict(json.loads(line))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}, line {lineno}: not a finding ({exc}). The line reads: {line.strip()[:200]!r}") from None
            found[f.key] = f
    return list(found.values())
