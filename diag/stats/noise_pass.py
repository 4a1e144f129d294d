"""The gradient noise scale's extra pass: the gradient of part of a batch at the current weights, without Lightning.

With one gradient per step (no accumulation), :class:`~diag.stats.noise_scale.GradientNoiseScale` needs a second
estimate of a smaller batch at the same parameters. :func:`part_batch_figures` re-runs the user's step on the first
samples of the batch and takes their gradient ``G_a`` with ``torch.autograd.grad`` (``.grad`` is never touched);
:func:`rest_sq_norm` turns its three figures, once read, into the second small-batch estimate, of the rest of the
batch, without a pass of its own. The pass must leave training bitwise unchanged: it is built on the learning-rate probe's restore
point (RNG states, buffers such as BatchNorm statistics, train/eval modes, attributes the step rebinds such as an RNN's
hidden state, torchmetrics states) and its :func:`~diag.probe.quiet_logging`.

Example::

    size = batch_size(batch)
    part = part_size(size)
    figures = part_batch_figures(model, lambda b: model.training_step(b, 0), take_samples(batch, 0, part),
                                 params, [p.grad for p in params])
    first_sq, big_sq, dot = figures.tolist()
    small_sq = [first_sq, rest_sq_norm(first_sq, big_sq, dot, size, part)]  # for b_small = part and size - part
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn

from diag.batch import loss_of
from diag.probe import RestorePoint, quiet_logging
from diag.stats.gradients import norms_and_dots

# The batch split needs a sample per part. (BatchNorm in training mode refuses a single sample per channel: then the
# step raises :class:`PartBatchRefused`.)
MIN_SPLIT_BATCH = 2
QUARTER_SPLIT_MIN_BATCH = 16  # from this batch size on the extra pass takes a quarter of it (at least 4 samples)


class PartBatchRefused(Exception):
    """The user's step raised on part of a batch (its ``__cause__``); the batch split cannot be used on this model."""


def part_size(size: int) -> int:
    """Samples the extra pass runs on: a quarter of the batch (half of a small one). Its cost is a fraction of a step,
    and a smaller part makes ``1/b_small - 1/b_big`` larger, which conditions the estimate better."""
    return size // 4 if size >= QUARTER_SPLIT_MIN_BATCH else size // 2


def part_batch_figures(module: nn.Module, step: Callable[[Any], Any], part: Any, params: Sequence[torch.Tensor],
                       big: Sequence[torch.Tensor], precision: Optional[ContextManager] = None
                       ) -> Optional[torch.Tensor]:
    """Run ``step(part)`` and take the gradient ``G_a`` of the loss it returns with respect to ``params``.

    Args:
        module: the model the step runs (its state is restored afterwards; parameters are only read).
        step: ``part -> training_step output`` (a loss tensor or a mapping with ``"loss"``), the mean over samples.
        part: the first samples of the batch (see :func:`diag.batch.take_samples`).
        params: the parameters with a gradient of the whole batch.
        big: that gradient ``G_big``, one tensor per parameter (``p.grad``).
        precision: a context manager the step runs under (the Trainer's autocast); ``None``: none.

    Returns ``[|G_a|², |G_big|², <G_a, G_big>]`` on the device (float64), over the parameters the part's loss reaches;
    ``None`` when the step gave no scalar loss with a graph. Raises :class:`PartBatchRefused` when the step raised.
    Everything the step can change is put back: RNG states, buffers, train/eval modes, rebound attributes, metric
    states; its ``self.log`` calls are dropped.
    """
    point = RestorePoint(module, parameters=False)
    try:
        with quiet_logging(module):
            try:
                with torch.enable_grad(), precision if precision is not None else contextlib.nullcontext():
                    output = step(part)
            except Exception as exc:  # the user's step may refuse part of a batch (e.g. BatchNorm on one sample)
                raise PartBatchRefused(f"{type(exc).__name__}: {exc}") from exc
            loss = loss_of(output)
            if loss is None or not loss.requires_grad or loss.dim() != 0:
                return None
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            mine = [g.detach() for g in grads if g is not None]
            if not mine:
                return None
            return norms_and_dots(mine, [b.detach() for g, b in zip(grads, big) if g is not None]).sum(1)
    finally:
        point.restore()


def rest_sq_norm(first_sq: Any, big_sq: Any, dot: Any, size: int, part: int) -> Any:
    """``|G_b|²`` of the ``size - part`` samples after the first ``part``: ``G_big = (h G_a + (B-h) G_b) / B``, so
    ``G_b = (B G_big - h G_a) / (B-h)``. On tensors or on the figures read as floats: the same float64 operations in
    the same order, so the same value to the bit (the monitor splits on the host, without six small kernels)."""
    rest = size - part
    return (size ** 2 * big_sq - 2 * size * part * dot + part ** 2 * first_sq) / rest ** 2
