"""`diag analyze`: runs trained WITHOUT lightning-diag, diagnosed from the curves their loggers wrote.

Each run is a real `Trainer.fit` with a plain `TensorBoardLogger` or `CSVLogger` and no callback at all; the command
reads the event files (TensorBoard's `EventAccumulator`) or `metrics.csv` back. A learning rate far too high (plain
SGD at 3 on the digits MLP: the loss climbs and stays high) must be named and fail the gate; its healthy twin (Adam
at 1e-3) must pass. The same run watched live by `Diagnostics()` gives the same loss-curve and fit findings: the
rules are the monitors' own.
"""

from __future__ import annotations

import json
import os

import pytest

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from diag.analyze import analyze
from diag.cli import main
from tests.helpers import Classifier, digits_loaders, mlp, trainer

DIVERGING = dict(lr=3.0, optimizer="sgd")  # the loss climbs to ~3x its start and stays there, finite
NAN = dict(lr=8.0, optimizer="sgd")  # the loss overflows to inf/NaN within 30 steps
HEALTHY = dict(lr=1e-3, optimizer="adam")
LOSS_AND_FIT_CODES = {"nonfinite_loss", "loss_diverging", "loss_oscillating", "loss_plateau", "unexpected_initial_loss",
                      "underfitting", "overfitting", "early_stop_suggested"}


def plain_fit(root, logger_class, name: str, module=None, epochs: int = 3, callbacks=(), **module_kwargs) -> str:
    """A fit with nothing of lightning-diag attached (unless ``callbacks``); returns the logger's run folder."""
    train, val = digits_loaders()
    pl.seed_everything(0)
    t = trainer(root, list(callbacks), max_epochs=epochs, logger=logger_class(str(root), name=name))
    t.fit(module or Classifier(mlp([64, 64, 10]), **module_kwargs), train, val)
    return t.log_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain_runs")
    out = {}
    for logger in (TensorBoardLogger, CSVLogger):
        for name, kwargs in (("diverging", DIVERGING), ("healthy", HEALTHY)):
            out[(logger.__name__, name)] = plain_fit(root / logger.__name__, logger, name, **kwargs)
    out[("CSVLogger", "nan")] = plain_fit(root / "CSVLogger", CSVLogger, "nan", **NAN)
    return out


def cli(capsys, *args):
    status = main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "CSVLogger"])
def test_diverging_run_without_callback_is_named_and_fails_the_gate(runs, capsys, logger):
    run_dir = runs[(logger, "diverging")]
    assert not os.path.exists(os.path.join(run_dir, "diag")), "lightning-diag was attached: nothing was tested"
    status, out, err = cli(capsys, "analyze", run_dir, "--fail-on", "warning", "--plain")
    assert status == 1, (out, err)
    assert "loss_diverging" in out and "warning" in out and "FAILED --fail-on warning" in err
    status, out, _ = cli(capsys, "analyze", run_dir, "--json")
    assert status == 0
    (run,) = json.loads(out)
    assert run["source"] == ("tensorboard" if logger == "TensorBoardLogger" else "csv")
    assert (run["train_loss"], run["val_loss"]) == ("train_loss_step", "val_loss")
    found = {(f["code"], f["severity"]) for f in run["findings"]}
    assert ("loss_diverging", "warning") in found
    # what the curves cannot tell: said once, as info, with the line to run live
    live = [f for f in run["findings"] if f["code"] == "needs_live_run"]
    assert len(live) == 1 and live[0]["severity"] == "info" and "Diagnostics()" in live[0]["advice"]


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "CSVLogger"])
def test_healthy_run_passes_the_gate(runs, capsys, logger):
    status, out, err = cli(capsys, "analyze", runs[(logger, "healthy")], "--fail-on", "warning", "--plain")
    assert status == 0, (out, err)
    assert "No findings" in out and "passed --fail-on warning" in err


def test_a_nan_loss_in_metrics_csv_is_an_error(runs, capsys):
    status, out, err = cli(capsys, "analyze", runs[("CSVLogger", "nan")], "--fail-on", "error", "--json")
    assert status == 1, err
    (run,) = json.loads(out)
    assert ("nonfinite_loss", "error") in {(f["code"], f["severity"]) for f in run["findings"]}


def test_a_folder_of_runs_is_searched_like_tensorboard_does(runs, capsys):
    root = os.path.commonpath([runs[k] for k in runs])
    status, out, err = cli(capsys, "analyze", root, "--fail-on", "warning", "--json")
    assert status == 1
    names = {r["run"]: r for r in json.loads(out)}
    assert len(names) == 5
    failing = {n for n, r in names.items() if any(f["severity"] != "info" for f in r["findings"])}
    assert failing == {n for n in names if "diverging" in n or "nan" in n}
    assert "in 3 of 5 runs" in err


