"""Every logger, every run kept: each fit's findings land in its own run folder (MLflow and W&B runs included), a
callback reused for a new fit starts clean, and ``diag report`` reads runs cut off mid-write.

Real fits of a digits MLP: a *flawed* recipe (raw 0..16 pixels, Adam with L2 weight decay: ``inputs_not_normalized`` and
``adam_coupled_weight_decay`` warnings) and its *healthy* twin (standardized inputs, AdamW: no warning).
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import pytorch_lightning as pl

from diag.callbacks import Diagnostics
from diag.cli import main
from diag.report import load_runs
from diag.sinks import read_findings

from .helpers import Classifier, assert_silent, codes, digits_loaders, fit, mlp, trainer

FLAWED_CODES = {"inputs_not_normalized", "adam_coupled_weight_decay"}


def flawed_fit(root, callback, **kwargs):
    train, val = digits_loaders(standardize=False, n_train=640)
    return fit(root, Classifier(mlp([64, 32, 10]), optimizer="adam", weight_decay=1e-2), train, val, [callback],
               max_epochs=1, **kwargs)


def healthy_fit(root, callback, **kwargs):
    train, val = digits_loaders(n_train=640)
    return fit(root, Classifier(mlp([64, 32, 10]), optimizer="adamw"), train, val, [callback], max_epochs=2, **kwargs)


class NaNAfter(Classifier):
    """The loss turns NaN from global step ``at`` on (a fault that TensorBoard users see as ``nonfinite_loss``)."""

    def __init__(self, at: int = 30) -> None:
        super().__init__(mlp([64, 32, 10]))
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.at else loss


@pytest.fixture
def diag_warnings():
    """What the ``diag`` logger says at WARNING or above during the test."""
    records: list = []

    class Handler(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = Handler()
    logging.getLogger("diag").addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger("diag").removeHandler(handler)


def not_console(messages):
    """The ``diag`` logger's warnings other than the console lines of findings."""
    return [m for m in messages if not m.startswith("lightning-diag WARNING") and not m.startswith("lightning-diag ERROR")]


# ---- no logger ----------------------------------------------------------------------------------------------------
def test_two_fits_without_logger_keep_both_and_the_gate_fails(tmp_path, capsys):
    flawed, healthy = Diagnostics(console=False), Diagnostics(console=False)
    flawed_fit(tmp_path, flawed, logger=False)
    healthy_fit(tmp_path, healthy, logger=False)
    assert FLAWED_CODES <= codes(flawed.findings)
    assert_silent(healthy.findings)
    runs = tmp_path / "lightning_logs"
    assert flawed.findings_file == str(runs / "version_0" / "diag" / "findings.jsonl")
    assert healthy.findings_file == str(runs / "version_1" / "diag" / "findings.jsonl")
    assert {f.key for f in read_findings(flawed.findings_file)} == {f.key for f in flawed.findings}
    assert {f.key for f in read_findings(healthy.findings_file)} == {f.key for f in healthy.findings}
    assert [run.name for run in load_runs(str(tmp_path))] == [os.path.join("lightning_logs", "version_0"),
                                                              os.path.join("lightning_logs", "version_1")]
    assert main(["report", str(tmp_path), "--fail-on", "warning", "--plain"]) == 1
    err = capsys.readouterr().err
    assert "FAILED --fail-on warning" in err and "in 1 of 2 runs" in err


# ---- a callback reused for a new fit --------------------------------------------------------------------------------
def test_reused_callback_starts_each_fit_clean(tmp_path):
    callback = Diagnostics(console=False)
    first = flawed_fit(tmp_path, callback)  # TensorBoard, Lightning's default logger: lightning_logs/version_0
    assert FLAWED_CODES <= codes(callback.findings)
    first_file = callback.findings_file
    second = healthy_fit(tmp_path, callback)
    assert second.log_dir != first.log_dir
    assert_silent(callback.findings)
    assert not FLAWED_CODES & {f.code for f in callback.findings}
    assert callback.findings_file == os.path.join(second.log_dir, "diag", "findings.jsonl")
    assert {f.key for f in read_findings(callback.findings_file)} == {f.key for f in callback.findings}
    assert FLAWED_CODES <= {f.code for f in read_findings(first_file)}  # the first fit's file is kept as it was


