"""`diag report DIR --html OUT.html`: one self-contained page per report, from a real run's files.

The run is the too-high learning rate fit of tests/test_tensorboard_view.py (Diagnostics with the probe): its findings.jsonl,
its event files (the training-loss curve) and the probe's figures beside the findings. The page must hold every
finding, the loss curve and the probe's figures as inlined PNGs, and nothing it would have to fetch. Where headless
Chromium is installed the page is opened in it and every image must decode.
"""

from __future__ import annotations

import base64
import os
import re
import sys

import pytest

from diag.cli import main
from diag.report import load_runs
from tests.test_tensorboard_view import PNG_SIGNATURE, png_size, too_high_lr_run

pytest.importorskip("matplotlib", reason='the figures need matplotlib: pip install -e ".[plots]" (make venv does)')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    trainer, _ = too_high_lr_run(tmp_path_factory.mktemp("html_run"))
    return trainer.log_dir


def inlined_pngs(page: str):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_html_report_holds_findings_curve_and_probe_figures(run_dir, tmp_path, capsys):
    out = tmp_path / "ci-artifact" / "report.html"
    status = main(["report", run_dir, "--html", str(out), "--fail-on", "error"])
    err = capsys.readouterr().err
    assert status == 1 and f"wrote {out}" in err  # the gate still works (nonfinite_loss is an error)
    page = out.read_text(encoding="utf-8")
    (run,) = load_runs(run_dir)
    for finding in run.findings:
        assert f"<code>{finding.code}</code>" in page, finding.code
    assert "lr_too_high" in page and "Advice:" in page
    probe_files = sorted(n for n in os.listdir(os.path.join(run_dir, "diag")) if n.endswith(".png"))
    assert probe_files, "the run has no probe figure: nothing to inline"
    images = inlined_pngs(page)
    assert len(images) == 1 + len(probe_files)  # the loss curve, then each probe figure
    for png in images:
        assert png[:8] == PNG_SIGNATURE and min(png_size(png)) > 100
    for name in probe_files:
        with open(os.path.join(run_dir, "diag", name), "rb") as fh:
            assert fh.read() in images
    # self-contained: nothing to fetch from elsewhere
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page and "<script" not in page


def test_without_matplotlib_the_page_still_lists_findings(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "report.html"
    assert main(["report", run_dir, "--html", str(out)]) == 0
    capsys.readouterr()
    page = out.read_text(encoding="utf-8")
    assert "lr_too_high" in page and "The loss curve needs matplotlib" in page
    assert len(inlined_pngs(page)) == len([n for n in os.listdir(os.path.join(run_dir, "diag")) if n.endswith(".png")])


@pytest.mark.browser
def test_the_page_renders_in_a_browser(run_dir, tmp_path, capsys):
    from tests.test_dashboard import _require_browser, page_text, save_screenshot, start_browser

    _require_browser()
    out = tmp_path / "report.html"
    assert main(["report", run_dir, "--html", str(out)]) == 0
    capsys.readouterr()
    driver = start_browser(str(tmp_path / "profile"), "1300,1600")
    try:
        driver.get(out.as_uri())
        sizes = driver.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth]);")
        assert sizes and all(done and width > 100 for done, width in sizes), sizes
        text = page_text(driver)
        assert "Findings, worst first" in text and "The learning-rate probe" in text and "ERROR" in text
        save_screenshot(driver, tmp_path / "report_html.png")
    finally:
        driver.quit()
