"""Where a fit's findings go, for each Lightning logger (README: "Where findings go").

Every run keeps its own findings: each logger's run gets ``diag/findings.jsonl`` in the run's own folder, and no fit
appends to (or replaces) another fit's file unless both were given the same folder.

==================  ======================================================  ==========================================
logger              ``diag/findings.jsonl``                                 the findings table (with the advice)
==================  ======================================================  ==========================================
TensorBoardLogger   ``<log_dir>/diag/``                                     Text tab, tag ``diag/findings``
CSVLogger           ``<log_dir>/diag/`` (next to ``metrics.csv``)           the JSONL (``diag report``)
MLFlowLogger        the run's artifacts, ``diag/`` (staged under            artifact ``diag/findings.md``
                    ``<default_root_dir>/lightning_logs/mlflow/<run_id>``
                    and uploaded when the artifacts are not local)
WandbLogger         the run's files, ``<run.dir>/diag/``                    ``wandb.Table`` ``diag/findings``
none                ``<default_root_dir>/lightning_logs/version_N/diag/``,  the JSONL (``diag report``)
                    a new ``version_N`` per fit
==================  ======================================================  ==========================================

Scalars go to the first TensorBoard logger under their ``diag/...`` tags and to every other logger through
``log_metrics`` under flat names (:func:`diag.sinks.metric_name`). The learning-rate probe's figures go beside each
JSONL (``lr_probe_<n>.png``, for ``diag report --html``) and to that TensorBoard logger's Images tab
(``diag/lr_probe/<n>``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, List, Optional

from diag.sinks import (ConsoleSink, JsonlSink, LoggerMetricsSink, MlflowSink, Sink, TensorBoardSink, WandbSink,
                        findings_path, local_artifact_dir)

from ._compat import is_tensorboard_logger

# The folder below default_root_dir where runs without a folder of their own get one (Lightning's default logger writes
# there too, so ``diag report lightning_logs`` covers both).
RUNS_FOLDER = "lightning_logs"

log = logging.getLogger("diag")


def _is(logger: Any, class_name: str) -> bool:
    """Whether ``logger`` is a ``class_name`` of either Lightning namespace (or a subclass of one)."""
    return any(cls.__name__ == class_name for cls in type(logger).__mro__)


def make_sinks(trainer: Any, console: bool = True, jsonl: bool = True, tensorboard: bool = True) -> List[Sink]:
    """The sinks of one fit, on global rank zero (call it there only: it may create the run's folder)."""
    loggers = list(getattr(trainer, "loggers", []) or [])
    root = str(getattr(trainer, "default_root_dir", None) or os.getcwd())
    sinks: List[Sink] = []
    files: List[str] = []  # one JSONL per run folder

    def add_jsonl(path: str) -> None:
        if os.path.abspath(path) not in {os.path.abspath(p) for p in files}:
            files.append(path)
            sinks.append(JsonlSink(path))

    runs: List[Sink] = []  # MLflow and W&B runs: the table and the JSONL as parts of the run
    for logger in loggers:
        try:
            _logger_outputs(logger, root, jsonl, tensorboard, add_jsonl, runs)
        except Exception as exc:  # e.g. a tracking server out of reach: the other outputs still work
            log.warning("lightning-diag: cannot write findings to %s (%s: %s); they still reach `.findings`, the "
                        "console and the other outputs.", type(logger).__name__, type(exc).__name__, str(exc)[:300])
    if jsonl and not files:  # no logger, or none with a folder of its own: a new version folder per fit
        sinks.append(JsonlSink(new_version_under=os.path.join(root, RUNS_FOLDER), fit=id(trainer)))
    if console:
        sinks.append(ConsoleSink())
    if tensorboard:
        board = [lg for lg in loggers if is_tensorboard_logger(lg)]
        others = [lg for lg in loggers if not is_tensorboard_logger(lg)]
        if board:
            sinks.append(TensorBoardSink(board[0].experiment))
        if others:
            sinks.append(LoggerMetricsSink(others))
    sinks.extend(runs)
    return sinks


def _logger_outputs(logger: Any, root: str, jsonl: bool, table: bool, add_jsonl: Callable[[str], None],
                    runs: List[Sink]) -> None:
    """The JSONL folder (``add_jsonl``) and the run sinks (``runs``: the findings table when ``table``, the JSONL
    uploaded or synced when ``jsonl``) of one logger."""
    if _is(logger, "MLFlowLogger"):
        client, run_id = logger.experiment, logger.run_id
        artifacts = local_artifact_dir(client, run_id)
        if artifacts is not None:
            if jsonl:
                add_jsonl(findings_path(artifacts))
            if table:
                runs.append(MlflowSink(client, run_id))
        else:
            staged = findings_path(os.path.join(root, RUNS_FOLDER, "mlflow", str(run_id)))
            if jsonl:
                add_jsonl(staged)
            if table or jsonl:
                runs.append(MlflowSink(client, run_id, upload_jsonl=staged if jsonl else None, table=table))
    elif _is(logger, "WandbLogger"):
        run = logger.experiment
        run_dir = getattr(run, "dir", None)  # None for a disabled run (wandb.init(mode="disabled"))
        path = findings_path(run_dir) if run_dir else None
        if jsonl and path:
            add_jsonl(path)
        if table or jsonl:
            runs.append(WandbSink(run, jsonl_path=path if jsonl else None,
                                  log_table=getattr(logger, "log_table", None), table=table))
    elif jsonl:
        log_dir = _own_log_dir(logger)
        if log_dir is not None:
            add_jsonl(findings_path(log_dir))


def _own_log_dir(logger: Any) -> Optional[str]:
    """The folder of this logger's run (``TensorBoardLogger``, ``CSVLogger`` and others with a ``log_dir`` of their own:
    ``save_dir/name/version``), or ``None`` when it has none (a ``save_dir`` alone is shared by every run)."""
    if is_tensorboard_logger(logger) or _is(logger, "CSVLogger"):
        return str(logger.log_dir)
    try:
        log_dir = getattr(logger, "log_dir", None)
    except Exception:  # a property that needs a started run
        return None
    return str(log_dir) if isinstance(log_dir, (str, os.PathLike)) and str(log_dir) else None
