"""Collects findings: one per ``(code, layer)``, raised again only when its severity rises; fans out to sinks."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

from diag.findings import Finding, Severity
from diag.sinks.base import Sink

log = logging.getLogger("diag")

# Scalars reach the sinks in batches, one write per step: every SCALARS_WRITE_EVERY steps, those of the steps at least
# SCALARS_HOLD steps old. A measurement is read from the device up to READ_EVERY (10) steps after it was taken and logged
# at the step it was taken, so the scalars of one step arrive at different reads; held, they go out together. Each write
# is a TensorBoard event: about 0.1 ms in the training thread (the protobuf, waking the writer thread) and TensorBoard's
# pure-Python checksum in its writer thread (about 0.2 us per byte, holding the GIL). Written one batch of scalars at a
# time that was 3% of a 2 ms step; held, the 300-step benchmark MLP writes 46 events instead of 77. Fit end, an exception and
# ``close`` write everything held; so does ``flush(force=True)``.
SCALARS_WRITE_EVERY = 50
SCALARS_HOLD = 20


class FindingsCollector:
    """De-duplicates findings and hands the new ones to the sinks.

    A finding is new when no finding with the same ``(code, layer)`` exists, or when its severity is higher
    than the one already held. A repeat at the same or a lower severity only updates the evidence of the
    finding held (sinks are not told again: nothing is reported twice).

    Example::

        collector = FindingsCollector(sinks=[JsonlSink("run/diag/findings.jsonl")])
        collector.report(finding, source="LossCurveMonitor")
    """

    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self._findings: List[Finding] = []
        self._index: Dict[tuple, int] = {}
        self._sources: Dict[tuple, str] = {}
        self._sinks: List[Sink] = list(sinks)
        self._dirty = False
        self._flushed = False
        self._scalars: Dict[int, Dict[str, float]] = {}  # step -> scalars not yet handed to the sinks
        self._next_write = 0  # the step from which flush() writes the scalars held (see SCALARS_WRITE_EVERY)
        self._figures = 0  # probe figures of this run so far (their tags are numbered 1, 2, ...)
        self._no_figures_noted = False

    # ---- findings -------------------------------------------------------------------------------
    @property
    def findings(self) -> List[Finding]:
        """All findings so far, oldest first."""
        return list(self._findings)

    def findings_of(self, source: str) -> List[Finding]:
        return [f for f in self._findings if self._sources.get(f.key) == source]

    def get(self, code: str, layer: Optional[str] = None) -> Optional[Finding]:
        i = self._index.get((code, layer))
        return None if i is None else self._findings[i]

    def has(self, code: str, min_severity: Severity = Severity.INFO, any_layer: bool = True) -> bool:
        """Whether a finding with ``code`` (of at least ``min_severity``) was raised, on any layer by default."""
        return any(f.code == code and f.severity.rank >= Severity(min_severity).rank for f in self._findings)

    def report(self, finding: Finding, source: str = "") -> Optional[Finding]:
        """Record ``finding``; return it when it is new or more severe than before, else ``None``."""
        key = finding.key
        i = self._index.get(key)
        if i is not None:
            held = self._findings[i]
            if finding.severity.rank <= held.severity.rank:
                merged = {**held.evidence, **finding.evidence}
                self._findings[i] = dataclasses.replace(held, evidence=merged)
                return None
            # Severity rose: keep the position of the finding, report it again.
            self._findings[i] = finding
        else:
            self._index[key] = len(self._findings)
            self._findings.append(finding)
        self._sources[key] = source
        self._dirty = True
        for sink in self._sinks:
            sink.on_finding(finding, self._findings)
        return finding

    # ---- sinks ----------------------------------------------------------------------------------
    @property
    def sinks(self) -> List[Sink]:
        return list(self._sinks)

    def open(self, sinks: Sequence[Sink]) -> None:
        """Attach ``sinks`` (closing any earlier ones) and show them the findings already held."""
        self.close()
        self._sinks = list(sinks)
        for sink in self._sinks:
            sink.open(self._findings)
        self._dirty = bool(self._findings)
        self._flushed = False
        self._no_figures_noted = False
        self._next_write = 0

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Hold ``scalars`` for ``step``; the sinks get each step's scalars at once, in one write (TensorBoard: one
        event), at a later :meth:`flush` (see ``SCALARS_WRITE_EVERY``) or at :meth:`close`."""
        if not scalars:
            return
        held = self._scalars.get(step)
        if held is None:
            self._scalars[step] = dict(scalars)
        else:  # (a tag logged twice at one step, e.g. both updates of a gradient sample's pair: the later one stays)
            held.update(scalars)

    def log_probe(self, result: Any, verdict: Any = None, step: int = 0) -> Optional[str]:
        """Draw the learning-rate probe's sweep and hand it to the sinks that keep figures: TensorBoard's Images tab
        and the run's ``diag`` folder, as ``diag/lr_probe/<n>`` (n = 1, 2, ... per run); returns the tag.

        ``result`` is a :class:`diag.probe.ProbeResult`, ``verdict`` what the rules made of it (``.code``,
        ``.suggested_lr``, ``.evidence``) or ``None``. Nothing is drawn when no sink keeps figures (another rank, or
        no TensorBoard and no JSONL). Without matplotlib there is no figure and one log line per fit says how to get
        it. Never raises: a figure is not worth a fit.
        """
        takers = [sink for sink in self._sinks if getattr(sink, "wants_images", False)]
        if not takers:
            return None
        from diag.sinks import figures

        try:
            image = figures.probe_sweep_image(result, verdict, step)
        except Exception as exc:  # a figure that cannot be drawn must not stop the fit
            log.warning("lightning-diag: could not draw the learning-rate probe's figure (%s: %s).",
                        type(exc).__name__, str(exc)[:300])
            return None
        if image is None:
            if not self._no_figures_noted and not figures.matplotlib_available():
                self._no_figures_noted = True
                log.info("lightning-diag: no figure of the learning-rate probe's sweep (TensorBoard Images tab, "
                         "`diag report --html`): matplotlib is not installed; %s.", figures.INSTALL_HINT)
            return None
        self._figures += 1
        tag = f"{figures.PROBE_FIGURE_TAG}/{self._figures}"
        for sink in takers:
            try:
                sink.log_image(tag, image, step)
            except Exception as exc:
                log.warning("lightning-diag: could not write the figure %s to %s (%s: %s).", tag, type(sink).__name__,
                            type(exc).__name__, str(exc)[:300])
        return tag

    def write_scalars(self, before: Optional[int] = None) -> None:
        """Hand the scalars held to the sinks now, oldest step first: those of the steps before ``before``, or all."""
        if not self._scalars:
            return
        steps = sorted(s for s in self._scalars if before is None or s < before)
        for step in steps:
            scalars = self._scalars.pop(step)
            for sink in self._sinks:
                sink.log_scalars(scalars, step)
        if steps:
            for sink in self._sinks:
                sink.scalars_written(steps[-1])

    def flush(self, step: int, force: bool = False) -> None:
        """Write the scalars held when their time has come (see ``SCALARS_WRITE_EVERY``; all of them with ``force``) and
        let the sinks rewrite what shows all findings (e.g. the TensorBoard table), if they changed.

        ``force`` writes even without a change when nothing was written since :meth:`open` (so that a run with
        no findings still shows an empty table); the table is never rewritten unchanged.
        """
        if force:
            self.write_scalars()
        elif step >= self._next_write:
            self._next_write = step + SCALARS_WRITE_EVERY
            self.write_scalars(before=step - SCALARS_HOLD + 1)
        if not (self._dirty or (force and not self._flushed)):
            return
        self._dirty = False
        self._flushed = True
        for sink in self._sinks:
            sink.flush(self._findings, step)

    def close(self) -> None:
        self.write_scalars()
        for sink in self._sinks:
            sink.close(self._findings)
        self._sinks = []

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"findings": [f.to_dict() for f in self._findings],
                "sources": [self._sources.get(f.key, "") for f in self._findings], "figures": self._figures}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        findings = [Finding.from_dict(d) for d in state.get("findings", [])]
        sources = list(state.get("sources", [""] * len(findings)))
        for finding, source in zip(findings, sources):
            key = finding.key
            if key in self._index:
                self._findings[self._index[key]] = finding
            else:
                self._index[key] = len(self._findings)
                self._findings.append(finding)
            self._sources[key] = source
        self._figures = max(self._figures, int(state.get("figures", 0)))
        self._dirty = True
