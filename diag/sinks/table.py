"""Findings as tables: markdown for TensorBoard, plain text for the console."""

from __future__ import annotations

from typing import List, Sequence

from diag.findings import Finding

COLUMNS = ("severity", "step", "code", "layer", "message", "advice")


def cells(f: Finding) -> List[str]:
    """The :data:`COLUMNS` of one finding, as text."""
    return [f.severity.value, str(f.step), f.code, f.layer or "", f.message, f.advice]


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def markdown_table(findings: Sequence[Finding]) -> str:
    """A markdown table, worst findings first (TensorBoard's Text tab renders it)."""
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
