"""Where findings go: TensorBoard, JSONL, the console, or any Lightning logger's ``log_metrics``."""

from diag.sinks.base import Sink
from diag.sinks.console import ConsoleSink
from diag.sinks.jsonl import JsonlSink, findings_path, read_findings
from diag.sinks.table import markdown_table, text_table
from diag.sinks.tensorboard import LAYOUT, TEXT_TAG, LoggerMetricsSink, TensorBoardSink

__all__ = ["Sink", "ConsoleSink", "JsonlSink", "TensorBoardSink", "LoggerMetricsSink", "findings_path",
           "read_findings", "markdown_table", "text_table", "LAYOUT", "TEXT_TAG"]
