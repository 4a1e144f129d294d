"""What a TensorBoard user sees of a run, read back from the event files with ``EventAccumulator``.

A real fit with a learning rate far too high (plain SGD at 8 on the digits) raises findings of every severity and makes
the loss monitor call the probe. Checked here:

- Images: the probe's sweep as a figure, ``diag/lr_probe/<n>``, the same PNG beside the findings; without matplotlib
  no figure and one log line that says how to get it; drawing it does not change training.
- Text: ``diag/findings`` holds one row per finding, worst first, severity, code, layer and step on the first line.
- Custom Scalars: the layout holds only charts with data (a curve of two points), per-layer curves one chart per
  layer titled by the layer.

tests/test_dashboard.py opens the same kind of run in TensorBoard in a browser.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import sys

import pytest

from diag.callbacks import Diagnostics, LearningRateProbe
from diag.report import load_runs
from diag.sinks import figures
from diag.sinks.tensorboard import OVERVIEW_CHARTS, PER_LAYER, POINTS_TO_SHOW
from tests.helpers import Classifier, digits_loaders, fit, mlp

pytest.importorskip("matplotlib", reason='the figures need matplotlib: pip install -e ".[plots]" (make venv does)')

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def too_high_lr_run(root, max_epochs: int = 2):
    """Plain SGD at lr=8 on the digits MLP with every monitor and the probe's time budget lifted (the default budget,
    10% of the fit, skips a sweep in a fit this short); the default TensorBoardLogger. Returns the trainer and the
    callback."""
    train, val = digits_loaders()
    diagnostics = Diagnostics(lr_probe=LearningRateProbe(budget_fraction=None))
    trainer = fit(root, Classifier(mlp([64, 64, 10]), lr=8.0, optimizer="sgd"), train, val, [diagnostics],
                  max_epochs=max_epochs)
    return trainer, diagnostics


def png_size(png: bytes):
    assert png[:8] == PNG_SIGNATURE, "not a PNG"
    return struct.unpack(">II", png[16:24])


def read_events(log_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_images(log_dir: str):
    acc = read_events(log_dir)
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def read_layout(acc):
    """The last custom-scalars layout written: [(category, closed, [(chart title, tag regexes)])]."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return [(c.title, c.closed, [(chart.title, list(chart.multiline.tag)) for chart in c.chart])
            for c in layout.category]


@pytest.fixture(scope="module")
def too_high(tmp_path_factory):
    return too_high_lr_run(tmp_path_factory.mktemp("too_high_lr"))


def test_probe_figure_reaches_tensorboard_and_the_run_folder(too_high):
    trainer, diagnostics = too_high
    probe = diagnostics.monitor(LearningRateProbe)
    verdict = next(f for f in diagnostics.findings if f.code == "lr_too_high")
    assert probe.results, "the probe did not run: nothing was drawn"
    images = read_images(trainer.log_dir)
    tags = sorted(images, key=lambda t: int(t.rsplit("/", 1)[1]))
    assert tags == [f"diag/lr_probe/{n}" for n in range(1, len(probe.results) + 1)], tags
    folder = os.path.join(trainer.log_dir, "diag")
    for tag in tags:
        (event,) = images[tag]  # one image per probe, never rewritten
        assert png_size(event.encoded_image_string) == (event.width, event.height)
        assert event.width >= 600 and event.height >= 400
        on_disk = os.path.join(folder, f"lr_probe_{tag.rsplit('/', 1)[1]}.png")
        with open(on_disk, "rb") as fh:
            assert fh.read() == event.encoded_image_string  # the report's copy is the TensorBoard one
    # the verdict's probe drew a figure at the step the finding was raised
    assert verdict.step in {images[t][0].step for t in tags}


def test_probe_title_and_fresh_init_line_come_from_the_verdict(too_high):
    _, diagnostics = too_high
    result = diagnostics.monitor(LearningRateProbe).results[0]
    finding = next(f for f in diagnostics.findings if f.code == "lr_too_high")

    class Verdict:  # what _conclude hands over: the finding's code, suggested rate and evidence
        code, severity, evidence = finding.code, None, finding.evidence
        suggested_lr = float(finding.evidence["suggested_lr"])

    title = figures.probe_title(result, Verdict, step=finding.step)
    assert "lr_too_high" in title and f"use about {Verdict.suggested_lr:.2g}" in title and "now 8" in title
    # the fresh-initialization control's sweep, as judge_control records it in the evidence
    evidence = {"fresh_init_loss_fraction@x0.1": 0.5, "fresh_init_loss_fraction@x1": "diverged",
                "fresh_init_loss_fraction@x0.01": 0.9, "suggested_lr": 0.8}
    assert figures._fresh_init_ratios(evidence) == [(0.01, 0.9), (0.1, 0.5), (1.0, None)]
    Verdict.evidence = {**finding.evidence, **evidence}
    image = figures.probe_sweep_image(result, Verdict, step=finding.step)
    assert png_size(image.png) == (image.width, image.height)


