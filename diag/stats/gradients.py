"""Gradient and update statistics on plain tensors: per-layer norms, update-to-weight ratio, update cosine, EMAs.

Everything is batched: one ``torch._foreach_norm`` over all tensors and a segment sum into layers, so the caller
needs a single host sync per measurement. A *layer* is the module that owns a parameter (``net.0`` for
``net.0.weight``).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

ROOT_LAYER = "(root)"


def layer_of(param_name: str) -> str:
    """The module path that owns ``param_name``: ``"net.0.weight" -> "net.0"``."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ROOT_LAYER


class LayerGrouping:
    """A fixed list of parameters with their layer index, built once (e.g. per optimizer).

    Args:
        named_params: ``(name, parameter)`` pairs, in model order.
    """

    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]]) -> None:
        self.names: List[str] = []
        self.params: List[nn.Parameter] = []
        self.layers: List[str] = []
        layer_index: Dict[str, int] = {}
        index: List[int] = []
        for name, p in named_params:
            layer = layer_of(name)
            if layer not in layer_index:
                layer_index[layer] = len(self.layers)
                self.layers.append(layer)
            self.names.append(name)
            self.params.append(p)
            index.append(layer_index[layer])
        self.layer_index: List[int] = index  # layer of each parameter, for host-side loops (no tensor indexing)
        self._index = torch.tensor(index, dtype=torch.long)
        self._index_on: Dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.params)

    def index_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._index_on:
            self._index_on[device] = self._index.to(device)
        return self._index_on[device]

    def layer_sum_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum each row of a ``(k, parameters)`` tensor into layers, in one kernel: ``(k, layers)``."""
        out = torch.zeros(rows.shape[0], len(self.layers), dtype=rows.dtype, device=rows.device)
        return out.index_add_(1, self.index_on(rows.device), rows)


def stacked_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor, as one float32 vector on the first tensor's device (no host sync): one
    ``_foreach_norm`` and one stack. Square them on the host, once read."""
    return stack_norms(torch._foreach_norm(list(tensors)) if tensors else [])


def stack_norms(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d norms (as ``torch._foreach_norm`` gives them, from one or several calls) as one float32 vector on the first
    one's device: one ``stack``, where a ``cat`` of stacked pieces would take a stack per piece, slices and the cat."""
    if not norms:
        return torch.zeros(0)
    try:
        stacked = torch.stack(norms)  # (promotes mixed dtypes; the float32 cast below rounds each value once)
    except RuntimeError:  # norms on several devices (model parallel), which stack refuses (asking each norm for its
        device = norms[0].device  # device beforehand would cost a call per norm on every measurement)
        return torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])
    return stacked if stacked.dtype == torch.float32 else stacked.float()


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of each tensor, as one float32 vector on the first tensor's device (no host sync)."""
    stacked = stacked_norms(tensors)
    return stacked * stacked


