"""TensorBoard sink: ``diag/...`` scalars, the ``diag/findings`` text, a custom-scalars layout and the probe's figures.

What a user sees, tab by tab:

- **Text**, tag ``diag/findings``: :func:`diag.sinks.table.markdown_findings`, one row per finding, worst first.
- **Custom Scalars**: a layout that holds only charts with data. A chart appears once one of its curves has two points
  (a single point is a dot, not a curve): the category ``lightning-diag`` with the overview (loss, validation,
  totals, findings by severity), then one closed category per per-layer family (``gradient norm per layer``, ...)
  with one chart per layer, titled by the layer's name. TensorBoard colours lines by run, not by tag, so a chart
  of ten layers is ten lines of one colour; a chart per layer says which layer it is. The layout is rewritten (at
  the current step; TensorBoard reads the newest) when a chart is added, at most once per tag.
- **Images**, ``diag/lr_probe/<n>``: the learning-rate probe's sweeps (:mod:`diag.sinks.figures`).

Other loggers: :mod:`diag.sinks.loggers`."""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Set, Tuple

from diag.findings import Finding, Severity
from diag.sinks.base import Sink
from diag.sinks.figures import Image
from diag.sinks.table import markdown_findings

log = logging.getLogger("diag")

TEXT_TAG = "diag/findings"

# A curve needs two points: a chart appears in the layout when one of its tags has this many.
POINTS_TO_SHOW = 2

OVERVIEW = "lightning-diag"
# The overview: (title, tag regular expressions). Totals and one-per-run measurements only, a few lines per chart.
OVERVIEW_CHARTS: List[Tuple[str, List[str]]] = [
    ("training loss (raw, smoothed)", [r"diag/loss$", r"diag/loss_smoothed$"]),
    ("training and validation loss per evaluation", [r"diag/train_loss$", r"diag/val_loss$"]),
    ("generalization gap (validation - training loss)", [r"diag/generalization_gap$"]),
    ("best validation epoch", [r"diag/best_val_epoch$"]),
    ("gradient norm, whole model", [r"diag/grad_norm$"]),
    ("gradient noise scale vs batch size", [r"diag/grad_noise_scale$", r"diag/batch_size$"]),
    ("update-to-weight ratio (log10), whole model", [r"diag/update_to_weight_ratio$"]),
    ("update direction cosine, whole model (zig-zag < 0)", [r"diag/update_cosine$"]),
    ("share of steps with clipped gradients", [r"diag/grad_clip_fraction$"]),
    ("findings by severity", [r"diag/findings/(error|warning|info)$"]),
]
# Per-layer families: tag prefix -> category title; one chart per layer (``<prefix><layer>``), titled by the layer.
PER_LAYER: List[Tuple[str, str]] = [
    ("diag/grad_norm/", "gradient norm per layer"),
    ("diag/update_to_weight_ratio/", "update-to-weight ratio (log10) per layer"),
    ("diag/update_cosine/", "update direction cosine per layer (zig-zag < 0)"),
    ("diag/activation_mean/", "activation mean per layer"),
    ("diag/activation_std/", "activation std per layer"),
    ("diag/fraction_positive_inputs/", "fraction of positive inputs per weight layer"),
    ("diag/dead_fraction/", "dead units per layer"),
    ("diag/saturated_fraction/", "saturated units per layer"),
]

# Every chart the layout can hold, as ``SummaryWriter.add_custom_scalars`` takes it (per-layer families as one
# regular-expression chart each): for writers without the tensorboard package, and as documentation.
LAYOUT: Dict[str, Dict[str, list]] = {
    OVERVIEW: {title: ["Multiline", tags] for title, tags in OVERVIEW_CHARTS},
    **{f"{OVERVIEW}: {title}": {title: ["Multiline", [re.escape(prefix) + ".+"]]} for prefix, title in PER_LAYER},
}

Layout = List[Tuple[str, bool, List[Tuple[str, List[str]]]]]  # (category, closed, [(chart title, tag regexes)])


def layout_for(tags: Iterable[str]) -> Layout:
    """The charts that have data, given the tags with enough points: the overview, then a category per layer family."""
    tags = sorted(set(tags))
    overview = [(title, regexes) for title, regexes in OVERVIEW_CHARTS
                if any(re.match(r, tag) for r in regexes for tag in tags)]
    layout: Layout = [(OVERVIEW, False, overview)] if overview else []
    for prefix, title in PER_LAYER:
        layers = [tag[len(prefix):] for tag in tags if tag.startswith(prefix) and len(tag) > len(prefix)]
        if layers:
            layout.append((f"{OVERVIEW}: {title}", True,
                           [(layer, [re.escape(prefix + layer) + "$"]) for layer in layers]))
    return layout


