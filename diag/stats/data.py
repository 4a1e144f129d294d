"""Streaming statistics of the data: per-feature moments of the inputs, label counts, per-sample digests.

Each statistic reduces a batch at once to a few numbers per feature (or per class) kept on the batch's device,
so that reading it costs one host transfer when the rule runs, not one per batch. Memory is bounded: O(features)
for the moments, O(classes) and the labels of up to 64 batches for the counts, a capped set for the digests. Nothing
here changes the tensors it reads (every operation makes a new tensor).

Example::

    moments = FeatureMoments()
    for x in batches:
        moments.update(x, axis=feature_axis(x.shape))
    summary = moments.compute()  # count, mean, std, min, max, non_integer per feature (CPU tensors)
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any, Deque, Dict, Iterable, List, Optional

import torch

# Inputs with more features than this are not summarized (e.g. a 100k-word bag of words): the per-feature state
# would no longer be small.
MAX_FEATURES = 65536
# Values read per batch for the moments (the first samples of a batch): ~20 CIFAR images, 1000 rows of 64 features.
# Enough for per-feature means and spreads over a few batches, and it bounds the cost for large inputs.
MAX_VALUES_PER_BATCH = 65536
# Bytes hashed per training batch (the first samples of a batch): bounds the host copy and the hashing cost.
MAX_HASH_BYTES_PER_BATCH = 4 * 2**20
# Target batches a LabelCounts keeps (copies, in a deque of this length) before counting them all with one scatter: a
# kernel per batch instead of four, and memory bounded by this many batches of labels.
KEPT_TARGET_BATCHES = 64
# Per-channel images: a last dimension of this size, after a larger second one, is taken as channels-last (N, H, W, C).
_CHANNEL_SIZES = (1, 2, 3, 4)


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def feature_axis(shape: torch.Size) -> Optional[int]:
    """Which axis of an input batch holds its features, or ``None`` for shapes we do not summarize.

    ``(N,)``: one feature; ``(N, F)``: columns; ``(N, C, L)`` / ``(N, T, F)``: the smaller of the two axes
    (channels of a signal, features of a sequence); ``(N, C, H, W)``: channels (channels-last when the last axis is
    1-4 and the second is larger); ``(N, C, D, H, W)``: channels.
    """
    dims = len(shape)
    if dims == 1:
        return None  # (N,): one feature, FeatureMoments handles it
    if dims == 2:
        return 1
    if dims == 3:
        return 1 if shape[1] <= shape[2] else 2
    if dims == 4:
        return 3 if shape[3] in _CHANNEL_SIZES and shape[1] not in _CHANNEL_SIZES else 1
    if dims == 5:
        return 1
    return None


def _float32(x: torch.Tensor) -> torch.Tensor:
    """``x.float()``, without the dispatcher call when ``x`` already is float32 (then it is ``x`` itself)."""
    return x if x.dtype == torch.float32 else x.float()


def _float_input(x: Any) -> bool:
    return (isinstance(x, torch.Tensor) and x.layout == torch.strided and x.is_floating_point() and x.dim() > 0
            and x.numel() > 0)


class FeatureMoments:
    """Per-feature count, mean, variance, min, max and count of non-integer values over a stream of batches.

    ``update(x, axis)`` reduces a float batch over every axis but the feature ``axis`` (``None``: a 1-D batch, one
    feature). Sums are taken around a per-feature shift (the first batch's mean), which keeps the variance exact in
    float arithmetic even for features far from zero. At most ``max_values`` values per batch are read (the first
    samples of the batch), so a batch of large images costs no more than a small one. State stays on the device.
    Integer tensors (token ids, class indices) are not features: ``update`` refuses them.
    """

    def __init__(self, max_values: int = MAX_VALUES_PER_BATCH) -> None:
        self.max_values = int(max_values)
        self.reset()

    def reset(self) -> None:
        self.count = 0  # values per feature so far
        self.batches = 0
        self.axis: Optional[int] = None
        self.shift: Optional[torch.Tensor] = None
        self.sum: Optional[torch.Tensor] = None
        self.sum_sq: Optional[torch.Tensor] = None
        self.min: Optional[torch.Tensor] = None
        self.max: Optional[torch.Tensor] = None
        self.non_integer: Optional[torch.Tensor] = None

    @property
    def features(self) -> Optional[int]:
        return None if self.sum is None else int(self.sum.numel())

    def update(self, x: torch.Tensor, axis: Optional[int] = None) -> bool:
        """Fold one batch in; ``False`` (nothing changes) for integer tensors, unknown axes or another feature count."""
        if not _float_input(x):
            return False
        x = x.detach()
        if x.dim() == 1:
            x, axis = x.unsqueeze(1), 1
        if axis is None or not 0 < axis < x.dim():
            return False
        features = int(x.shape[axis])
        if features == 0 or features > MAX_FEATURES or (self.sum is not None and features != self.sum.numel()):
            return False
        per_sample = max(1, x.numel() // x.shape[0])
        keep = max(1, self.max_values // per_sample)
        if x.shape[0] > keep:
            x = x[:keep]
        dims = tuple(d for d in range(x.dim()) if d != axis)
        view = [1] * x.dim()
        view[axis] = features
        if self.shift is None:
            self.shift = x.mean(dims, dtype=torch.float32)
        centered = _float32(x) - self.shift.view(view)
        acc = _accumulation_dtype(x.device)
        batch_sum = centered.sum(dims).to(acc)
        batch_sq = centered.square().sum(dims).to(acc)
        batch_min, batch_max = _float32(x.amin(dims)), _float32(x.amax(dims))
        batch_non_integer = (torch.frac(x) != 0).sum(dims)
        if self.sum is None:
            self.sum, self.sum_sq, self.min, self.max = batch_sum, batch_sq, batch_min, batch_max
            self.non_integer = batch_non_integer
        else:
            self.sum, self.sum_sq = self.sum + batch_sum, self.sum_sq + batch_sq
            self.min, self.max = torch.minimum(self.min, batch_min), torch.maximum(self.max, batch_max)
            self.non_integer = self.non_integer + batch_non_integer
        self.count += x.numel() // features
        self.batches += 1
        self.axis = axis
        return True

    def compute(self) -> Optional[Dict[str, torch.Tensor]]:
        """The per-feature summary as float64 CPU tensors (one host transfer), or ``None`` before any update."""
        if self.sum is None:
            return None
        dtype = self.sum.dtype
        stacked = torch.stack([self.shift.to(dtype), self.sum, self.sum_sq, self.min.to(dtype), self.max.to(dtype),
                               self.non_integer.to(dtype)])
        shift, total, total_sq, low, high, non_integer = stacked.to("cpu", torch.float64).unbind(0)
        mean_centered = total / self.count
        variance = (total_sq / self.count - mean_centered.square()).clamp_min(0)
        return {"count": torch.tensor(float(self.count), dtype=torch.float64), "mean": shift + mean_centered,
                "std": variance.sqrt(), "min": low, "max": high, "non_integer": non_integer}


def summarize(x: torch.Tensor, axis: Optional[int] = None) -> Optional[Dict[str, torch.Tensor]]:
    """The summary of one batch (what :meth:`FeatureMoments.compute` returns), or ``None``."""
    moments = FeatureMoments()
    return moments.compute() if moments.update(x, axis) else None


class LabelCounts:
    """How often each class label occurs, counted on the device without a host sync per batch (a copy of each batch's
    labels is kept and counted with the next ones, every :data:`KEPT_TARGET_BATCHES` batches and in :meth:`compute`).

    Integer labels ``0 .. max_classes-1`` are counted per class; larger ones go to an overflow count and negative
    ones (``ignore_index``, e.g. -100) to the ``other`` count. Float targets count as binary labels while every value
    is exactly 0 or 1; any other value goes to ``other`` (regression targets, soft labels). Only one label per sample
    is counted: targets shaped ``(N,)`` or ``(N, 1)``; sequences of labels (language modeling, segmentation) are not.
    """

    def __init__(self, max_classes: int = 4096) -> None:
        self.max_classes = int(max_classes)
        self.reset()

    def reset(self) -> None:
        # bins: 0 = other (negative / not 0-1), 1 .. max_classes = labels 0 .. max_classes-1, last = overflow
        self.counts: Optional[torch.Tensor] = None
        self.kind: Optional[str] = None  # "integer" or "binary_float"; "unsupported" once shapes/kinds disagree
        # copies of the labels of the batches not counted yet
        self._kept: Deque[torch.Tensor] = collections.deque(maxlen=KEPT_TARGET_BATCHES)
        # per batch: how many distinct labels it held (summed on the device), the batches and their samples
        self.distinct: Optional[torch.Tensor] = None
        self.batches = 0
        self.samples = 0

    def update(self, targets: torch.Tensor) -> bool:
        """Count one batch of targets; ``False`` when they are not one class label per sample."""
        if self.kind == "unsupported" or not isinstance(targets, torch.Tensor):
            return False
        y = targets.detach()
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.dim() != 1 or y.numel() == 0 or y.is_complex():
            if self.kind is not None:
                self._unsupported()
            return False
        kind = "binary_float" if y.is_floating_point() else "integer"
        if self.kind not in (None, kind):
            self._unsupported()
            return False
        self.kind = kind
        if len(self._kept) == KEPT_TARGET_BATCHES:
            self._count_kept()
        # a copy: the batch's tensor may be changed in place by the training step, or refilled by the loader
        self._kept.append(y.clone())
        return True

    def _unsupported(self) -> None:
        self.kind = "unsupported"
        self._kept.clear()  # never counted: compute() answers None from now on

    def _count_kept(self) -> None:
        """Count the kept labels and the distinct labels of each kept batch, per group of batches of one size (usually
        one group, two at an epoch's short last batch): a ``stack``, the bin of each label, a ``scatter_add_`` into the
        counts and a ``scatter_`` into a (batches, bins) table of presence. No host sync, no copy from the host."""
        if not self._kept:
            return
        groups: Dict[int, List[torch.Tensor]] = {}
        for t in self._kept:
            groups.setdefault(len(t), []).append(t)
        self._kept.clear()
        k = self.max_classes
        for size, batches in groups.items():
            y = torch.stack(batches) if len(batches) > 1 else batches[0].view(1, -1)
            if self.kind == "binary_float":
                index = torch.where(y == 0, 1, torch.where(y == 1, 2, 0))
            else:
                index = y.long().clamp(-1, k) + 1
            if self.counts is None:
                self.counts = torch.zeros(k + 2, dtype=torch.long, device=y.device)
                self.distinct = torch.zeros((), dtype=torch.long, device=y.device)
            self.counts.scatter_add_(0, index.view(-1), torch.ones_like(index).view(-1))
            present = torch.zeros(len(batches), k + 2, dtype=torch.bool, device=y.device)
            present.scatter_(1, index, True)
            self.distinct += present[:, 1:].sum()  # (bin 0, "other", is no label)
            self.batches += len(batches)
            self.samples += size * len(batches)

    def compute(self) -> Optional[Dict[str, object]]:
        """``{"kind", "counts" (list per label up to the largest seen), "overflow", "other", "batches",
        "mean_batch_size", "mean_distinct" (labels per batch)}`` or ``None``."""
        if self.kind in (None, "unsupported"):
            return None
        self._count_kept()
        if self.counts is None:
            return None
        values: List[int] = torch.cat([self.counts, self.distinct.view(1)]).cpu().tolist()  # (one transfer)
        other, per_class, overflow = values[0], values[1: self.max_classes + 1], values[self.max_classes + 1]
        last = max((i for i, c in enumerate(per_class) if c), default=-1)
        return {"kind": self.kind, "counts": per_class[: last + 1], "overflow": overflow, "other": other,
                "batches": self.batches, "mean_batch_size": self.samples / max(1, self.batches),
                "mean_distinct": values[-1] / max(1, self.batches)}


def _as_bytes_matrix(x: torch.Tensor):
    """A contiguous CPU numpy view of ``x`` with one row per sample (bfloat16 is read as its raw 16-bit words)."""
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    elif x.dtype == torch.bool:
        x = x.to(torch.uint8)
    return x.numpy().reshape(x.shape[0], -1)


def sample_digests(inputs: torch.Tensor, mask: Optional[torch.Tensor] = None, digest_size: int = 16,
                   max_bytes: Optional[int] = None) -> List[bytes]:
    """One BLAKE2b digest per sample of ``inputs`` (its dtype, per-sample shape and bytes); with ``mask``
    (1 = real token), only the unmasked positions count, so padding to different lengths does not matter.
    With ``max_bytes``, only the first samples of the batch that fit in that many bytes are hashed (at least one)."""
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        return []
    if max_bytes is not None:
        per_sample = max(1, inputs[:1].numel() * inputs.element_size())
        keep = max(1, max_bytes // per_sample)
        inputs = inputs[:keep]
        mask = mask[:keep] if mask is not None else None
    header = f"{inputs.dtype}|{tuple(inputs.shape[1:]) if mask is None else ''}|".encode()
    base = hashlib.blake2b(header, digest_size=digest_size)
    rows = _as_bytes_matrix(inputs)
    digests = []
    if mask is not None:
        keep_rows = _as_bytes_matrix(mask if mask.dtype == torch.bool else mask != 0).astype(bool)
        for row, k in zip(rows, keep_rows):
            h = base.copy()
            h.update(row[k].tobytes())
            digests.append(h.digest())
        return digests
    for row in rows:
        h = base.copy()
        h.update(row)  # a contiguous row: hashed in place, no copy
        digests.append(h.digest())
    return digests


class DigestSet:
    """A set of sample digests capped at ``max_items`` (later samples are dropped once full), with the number of
    samples offered, so that shares can be computed over what was really hashed."""

    def __init__(self, max_items: int) -> None:
        self.max_items = int(max_items)
        self.counts: Dict[bytes, int] = {}
        self.samples = 0  # samples hashed (with repeats)

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def full(self) -> bool:
        return len(self.counts) >= self.max_items

    def add(self, digests: Iterable[bytes]) -> None:
        for d in digests:
            if d in self.counts:
                self.counts[d] += 1
            elif len(self.counts) < self.max_items:
                self.counts[d] = 1
            else:
                continue
            self.samples += 1

    def clear(self) -> None:
        self.counts.clear()
        self.samples = 0
