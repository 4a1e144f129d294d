"""The ``diag`` command (also ``python -m diag``).

``diag report LOG_DIR`` prints the findings of every run below ``LOG_DIR`` (``--html OUT.html``: also one
self-contained page with the loss curves and the probe's figures); ``--fail-on warning`` makes it a CI gate for
training recipes. ``diag analyze LOG_DIR`` diagnoses runs trained without lightning-diag from the curves they logged
(TensorBoard event files, ``CSVLogger`` ``metrics.csv``), with the same output, gate and exit status.

Exit status: 0 fine, 1 a finding at ``--fail-on`` or worse, 2 usage error or unreadable logs (missing directory, no
findings file / no logged curves, a corrupt line). An unfinished last line (a run killed mid-write) is skipped with a
one-line warning on stderr; the status is then that of the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from diag import __version__
from diag.findings import Severity
from diag.report import ReportError, RunFindings, counts_line, gate, load_runs, render

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_UNREADABLE = 2  # also argparse's own exit status for a bad command line

_SEVERITIES = [s.value for s in Severity]

_REPORT_EPILOG = """\
exit status:
  0  no finding at --fail-on or worse (or no --fail-on given)
  1  a finding at --fail-on or worse exists (the CI gate failed)
  2  bad arguments, missing directory, no findings.jsonl below it, or a corrupt line
     (an unfinished last line, left by a run killed mid-write, is skipped with a warning
     and does not change the status)

examples:
  diag report lightning_logs                       every run below lightning_logs
  diag report lightning_logs/version_3             one run
  diag report lightning_logs --min-severity warning
  diag report lightning_logs --fail-on warning     CI gate: exit 1 on any warning or error
  diag report lightning_logs --json | jq '.[].findings[].code'
  diag report lightning_logs --html report.html    also one page: loss curves, findings, probe figures
"""

_ANALYZE_EPILOG = """\
exit status:
  0  no finding at --fail-on or worse (or no --fail-on given)
  1  a finding at --fail-on or worse exists (the CI gate failed)
  2  bad arguments, missing directory, no event file or metrics.csv below it, or no training loss in any run

what it reads:
  every folder below LOG_DIR with TensorBoard event files (events.out.tfevents.*) or a Lightning CSVLogger
  metrics.csv; the training loss by its usual names (train_loss_step, train_loss, train/loss, loss, ...), the
  validation loss likewise (val_loss, val/loss, valid_loss, ...). Each logged point counts as one step of the
  live monitors' rules (same statistics, same thresholds).

what it cannot tell:
  whether a learning rate or a code bug causes a symptom (that takes the model: the live learning-rate probe),
  nor anything about gradients, activations or data. It says so once per run with a symptom (info needs_live_run).

