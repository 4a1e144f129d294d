"""TensorBoard sink: ``diag/...`` scalars, the ``diag/findings`` markdown table and a custom-scalars layout.

Other loggers: :mod:`diag.sinks.loggers`."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

from diag.findings import Finding, Severity
from diag.sinks.base import Sink
from diag.sinks.table import markdown_table

TEXT_TAG = "diag/findings"

# The custom-scalars layout: one category, one chart per family of tags. Chart tags are regular expressions,
# so per-layer charts appear as layers are measured, without rewriting the layout.
LAYOUT: Dict[str, Dict[str, list]] = {
    "lightning-diag": {
        "training loss (raw, smoothed)": ["Multiline", [r"diag/loss(_smoothed)?$"]],
        "learning-rate probe: loss fraction after probe per LR factor": ["Multiline", [r"diag/probe/.*"]],
        "gradient norm (total, per layer)": ["Multiline", [r"diag/grad_norm(/.*)?$"]],
        "gradient noise scale vs batch size": ["Multiline", [r"diag/grad_noise_scale$", r"diag/batch_size$"]],
        "update-to-weight ratio (log10)": ["Multiline", [r"diag/update_to_weight_ratio(/.*)?$"]],
        "update direction cosine (zig-zag < 0)": ["Multiline", [r"diag/update_cosine(/.*)?$"]],
        "activation mean per layer": ["Multiline", [r"diag/activation_mean/.*"]],
        "activation std per layer": ["Multiline", [r"diag/activation_std/.*"]],
        "fraction of positive inputs per weight layer": ["Multiline", [r"diag/fraction_positive_inputs/.*"]],
        "dead units per layer": ["Multiline", [r"diag/dead_fraction/.*"]],
        "saturated units per layer": ["Multiline", [r"diag/saturated_fraction/.*"]],
        "generalization gap (val - train)": ["Multiline", [r"diag/generalization_gap$", r"diag/(train|val)_loss$"]],
        "best validation epoch": ["Multiline", [r"diag/best_val_epoch$"]],
        "findings by severity": ["Multiline", [r"diag/findings/.*"]],
    }
}


def severity_counts(findings: Sequence[Finding]) -> Dict[str, float]:
    counts = {s.value: 0 for s in Severity}
    for f in findings:
        counts[f.severity.value] += 1
    return {f"diag/findings/{k}": float(v) for k, v in counts.items()}


def _summary_class() -> Any:
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
    except ImportError:  # tensorboardX or another writer without the tensorboard package: add_scalar per tag
        return None
    return Summary


class TensorBoardSink(Sink):
    """Writes through a ``SummaryWriter`` (e.g. ``TensorBoardLogger.experiment``)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        # torch's SummaryWriter writes tensorboard's protos; another writer (tensorboardX) gets add_scalar per tag
        torch_writer = type(writer).__module__.startswith("torch.utils.tensorboard")
        self._summary = _summary_class() if torch_writer and callable(getattr(writer, "_get_file_writer", None)) else None

    def open(self, findings: Sequence[Finding]) -> None:
        self.writer.add_custom_scalars(LAYOUT)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        if self._summary is not None:
            # One event holding every scalar (what ``add_scalar`` writes, once per call instead of once per tag):
            # building a summary per tag was most of the cost of a sampled step on a small model.
            summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=float(value))
                                           for tag, value in scalars.items()])
            self.writer._get_file_writer().add_summary(summary, step)
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), global_step=step)

    def flush(self, findings: Sequence[Finding], step: int) -> None:
        self.writer.add_text(TEXT_TAG, markdown_table(findings), global_step=step)
        self.log_scalars(severity_counts(findings), step)
        self.writer.flush()

    def close(self, findings: Sequence[Finding]) -> None:
        try:
            self.writer.flush()
        except Exception:  # a writer closed by its logger already
            pass
