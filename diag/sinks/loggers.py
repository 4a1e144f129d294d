"""Sinks for loggers other than TensorBoard: scalars through ``log_metrics``, findings into MLflow and W&B runs.

Nothing here imports Lightning, MLflow or W&B: the sinks take the objects a logger holds (an MLflow client and run id,
a W&B run) and call their methods.

Metric names: TensorBoard keeps ``diag/grad_norm`` next to ``diag/grad_norm/net.0`` (tags are names, not paths). MLflow's
file store keeps one file per metric under ``metrics/``, so there the first is a file and the second needs it to be a
folder ("[Errno 21] Is a directory"). Every other logger gets the flat name :func:`metric_name` instead: one level
below ``diag/``, so no name is the folder of another, in any logger.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

from diag.findings import Finding
from diag.sinks.base import Sink
from diag.sinks.table import COLUMNS, cells, markdown_table
from diag.sinks.tensorboard import severity_counts

log = logging.getLogger("diag")

FINDINGS_FOLDER = "diag"  # the folder of a run's findings, below its log_dir or among its artifacts
TABLE_FILE = "findings.md"  # the markdown table of findings, an MLflow artifact
TABLE_KEY = "diag/findings"  # the W&B table of findings (TensorBoard's text tag has the same name)

# What MLflow accepts in a metric name (mlflow.utils.validation); anything else becomes "_" (W&B and CSV take these too).
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(tag: str) -> str:
    """The name of a ``diag/...`` TensorBoard tag in any other logger: ``diag/grad_norm/net.0`` ->
    ``diag/grad_norm.net.0``, ``diag/probe/loss_fraction@x0.1`` -> ``diag/probe.loss_fraction_x0.1``."""
    head, sep, rest = tag.partition("/")
    return _UNSAFE.sub("_", head + sep + rest.replace("/", ".") if sep else tag)


class LoggerMetricsSink(Sink):
    """For loggers other than TensorBoard: scalars through ``logger.log_metrics``, under :func:`metric_name`."""

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = list(loggers)
        self._names: Dict[str, str] = {}  # tag -> metric name (the same few tags come back every sampled step)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        names = self._names
        metrics = {}
        for tag, value in scalars.items():
            name = names.get(tag)
            if name is None:
                name = names[tag] = metric_name(tag)
            metrics[name] = float(value)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def flush(self, findings: Sequence[Finding], step: int) -> None:
        self.log_scalars(severity_counts(findings), step)


class _Uploads(Sink):
    """A sink that writes into a tracking service: it warns once and stops at the first failure (the fit goes on).

    ``table=False`` leaves out the table of findings (``Diagnostics(tensorboard=False)``), keeping the JSONL.
    """

    service = ""

    def __init__(self, table: bool = True) -> None:
        self.table = table
        self._failed = False
        self._last_table: Optional[str] = None

    def _guarded(self, what: Callable[[], None]) -> None:
        if self._failed:
            return
        try:
            what()
        except Exception as exc:  # a tracking server away, a full disk: never into the fit
            self._failed = True
            log.warning("lightning-diag: cannot write findings to the %s run (%s: %s); they still reach `.findings`, the "
                        "console and the other outputs.", self.service, type(exc).__name__, str(exc)[:300])

    def flush(self, findings: Sequence[Finding], step: int) -> None:
        table = markdown_table(findings)
        if table != self._last_table:  # findings changed (the collector also flushes once at fit end)
            self._guarded(lambda: self._write(findings, table, step))
            self._last_table = table

    def close(self, findings: Sequence[Finding]) -> None:
        self.flush(findings, -1)

    def _write(self, findings: Sequence[Finding], table: str, step: int) -> None:
        raise NotImplementedError


def local_artifact_dir(client: Any, run_id: str) -> Optional[str]:
    """The folder of an MLflow run's artifacts when it is on this machine (a ``file:`` store or artifact location),
    else ``None`` (a tracking server keeps them)."""
    uri = str(client.get_run(run_id).info.artifact_uri)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a plain path (C:\\... on Windows)
        return uri
    return None


class MlflowSink(_Uploads):
    """Findings as artifacts of an MLflow run: ``diag/findings.md`` (the table, ``client.log_text``) and, when the
    JSONL is not written among the run's artifacts already, ``diag/findings.jsonl`` (``client.log_artifact``).

    Both are rewritten when the findings change. ``client`` is an ``mlflow.MlflowClient`` (``MLFlowLogger.experiment``).
    """

    service = "MLflow"

    def __init__(self, client: Any, run_id: str, upload_jsonl: Optional[str] = None, table: bool = True) -> None:
        super().__init__(table)
        self.client, self.run_id, self.upload_jsonl = client, run_id, upload_jsonl

    def _write(self, findings: Sequence[Finding], table: str, step: int) -> None:
        if self.table:
            self.client.log_text(self.run_id, table, f"{FINDINGS_FOLDER}/{TABLE_FILE}")
        if self.upload_jsonl and os.path.exists(self.upload_jsonl):
            self.client.log_artifact(self.run_id, self.upload_jsonl, FINDINGS_FOLDER)


class WandbSink(_Uploads):
    """Findings in a W&B run: a ``wandb.Table`` under ``diag/findings`` (rewritten when the findings change), and the
    run's ``diag/findings.jsonl`` synced live (``run.save``; it is written in the run's files folder).

    ``log_table(key, columns, data, step)`` is ``WandbLogger.log_table`` (the table then sits at the trainer's step);
    without it the table goes through ``run.log``.
    """

    service = "W&B"

    def __init__(self, run: Any, jsonl_path: Optional[str] = None,
                 log_table: Optional[Callable[..., None]] = None, table: bool = True) -> None:
        super().__init__(table)
        self.run, self.jsonl_path, self.log_table = run, jsonl_path, log_table

    def open(self, findings: Sequence[Finding]) -> None:
        if self.jsonl_path:
            base = os.path.dirname(os.path.dirname(self.jsonl_path))
            self._guarded(lambda: self.run.save(self.jsonl_path, base_path=base, policy="live"))

    def _write(self, findings: Sequence[Finding], table: str, step: int) -> None:
        if not self.table:
            return
        ordered = sorted(findings, key=lambda f: (-f.severity.rank, f.step))
        rows: List[List[str]] = [cells(f) for f in ordered]
        if self.log_table is not None:
            self.log_table(key=TABLE_KEY, columns=list(COLUMNS), data=rows, step=step if step >= 0 else None)
        else:
            import wandb  # only reached with a W&B run, so W&B is installed

            self.run.log({TABLE_KEY: wandb.Table(columns=list(COLUMNS), data=rows)})