def test_the_same_findings_as_the_live_monitors(tmp_path):
    """One diverging run, watched live by Diagnostics() and logged every step: analyzing its event file afterwards
    gives the loss-curve findings the live monitors gave (the probe's verdicts aside: they need the model)."""
    from diag.callbacks import Diagnostics

    diagnostics = Diagnostics(lr_probe=False)
    run_dir = plain_fit(tmp_path, TensorBoardLogger, "watched", callbacks=[diagnostics], **DIVERGING)
    live = {(f.code, f.severity.value) for f in diagnostics.findings if f.code in LOSS_AND_FIT_CODES}
    (run,) = analyze(run_dir)
    offline = {(f.code, f.severity.value) for f in run.findings if f.code in LOSS_AND_FIT_CODES}
    assert ("loss_diverging", "warning") in live
    assert offline == live, (offline, live)


@pytest.mark.slow
def test_overfitting_and_early_stopping_as_the_fit_monitor_says(tmp_path):
    """A wide MLP on 40 digits (the fit monitor's own overfitting case), logged by a CSVLogger: the same findings."""
    from diag.callbacks import FitMonitor
    from tests.test_fit_monitor import few_digits_loaders

    train, val = few_digits_loaders()
    monitor = FitMonitor()
    pl.seed_everything(0)
    t = trainer(tmp_path, [monitor], max_epochs=14, logger=CSVLogger(str(tmp_path), name="overfit"))
    t.fit(Classifier(mlp([64, 256, 256, 10]), lr=1e-2), train, val)
    live = {(f.code, f.severity.value) for f in monitor.findings}
    assert ("overfitting", "warning") in live
    (run,) = analyze(t.log_dir)
    offline = {(f.code, f.severity.value) for f in run.findings if f.code in LOSS_AND_FIT_CODES}
    assert {("overfitting", "warning"), ("early_stop_suggested", "warning")} <= offline, offline
    assert offline >= {c for c in live if c[0] in LOSS_AND_FIT_CODES}, (offline, live)


class OddNames(Classifier):
    """Logs its losses under names no heuristic takes for a training or validation loss."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("objective", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("holdout_nll", self.loss_fn(self(x), y))


def test_tags_named_on_the_command_line(tmp_path, capsys):
    run_dir = plain_fit(tmp_path, CSVLogger, "odd", module=OddNames(mlp([64, 64, 10]), **DIVERGING))
    status, _, err = cli(capsys, "analyze", run_dir)
    assert status == 2 and "no training loss among the logged scalars" in err and "objective" in err
    status, out, err = cli(capsys, "analyze", run_dir, "--train-tag", "objective", "--val-tag", "holdout_nll",
                           "--fail-on", "warning", "--json")
    assert status == 1, err
    (run,) = json.loads(out)
    assert (run["train_loss"], run["val_loss"]) == ("objective", "holdout_nll")
    assert "loss_diverging" in {f["code"] for f in run["findings"]}


def test_unreadable_input_exits_2(tmp_path, capsys):
    status, _, err = cli(capsys, "analyze", str(tmp_path / "missing"))
    assert status == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    status, _, err = cli(capsys, "analyze", str(tmp_path / "empty"))
    assert status == 2 and "no TensorBoard event files" in err and "metrics.csv" in err
    status, _, err = cli(capsys, "analyze", str(tmp_path), "--num-classes", "1")
    assert status == 2 and "--num-classes" in err


def test_html_page_of_analyzed_runs(runs, tmp_path, capsys):
    out = tmp_path / "analyze.html"
    status, _, err = cli(capsys, "analyze", runs[("CSVLogger", "diverging")], "--html", str(out))
    assert status == 0 and f"wrote {out}" in err
    page = out.read_text(encoding="utf-8")
    assert "loss_diverging" in page and page.count("data:image/png;base64,") == 1  # the loss curve


def test_defaults_are_the_live_monitors():
    """The replay's schedule is the monitors' (diag does not import the callbacks, so the numbers are repeated)."""
    from diag import analyze as offline
    from diag.callbacks import FitMonitor, LossCurveMonitor

    monitor = LossCurveMonitor()
    assert (offline.EMA_DECAY, offline.WINDOW, offline.WARMUP_STEPS, offline.CHECK_EVERY) == (
        monitor.ema_decay, monitor.window, monitor.warmup_steps, monitor.sync_every)
    assert offline.PATIENCE == FitMonitor().patience
