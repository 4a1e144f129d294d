"""The findings of finished (or running) fits, read back from disk: what ``diag report`` shows.

Each run that had lightning-diag attached holds ``<log_dir>/diag/findings.jsonl``. Like ``tensorboard --logdir``,
:func:`load_runs` finds every such file below a directory, so ``diag report lightning_logs`` covers every
version of every experiment. Nothing here imports torch or Lightning: the report is quick to start and runs
where only the logs are (a CI job, a laptop with the logs copied over).

Example::

    from diag.report import load_runs, worst_severity
    runs = load_runs("lightning_logs")
    for run in runs:
        print(run.name, worst_severity(run.findings), [f.code for f in run.findings])
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, TextIO

from diag.findings import Finding, Severity
from diag.sinks.jsonl import FILE_NAME, read_findings
from diag.sinks.table import counts_line, text_table

# The folder a run's findings live in, below the run's log_dir (see diag.sinks.jsonl.findings_path).
FINDINGS_FOLDER = "diag"


class ReportError(Exception):
    """Something ``diag report`` cannot read: a missing directory, no findings file, a corrupt line.

    The message is one line that names the path (and the line, for a corrupt file) and says what to do.
    """


@dataclasses.dataclass
class RunFindings:
    """The findings of one run.

    Attributes:
        name: the run's log_dir relative to the directory searched (the log_dir itself when that is the run).
        log_dir: the run's log_dir (the folder holding ``diag/findings.jsonl``).
        path: the ``findings.jsonl`` file.
        findings: the run's findings, worst first (then by step); the last line per ``(code, layer)`` wins.
        warnings: what was skipped while reading (an unfinished last line), one line each, naming the file.
    """

    name: str
    log_dir: str
    path: str
    findings: List[Finding]
    warnings: List[str] = dataclasses.field(default_factory=list)

    def to_dict(self, min_severity: Severity = Severity.INFO) -> Dict[str, Any]:
        return {
            "run": self.name,
            "log_dir": self.log_dir,
            "path": self.path,
            "findings": [f.to_dict() for f in at_least(self.findings, min_severity)],
        }


def _ordered(findings: Iterable[Finding]) -> List[Finding]:
    return sorted(findings, key=lambda f: (-f.severity.rank, f.step, f.code, f.layer or ""))


def at_least(findings: Iterable[Finding], min_severity: Severity) -> List[Finding]:
    """The findings at ``min_severity`` or worse, in their given order."""
    rank = Severity.parse(min_severity).rank
    return [f for f in findings if f.severity.rank >= rank]


def worst_severity(findings: Iterable[Finding]) -> Optional[Severity]:
    """The most severe finding's severity, or ``None`` when there is none."""
    return max((f.severity for f in findings), key=lambda s: s.rank, default=None)


def find_findings_files(root: str) -> List[str]:
    """Every ``diag/findings.jsonl`` below ``root`` (sorted), or ``[root]`` when ``root`` is such a file.

    Raises:
        ReportError: ``root`` does not exist, or holds no findings file.
    """
    if os.path.isfile(root):
        return [root]
    if not os.path.isdir(root):
        raise ReportError(f"{root}: no such directory. Give the log directory of your runs "
                          f"(e.g. lightning_logs, or the Trainer's default_root_dir).")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=False):
        dirnames.sort()
        if os.path.basename(dirpath) == FINDINGS_FOLDER and FILE_NAME in filenames:
            found.append(os.path.join(dirpath, FILE_NAME))
    if not found:
        raise ReportError(
            f"{root}: no {FINDINGS_FOLDER}/{FILE_NAME} below this directory. lightning-diag writes one per run "
            f"at <log_dir>/{FINDINGS_FOLDER}/{FILE_NAME} when Diagnostics() (or a monitor) is attached to the Trainer."
        )
    return sorted(found)


def _run_name(root: str, log_dir: str) -> str:
    name = os.path.relpath(log_dir, root) if os.path.isdir(root) else "."
    return os.path.normpath(log_dir) if name == "." else name