def test_without_matplotlib_no_figure_and_one_line_says_how(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert not figures.matplotlib_available()
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger, level = logging.getLogger("diag"), logging.getLogger("diag").level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # as lightning-diag sets it when the application configured no logging
    try:
        trainer, diagnostics = too_high_lr_run(tmp_path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert diagnostics.monitor(LearningRateProbe).results, "the probe did not run: nothing was tested"
    assert any(f.code == "lr_too_high" for f in diagnostics.findings)  # the verdict does not need the figure
    assert read_images(trainer.log_dir) == {}
    assert not [n for n in os.listdir(os.path.join(trainer.log_dir, "diag")) if n.endswith(".png")]
    hints = [line for line in lines if "matplotlib is not installed" in line]
    assert len(hints) == 1 and "lightning-diag[plots]" in hints[0], lines


@pytest.mark.slow
def test_drawing_the_figure_does_not_change_training(tmp_path):
    """Same seed, with and without Diagnostics: a preflight probe runs and is drawn, training is bitwise the same."""
    from tests.test_no_effect import _assert_same_training, _run

    import pytorch_lightning as pl

    plain = _run(tmp_path, pl, with_diag=False, epochs=2)
    watched = _run(tmp_path, pl, with_diag=True, epochs=2,
                   diagnostics_kwargs={"lr_probe": LearningRateProbe(preflight_step=5, budget_fraction=None)})
    log_dir = os.path.dirname(os.path.dirname(watched["diagnostics"].findings_file))
    assert "diag/lr_probe/1" in read_images(log_dir), "no figure was drawn: nothing was tested"
    _assert_same_training(plain, watched)


# ---- the Text tab and the Custom Scalars layout -------------------------------------------------------------
def test_findings_text_is_one_row_per_finding_worst_first(too_high):
    trainer, diagnostics = too_high
    text = read_events(trainer.log_dir).Tensors("diag/findings/text_summary")[-1].tensor_proto.string_val[0].decode()
    (run,) = load_runs(trainer.log_dir)
    assert {f.key for f in run.findings} == {f.key for f in diagnostics.findings}
    header, rule, *rows = text.splitlines()
    assert header.startswith("| lightning-diag: 1 error") and "worst first" in header and rule == "|---|"
    assert len(rows) == len(run.findings)
    severities = [row.split("**")[1] for row in rows]
    order = {"ERROR": 0, "WARNING": 1, "INFO": 2}
    assert severities == sorted(severities, key=order.get), severities
    assert {"ERROR", "WARNING", "INFO"} <= set(severities)
    for row in rows:
        heading, message, advice = row.strip("| ").split("<br>")
        code = re.search(r"`([a-z_]+)`", heading).group(1)
        finding = next(f for f in run.findings if f.code == code and (f.layer is None or f"`{f.layer}`" in heading))
        assert heading == (f"**{finding.severity.value.upper()}** · `{code}`"
                           + (f" · layer `{finding.layer}`" if finding.layer else "") + f" · step {finding.step}")
        assert message == finding.message.replace("|", "\\|") and advice.startswith("**Advice:** ")


def test_custom_scalars_layout_holds_only_charts_with_data(too_high):
    trainer, _ = too_high
    acc = read_events(trainer.log_dir)
    points = {tag: len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}
    with_data = {tag for tag, n in points.items() if n >= POINTS_TO_SHOW}
    layout = read_layout(acc)
    shown = {}
    for category, closed, charts in layout:
        for title, regexes in charts:
            assert any(re.match(r, tag) for r in regexes for tag in with_data), f"{category}: {title} has no curve"
            shown.setdefault(category, []).append(title)
    # ... and every overview chart with a curve is there; the probe's per-factor fractions are a figure now
    expected = [t for t, regexes in OVERVIEW_CHARTS if any(re.match(r, tag) for r in regexes for tag in with_data)]
    assert shown["lightning-diag"] == expected and "training loss (raw, smoothed)" in expected
    assert not any("probe" in title for titles in shown.values() for title in titles)
    assert any(tag.startswith("diag/probe/") for tag in points)  # (the scalars are still in the Scalars tab)
    # per-layer curves: a closed category per family, a chart per layer titled by the layer
    assert [closed for _, closed, _ in layout] == [False] + [True] * (len(layout) - 1)
    for prefix, title in PER_LAYER:
        layers = sorted(tag[len(prefix):] for tag in with_data if tag.startswith(prefix))
        assert sorted(shown.get(f"lightning-diag: {title}", [])) == layers, title
    assert shown["lightning-diag: gradient norm per layer"]  # the run has per-layer gradient curves
