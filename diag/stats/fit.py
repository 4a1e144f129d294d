"""The history of a run's training and validation losses, in bounded form, one entry per evaluation.

An *evaluation* is one validation run (several per epoch with ``val_check_interval < 1``, one every few epochs
with ``check_val_every_n_epoch > 1``). :class:`FitHistory` keeps the best evaluation, the first one, the last
``maxlen`` in a deque and the best values of the evaluations that left the deque: O(1) memory however long the
run. :class:`RunningMean` averages the training loss between evaluations without a host sync per step, and
:class:`ClassCountEstimator` reads the class count off integer targets (for the chance level ln C).

Nothing here imports Lightning: a plain PyTorch loop can feed these too.

Example::

    history = FitHistory(mode="min")
    for epoch in range(10):
        history.update(epoch=epoch, step=100 * epoch, val=val_loss, train=train_loss)
    history.best.epoch, history.evaluations_since_best
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Deque, Dict, List, Mapping, Optional

import torch

from diag.stats.numbers import finite_number

NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation: the validation metric, the training loss over the steps since the previous evaluation."""

    index: int  # 0 for the first evaluation of the run
    epoch: int
    step: int
    val: float  # the validation metric (NaN when unknown)
    train: float  # mean training loss since the previous evaluation (NaN when unknown)
    accuracy: float = NAN  # a validation accuracy, when logged

    def to_list(self) -> List[float]:
        return [self.index, self.epoch, self.step, self.val, self.train, self.accuracy]

    @classmethod
    def from_list(cls, values: List[float]) -> "Evaluation":
        index, epoch, step, val, train, accuracy = values
        return cls(int(index), int(epoch), int(step), float(val), float(train), float(accuracy))


class FitHistory:
    """Bounded history of evaluations: best, first, last ``maxlen`` and the best values of older ones.

    Args:
        mode: ``"min"`` when a lower validation metric is better (a loss), ``"max"`` otherwise (an accuracy).
        train_mode: the same for the training values (``"min"`` for a loss; the stall statistics assume a loss).
        maxlen: how many recent evaluations are kept in full.
    """

    def __init__(self, mode: str = "min", maxlen: int = 64, train_mode: str = "min") -> None:
        for name, value in (("mode", mode), ("train_mode", train_mode)):
            if value not in ("min", "max"):
                raise ValueError(f"`{name}` must be 'min' or 'max', got {value!r}.")
        self.train_mode = train_mode
        if maxlen < 2:
            raise ValueError(f"`maxlen` must be >= 2, got {maxlen!r}.")
        self.mode = mode
        self.maxlen = maxlen
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.recent: Deque[Evaluation] = collections.deque(maxlen=self.maxlen)
        self.best: Optional[Evaluation] = None  # best validation value (NaN validation never counts)
        self.first: Optional[Evaluation] = None
        self.best_train = NAN  # lowest training loss so far
        self._evicted_best_train = NAN  # lowest training loss of the evaluations that left ``recent``
        self._evicted_best_badness = NAN  # best validation (as badness) of the evaluations that left ``recent``

    # ---- update -----------------------------------------------------------------------------------
    def badness(self, value: float) -> float:
        """The validation value turned into "lower is better"."""
        return value if self.mode == "min" else -value

    def train_badness(self, value: float) -> float:
        """The training value turned into "lower is better"."""
        return value if self.train_mode == "min" else -value

    def update(self, epoch: int, step: int, val: float = NAN, train: float = NAN, accuracy: float = NAN) -> Evaluation:
        record = Evaluation(self.count, int(epoch), int(step), float(val), float(train), float(accuracy))
        if len(self.recent) == self.recent.maxlen:
            old = self.recent[0]
            self._evicted_best_train = _nanmin(self._evicted_best_train, old.train)
            self._evicted_best_badness = _nanmin(self._evicted_best_badness, self.badness(old.val))
        self.recent.append(record)
        if self.first is None:
            self.first = record
        if finite_number(record.val) and (self.best is None or self.badness(record.val) < self.badness(self.best.val)):
            self.best = record
        self.best_train = _nanmin(self.best_train, record.train)
        self.count += 1
        return record

    # ---- queries ----------------------------------------------------------------------------------
    @property
    def last(self) -> Optional[Evaluation]:
        return self.recent[-1] if self.recent else None

    @property
    def evaluations_since_best(self) -> int:
        return 0 if self.best is None else self.count - 1 - self.best.index

    def since(self, index: int) -> List[Evaluation]:
        """The evaluations still held whose index is ``>= index``."""
        return [r for r in self.recent if r.index >= index]

    def window_start(self, min_evaluations: int, min_epochs: int, enough_evaluations: int) -> Optional[int]:
        """Index where the shortest recent window starts that holds ``min_evaluations`` evaluations spanning
        ``min_epochs`` epochs (or, when validation is frequent, ``enough_evaluations`` evaluations); ``None`` when
        the history is too short for such a window with at least one evaluation before it."""
        records = list(self.recent)
        last = records[-1] if records else None
        for back in range(min_evaluations, len(records) + 1):
            start = records[-back]
            if last.epoch - start.epoch >= min_epochs or back >= enough_evaluations:
                return start.index if start.index > 0 else None
        return None

    def best_train_before(self, index: int) -> float:
        """Lowest training loss of the evaluations before ``index`` (NaN when none)."""
        best = self._evicted_best_train
        for r in self.recent:
            if r.index < index:
                best = _nanmin(best, r.train)
        return best

    def best_val_before(self, index: int) -> float:
        """Best validation value (as badness: lower is better) of the evaluations before ``index``."""
        best = self._evicted_best_badness
        for r in self.recent:
            if r.index < index:
                best = _nanmin(best, self.badness(r.val))
        return best

    def difference_spread(self, window: int) -> float:
        """Spread of the evaluation-to-evaluation changes of the validation value over the last ``window``
        evaluations: the median absolute deviation of the successive differences from their median. A steady
        trend has (almost) no spread; noise has spread about its own size. NaN with fewer than 4 differences."""
        values = [self.badness(r.val) for r in list(self.recent)[-window:] if finite_number(r.val)]
        diffs = [b - a for a, b in zip(values[:-1], values[1:])]
        if len(diffs) < 4:
            return NAN
        center = _median(diffs)
        return _median([abs(d - center) for d in diffs])

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"mode": self.mode, "count": self.count, "recent": [r.to_list() for r in self.recent],
                "best": self.best.to_list() if self.best else None, "first": self.first.to_list() if self.first else None,
                "best_train": self.best_train, "evicted_best_train": self._evicted_best_train,
                "evicted_best_badness": self._evicted_best_badness}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.count = int(state.get("count", 0))
        for values in state.get("recent", []):
            self.recent.append(Evaluation.from_list(list(values)))
        self.best = Evaluation.from_list(list(state["best"])) if state.get("best") else None
        self.first = Evaluation.from_list(list(state["first"])) if state.get("first") else None
        self.best_train = float(state.get("best_train", NAN))
        self._evicted_best_train = float(state.get("evicted_best_train", NAN))
        self._evicted_best_badness = float(state.get("evicted_best_badness", NAN))


