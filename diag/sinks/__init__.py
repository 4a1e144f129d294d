"""Where findings go: TensorBoard, JSONL, the console, MLflow and W&B runs, or any Lightning logger's ``log_metrics``."""

from diag.sinks.base import Sink
from diag.sinks.console import ConsoleSink
from diag.sinks.jsonl import JsonlSink, findings_path, new_version_dir, read_findings
from diag.sinks.loggers import LoggerMetricsSink, MlflowSink, WandbSink, local_artifact_dir, metric_name
from diag.sinks.table import markdown_findings, markdown_table, text_table
from diag.sinks.tensorboard import LAYOUT, TEXT_TAG, TensorBoardSink

__all__ = ["Sink", "ConsoleSink", "JsonlSink", "TensorBoardSink", "LoggerMetricsSink", "MlflowSink", "WandbSink",
           "findings_path", "new_version_dir", "read_findings", "local_artifact_dir", "metric_name", "markdown_table",
           "markdown_findings", "text_table", "LAYOUT", "TEXT_TAG"]
