"""The ``diag`` command (also ``python -m diag``).

``diag report LOG_DIR`` prints the findings of every run below ``LOG_DIR``; ``--fail-on warning`` makes it a CI
gate for training recipes. Exit status: 0 fine, 1 a finding at ``--fail-on`` or worse, 2 usage error or
unreadable logs (missing directory, no findings file, a corrupt line). An unfinished last line (a run killed mid-write)
is skipped with a one-line warning on stderr; the status is then that of the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from diag import __version__
from diag.findings import Severity
from diag.report import ReportError, counts_line, gate, load_runs, render

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
    report.add_argument("--evidence", action="store_true", help="add the measured figures behind each finding")
    report.add_argument("--plain", action="store_true", help="plain-text tables even when `rich` is installed")
    return parser


def _report(args: argparse.Namespace) -> int:
    runs = load_runs(args.log_dir)
    for run in runs:
        for warning in run.warnings:
            print(f"diag report: warning: {warning}", file=sys.stderr)
    min_severity = Severity(args.min_severity)
    if args.json:
        json.dump([run.to_dict(min_severity) for run in runs], sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        render(runs, sys.stdout, min_severity=min_severity, evidence=args.evidence,
               use_rich=False if args.plain else None)
    if args.fail_on is None:
        return EXIT_OK
    failing = gate(runs, Severity(args.fail_on))
    if failing:
        n_runs = sum(1 for run in runs if any(f.severity.rank >= Severity(args.fail_on).rank for f in run.findings))
        print(f"diag report: FAILED --fail-on {args.fail_on}: {counts_line(failing)} in {n_runs} of {len(runs)} "
              f"run{'s' * (len(runs) != 1)} ({', '.join(sorted({f.code for f in failing}))}).", file=sys.stderr)
        return EXIT_GATE_FAILED
    print(f"diag report: passed --fail-on {args.fail_on}: no finding at {args.fail_on} or worse in "
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
        return _report(args)
    except ReportError as exc:
        print(f"diag report: error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    except BrokenPipeError:  # `diag report ... | head`: the reader left; not an error worth a traceback
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
