"""Streaming per-feature statistics of the activations entering or leaving a layer.

A layer's activation tensor is reduced at once to per-feature vectors (a feature is the last axis of a
``(batch, ..., features)`` tensor, or the channel axis of a ``(batch, channels, *spatial)`` tensor; every
other axis counts as samples), so memory is O(features) whatever the batch and the number of steps.
``update`` launches five or six reductions and never synchronizes with the host; the reduced batches are kept as
they are and folded into the running vectors when the window is summarized, for every layer at once (a few kernels per
window instead of four per layer and batch). :func:`summary_table` turns the window of every layer into a handful of
numbers per layer with a few vectorized operations on the device (no host sync: to be read with other figures),
:func:`summaries_from` makes them dicts, and :func:`summarize_all` does both with one ``tolist()``.

State per layer (vectors of ``features`` entries, in the activations' precision, float32 for bf16/fp16):

- ``count``: samples per feature (a number: every feature sees the same samples);
- ``sum`` and ``sum_sq``: first and second moments;
- ``low`` and ``high``: per-feature minimum and maximum, so that "never negative", "never zero" and "zero for
  every sample" are exact over the window;
- ``saturated``: samples at the limits of a sigmoid/tanh unit (only for saturating activations).

For a DDP reduction :meth:`FeatureMoments.flat` packs the state as sums and 0/1 masks (reducible with a plain
sum: a mask > 0 means "on some rank"); :meth:`FeatureMoments.load_flat` reads the reduced vector back.
"""

from __future__ import annotations

import collections
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

# Reduced batches a layer keeps (a deque of this length) before :meth:`FeatureMoments.add` folds them into its running
# vectors: a window of the default 4 sampled steps fits, with gradient accumulation or a module called twice per
# forward; a longer window is folded every so many batches, so that memory stays O(features).
MAX_KEPT_BATCHES = 16

# Summary fields, in the order of the rows that ``summarize_all`` returns.
SUMMARY_FIELDS: Tuple[str, ...] = (
    "samples",  # samples per feature over the window (batch x positions)
    "features",  # number of features (units / channels)
    "mean",  # mean activation over samples and features
    "std",  # standard deviation over samples and features
    "offset_ratio",  # root-mean-square of the per-feature means / root-mean of the per-feature variances
    "fraction_positive",  # among live features: share never negative over the window
    "fraction_strictly_positive",  # among live features: share never <= 0 (sigmoid/softplus; ReLU has exact zeros)
    "fraction_bounded",  # among live features: share inside [0, 1] over the window (sigmoid-like)
    "dead_fraction",  # share of features that are exactly zero for every sample of the window
    "saturated_fraction",  # share of units at the activation's limits for >= `unit_share` of samples
)


def feature_view(x: torch.Tensor, feature_dim: int) -> Optional[Tuple[torch.Tensor, Tuple[int, ...]]]:
    """``x`` and the dims to reduce so that ``feature_dim`` is what remains; ``None`` for unbatched input."""
    ndim = x.dim()
    if ndim < 2:
        return None
    feature_dim = feature_dim % ndim
    if feature_dim == ndim - 1:
        return (x if ndim == 2 else x.reshape(-1, x.shape[-1])), (0,)
    return x, tuple(d for d in range(ndim) if d != feature_dim)


class BatchMoments(NamedTuple):
    """One batch of one layer, reduced to per-feature vectors (on the tensor's device)."""

    features: int
    feature_dim: int  # normalized (>= 0) axis of the features in the original tensor
    n: int  # samples per feature
    sum: torch.Tensor
    sum_sq: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    saturated: Optional[torch.Tensor]  # samples at the limits, when asked for