def layout_dict(layout: Layout) -> Dict[str, Dict[str, list]]:
    """``layout`` as ``SummaryWriter.add_custom_scalars`` takes it (without the categories' ``closed`` flags)."""
    return {category: {title: ["Multiline", regexes] for title, regexes in charts} for category, _, charts in layout}


def severity_counts(findings: Sequence[Finding]) -> Dict[str, float]:
    counts = {s.value: 0 for s in Severity}
    for f in findings:
        counts[f.severity.value] += 1
    return {f"diag/findings/{k}": float(v) for k, v in counts.items()}


def _proto_classes() -> Any:
    """TensorBoard's ``(Summary, Event)`` protos, or ``(None, None)``."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
    except ImportError:  # tensorboardX or another writer without the tensorboard package: add_scalar per tag
        return None, None
    return Summary, Event


def _layout_summary(layout: Layout) -> Any:
    """The custom-scalars layout as a summary (what ``SummaryWriter.add_custom_scalars`` writes, with the categories'
    ``closed`` flags, which it cannot set)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    proto = layout_pb2.Layout()
    for category, closed, charts in layout:
        entry = proto.category.add(title=category, closed=closed)
        for title, regexes in charts:
            entry.chart.add(title=title, multiline=layout_pb2.MultilineChartContent(tag=regexes))
    tensor = TensorProto(dtype="DT_STRING", string_val=[proto.SerializeToString()], tensor_shape=TensorShapeProto())
    plugin = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME))
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=plugin)])


class TensorBoardSink(Sink):
    """Writes through a ``SummaryWriter`` (e.g. ``TensorBoardLogger.experiment``)."""

    wants_images = True

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        # torch's SummaryWriter writes tensorboard's protos; another writer (tensorboardX) gets add_scalar per tag
        torch_writer = type(writer).__module__.startswith("torch.utils.tensorboard")
        protos = torch_writer and callable(getattr(writer, "_get_file_writer", None))
        self._summary, self._event = _proto_classes() if protos else (None, None)
        self._points: Dict[str, int] = {}  # diag/... tag -> points written, counted up to POINTS_TO_SHOW (O(tags))
        self._shown: Set[str] = set()  # tags with POINTS_TO_SHOW points: nothing more to count for them
        self._layout: Layout = []
        self._layout_stale = False  # a tag got its points since the layout was last written

    def open(self, findings: Sequence[Finding]) -> None:
        self._points, self._shown, self._layout, self._layout_stale = {}, set(), [], False

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        if self._event is not None:
            # One event holding every scalar of the step (what ``add_scalar`` writes, once per step instead of once per
            # tag), its values added in place (no Summary built and then copied into the Event).
            event = self._event()
            add = event.summary.value.add
            for tag, value in scalars.items():
                add(tag=tag, simple_value=float(value))
            self.writer._get_file_writer().add_event(event, step)
        else:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, float(value), global_step=step)
        new = scalars.keys() - self._shown  # one set difference in C: empty on most steps once every tag is shown
        for tag in new:
            n = self._points.get(tag, 0) + 1
            self._points[tag] = n
            if n >= POINTS_TO_SHOW:
                self._shown.add(tag)
                self._layout_stale = True

    def scalars_written(self, step: int) -> None:
        if self._layout_stale:  # once per batch of steps, however many tags got their points in it
            self._layout_stale = False
            self._update_layout(step)

    def _update_layout(self, step: int) -> None:
        layout = layout_for(self._shown)
        if layout == self._layout:
            return
        self._layout = layout
        try:
            if self._summary is not None:
                self.writer._get_file_writer().add_summary(_layout_summary(layout), step)
            else:
                self.writer.add_custom_scalars(layout_dict(layout))
        except Exception as exc:  # the charts are a view: the scalars are written, a monitor must not stop for this
            log.warning("lightning-diag: could not write the custom-scalars layout (%s: %s); the scalars are in the "
                        "Scalars tab.", type(exc).__name__, str(exc)[:300])

    def log_image(self, tag: str, image: Image, step: int) -> None:
        if self._summary is not None:
            picture = self._summary.Image(height=image.height, width=image.width, colorspace=4,
                                          encoded_image_string=image.png)
            self.writer._get_file_writer().add_summary(self._summary(value=[self._summary.Value(tag=tag, image=picture)]),
                                                       step)
        else:  # a writer that takes arrays only
            import io

            from matplotlib.image import imread  # a figure exists, so matplotlib is installed

            self.writer.add_image(tag, imread(io.BytesIO(image.png), format="png"), global_step=step,
                                  dataformats="HWC")
        self.writer.flush()

    def flush(self, findings: Sequence[Finding], step: int) -> None:
        self.writer.add_text(TEXT_TAG, markdown_findings(findings), global_step=step)
        self.log_scalars(severity_counts(findings), step)
        self.scalars_written(step)
        self.writer.flush()

    def close(self, findings: Sequence[Finding]) -> None:
        try:
            self.writer.flush()
        except Exception:  # a writer closed by its logger already
            pass