def test_reused_callback_resuming_from_a_checkpoint_restores_its_findings(tmp_path):
    callback = Diagnostics(console=False)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    train, val = digits_loaders(standardize=False, n_train=640)
    model = Classifier(mlp([64, 32, 10]), optimizer="adam", weight_decay=1e-2)
    fit(tmp_path, model, train, val, [callback, checkpoints], max_epochs=1, enable_checkpointing=True, logger=False)
    before = {f.key: f for f in callback.findings}
    assert FLAWED_CODES <= codes(before.values())
    resumed = trainer(tmp_path, [callback], max_epochs=2, logger=False)
    resumed.fit(Classifier(mlp([64, 32, 10]), optimizer="adam", weight_decay=1e-2), train, val,
                ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    after = {f.key: f for f in callback.findings}
    assert set(before) <= set(after)  # restored from the checkpoint, not found again
    assert all(after[key].step == before[key].step for key in before)
    lines = [json.loads(line) for line in open(callback.findings_file, encoding="utf-8")]
    assert sorted(line["code"] for line in lines if line["code"] in FLAWED_CODES) == sorted(FLAWED_CODES)


# ---- CSV ----------------------------------------------------------------------------------------------------------
def test_csv_logger_gets_the_findings_and_flat_metric_names(tmp_path):
    callback = Diagnostics(console=False)
    logger = pl.loggers.CSVLogger(str(tmp_path))
    flawed_fit(tmp_path, callback, logger=logger)
    assert callback.findings_file == os.path.join(logger.log_dir, "diag", "findings.jsonl")
    assert FLAWED_CODES <= {f.code for f in read_findings(callback.findings_file)}
    with open(os.path.join(logger.log_dir, "metrics.csv"), encoding="utf-8") as fh:
        columns = fh.readline().strip().split(",")
    assert "diag/grad_norm" in columns and "diag/grad_norm.net.0" in columns
    assert not [c for c in columns if c.startswith("diag/") and c.count("/") > 1]


# ---- MLflow -------------------------------------------------------------------------------------------------------
def test_mlflow_file_store_nan_run(tmp_path, monkeypatch, diag_warnings):
    pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'lightning-diag[mlflow]'")
    from pytorch_lightning.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3 refuses file stores without it
    store = tmp_path / "mlruns"
    callback = Diagnostics()
    train, val = digits_loaders(n_train=640)
    logger = MLFlowLogger(experiment_name="nan", tracking_uri=store.as_uri())
    fit(tmp_path, NaNAfter(at=12), train, val, [callback], max_epochs=2, logger=logger)  # 10 steps per epoch

    assert "nonfinite_loss" in codes(callback.findings, "error")
    assert "diag_internal_error" not in {f.code for f in callback.findings}
    assert not not_console(diag_warnings), not_console(diag_warnings)
    client, run_id = logger.experiment, logger.run_id
    artifacts = {a.path for a in client.list_artifacts(run_id, "diag")}
    assert artifacts == {"diag/findings.jsonl", "diag/findings.md"}
    jsonl = client.download_artifacts(run_id, "diag/findings.jsonl", str(tmp_path / "download"))
    assert {f.key for f in read_findings(jsonl)} == {f.key for f in callback.findings}
    table = open(client.download_artifacts(run_id, "diag/findings.md", str(tmp_path / "download")), encoding="utf-8").read()
    nan = next(f for f in callback.findings if f.code == "nonfinite_loss")
    assert "| error |" in table and "nonfinite_loss" in table and nan.advice in table
    metrics = client.get_run(run_id).data.metrics
    assert "diag/grad_norm" in metrics and "diag/grad_norm.net.0" in metrics and "diag/findings.error" in metrics
    assert not (store / "diag").exists()  # never a folder MLflow would take for an experiment
    # The store stays readable: a second run in it starts and lists both runs' experiment.
    second = MLFlowLogger(experiment_name="nan", tracking_uri=store.as_uri())
    assert second.run_id != run_id and len(client.search_runs([logger.experiment_id])) == 2
    assert main(["report", str(store), "--fail-on", "error", "--plain"]) == 1


# ---- W&B ----------------------------------------------------------------------------------------------------------
def test_wandb_offline_run_holds_the_findings(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="needs the wandb extra: pip install 'lightning-diag[wandb]'")
    from pytorch_lightning.loggers import WandbLogger

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                        "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    callback = Diagnostics(console=False)
    logger = WandbLogger(save_dir=str(tmp_path), project="diag-test", offline=True)
    try:
        flawed_fit(tmp_path, callback, logger=logger)
        files = logger.experiment.dir
    finally:
        wandb.finish()
    assert FLAWED_CODES <= codes(callback.findings)
    assert callback.findings_file == os.path.join(files, "diag", "findings.jsonl")
    assert {f.key for f in read_findings(callback.findings_file)} == {f.key for f in callback.findings}
    tables = sorted((p for p in (tmp_path / "wandb").rglob("findings_*.table.json")), key=os.path.getmtime)
    assert tables, "no wandb.Table of findings in the run's files"
    latest = json.loads(tables[-1].read_text(encoding="utf-8"))
    assert latest["columns"] == ["severity", "step", "code", "layer", "message", "advice"]
    assert {row[2] for row in latest["data"]} == {f.code for f in callback.findings}


# ---- diag report on a run killed mid-write ------------------------------------------------------------------------
def test_report_skips_an_unfinished_last_line_and_reports_every_run(tmp_path, capsys):
    flawed, healthy = Diagnostics(console=False), Diagnostics(console=False)
    flawed_fit(tmp_path, flawed, logger=False)
    healthy_fit(tmp_path, healthy, logger=False)
    killed = tmp_path / "lightning_logs" / "version_2" / "diag" / "findings.jsonl"
    killed.parent.mkdir(parents=True)
    data = open(flawed.findings_file, "rb").read()
    lines = data.splitlines(keepends=True)
    assert len(lines) >= 2
    killed.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed half-way through a line
    assert main(["report", str(tmp_path), "--fail-on", "warning", "--plain"]) == 1
    out, err = capsys.readouterr()
    for version in ("version_0", "version_1", "version_2"):
        assert os.path.join("lightning_logs", version) in out
    warnings = [line for line in err.splitlines() if line.startswith("diag report: warning:")]
    assert len(warnings) == 1 and str(killed) in warnings[0] and f"line {len(lines)}" in warnings[0]
    (version_2,) = [run for run in load_runs(str(tmp_path)) if run.name.endswith("version_2")]
    assert len(version_2.findings) == len(lines) - 1
    # A multi-byte character cut in two at the end is an unfinished line too; a whole corrupt line is still an error.
    killed.write_bytes(b"".join(lines[:-1]) + "{\"message\": \"≈".encode("utf-8")[:-1])
    assert main(["report", str(killed), "--plain"]) == 0
    killed.write_bytes(b"".join(lines[:-1]) + b'{"code": "lr_too_high", "sev\n')
    assert main(["report", str(tmp_path), "--plain"]) == 2


def test_mlflow_sink_uploads_a_staged_jsonl(tmp_path, monkeypatch):
    """Where the run's artifacts are not on this machine, the JSONL is written locally and uploaded with log_artifact
    (checked here against a file store, whose log_artifact copies the same way a server's upload stores it)."""
    pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'lightning-diag[mlflow]'")
    from mlflow import MlflowClient

    from diag.findings import Finding
    from diag.sinks import JsonlSink, MlflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    run_id = client.create_run(client.create_experiment("staged")).info.run_id
    staged = str(tmp_path / "stage" / "diag" / "findings.jsonl")
    jsonl, sink = JsonlSink(staged), MlflowSink(client, run_id, upload_jsonl=staged, table=False)
    finding = Finding("lr_too_high", "warning", 3, 0, "m", "a", {"suggested_lr": 1e-3})
    for s in (jsonl, sink):
        s.open([])
    jsonl.on_finding(finding, [finding])
    for s in (jsonl, sink):
        s.flush([finding], 3)
        s.close([finding])
    assert [a.path for a in client.list_artifacts(run_id, "diag")] == ["diag/findings.jsonl"]
    uploaded = client.download_artifacts(run_id, "diag/findings.jsonl", str(tmp_path / "download"))
    assert read_findings(uploaded) == [finding]