class FeatureMoments:
    """Per-feature moments, extremes and saturation counts of one layer over a window of batches.

    Args:
        saturation: ``None``, or ``(low, high)``: a sample of a unit is saturated when it is ``< low`` or
            ``> high`` (sigmoid: ``(0.01, 0.99)``; tanh: ``(-0.99, 0.99)``).
        unit_share: a unit counts as saturated when at least this share of its samples is at the limits.

    Example::

        moments = FeatureMoments()
        moments.update(torch.relu(torch.randn(64, 32)), feature_dim=-1)
        (summary,) = summarize_all([moments])
    """

    # the per-feature vectors (see the module docstring): ``None`` until batches are folded in, and after ``reset``;
    # the batches added since are kept in ``_kept`` (see ``add``)
    _VECTORS = ("sum", "sum_sq", "low", "high", "saturated")
    sum: Optional[torch.Tensor]
    sum_sq: Optional[torch.Tensor]
    low: Optional[torch.Tensor]
    high: Optional[torch.Tensor]
    saturated: Optional[torch.Tensor]

    def __init__(self, saturation: Optional[Tuple[float, float]] = None, unit_share: float = 0.5) -> None:
        self.saturation = saturation
        self.unit_share = unit_share
        self.features: Optional[int] = None
        self.reset()

    def reset(self) -> None:
        self.count = 0.0
        self._kept: Deque[BatchMoments] = collections.deque(maxlen=MAX_KEPT_BATCHES)
        self.sum = self.sum_sq = self.low = self.high = self.saturated = None  # (the _VECTORS)

    @property
    def empty(self) -> bool:
        return self.sum is None and not self._kept

    @staticmethod
    def reduce(x: torch.Tensor, feature_dim: int = -1,
               saturation: Optional[Tuple[float, float]] = None) -> Optional[BatchMoments]:
        """One batch reduced to per-feature vectors: four or five reductions, no host synchronization."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        ndim, numel = x.dim(), x.numel()
        if ndim < 2 or numel == 0:
            return None
        dim = feature_dim % ndim
        features = x.shape[dim]
        # (detached: everything below is then outside autograd; no no_grad context needed, it costs more)
        x, dims = feature_view(x.detach(), dim)  # type: ignore[misc]
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bf16/fp16: moments in float32
        total, total_sq = x.sum(dim=dims), (x * x).sum(dim=dims)  # (torch.var_mean is 10-20x slower on CPU)
        if len(dims) == 1 and x.is_cuda:
            low, high = torch.aminmax(x, dim=dims[0])  # one kernel for both
        else:  # (on the CPU aminmax over the batch axis is 2-15x slower than amin + amax: torch 2.13, 64x64-8192x128)
            low, high = torch.amin(x, dim=dims), torch.amax(x, dim=dims)
        sat = None
        if saturation is not None:
            lo, hi = saturation
            sat = (x.abs() > hi).sum(dim=dims) if lo == -hi else ((x < lo) | (x > hi)).sum(dim=dims)
            sat = sat.to(total.dtype)
        return BatchMoments(features, dim, numel // features, total, total_sq, low, high, sat)

    def update(self, x: torch.Tensor, feature_dim: int = -1) -> bool:
        """Add a batch of activations; returns ``False`` (and ignores it) when its feature count differs."""
        batch = self.reduce(x, feature_dim, self.saturation)
        return batch is not None and self.add(batch)

    def add(self, batch: BatchMoments) -> bool:
        """Add a reduced batch (possibly shared with another layer that saw the same tensor).

        The batch is kept as it is (no kernel here: this runs inside the user's forward) and folded into the running
        vectors later: by :func:`summary_table` for all layers at once, or by :meth:`fold`. Either way the additions
        are the ones, in the order, that folding each batch at once would make."""
        if self.features is not None and batch.features != self.features:
            return False  # a shared module applied to tensors of another width: keep the first
        self.features = batch.features
        self.count += batch.n
        if len(self._kept) == MAX_KEPT_BATCHES:
            self.fold()
        self._kept.append(batch)
        return True

    def fold(self) -> None:
        """Fold the batches kept by :meth:`add` into the running vectors, in the order they came."""
        for batch in self._kept:
            self._fold_one(batch)
        self._kept.clear()

    def _folded_copy(self) -> "FeatureMoments":
        """A copy with the kept batches folded in; this one keeps them (a checkpoint changes nothing)."""
        copy = FeatureMoments(self.saturation, self.unit_share)
        copy.features, copy.count = self.features, self.count
        for name in self._VECTORS:
            value = getattr(self, name)
            setattr(copy, name, None if value is None else value.clone())
        for batch in self._kept:
            copy._fold_one(batch)
        return copy

    def _fold_one(self, batch: BatchMoments) -> None:
        if self.sum is None or self.sum.device != batch.sum.device or self.sum.dtype != batch.sum.dtype:
            if self.sum is not None:  # restored from a checkpoint on the CPU, or a dtype change: merge once
                self._move(batch.sum.device, batch.sum.dtype)
            else:  # (copies: a batch may be shared with another layer, and these are updated in place)
                self.sum, self.sum_sq = batch.sum.clone(), batch.sum_sq.clone()
                self.low, self.high = batch.low.clone(), batch.high.clone()
                self.saturated = batch.saturated.clone() if batch.saturated is not None and self.saturation else None
                if self.saturation is not None and self.saturated is None:
                    self.saturated = torch.zeros_like(self.sum)
                return
        self.sum.add_(batch.sum)
        self.sum_sq.add_(batch.sum_sq)
        torch.minimum(self.low, batch.low, out=self.low)
        torch.maximum(self.high, batch.high, out=self.high)
        if self.saturated is not None and batch.saturated is not None:
            self.saturated.add_(batch.saturated)

    def _move(self, device: torch.device, dtype: torch.dtype) -> None:
        for name in self._VECTORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device=device, dtype=dtype))

    # ---- DDP and checkpoints --------------------------------------------------------------------
    def flat(self) -> Optional[torch.Tensor]:
        """The state as one float64 vector of sums and 0/1 masks (sum-reducible across ranks); ``None`` if empty."""
        self.fold()
        if self.sum is None:
            return None
        low, high = self.low, self.high
        parts = [_count_tensor(self.count, self.sum.device).reshape(1), self.sum.double(),
                 self.sum_sq.double(), (low < 0).double(), (low <= 0).double(), (high > 0).double(),
                 (high > 1).double()]
        if self.saturated is not None:
            parts.append(self.saturated.double())
        return torch.cat(parts)

    def load_flat(self, flat: torch.Tensor) -> None:
        """Inverse of :meth:`flat`, after a sum across ranks (masks > 0 mean "on some rank")."""
        assert self.features is not None and self.sum is not None
        dtype = self.sum.dtype
        self._kept.clear()  # (folded by ``flat``)
        count, rest = flat[0], flat[1:]
        chunks = rest.split(self.features)
        self.count = count  # a 0-d tensor on the device (read with the summary, not here)
        self.sum, self.sum_sq = chunks[0].to(dtype), chunks[1].to(dtype)
        negative, nonpositive, positive, above_one = (c > 0 for c in chunks[2:6])
        # stand-in extremes that give back the same masks
        self.low = torch.where(negative, -1.0, torch.where(nonpositive, 0.0, 0.5)).to(dtype)
        self.high = torch.where(above_one, 2.0, torch.where(positive, 0.5, 0.0)).to(dtype)
        if self.saturated is not None and len(chunks) > 6:
            self.saturated = chunks[6].to(dtype)

    def state_dict(self) -> Dict[str, object]:
        folded = self._folded_copy() if self._kept else self
        state: Dict[str, object] = {"features": self.features, "count": float(self.count)}
        for name in self._VECTORS:
            value = getattr(folded, name)
            state[name] = None if value is None else value.detach().cpu().clone()
        return state

    def load_state_dict(self, state: Dict[str, object], device: Optional[torch.device] = None) -> None:
        self.features = state.get("features")  # type: ignore[assignment]
        self.count = float(state.get("count", 0.0))  # type: ignore[arg-type]
        self._kept.clear()
        for name in self._VECTORS:
            value = state.get(name)
            setattr(self, name, None if value is None else torch.as_tensor(value).to(device or "cpu"))


_LAYOUTS: Dict[tuple, tuple] = {}  # per model layout: layer index, unit masks (a few models per process at most)
_COUNTS: Dict[tuple, tuple] = {}  # per model layout and window sample counts (a few per fit)


def _count_tensor(count: object, device: torch.device) -> torch.Tensor:
    """A sample count (a number, or a 0-d tensor after a DDP reduction) as a 0-d float64 tensor on ``device``, built
    there (``torch.full``: no copy from the host, no sync)."""
    if isinstance(count, torch.Tensor):
        return count.to(device=device, dtype=torch.float64).reshape(())
    return torch.full((), float(count), dtype=torch.float64, device=device)  # type: ignore[arg-type]


def _layout(full: Sequence[FeatureMoments], device: torch.device) -> tuple:
    """Per feature: its layer's index, whether the layer counts saturated units, the unit share; per layer: the number
    of features. Built on ``device`` with fill kernels (no copy from the host), once per model layout."""
    key = (str(device), *[(m.features, m.saturation is not None, m.unit_share) for m in full])
    cached = _LAYOUTS.get(key)
    if cached is None:
        if len(_LAYOUTS) > 16:
            _LAYOUTS.clear()

        def per_feature(values: Sequence[object], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat([torch.full((m.features,), v, dtype=dtype, device=device)  # type: ignore[arg-type]
                              for m, v in zip(full, values)])

        units = [m.saturation is not None for m in full]
        cached = _LAYOUTS[key] = (
            per_feature(range(len(full)), torch.long), per_feature(units, torch.bool),
            per_feature([m.unit_share for m in full], torch.float64),
            torch.cat([torch.full((1,), float(m.features), dtype=torch.float64, device=device)  # type: ignore
                       for m in full]))
    return cached


def _counts(full: Sequence[FeatureMoments], layer: torch.Tensor, device: torch.device) -> tuple:
    """The sample count of each layer (a ``(1, layers)`` row) and of each feature's layer (float64, on ``device``): kept
    for the next windows, which have the same counts but the last one; a DDP-reduced count (a tensor) is built each
    time."""
    counted = [m.count for m in full]
    cacheable = not any([isinstance(c, torch.Tensor) for c in counted])
    key = (str(device), *[m.features for m in full], *counted) if cacheable else None
    cached = _COUNTS.get(key) if cacheable else None
    if cached is None:
        if len(_COUNTS) > 16:
            _COUNTS.clear()
        counts = torch.stack([_count_tensor(c, device) for c in counted])
        cached = (counts.view(1, -1), counts[layer])
        if cacheable:
            _COUNTS[key] = cached
    return cached


def _kept_alike(full: Sequence[FeatureMoments]) -> bool:
    """Whether every layer holds kept batches only (nothing folded yet), as many as the others, all in one dtype on one
    device, with saturation counts wherever the layer counts them: the case of every window but a resumed or a
    DDP-reduced one, which :func:`_fold_kept` folds for all layers at once."""
    steps = len(full[0]._kept)
    if not steps:
        return False
    like = full[0]._kept[0].sum
    dtype, device = like.dtype, like.device
    for m in full:
        if m.sum is not None or len(m._kept) != steps:
            return False
        for b in m._kept:
            if b.sum.dtype is not dtype or b.sum.device != device or (b.saturated is None and m.saturation is not None):
                return False
    return True


def _fold_kept(full: Sequence[FeatureMoments]) -> Tuple[Any, ...]:
    """What folding each layer's kept batches would give (see :func:`_window`), for all layers at once: per statistic
    one ``cat`` of every batch of every layer, a ``(batches, ...)`` view, then the batches added in the order they came
    (the same float additions as :meth:`FeatureMoments.fold`) and exact minima and maxima (only compared with 0 and 1:
    which of 0.0 and -0.0 a tie keeps does not matter)."""
    steps = len(full[0]._kept)

    def rows(names: Sequence[str], layers: Sequence[FeatureMoments]) -> torch.Tensor:
        shape = (steps, -1) if len(names) == 1 else (steps, len(names), -1)
        fields = [BatchMoments._fields.index(name) for name in names]
        return torch.cat([m._kept[j][i] for j in range(steps) for i in fields for m in layers]).view(shape)

    def added_in_order(names: Sequence[str], layers: Sequence[FeatureMoments]) -> torch.Tensor:
        batches = rows(names, layers).unbind(0)
        total = batches[0] if steps == 1 else batches[0] + batches[1]
        for batch in batches[2:]:
            total.add_(batch)
        return total

    sums = added_in_order(("sum", "sum_sq"), full)
    low, high = rows(("low",), full).amin(0), rows(("high",), full).amax(0)
    counting = [m for m in full if m.saturation is not None]
    saturated = None
    if counting:
        folded = iter(added_in_order(("saturated",), counting).split([m.features for m in counting]))  # type: ignore
        saturated = torch.cat([next(folded) if m.saturation is not None
                               else torch.zeros(m.features, dtype=torch.float64, device=sums.device)  # type: ignore
                               for m in full])
    return sums, low, high, saturated


def _window(full: Sequence[FeatureMoments]) -> Tuple[Any, ...]:
    """The window of every layer of ``full`` (none empty), each statistic concatenated over the layers on the first
    layer's device: a ``(2, features)`` tensor of the sums and sums of squares, the minima, the maxima and the
    saturation counts (``None`` when no layer counts them), in the activations' precision (float32 or float64; the
    float64 arithmetic of :func:`summary_table` converts them exactly)."""
    if _kept_alike(full):
        return _fold_kept(full)
    for m in full:
        m.fold()
    device = full[0].sum.device  # type: ignore[union-attr]

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(m, name).to(device) for m in full])

    saturated = None
    if any(m.saturated is not None for m in full):
        saturated = torch.cat([(m.saturated.to(device=device, dtype=torch.float64) if m.saturated is not None
                                else torch.zeros(m.features, dtype=torch.float64, device=device)) for m in full])
    return torch.stack([cat("sum"), cat("sum_sq")]), cat("low"), cat("high"), saturated


@torch.no_grad()
def summary_table(moments: Sequence[FeatureMoments]) -> Optional[torch.Tensor]:
    """The window of the non-empty layers among ``moments`` reduced to a few figures per layer, on their device: a
    float64 ``(rows, layers)`` tensor (:data:`_TABLE_ROWS`), vectorized over all layers' features; ``None`` when all
    are empty. No host sync: read it (with other figures) and pass the values, with the same ``moments``, to
    :func:`summaries_from`, which finishes the summaries on the host (the last divisions per layer cost less there
    than a dozen more kernels; the square roots stay here: torch's differ from ``math.sqrt`` in the last bit)."""
    full = [m for m in moments if not m.empty]
    if not full:
        return None
    sums, low, high, saturated_count = _window(full)
    layer, units, unit_share, features = _layout(full, sums.device)
    counts, count_f = _counts(full, layer, sums.device)
    mean_f, ex2_f = sums / count_f  # per feature: the mean and the mean of the squares
    mean2_f = mean_f * mean_f
    var_f = (ex2_f - mean2_f).clamp_min(0)
    negative, positive = low < 0, high > 0
    live = negative | positive
    positive_only = live & ~negative
    per_feature = [mean_f, ex2_f, var_f, mean2_f, live, positive_only, live & (low > 0), positive_only & (high <= 1)]
    if saturated_count is not None:  # a unit of a layer that counts saturation (``units``) at the limits often enough
        per_feature.append((saturated_count / count_f >= unit_share) & units)
    # per layer, the sums over its features (stack promotes the masks to float64: counts)
    per_layer = torch.zeros(len(per_feature), len(full), dtype=torch.float64, device=sums.device)
    per_layer.index_add_(1, layer, torch.stack(per_feature))
    mean, ex2, var, mean2 = per_layer[:4] / features
    roots = torch.stack([(ex2 - mean * mean).clamp_min(0), mean2, var]).sqrt()
    return torch.cat([counts, roots, per_layer])


# The rows of a :func:`summary_table`, per layer: the sample count; the standard deviation and the square roots of the
# mean squared feature mean and of the mean feature variance; then sums over the layer's features: of the feature means,
# mean squares, variances and squared means, and the counts of features live, never negative, always positive, inside
# [0, 1] and (only when some layer counts saturation) saturated.
_TABLE_ROWS = ("samples", "std", "root_mean2", "root_variance", "mean", "mean_square", "variance", "mean2", "live",
               "positive", "strictly_positive", "bounded", "saturated")


def summaries_from(values: Sequence[float], moments: Sequence[FeatureMoments]) -> List[Dict[str, float]]:
    """The flat values of a :func:`summary_table` of ``moments`` (its non-empty layers, in order: their feature counts
    and saturation settings are read, which a reset keeps), as one dict per layer (:data:`SUMMARY_FIELDS`). The float64
    divisions here are those the device ran before (IEEE: the same values; ``x if not x < low else low`` is
    ``torch.clamp_min(x, low)``, NaN included)."""
    width = len(moments)
    rows = dict(zip(_TABLE_ROWS, [values[i:i + width] for i in range(0, len(values), width)]))
    saturated = rows.get("saturated")
    summaries = []
    for i, m in enumerate(moments):
        n = float(m.features)  # type: ignore[arg-type]
        n_live = rows["live"][i]
        live_den = n_live if not n_live < 1.0 else 1.0
        root_variance = rows["root_variance"][i]
        root_variance = root_variance if not root_variance < 1e-12 else 1e-12
        summaries.append(dict(zip(SUMMARY_FIELDS, (
            rows["samples"][i], n, rows["mean"][i] / n, rows["std"][i], rows["root_mean2"][i] / root_variance,
            rows["positive"][i] / live_den, rows["strictly_positive"][i] / live_den, rows["bounded"][i] / live_den,
            (n - n_live) / n,
            saturated[i] / n if saturated is not None and m.saturation is not None else float("nan")))))
    return summaries


def summarize_all(moments: Sequence[FeatureMoments]) -> List[Dict[str, float]]:
    """Summaries (dicts keyed by :data:`SUMMARY_FIELDS`) of several layers, with one host synchronization. Empty
    layers give NaN."""
    full = [m for m in moments if not m.empty]
    table = summary_table(full)
    rows = summaries_from(table.reshape(-1).tolist(), full) if table is not None else []
    by_id = {id(m): row for m, row in zip(full, rows)}
    nan_row = dict(zip(SUMMARY_FIELDS, [float("nan")] * len(SUMMARY_FIELDS)))
    return [by_id.get(id(m), nan_row) for m in moments]
