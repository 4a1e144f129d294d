"""Streaming per-feature statistics of the activations entering or leaving a layer.

A layer's activation tensor is reduced at once to per-feature vectors (a feature is the last axis of a
``(batch, ..., features)`` tensor, or the channel axis of a ``(batch, channels, *spatial)`` tensor; every
other axis counts as samples), so memory is O(features) whatever the batch and the number of steps.
``update`` launches four or five reductions and four in-place updates and never synchronizes with the host;
:func:`summary_table` turns the window of every layer into a handful of numbers per layer with a few vectorized
operations on the device (no host sync: to be read with other figures), :func:`summaries_from` makes them dicts, and
:func:`summarize_all` does both with one ``tolist()``.

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

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

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
    if x.dim() < 2:
        return None
    feature_dim = feature_dim % x.dim()
    if feature_dim == x.dim() - 1:
        return x.reshape(-1, x.shape[-1]), (0,)
    return x, tuple(d for d in range(x.dim()) if d != feature_dim)


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

    # the per-feature vectors (see the module docstring): ``None`` until the first batch, and after ``reset``
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
        for name in self._VECTORS:
            setattr(self, name, None)

    @property
    def empty(self) -> bool:
        return self.sum is None

    @staticmethod
    def reduce(x: torch.Tensor, feature_dim: int = -1,
               saturation: Optional[Tuple[float, float]] = None) -> Optional[BatchMoments]:
        """One batch reduced to per-feature vectors: four or five reductions, no host synchronization."""
        if not torch.is_tensor(x) or not x.is_floating_point() or x.numel() == 0 or x.dim() < 2:
            return None
        x = x.detach()  # everything below is then outside autograd (no no_grad context needed: it costs more)
        dim = feature_dim % x.dim()
        features = x.shape[dim]
        x, dims = feature_view(x, dim)  # type: ignore[misc]
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # bf16/fp16: moments in float32
        total, total_sq = x.sum(dim=dims), (x * x).sum(dim=dims)  # (torch.var_mean is 10-20x slower on CPU)
        if len(dims) == 1:
            low, high = torch.aminmax(x, dim=dims[0])  # one kernel for both
        else:
            low, high = torch.amin(x, dim=dims), torch.amax(x, dim=dims)
        sat = None
        if saturation is not None:
            lo, hi = saturation
            sat = (x.abs() > hi).sum(dim=dims) if lo == -hi else ((x < lo) | (x > hi)).sum(dim=dims)
            sat = sat.to(total.dtype)
        return BatchMoments(features, dim, x.numel() // features, total, total_sq, low, high, sat)

    def update(self, x: torch.Tensor, feature_dim: int = -1) -> bool:
        """Add a batch of activations; returns ``False`` (and ignores it) when its feature count differs."""
        batch = self.reduce(x, feature_dim, self.saturation)
        return batch is not None and self.add(batch)

    def add(self, batch: BatchMoments) -> bool:
        """Add a reduced batch (possibly shared with another layer that saw the same tensor)."""
        if self.features is not None and batch.features != self.features:
            return False  # a shared module applied to tensors of another width: keep the first
        self.features = batch.features
        if self.sum is None or self.sum.device != batch.sum.device or self.sum.dtype != batch.sum.dtype:
            if self.sum is not None:  # restored from a checkpoint on the CPU, or a dtype change: merge once
                self._move(batch.sum.device, batch.sum.dtype)
            else:
                self.count = float(batch.n)
                self.sum, self.sum_sq = batch.sum.clone(), batch.sum_sq.clone()
                self.low, self.high = batch.low.clone(), batch.high.clone()
                self.saturated = batch.saturated.clone() if batch.saturated is not None and self.saturation else None
                if self.saturation is not None and self.saturated is None:
                    self.saturated = torch.zeros_like(self.sum)
                return True
        self.count += batch.n
        self.sum.add_(batch.sum)
        self.sum_sq.add_(batch.sum_sq)
        torch.minimum(self.low, batch.low, out=self.low)
        torch.maximum(self.high, batch.high, out=self.high)
        if self.saturated is not None and batch.saturated is not None:
            self.saturated.add_(batch.saturated)
        return True

    def _move(self, device: torch.device, dtype: torch.dtype) -> None:
        for name in self._VECTORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device=device, dtype=dtype))

    # ---- DDP and checkpoints --------------------------------------------------------------------
    def flat(self) -> Optional[torch.Tensor]:
        """The state as one float64 vector of sums and 0/1 masks (sum-reducible across ranks); ``None`` if empty."""
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
        state: Dict[str, object] = {"features": self.features, "count": float(self.count)}
        for name in self._VECTORS:
            value = getattr(self, name)
            state[name] = None if value is None else value.detach().cpu().clone()
        return state

    def load_state_dict(self, state: Dict[str, object], device: Optional[torch.device] = None) -> None:
        self.features = state.get("features")  # type: ignore[assignment]
        self.count = float(state.get("count", 0.0))  # type: ignore[arg-type]
        for name in self._VECTORS:
            value = state.get(name)
            setattr(self, name, None if value is None else torch.as_tensor(value).to(device or "cpu"))


_LAYOUTS: Dict[tuple, tuple] = {}  # per model layout: layer index, unit masks (a few models per process at most)


def _count_tensor(count: object, device: torch.device) -> torch.Tensor:
    """A sample count (a number, or a 0-d tensor after a DDP reduction) as a 0-d float64 tensor on ``device``, built
    there (``torch.full``: no copy from the host, no sync)."""
    if isinstance(count, torch.Tensor):
        return count.to(device=device, dtype=torch.float64).reshape(())
    return torch.full((), float(count), dtype=torch.float64, device=device)  # type: ignore[arg-type]


def _layout(full: Sequence[FeatureMoments], device: torch.device) -> tuple:
    """Per feature: its layer's index, whether the layer counts saturated units, the unit share; per layer: the
    saturation flag. Built on ``device`` with fill kernels (no copy from the host), once per model layout."""
    key = (str(device),) + tuple((m.features, m.saturation is not None, m.unit_share) for m in full)
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
            torch.cat([torch.full((1,), u, dtype=torch.bool, device=device) for u in units]))
    return cached


@torch.no_grad()
def summary_table(moments: Sequence[FeatureMoments]) -> Optional[torch.Tensor]:
    """The summaries of the non-empty layers among ``moments``, on their device: a float64 ``(layers, fields)`` tensor
    (fields in :data:`SUMMARY_FIELDS` order), vectorized over all layers' features; ``None`` when all are empty. No
    host sync: read it (with other figures) and pass the values to :func:`summaries_from`."""
    full = [m for m in moments if not m.empty]
    if not full:
        return None
    device = full[0].sum.device  # type: ignore[union-attr]
    layer, units, unit_share, has_units = _layout(full, device)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(m, name).to(device=device, dtype=torch.float64) for m in full])

    counts = torch.stack([_count_tensor(m.count, device) for m in full])
    count_f = counts[layer]
    mean_f = cat("sum") / count_f
    ex2_f = cat("sum_sq") / count_f
    var_f = (ex2_f - mean_f * mean_f).clamp_min(0)
    low, high = cat("low"), cat("high")
    negative, positive = low < 0, high > 0
    live = negative | positive
    sat_parts = [(m.saturated.to(device=device, dtype=torch.float64) if m.saturated is not None
                  else torch.zeros(m.features, dtype=torch.float64, device=device)) for m in full]
    saturated = (torch.cat(sat_parts) / count_f) >= unit_share
    columns = torch.stack([
        torch.ones_like(mean_f), mean_f, ex2_f, var_f, mean_f * mean_f, live.double(),
        (live & ~negative).double(), (live & (low > 0)).double(), (live & ~negative & (high <= 1)).double(),
        (saturated & units).double(),
    ], dim=1)
    sums = torch.zeros(len(full), columns.shape[1], dtype=torch.float64, device=device)
    sums.index_add_(0, layer, columns)
    n, s_mean, s_ex2, s_var, s_mean2, n_live, n_pos, n_strict, n_bounded, n_sat = sums.unbind(1)
    mean = s_mean / n
    std = (s_ex2 / n - mean * mean).clamp_min(0).sqrt()
    offset = (s_mean2 / n).sqrt() / (s_var / n).sqrt().clamp_min(1e-12)
    live_den = n_live.clamp_min(1)
    sat_fraction = torch.where(has_units, n_sat / n, torch.full_like(n, float("nan")))
    return torch.stack([counts, n, mean, std, offset, n_pos / live_den, n_strict / live_den,
                        n_bounded / live_den, (n - n_live) / n, sat_fraction], dim=1)


def summaries_from(values: Sequence[float], layers: int) -> List[Dict[str, float]]:
    """The flat values of a :func:`summary_table` of ``layers`` layers, as one dict per layer."""
    width = len(SUMMARY_FIELDS)
    return [dict(zip(SUMMARY_FIELDS, values[i * width:(i + 1) * width])) for i in range(layers)]


def summarize_all(moments: Sequence[FeatureMoments]) -> List[Dict[str, float]]:
    """Summaries (dicts keyed by :data:`SUMMARY_FIELDS`) of several layers, with one host synchronization. Empty
    layers give NaN."""
    table = summary_table(moments)
    full = [m for m in moments if not m.empty]
    rows = summaries_from(table.reshape(-1).tolist(), len(full)) if table is not None else []
    by_id = {id(m): row for m, row in zip(full, rows)}
    nan_row = dict(zip(SUMMARY_FIELDS, [float("nan")] * len(SUMMARY_FIELDS)))
    return [by_id.get(id(m), nan_row) for m in moments]
