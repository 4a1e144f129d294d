"""The sink interface: where findings and scalars go."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from diag.findings import Finding

if TYPE_CHECKING:
    from diag.sinks.figures import Image


class Sink:
    """Receives findings and scalars. Every method is optional; a sink must never raise into training."""

    def open(self, findings: Sequence[Finding]) -> None:
        """Called when a fit starts, with the findings already held (e.g. restored from a checkpoint)."""

    def on_finding(self, finding: Finding, findings: Sequence[Finding]) -> None:
        """A finding is new or rose in severity."""

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Scalars named ``diag/...``, all those of one ``step`` (the collector holds them for a while and writes them
        in batches, oldest step first)."""

    def scalars_written(self, step: int) -> None:
        """A batch of :meth:`log_scalars` calls ended, its last step ``step`` (e.g. rewrite a layout once per batch)."""

    #: Whether this sink keeps figures (:meth:`log_image`); figures are drawn only when one sink does.
    wants_images: bool = False

    def log_image(self, tag: str, image: "Image", step: int) -> None:
        """A figure, e.g. the learning-rate probe's sweep under ``diag/lr_probe/<n>``."""

    def flush(self, findings: Sequence[Finding], step: int) -> None:
        """The findings changed since the last flush: rewrite whatever shows all of them."""

    def close(self, findings: Sequence[Finding]) -> None:
        """The fit ended."""