def load_run(path: str, name: Optional[str] = None) -> RunFindings:
    """Read one ``findings.jsonl``.

    An unfinished last line (a run killed mid-write, or still running) is skipped and noted in ``warnings``.

    Raises:
        ReportError: the file cannot be read or a line is not a finding (the message names file and line).
    """
    warnings: List[str] = []
    try:
        findings = read_findings(path, on_skip=warnings.append)
    except ValueError as exc:  # read_findings names the file and the line
        raise ReportError(str(exc)) from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror or exc}).") from None
    diag_dir = os.path.dirname(path)
    log_dir = os.path.dirname(diag_dir) if os.path.basename(diag_dir) == FINDINGS_FOLDER else diag_dir
    return RunFindings(name=name or os.path.normpath(log_dir or "."), log_dir=log_dir or ".", path=path,
                       findings=_ordered(findings), warnings=warnings)


def load_runs(root: str) -> List[RunFindings]:
    """Every run's findings below ``root`` (a directory, or one ``findings.jsonl``), sorted by path.

    Raises:
        ReportError: a missing directory, no findings file below it, or a file that is not valid findings JSONL.
    """
    runs = []
    for path in find_findings_files(root):
        run = load_run(path)
        run.name = _run_name(root, run.log_dir)
        runs.append(run)
    return runs


def gate(runs: Sequence[RunFindings], fail_on: Severity) -> List[Finding]:
    """The findings at ``fail_on`` or worse across ``runs``: a CI gate fails when this is not empty."""
    return [f for run in runs for f in at_least(run.findings, fail_on)]


# ---- rendering ------------------------------------------------------------------------------------------
def _empty_text(run: RunFindings, min_severity: Severity) -> str:
    if not run.findings:
        return "No findings: nothing looked wrong."
    hidden = len(run.findings) - len(at_least(run.findings, min_severity))
    return f"No findings at {min_severity.value} or worse ({hidden} below it hidden; --min-severity info shows them)."


def _evidence_text(f: Finding) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in f.evidence.items())


def render_plain(runs: Sequence[RunFindings], stream: TextIO, min_severity: Severity = Severity.INFO,
                 evidence: bool = False) -> None:
    """Fixed-width tables (``diag.sinks.text_table``), for when ``rich`` is not installed."""
    for i, run in enumerate(runs):
        if i:
            stream.write("\n")
        stream.write(f"== {run.name}: {counts_line(run.findings)}\n")
        shown = at_least(run.findings, min_severity)
        if not shown:
            stream.write(_empty_text(run, min_severity) + "\n")
            continue
        stream.write(text_table(shown) + "\n")
        if evidence:
            for f in shown:
                stream.write(f"  evidence {f.code}{' [' + f.layer + ']' if f.layer else ''}: {_evidence_text(f)}\n")


_SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def render_rich(runs: Sequence[RunFindings], stream: TextIO, min_severity: Severity = Severity.INFO,
                evidence: bool = False) -> None:
    """One ``rich`` table per run: severity in colour on a terminal, long text wrapped in its column."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Piped output (CI logs, `| less`) has no terminal width; 80 columns squeeze six columns too hard.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    console = Console(file=stream, width=width, soft_wrap=False)
    for run in runs:
        shown = at_least(run.findings, min_severity)
        console.print(Text.assemble((run.name, "bold"), ": ", counts_line(run.findings)), soft_wrap=True)
        if not shown:
            console.print(_empty_text(run, min_severity), style="green" if not run.findings else None)
            console.print()
            continue
        table = Table(show_lines=True, expand=True)
        table.add_column("severity", no_wrap=True)
        table.add_column("step", justify="right", no_wrap=True)
        table.add_column("code", no_wrap=True, overflow="fold")
        table.add_column("layer", overflow="fold")
        table.add_column("message", ratio=3)
        table.add_column("advice", ratio=3)
        if evidence:
            table.add_column("evidence", ratio=2)
        for f in shown:
            cells = [Text(f.severity.value, style=_SEVERITY_STYLE[f.severity]), str(f.step), f.code, f.layer or "",
                     f.message, f.advice]
            if evidence:
                cells.append(_evidence_text(f))
            table.add_row(*cells)
        console.print(table)
        console.print()


def rich_available() -> bool:
    try:
        import rich.console  # noqa: F401
        import rich.table  # noqa: F401
    except ImportError:
        return False
    return True


def render(runs: Sequence[RunFindings], stream: Optional[TextIO] = None, min_severity: Severity = Severity.INFO,
           evidence: bool = False, use_rich: Optional[bool] = None) -> None:
    """Print a table per run, worst findings first: with ``rich`` when it is installed, else plain text."""
    stream = stream if stream is not None else sys.stdout
    if use_rich is None:
        use_rich = rich_available()
    (render_rich if use_rich else render_plain)(runs, stream, Severity.parse(min_severity), evidence)
