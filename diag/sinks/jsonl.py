"""JSONL sink: one finding per line at ``<log_dir>/diag/findings.jsonl``; figures beside it (``lr_probe_<n>.png``)."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from diag.findings import Finding
from diag.sinks.base import Sink
from diag.sinks.figures import Image

log = logging.getLogger("diag")

FILE_NAME = "findings.jsonl"
# A fit without a run folder of its own (no logger) gets a new one per fit, numbered like Lightning's loggers number
# theirs, so that no fit writes over another's findings.
VERSION_PREFIX = "version_"

# Monitors used side by side (each a callback of its own, each with its own sinks) write to the same file: they
# share one handle, opened by the first and closed by the last, so that their lines never overwrite each other.
# Absolute path -> [file, number of sinks using it].
_SHARED: Dict[str, list] = {}
# The new version folder of each fit under way, by (root, fit): monitors used side by side in one fit share it.
_FIT_FOLDERS: Dict[Tuple[str, Any], str] = {}


def findings_path(log_dir: str) -> str:
    return os.path.join(log_dir, "diag", FILE_NAME)


def figure_file_name(tag: str) -> str:
    """The file of a figure tag, beside the findings: ``diag/lr_probe/2`` -> ``lr_probe_2.png``."""
    name = tag[len("diag/"):] if tag.startswith("diag/") else tag
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png"


def new_version_dir(root: str) -> str:
    """Create and return ``root/version_N``, ``N`` one above the highest version already there (a folder no other fit
    uses, also when several processes start at once). Raises ``OSError`` when ``root`` cannot be written."""
    os.makedirs(root, exist_ok=True)
    taken = [int(m.group(1)) for m in (re.fullmatch(VERSION_PREFIX + r"(\d+)", name) for name in os.listdir(root)) if m]
    number = max(taken, default=-1) + 1
    while True:
        path = os.path.join(root, f"{VERSION_PREFIX}{number}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            number += 1


class JsonlSink(Sink):
    """Writes each new (or more severe) finding as one JSON line; a reader keeps the last line per (code, layer).

    The file is appended to, never truncated: a fit that finds another fit's findings in its folder (a logger with a
    fixed ``version``) keeps them. ``JsonlSink(new_version_under=root, fit=key)`` writes to a new ``root/version_N``
    made when the fit starts (:func:`new_version_dir`), one per ``fit``: sinks opened with the same key while the first
    is open (monitors used side by side in one fit) share it.

    Figures (the learning-rate probe's sweeps, ``figures=True``) are written beside the file as PNGs,
    ``lr_probe_<n>.png`` (``diag report --html`` puts them in the report); a name another fit left there gets a suffix
    (``lr_probe_1-2.png``) instead of being overwritten.

    A directory that cannot be written is reported once as a warning and the sink switches itself off:
    training goes on.
    """

    def __init__(self, path: Optional[str] = None, new_version_under: Optional[str] = None, fit: Any = None,
                 figures: bool = True) -> None:
        if (path is None) == (new_version_under is None):
            raise ValueError("JsonlSink needs either `path` or `new_version_under`.")
        self.wants_images = bool(figures)
        self.path = path
        self.new_version_under = new_version_under
        self.fit = fit
        self._file = None
        self._failed = False

    def open(self, findings: Sequence[Finding]) -> None:
        try:
            if self.path is None:
                fit = (os.path.abspath(str(self.new_version_under)), self.fit)
                if fit not in _FIT_FOLDERS:
                    _FIT_FOLDERS[fit] = findings_path(new_version_dir(str(self.new_version_under)))
                self.path = _FIT_FOLDERS[fit]
            key = os.path.abspath(self.path)
            shared = _SHARED.get(key)
            if shared is None or shared[0].closed:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                shared = _SHARED[key] = [open(self.path, "a", encoding="utf-8"), 0]
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
                self.path or os.path.join(str(self.new_version_under), VERSION_PREFIX + "N"), exc,
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

    def log_image(self, tag: str, image: Image, step: int) -> None:
        if self._file is None:
            return
        folder = os.path.dirname(str(self.path)) or "."
        stem, _ = os.path.splitext(figure_file_name(tag))
        path, k = os.path.join(folder, stem + ".png"), 1
        while os.path.exists(path):  # another fit's figure in a shared folder: keep it
            k += 1
            path = os.path.join(folder, f"{stem}-{k}.png")
        try:
            with open(path, "wb") as fh:
                fh.write(image.png)
        except OSError as exc:
            log.warning("lightning-diag: cannot write the figure %s (%s); the findings are written.", path, exc)

    def close(self, findings: Sequence[Finding]) -> None:
        if self._file is not None:
            key = os.path.abspath(str(self.path))
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
        for fit in [fit for fit, path in _FIT_FOLDERS.items() if path == self.path]:
            del _FIT_FOLDERS[fit]  # the fit is over: a next fit gets a new folder


def read_findings(path: str, on_skip: Optional[Callable[[str], None]] = None) -> List[Finding]:
    """Read a ``findings.jsonl``; the last line per ``(code, layer)`` wins.

    An unfinished last line (no line end, not a finding: the writer was killed mid-line, or is still writing) is
    skipped: ``on_skip`` (default: a warning on the ``diag`` logger) gets one line naming the file. Any other line
    that is not a finding raises ``ValueError`` naming the file and the line.
    """
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    unfinished = lines.pop()  # after the last line end: b"" when the file ends with one
    found: dict = {}
    for lineno, raw in enumerate(lines + [unfinished], 1):
        last = lineno == len(lines) + 1
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            f = Finding.from_dict(json.loads(text))
        except UnicodeDecodeError as exc:
            if last:
                _skip(path, lineno, on_skip)
                continue
            raise ValueError(f"{path}, line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line); "
                             f"is this a findings.jsonl?") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            if last:
                _skip(path, lineno, on_skip)
                continue
            raise ValueError(f"{path}, line {lineno}: not a finding ({exc}). The line reads: {text.strip()[:200]!r}") from None
        found[f.key] = f
    return list(found.values())


def _skip(path: str, lineno: int, on_skip: Optional[Callable[[str], None]]) -> None:
    message = (f"{path}, line {lineno}: skipped an unfinished last line (the run was stopped while writing it, "
               f"or is still running); the findings before it are read.")
    (on_skip or log.warning)(message)