class RunningMean:
    """Mean of a stream of scalar tensors without a host sync until :meth:`compute`.

    ``update`` keeps a reference to the detached value (no kernel launch); every ``FOLD`` values are summed on
    their device with one kernel, so memory stays bounded however long the stream.
    """

    FOLD = 64

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total: Optional[torch.Tensor] = None
        self.count = 0
        self._pending: List[torch.Tensor] = []

    def update(self, value: torch.Tensor) -> None:
        if value.requires_grad:  # (Lightning hands over a detached copy: no kernel on the common path)
            value = value.detach()
        if value.dim() or value.dtype != torch.float32:
            value = value.float().mean()
        self._pending.append(value)
        self.count += 1
        if len(self._pending) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        try:
            part = torch.stack(self._pending).sum()
        except RuntimeError:  # the model moved between devices
            part = torch.stack([t.to(self._pending[0].device) for t in self._pending]).sum()
        self._pending = []
        self.total = part if self.total is None else self.total.to(part.device) + part

    def mean_tensor(self) -> Optional[torch.Tensor]:
        self._fold()
        return None if self.total is None or self.count == 0 else self.total / self.count

    def compute(self) -> float:
        mean = self.mean_tensor()
        return NAN if mean is None else float(mean.item())

    def state_dict(self) -> Dict[str, Any]:
        """The sum and the count (one host read of the sum)."""
        self._fold()
        return {"total": float(self.total.item()) if self.total is not None else 0.0, "count": self.count}

    def load_state_dict(self, state: Any) -> None:
        self.reset()
        if isinstance(state, (list, tuple)) and len(state) == 2:  # an earlier release saved [mean, count]
            state = {"total": float(state[0]) * int(state[1]), "count": int(state[1])}
        if state.get("count") and finite_number(float(state.get("total", NAN))):
            self.total = torch.tensor(float(state["total"]))  # on the CPU: moved to the device by the next update
            self.count = int(state["count"])


class ClassCountEstimator:
    """Class count of integer targets: ``max + 1`` over the targets seen (kept on device, read once)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.maximum: Optional[torch.Tensor] = None
        self.batches = 0

    def update(self, targets: Any) -> None:
        self.batches += 1  # batches looked at, class targets or not
        if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
                or targets.dtype == torch.bool or targets.numel() == 0:
            return
        top = targets.detach().max()
        self.maximum = top if self.maximum is None else torch.maximum(self.maximum, top)

    def compute(self) -> Optional[int]:
        if self.maximum is None:
            return None
        classes = int(self.maximum.item()) + 1
        return classes if classes >= 2 else None


def _nanmin(a: float, b: float) -> float:
    if not finite_number(a):
        return b if finite_number(b) else NAN
    return min(a, b) if finite_number(b) else a


def _median(values: List[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])

