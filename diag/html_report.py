"""``diag report DIR --html OUT.html``: one self-contained page (no file or network it links to: images are inlined as
base64) with, per run, the training-loss curve marked at each finding's step, the findings worst first (evidence
folded), and the learning-rate probe's figures. Openable from a CI artifact.

The loss curve comes from the run's event files or ``metrics.csv`` (:mod:`diag.curves`: the training loss the user
logged, else lightning-diag's own ``diag/loss``); the probe figures are the ``lr_probe_<n>.png`` written beside the
run's ``findings.jsonl``. Curves are drawn with matplotlib (``pip install "lightning-diag[plots]"``); without it
the page says so and still lists the findings and the probe figures.

Example::

    from diag.html_report import HtmlRun, write_html
    write_html([HtmlRun.from_log_dir("run", "lightning_logs/version_0", findings)], "report.html")
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import glob
import html
import os
import re
from typing import List, Optional, Sequence, Tuple

from diag import __version__
from diag.curves import CurveError, Curves, read_curves, training_loss_tag, validation_loss_tag
from diag.findings import Finding
from diag.sinks import figures
from diag.sinks.table import counts_line, ordered

FINDINGS_FOLDER = "diag"
PROBE_FILES = "lr_probe_*.png"


@dataclasses.dataclass
class HtmlRun:
    """What the page shows of one run."""

    name: str
    log_dir: str
    findings: List[Finding]
    curves: Optional[Curves] = None  # None: read from log_dir when drawn
    probe_figures: List[Tuple[str, bytes]] = dataclasses.field(default_factory=list)  # (file name, PNG)
    train_tag: Optional[str] = None
    val_tag: Optional[str] = None
    note: str = ""

    @classmethod
    def from_log_dir(cls, name: str, log_dir: str, findings: Sequence[Finding], note: str = "") -> "HtmlRun":
        """A run with its probe figures read from ``<log_dir>/diag/lr_probe_<n>.png``."""
        return cls(name, log_dir, list(findings), probe_figures=probe_figures(log_dir), note=note)


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def probe_figures(log_dir: str) -> List[Tuple[str, bytes]]:
    """The probe's figures of a run, in order (``lr_probe_1.png``, ``lr_probe_2.png``, ..., ``lr_probe_10.png``)."""
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(log_dir), FINDINGS_FOLDER, PROBE_FILES)), key=_natural):
        try:
            with open(path, "rb") as fh:
                found.append((os.path.basename(path), fh.read()))
        except OSError:
            continue
    return found


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _loss_section(run: HtmlRun) -> str:
    curves = run.curves
    if curves is None:
        try:
            curves = read_curves(run.log_dir)
        except CurveError as exc:
            return f'<p class="note">{html.escape(str(exc))}</p>'
    train = run.train_tag or training_loss_tag(curves)
    if train is None or train not in curves:
        return ('<p class="note">No training-loss curve in this run\'s event files or metrics.csv (logged: '
                f'{html.escape(", ".join(sorted(curves)[:12]) or "nothing")}).</p>')
    if not figures.matplotlib_available():
        return f'<p class="note">The loss curve needs matplotlib: {html.escape(figures.INSTALL_HINT)}.</p>'
    val = run.val_tag or validation_loss_tag(curves)
    validation = (curves[val].steps, curves[val].values) if val and val in curves and val != train else None
    markers = [figures.Marker(f.step, f.severity.value, f.code) for f in run.findings]
    image = figures.loss_curve_image(curves[train].steps, curves[train].values, markers,
                                     title=f"{train}" + (f" and {val}" if validation else "") +
                                     "; dashed lines: the steps of the findings",
                                     name=train, validation=validation)
    if image is None:
        return f'<p class="note">No finite value in {html.escape(train)}.</p>'
    return f'<figure>{_img(image.png, "training loss of " + run.name)}</figure>'


def _evidence(f: Finding) -> str:
    if not f.evidence:
        return ""
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}"
                   f"</td></tr>" for k, v in f.evidence.items())
    return f"<details><summary>evidence</summary><table>{rows}</table></details>"


def _finding(f: Finding) -> str:
    layer = f' · layer <code>{html.escape(f.layer)}</code>' if f.layer else ""
    return (f'<div class="finding {f.severity.value}"><div class="head"><span class="sev">{f.severity.value.upper()}'
            f'</span> · <code>{html.escape(f.code)}</code>{layer} · step {f.step} · epoch {f.epoch}</div>'
            f'<div class="msg">{html.escape(f.message)}</div>'
            f'<div class="advice"><b>Advice:</b> {html.escape(f.advice)}</div>{_evidence(f)}</div>')


def _run(run: HtmlRun) -> str:
    parts = [f'<section><h2>{html.escape(run.name)}</h2><p class="counts">{counts_line(run.findings)} · '
             f'<code>{html.escape(run.log_dir)}</code></p>']
    if run.note:
        parts.append(f'<p class="note">{html.escape(run.note)}</p>')
    parts.append(_loss_section(run))
    parts.append("<h3>Findings, worst first</h3>")
    if run.findings:
        parts.extend(_finding(f) for f in ordered(run.findings))
    else:
        parts.append('<p class="ok">No findings: nothing looked wrong.</p>')
    if run.probe_figures:
        parts.append("<h3>The learning-rate probe</h3>")
        for name, png in run.probe_figures:
            parts.append(f'<figure>{_img(png, name)}<figcaption>{html.escape(name)}</figcaption></figure>')
    parts.append("</section>")
    return "\n".join(parts)


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
code { font: 13px ui-monospace, Menlo, Consolas, monospace; background: #f4f4f4; padding: 0 .25em; border-radius: 3px; }
.finding { border-left: 6px solid #999; background: #fafafa; margin: .6em 0; padding: .5em .8em; }
.finding.error { border-color: #d62728; } .finding.warning { border-color: #ff7f0e; } .finding.info { border-color: #1f77b4; }
.finding .sev { font-weight: 700; } .finding.error .sev { color: #d62728; } .finding.warning .sev { color: #c85f00; }
.finding.info .sev { color: #1f77b4; } .msg { margin: .2em 0; } details { margin-top: .3em; color: #555; }
details table { border-collapse: collapse; font-size: 13px; } details td { border: 1px solid #ddd; padding: 1px 6px; }
figure { margin: 1em 0; } img { max-width: 100%; } figcaption { color: #666; font-size: 13px; }
.note { color: #666; font-style: italic; } .ok { color: #2a7a2a; } .counts { color: #444; }
"""


def render_html(runs: Sequence[HtmlRun], title: str = "lightning-diag report") -> str:
    """The page, as one string."""
    total = [f for run in runs for f in run.findings]
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "\n".join(_run(run) for run in runs) or '<p class="note">No runs.</p>'
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body>'
            f"<h1>{html.escape(title)}</h1><p>{len(runs)} run{'s' * (len(runs) != 1)}: {counts_line(total)}. "
            f"Written {when} by lightning-diag {__version__}.</p>\n{body}\n</body></html>\n")


def write_html(runs: Sequence[HtmlRun], path: str, title: str = "lightning-diag report") -> str:
    """Write the page to ``path`` (its folder is created); returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render_html(runs, title))
    return path