examples:
  diag analyze old_runs/lightning_logs
  diag analyze runs --train-tag loss/train --val-tag loss/valid --num-classes 10
  diag analyze runs --fail-on warning              CI gate on runs trained without the callback
  diag analyze runs --json
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diag",
        description="lightning-diag: what went wrong in a PyTorch Lightning training run, and what to do about it. "
                    "Attach `Diagnostics()` to the Trainer; then read the findings here or in TensorBoard "
                    "(`tensorboard --logdir LOG_DIR --samples_per_plugin=text=100`, Text and Custom Scalars tabs).",
    )
    parser.add_argument("--version", action="version", version=f"lightning-diag {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="print the findings of every run below a log directory",
        description="Find every run's diag/findings.jsonl below LOG_DIR (as `tensorboard --logdir` finds event "
                    "files) and print a table per run: severity, step, code, layer, message, advice; worst first.",
        epilog=_REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("log_dir", metavar="LOG_DIR",
                        help="a directory holding runs (e.g. lightning_logs), one run's log_dir, or a findings.jsonl file")
    report.add_argument("--json", action="store_true",
                        help="print JSON instead of tables: a list of runs, each {run, log_dir, path, findings: [finding, ...]}")
    report.add_argument("--fail-on", choices=["warning", "error"], default=None, metavar="{warning,error}",
                        help="exit 1 when any run has a finding at this severity or worse (a gate for CI)")
    report.add_argument("--min-severity", choices=_SEVERITIES, default="info", metavar="{info,warning,error}",
                        help="show only findings at this severity or worse (default: info, i.e. all); "
                             "--fail-on still looks at every finding")
    _output_options(report)
    report.add_argument("--html", metavar="OUT.html", default=None,
                        help="also write one self-contained HTML page: per run the loss curve with a mark at each "
                             "finding's step, the findings, and the learning-rate probe's figures (images inlined)")

    analyze = commands.add_parser(
        "analyze",
        help="diagnose runs trained without lightning-diag, from their logged loss curves",
        description="Read the training and validation loss that runs logged (TensorBoard event files, CSVLogger "
                    "metrics.csv) and apply the loss-curve and fit rules of the live monitors: non-finite, diverging, "
                    "oscillating or flat loss, under/overfitting, when to stop. Output and exit status as `diag report`.",
        epilog=_ANALYZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument("log_dir", metavar="LOG_DIR",
                         help="a directory holding runs (e.g. lightning_logs), one run's folder, or a metrics.csv")
    analyze.add_argument("--train-tag", metavar="TAG", default=None,
                         help="the logged training loss (default: found by its usual names)")
    analyze.add_argument("--val-tag", metavar="TAG", default=None,
                         help="the logged validation loss (default: found by its usual names)")
    analyze.add_argument("--num-classes", metavar="C", type=int, default=None,
                         help="classes of a classifier trained with cross-entropy: the chance level ln C makes the "
                              "rules surer (as the live monitor, which reads C off the model's output)")
    analyze.add_argument("--json", action="store_true",
                         help="print JSON: a list of runs, each {run, log_dir, path, source, train_loss, val_loss, "
                              "findings: [...]}")
    analyze.add_argument("--fail-on", choices=["warning", "error"], default=None, metavar="{warning,error}",
                         help="exit 1 when any run has a finding at this severity or worse (a gate for CI)")
    analyze.add_argument("--min-severity", choices=_SEVERITIES, default="info", metavar="{info,warning,error}",
                         help="show only findings at this severity or worse (default: all)")
    _output_options(analyze)
    analyze.add_argument("--html", metavar="OUT.html", default=None,
                         help="also write one self-contained HTML page with each run's curves and findings")
    return parser


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evidence", action="store_true", help="add the measured figures behind each finding")
    parser.add_argument("--plain", action="store_true", help="plain-text tables even when `rich` is installed")


def _report(args: argparse.Namespace) -> int:
    runs = load_runs(args.log_dir)
    for run in runs:
        for warning in run.warnings:
            print(f"diag report: warning: {warning}", file=sys.stderr)
    if args.html:
        from diag.html_report import HtmlRun

        _write_html("report", args.html, [HtmlRun.from_log_dir(run.name, run.log_dir, run.findings) for run in runs],
                    f"lightning-diag report: {args.log_dir}")
    return _show("report", args, runs, [run.to_dict(Severity(args.min_severity)) for run in runs])


def _analyze(args: argparse.Namespace) -> int:
    from diag.analyze import AnalyzeError, analyze

    if args.num_classes is not None and args.num_classes < 2:
        print(f"diag analyze: error: --num-classes must be at least 2, got {args.num_classes}.", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        analyzed = analyze(args.log_dir, train_tag=args.train_tag, val_tag=args.val_tag, num_classes=args.num_classes)
    except AnalyzeError as exc:
        raise ReportError(str(exc)) from None
    for run in analyzed:
        for warning in run.warnings:
            print(f"diag analyze: warning: {warning}", file=sys.stderr)
    judged = [run for run in analyzed if run.train_tag is not None]
    if not judged:
        raise ReportError(f"{args.log_dir}: no run with a training loss to analyze (see the warnings above); name it "
                          "with --train-tag.")
    if args.html:
        from diag.html_report import HtmlRun

        _write_html("analyze", args.html,
                    [HtmlRun(run.name, run.log_dir, run.findings, curves=run.curves, train_tag=run.train_tag,
                             val_tag=run.val_tag, note=f"diagnosed by diag analyze from {run.train_tag}"
                             + (f" and {run.val_tag}" if run.val_tag else " (no validation loss)"))
                     for run in judged], f"lightning-diag analyze: {args.log_dir}")
    runs = [run.as_run_findings() for run in judged]
    return _show("analyze", args, runs, [run.to_dict(Severity(args.min_severity)) for run in judged])


def _write_html(command: str, path: str, runs: list, title: str) -> None:
    from diag.html_report import write_html

    try:
        write_html(runs, path, title)
    except OSError as exc:
        raise ReportError(f"{path}: cannot write the HTML page ({exc.strerror or exc}).") from None
    print(f"diag {command}: wrote {path} ({len(runs)} run{'s' * (len(runs) != 1)}).", file=sys.stderr)


def _show(command: str, args: argparse.Namespace, runs: Sequence[RunFindings], as_json: list) -> int:
    """Print the runs (tables or JSON) and apply the ``--fail-on`` gate."""
    min_severity = Severity(args.min_severity)
    if args.json:
        json.dump(as_json, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        render(runs, sys.stdout, min_severity=min_severity, evidence=args.evidence,
               use_rich=False if args.plain else None)
    if args.fail_on is None:
        return EXIT_OK
    failing = gate(runs, Severity(args.fail_on))
    if failing:
        n_runs = sum(1 for run in runs if any(f.severity.rank >= Severity(args.fail_on).rank for f in run.findings))
        print(f"diag {command}: FAILED --fail-on {args.fail_on}: {counts_line(failing)} in {n_runs} of {len(runs)} "
              f"run{'s' * (len(runs) != 1)} ({', '.join(sorted({f.code for f in failing}))}).", file=sys.stderr)
        return EXIT_GATE_FAILED
    print(f"diag {command}: passed --fail-on {args.fail_on}: no finding at {args.fail_on} or worse in "
          f"{len(runs)} run{'s' * (len(runs) != 1)}.", file=sys.stderr)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``diag`` console script; returns the exit status (argparse exits 2 on bad usage)."""
    parser = _parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_UNREADABLE
    try:
        return _analyze(args) if args.command == "analyze" else _report(args)
    except ReportError as exc:
        print(f"diag {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    except BrokenPipeError:  # `diag report ... | head`: the reader left; not an error worth a traceback
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