def norms_and_dots(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[|a_i|², |b_i|², <a_i, b_i>]`` for each pair, as a float64 ``(3, n)`` tensor from one batched norm.

    ``<a, b> = (|a + b|² − |a|² − |b|²) / 2``: three lists of norms in a single ``_foreach_norm`` instead of one
    reduction per tensor (exact enough for a cosine: the error is ~1e-7 of ``|a||b|`` in float32).
    """
    a, b = list(a), list(b)
    n = len(a)
    if n == 0:
        return torch.zeros(3, 0, dtype=torch.float64)
    sq = squared_norms(a + b + list(torch._foreach_add(a, b))).double().reshape(3, n)
    sq[2].sub_(sq[0]).sub_(sq[1]).div_(2)  # <a, b> in the row of |a + b|² (a new tensor: .double() copied)
    return sq


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def cosine(dot: float, sq_a: float, sq_b: float) -> float:
    denom = math.sqrt(sq_a * sq_b)
    return dot / denom if denom > 0 else float("nan")


class EMA:
    """Bias-corrected exponential moving average of a scalar (non-finite values are skipped)."""

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be in [0, 1), got {beta!r}.")
        self.beta = beta
        self.reset()

    def reset(self) -> None:
        self._value, self._weight, self.count = 0.0, 0.0, 0

    def update(self, x: float) -> None:
        if not math.isfinite(x):
            return
        self._value = self.beta * self._value + (1 - self.beta) * x
        self._weight = self.beta * self._weight + (1 - self.beta)
        self.count += 1

    def compute(self) -> float:
        return self._value / self._weight if self._weight > 0 else float("nan")

    def state_dict(self) -> Dict[str, float]:
        return {"value": self._value, "weight": self._weight, "count": self.count}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self._value, self._weight = float(state["value"]), float(state["weight"])
        self.count = int(state["count"])


class LayerEMA:
    """One :class:`EMA` per layer name (O(layers))."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.emas: Dict[str, EMA] = {}

    def update(self, values: Dict[str, float]) -> None:
        for k, v in values.items():
            ema = self.emas.get(k)
            if ema is None:  # (not setdefault: that would build an EMA per value only to drop it)
                ema = self.emas[k] = EMA(self.beta)
            ema.update(v)

    def compute(self) -> Dict[str, float]:
        return {k: e.compute() for k, e in self.emas.items()}

    def state_dict(self) -> Dict[str, Dict[str, float]]:
        return {k: e.state_dict() for k, e in self.emas.items()}

    def load_state_dict(self, state: Dict[str, Dict[str, float]]) -> None:
        self.emas = {}
        for k, s in state.items():
            self.emas[k] = EMA(self.beta)
            self.emas[k].load_state_dict(s)


class UpdateTracker:
    """Measures updates ``Δθ`` across optimizer steps and the cosine between two consecutive updates.

    Call :meth:`observe` with the current parameters right before each optimizer step that should be measured
    *and* right before the one after it. A pair of consecutive updates is measured as: snapshot ``θ_t``;
    at the next step ``Δθ_t = θ_{t+1} − θ_t`` (kept) and snapshot ``θ_{t+1}``; at the next ``Δθ_{t+1}`` and the
    cosine. Copies exist only while a measurement is pending (at most two copies of the tracked parameters).
    """

    def __init__(self, grouping: LayerGrouping) -> None:
        self.grouping = grouping
        self._snapshot: Optional[List[torch.Tensor]] = None  # −θ_t (negated: see _observe)
        self._snapshot_norm: Optional[List[torch.Tensor]] = None  # ‖θ_t‖ per param (0-d)
        self._previous_delta: Optional[List[torch.Tensor]] = None
        self._previous_norm: Optional[List[torch.Tensor]] = None  # ‖Δθ_t‖ per param (0-d)
        self._pair_step: Optional[int] = None  # the step the pending pair started at
        self.update_step: Optional[int] = None  # the step of the pair the last returned update belongs to

    @property
    def pending(self) -> bool:
        return self._snapshot is not None

    def release(self) -> None:
        self._snapshot = self._snapshot_norm = self._previous_delta = self._previous_norm = None

    def observe(self, start_pair: bool, step: Optional[int] = None) -> Optional[Dict[str, torch.Tensor]]:
        """Finish a pending update (if any) and snapshot when a pair starts or continues.

        Returns per-layer tensors ``update_sq`` and ``weight_sq`` (and ``dot`` / ``previous_update_sq`` when the
        update was the second of a pair), still on the device. (:meth:`observe_norms` gives the same figures per
        parameter, for the host to sum into layers: fewer kernels.)
        """
        found = self.observe_norms(start_pair, step)
        if found is None:
            return None
        second, norms = found
        n = len(self.grouping.params)
        sq = norms.double() ** 2
        if not second:
            per_layer = self.grouping.layer_sum_rows(sq.reshape(2, n))
            return {"update_sq": per_layer[0], "weight_sq": per_layer[1]}
        a, w, both, b = sq.reshape(4, n)
        per_layer = self.grouping.layer_sum_rows(torch.stack([a, w, (both - a - b) / 2, b]))
        return {"update_sq": per_layer[0], "weight_sq": per_layer[1], "dot": per_layer[2],
                "previous_update_sq": per_layer[3]}

    def observe_norms(self, start_pair: bool, step: Optional[int] = None,
                      weight_norms: Optional[Sequence[torch.Tensor]] = None) -> Optional[Tuple[bool, torch.Tensor]]:
        """:meth:`observe` with the figures per parameter, as norms (not squared) in one float32 vector on the device:
        ``(False, [‖Δθ_t‖, ‖θ_t‖])`` for the first update of a pair, ``(True, [‖Δθ_{t+1}‖, ‖θ_{t+1}‖,
        ‖Δθ_{t+1} + Δθ_t‖, ‖Δθ_t‖])`` for the second (``<a, b> = (‖a + b‖² − ‖a‖² − ‖b‖²) / 2``), each part one
        entry per parameter; ``None`` when no update finished. Four kernels per call. :attr:`update_step` is then the
        ``step`` the pair started at. ``weight_norms``: the parameters' norms when the caller has them already (one
        0-d tensor per parameter, as ``torch._foreach_norm`` gives them), for the snapshot of a new pair.
        """
        found = self.observe_norm_list(start_pair, step, weight_norms)
        return None if found is None else (found[0], stack_norms(found[1]))

    def observe_norm_list(self, start_pair: bool, step: Optional[int] = None,
                          weight_norms: Optional[Sequence[torch.Tensor]] = None
                          ) -> Optional[Tuple[bool, List[torch.Tensor]]]:
        """:meth:`observe_norms` with the norms as a list of 0-d tensors, for a caller that stacks them with its own
        (one ``stack`` for all of a step's figures)."""
        with torch.no_grad():  # no autograd bookkeeping for the copies and differences
            return self._observe(self.grouping.params, start_pair, step, weight_norms)

    def _observe(self, params: List[torch.Tensor], start_pair: bool, step: Optional[int],
                 weight_norms: Optional[Sequence[torch.Tensor]]) -> Optional[Tuple[bool, List[torch.Tensor]]]:
        # The snapshot holds −θ (``_foreach_neg``: one cheap kernel; a copy by ``_foreach_mul(θ, 1.0)`` costs three
        # times as much on CPU), so that the update is one in-place add: −θ_t + θ_{t+1} = Δθ_t. IEEE rounding is
        # symmetric in sign, so this is bit for bit the negation of θ_t − θ_{t+1}, and every norm the same.
        out: Optional[Tuple[bool, List[torch.Tensor]]] = None
        self.update_step = self._pair_step
        if self._snapshot is not None:
            delta = self._snapshot
            torch._foreach_add_(delta, params)
            n = len(params)
            if self._previous_delta is None:
                # ‖Δθ_t‖ and ‖θ_{t+1}‖ (the norm of the pair's second snapshot) in one batched norm
                norms = list(torch._foreach_norm(delta + params))
                out = (False, norms[:n] + self._snapshot_norm)
                # Δθ_t and its norms are kept for the second update; the snapshot θ_{t+1} continues the pair
                self._previous_delta, self._previous_norm = delta, norms[:n]
                self._snapshot, self._snapshot_norm = list(torch._foreach_neg(params)), norms[n:]
                return out
            # Δθ_t + Δθ_{t+1} in place in Δθ_t's buffer (its norm was kept from the first update): ‖Δθ_{t+1}‖ and
            # ‖Δθ_{t+1} + Δθ_t‖ in one batched norm
            previous = self._previous_delta
            torch._foreach_add_(previous, delta)
            norms = list(torch._foreach_norm(delta + previous))
            out = (True, norms[:n] + self._snapshot_norm + norms[n:] + self._previous_norm)
            self.release()
        if start_pair:
            self._pair_step = step
            self._snapshot = list(torch._foreach_neg(params))
            self._snapshot_norm = list(weight_norms if weight_norms is not None else torch._foreach_norm(params))
        return out


def update_figures(second: bool, norms: Sequence[float], layer_index: Sequence[int],
                   n_layers: int) -> Dict[str, List[float]]:
    """The per-layer figures of :meth:`UpdateTracker.observe` from the per-parameter norms of
    :meth:`UpdateTracker.observe_norms`, once read on the host (float64 arithmetic)."""
    n = len(layer_index)
    parts = ["update_sq", "weight_sq"] + (["sum_sq", "previous_update_sq"] if second else [])
    sums = {name: [0.0] * n_layers for name in parts}
    for k, name in enumerate(parts):
        column = sums[name]
        for i in range(n):
            v = norms[k * n + i]
            column[layer_index[i]] += v * v
    if second:
        a, both, b = sums["update_sq"], sums.pop("sum_sq"), sums["previous_update_sq"]
        sums["dot"] = [(both[j] - a[j] - b[j]) / 2 for j in range(n_layers)]
    return sums
