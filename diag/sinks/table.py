"""Findings as tables: markdown for TensorBoard (and MLflow), plain text for the console."""

from __future__ import annotations

from typing import List, Sequence

from diag.findings import Finding, Severity

COLUMNS = ("severity", "step", "code", "layer", "message", "advice")


def cells(f: Finding) -> List[str]:
    """The :data:`COLUMNS` of one finding, as text."""
    return [f.severity.value, str(f.step), f.code, f.layer or "", f.message, f.advice]


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def counts_line(findings: Sequence[Finding]) -> str:
    """``"1 error, 2 warnings, 0 info"``."""
    n = {s: sum(f.severity is s for f in findings) for s in Severity}
    err, warn, info = n[Severity.ERROR], n[Severity.WARNING], n[Severity.INFO]
    return f"{err} error{'s' * (err != 1)}, {warn} warning{'s' * (warn != 1)}, {info} info"


def ordered(findings: Sequence[Finding]) -> List[Finding]:
    """Worst first, then by step."""
    return sorted(findings, key=lambda f: (-f.severity.rank, f.step))


def finding_heading(f: Finding) -> str:
    """``**WARNING** · `code` · layer `net.0` · step 12``: what a reader scans for, on one line."""
    layer = f" · layer `{_md_escape(f.layer)}`" if f.layer else ""
    return f"**{f.severity.value.upper()}** · `{f.code}`{layer} · step {f.step}"


def markdown_findings(findings: Sequence[Finding]) -> str:
    """The findings for TensorBoard's Text tab: a markdown table of one column, one row per finding, worst first.

    Each row reads at a glance: severity, code, layer and step on the first line, the message below, then the
    advice. (A table with a column per field breaks short words into letters at usual widths: the six columns share
    the card, and the message and advice take it.) The header counts the findings by severity.
    """
    if not findings:
        return "_No findings so far._"
    lines = [f"| lightning-diag: {counts_line(findings)}; worst first |", "|---|"]
    for f in ordered(findings):
        lines.append(f"| {finding_heading(f)}<br>{_md_escape(f.message)}<br>**Advice:** {_md_escape(f.advice)} |")
    return "\n".join(lines)


def markdown_table(findings: Sequence[Finding]) -> str:
    """A markdown table with a column per field (severity, step, code, layer, message, advice), worst findings first:
    the MLflow run's ``diag/findings.md``. TensorBoard's Text tab shows :func:`markdown_findings`."""
    if not findings:
        return "_No findings so far._"
    ordered = sorted(findings, key=lambda f: (-f.severity.rank, f.step))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for f in ordered:
        lines.append("| " + " | ".join(_md_escape(c) for c in cells(f)) + " |")
    return "\n".join(lines)


def text_table(findings: Sequence[Finding], width: int = 60) -> str:
    """A fixed-width table for terminals; long text wraps in its column."""
    import textwrap

    if not findings:
        return "lightning-diag: no findings."
    ordered = sorted(findings, key=lambda f: (-f.severity.rank, f.step))
    widths = {"severity": 8, "step": 6, "code": 30, "layer": 16, "message": width, "advice": width}
    header = "  ".join(c.ljust(widths[c]) for c in COLUMNS)
    out = [header, "-" * len(header)]
    for f in ordered:
        wrapped = [textwrap.wrap(c, widths[col]) or [""] for col, c in zip(COLUMNS, cells(f))]
        for row in range(max(len(w) for w in wrapped)):
            out.append("  ".join((w[row] if row < len(w) else "").ljust(widths[col]) for col, w in zip(COLUMNS, wrapped)).rstrip())
    return "\n".join(out)
