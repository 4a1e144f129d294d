"""Regenerate the README's pictures in docs/: the findings in TensorBoard's Text tab, the learning-rate probe's
figure, and the HTML report.

One real fit (plain SGD at a learning rate far too high on the digits MLP, ``Diagnostics`` with the probe's time
budget lifted: tests/test_tensorboard_view.py's run) is served by TensorBoard and photographed in headless Chromium
at 1400 px, as a user sees it. Needs matplotlib (``pip install -e ".[plots]"``) and ``apt-get install chromium
chromium-driver``.

    .venv/bin/python tests/benchmarks/screenshots.py            # writes docs/dashboard.png, lr_probe.png, report_html.png
    .venv/bin/python tests/benchmarks/screenshots.py --out /tmp/shots --keep-run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from diag.cli import main as diag_main  # noqa: E402
from tests.test_dashboard import screenshot, start_browser  # noqa: E402
from tests.test_tensorboard_view import too_high_lr_run  # noqa: E402

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


def report_screenshot(html_path: str, out: str, window_size: str = "1300,1500") -> None:
    with tempfile.TemporaryDirectory() as profile:
        driver = start_browser(profile, window_size)
        try:
            driver.get("file://" + os.path.abspath(html_path))
            time.sleep(1.0)
            driver.save_screenshot(out)
        finally:
            driver.quit()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DOCS, help="folder for the PNGs (default: docs/)")
    parser.add_argument("--keep-run", action="store_true", help="keep the run's log folder and print where it is")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="diag_screenshots_")
    try:
        trainer, diagnostics = too_high_lr_run(root)
        log_dir = trainer.log_dir
        print(f"run: {log_dir}: " + ", ".join(f"{f.severity.value} {f.code}" for f in diagnostics.findings))
        screenshot(log_dir, os.path.join(args.out, "dashboard.png"), "text", "1400,1000",
                   ("diag/findings", "worst first"))
        shutil.copy(os.path.join(log_dir, "diag", "lr_probe_1.png"), os.path.join(args.out, "lr_probe.png"))
        html = os.path.join(root, "report.html")
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the tables: not wanted here
            diag_main(["report", log_dir, "--html", html])
        report_screenshot(html, os.path.join(args.out, "report_html.png"))
        print(f"wrote dashboard.png, lr_probe.png, report_html.png to {os.path.abspath(args.out)}")
    finally:
        if args.keep_run:
            print(f"kept the run in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
