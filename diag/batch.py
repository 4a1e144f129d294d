"""What a batch is, for every part of the package: its inputs and targets, its size, its samples, its loss.

One definition, used by the data checks, the fit monitor, the learning-rate probe, the loss monitor and the gradient
noise pass:

- :func:`split_batch` / :func:`batch_parts`: the inputs and targets the data checks read (``None`` whenever unsure);
- :func:`targets_of`: the targets the fit monitor counts classes in, and what :func:`zero_inputs` keeps (the last
  element of a tuple, the target keys of a mapping);
- :func:`batch_size`, :func:`take_samples`, :func:`halves`, :func:`map_tensors`: how many samples, and a batch of the
  same type with some of them (the noise pass, the probe);
- :func:`tensors_in`: every tensor of a batch (the loss monitor looks for integer targets among them);
- :func:`loss_of`: the loss in what ``training_step`` returned.

The data checks read the batch Lightning hands the callbacks. They never guess hard: a batch shape they do not
recognize is skipped silently, and the user can point at the parts with ``DataMonitor(input_key=..., target_key=...)``
or ``DataMonitor(select=...)``.

Recognized shapes:

- a tensor: the inputs (no targets);
- a tuple or list ``(x, y)``: inputs and targets; ``(x, y, ...)`` with more parts: only the inputs ``x``; a
  namedtuple is a tuple;
- a dataclass instance: by its field names when they are the obvious keys below (``Batch(image=..., label=...)``),
  else its fields in order, like a tuple (``Batch(x, y)``);
- a mapping with obvious keys: inputs under ``x``, ``input``, ``inputs``, ``image``, ``images``, ``features``,
  ``pixel_values`` or ``input_ids`` (Hugging Face style), targets under ``y``, ``label``, ``labels``, ``target`` or
  ``targets``; an ``attention_mask`` next to ``input_ids`` is kept, so that padding can be left out of a sample.

Example::

    parts = split_batch((x, y))
    parts.inputs is x and parts.targets is y
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "pixel_values", "input_ids")
TARGET_KEYS = ("y", "label", "labels", "target", "targets")
MASK_KEYS = ("attention_mask",)
SAMPLE_WEIGHT_KEYS = ("weight", "weights")
# Keys that are never inputs: the targets, masks and per-sample weights (kept as they are by :func:`zero_inputs`).
NON_INPUT_KEYS = TARGET_KEYS + ("mask",) + MASK_KEYS + SAMPLE_WEIGHT_KEYS

Key = Union[str, int]


@dataclasses.dataclass(frozen=True)
class BatchParts:
    """The parts of one batch the data checks look at (each ``None`` when not found)."""

    inputs: Optional[torch.Tensor]
    targets: Optional[torch.Tensor]
    mask: Optional[torch.Tensor] = None  # 1 for real tokens, 0 for padding, shaped like ``inputs``

    @property
    def batch_size(self) -> Optional[int]:
        for t in (self.inputs, self.targets):
            if t is not None and t.dim() > 0:
                return int(t.shape[0])
        return None


def _tensor(value: Any) -> Optional[torch.Tensor]:
    """``value`` if it is an ordinary (strided) tensor; sparse and nested tensors are not looked at."""
    return value if isinstance(value, torch.Tensor) and value.layout == torch.strided else None


def _same_batch(inputs: Optional[torch.Tensor], other: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``other`` if it has one entry per sample of ``inputs`` (first dimensions agree), else ``None``."""
    if other is None or other.dim() == 0:
        return None
    if inputs is not None and (inputs.dim() == 0 or inputs.shape[0] != other.shape[0]):
        return None
    return other


def _from_mapping(batch: Mapping[Any, Any]) -> BatchParts:
    inputs = next((_tensor(batch[k]) for k in INPUT_KEYS if k in batch and _tensor(batch[k]) is not None), None)
    targets = next((_tensor(batch[k]) for k in TARGET_KEYS if k in batch and _tensor(batch[k]) is not None), None)
    mask = None
    if inputs is not None and "input_ids" in batch and batch["input_ids"] is inputs:
        mask = next((_tensor(batch[k]) for k in MASK_KEYS if k in batch), None)
        if mask is not None and mask.shape != inputs.shape:
            mask = None
    return BatchParts(inputs, _same_batch(inputs, targets), mask)


def is_dataclass_batch(batch: Any) -> bool:
    """Whether ``batch`` is a dataclass instance (not a dataclass type)."""
    return dataclasses.is_dataclass(batch) and not isinstance(batch, type)


def dataclass_fields(batch: Any) -> dict:
    """A dataclass batch's fields in declaration order, as a name -> value mapping (no copies)."""
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


def split_batch(batch: Any) -> Optional[BatchParts]:
    """The inputs and targets of ``batch`` for the common shapes, or ``None`` when the shape is not recognized."""
    if type(batch) in (tuple, list):  # the common batch, checked first (the Mapping and dataclass checks cost more)
        return _from_sequence(batch)
    if isinstance(batch, torch.Tensor):
        return BatchParts(batch, None) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        parts = _from_mapping(batch)
        return parts if parts.inputs is not None or parts.targets is not None else None
    if is_dataclass_batch(batch):
        fields = dataclass_fields(batch)
        named = split_batch(fields)  # obvious field names first, then the fields in order, like a tuple
        return named if named is not None and named.inputs is not None else split_batch(tuple(fields.values()))
    if isinstance(batch, (tuple, list)):
        return _from_sequence(batch)
    return None


def _from_sequence(batch: Sequence[Any]) -> Optional[BatchParts]:
    if not batch:
        return None
    inputs = _tensor(batch[0])
    if inputs is None or inputs.dim() == 0:
        return None  # e.g. ((x1, x2), y): several inputs, we do not guess which one matters
    targets = _tensor(batch[1]) if len(batch) == 2 else None
    return BatchParts(inputs, _same_batch(inputs, targets))


def tensor_at(batch: Any, key: Key) -> Optional[torch.Tensor]:
    """The tensor under ``key`` (a mapping's key, a sequence's index, an attribute), or ``None``."""
    try:
        if isinstance(batch, Mapping):
            return _tensor(batch.get(key))
        if isinstance(batch, Sequence) and isinstance(key, int):
            return _tensor(batch[key])
        if isinstance(key, str):
            return _tensor(getattr(batch, key, None))
    except (IndexError, KeyError, TypeError):
        return None
    return None


def batch_parts(batch: Any, input_key: Optional[Key] = None, target_key: Optional[Key] = None,
                select: Optional[Callable[[Any], Any]] = None) -> Optional[BatchParts]:
    """:func:`split_batch`, unless the user pointed at the parts.

    Args:
        batch: what the dataloader yields (after Lightning moved it to the device).
        input_key: key (mapping), index (tuple/list) or attribute name of the inputs.
        target_key: the same for the targets.
        select: a callable ``batch -> (inputs, targets)`` (either may be ``None``); wins over the keys.
    """
    if select is not None:
        chosen = select(batch)
        if not isinstance(chosen, (tuple, list)) or len(chosen) != 2:
            raise TypeError(f"`select` must return a pair (inputs, targets), got {type(chosen).__name__}")
        inputs, targets = _tensor(chosen[0]), _tensor(chosen[1])
        return BatchParts(inputs, _same_batch(inputs, targets)) if inputs is not None or targets is not None else None
    if input_key is None and target_key is None:
        return split_batch(batch)
    guessed = split_batch(batch) or BatchParts(None, None)
    inputs = tensor_at(batch, input_key) if input_key is not None else guessed.inputs
    targets = tensor_at(batch, target_key) if target_key is not None else guessed.targets
    if inputs is None and targets is None:
        return None
    return BatchParts(inputs, _same_batch(inputs, targets), guessed.mask if inputs is guessed.inputs else None)


# ---- the targets the fit monitor counts classes in, and the inputs the probe zeroes -----------------------------
def targets_of(batch: Any) -> Any:
    """The targets of ``batch`` as the fit monitor reads them: the last element of a tuple or list of two or more
    (``((x1, x2), y)`` and ``(x, y, w)`` too, unlike :func:`split_batch`), the first of :data:`TARGET_KEYS` in a
    mapping (whatever it holds); ``None`` otherwise."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[-1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
    return None


def _not_input(key: Any) -> bool:
    return str(key).lower() in NON_INPUT_KEYS


def zero_inputs(batch: Any) -> Any:
    """The batch with its inputs replaced by zeros (``torch.zeros_like``), targets untouched.

    A tuple/list ``(x, y, ...)`` (a namedtuple too): everything but the last element is input (a 1-tuple: the one
    element). A dict: every tensor except keys that name targets, masks or weights (:data:`NON_INPUT_KEYS`). A
    dataclass: by its field names when one of them is such a key, else like a tuple. A bare tensor: zeroed. Pass
    your own function to the probe for other layouts.
    """
    zero = torch.zeros_like
    if isinstance(batch, torch.Tensor):
        return zero(batch)
    if isinstance(batch, (list, tuple)) and batch:
        parts = [map_tensors(b, zero) for b in batch[:-1]] + [batch[-1]] if len(batch) > 1 else [map_tensors(batch[0], zero)]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    if isinstance(batch, dict):
        return type(batch)((k, v if _not_input(k) else map_tensors(v, zero)) for k, v in batch.items())
    if is_dataclass_batch(batch):
        names = list(dataclass_fields(batch))
        kept = set(filter(_not_input, names)) or set(names[-1:])
        return dataclasses.replace(batch, **{f.name: getattr(batch, f.name) if f.name in kept
                                             else map_tensors(getattr(batch, f.name), zero)
                                             for f in dataclasses.fields(batch) if f.init})
    return map_tensors(batch, zero)


def with_targets(batch: Any, targets: torch.Tensor) -> Any:
    """The batch with its targets (as :func:`targets_of` finds them) replaced by ``targets``; ``None`` for a layout
    without recognizable targets."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        parts = list(batch[:-1]) + [targets]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    if isinstance(batch, dict):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        return None if key is None else type(batch)((k, targets if k == key else v) for k, v in batch.items())
    return None


# ---- the batch as a structure: its size and its samples ---------------------------------------------------------
def _parts(batch: Any, mapping: type = dict) -> Optional[List[Any]]:
    """The values inside a container batch (a ``mapping``'s values, a list's or tuple's items, a dataclass's fields);
    ``None`` for anything else."""
    if isinstance(batch, (list, tuple)):
        return list(batch)
    if isinstance(batch, mapping):
        return list(batch.values())
    if is_dataclass_batch(batch):
        return list(dataclass_fields(batch).values())
    return None


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: the leading dimension of its first tensor that has a non-zero one, 0 when none.

    Looks inside the containers :func:`map_tensors` rebuilds (dicts, lists, tuples, dataclasses), so that
    :func:`take_samples` cuts every tensor it counted.
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 0
    for part in _parts(batch) or ():
        n = batch_size(part)
        if n:
            return n
    return 0


def tensors_in(batch: Any, max_depth: Optional[int] = None) -> List[torch.Tensor]:
    """Every tensor of ``batch`` in order, looking at most ``max_depth`` containers deep (``None``: all the way);
    mappings of any type are read."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    parts = _parts(batch, Mapping) if max_depth is None or max_depth > 0 else None
    deeper = None if max_depth is None else max_depth - 1
    return [t for part in parts or () for t in tensors_in(part, deeper)]


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a (nested tuple/list/namedtuple/dict/dataclass) batch, keeping its types."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(b, fn) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(b, fn) for b in batch)
    if isinstance(batch, dict):
        return type(batch)((k, map_tensors(v, fn)) for k, v in batch.items())
    if is_dataclass_batch(batch):
        return dataclasses.replace(batch, **{f.name: map_tensors(getattr(batch, f.name), fn)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def take_samples(batch: Any, start: int, stop: int, copy: bool = False) -> Any:
    """Samples ``start:stop`` of ``batch``, in its own type: every tensor whose leading dimension is the batch size
    is sliced (a view), the others (scalars, metadata) are kept as they are. ``copy``: detached clones of every
    tensor instead, so that nothing refers to the batch Lightning handed over."""
    size = batch_size(batch)

    def cut(t: torch.Tensor) -> torch.Tensor:
        part = t[start:stop] if t.dim() > 0 and t.shape[0] == size else t
        return part.detach().clone() if copy else part

    return map_tensors(batch, cut)


MIN_HALVES_SAMPLES = 4  # one sample would make a half a single example; two per half is the least that says anything


def halves(batch: Any, samples: int) -> Optional[Tuple[Any, Any]]:
    """Copies of the first ``samples`` samples of ``batch``, halved into (A, B); ``None`` below
    :data:`MIN_HALVES_SAMPLES` samples. (The learning-rate probe fits A and holds B out.)"""
    n = batch_size(batch)
    if n < MIN_HALVES_SAMPLES:
        return None
    k = min(n, samples)
    return take_samples(batch, 0, k // 2, copy=True), take_samples(batch, k // 2, k, copy=True)


# ---- the loss -----------------------------------------------------------------------------------------------------
def loss_of(output: Any) -> Optional[torch.Tensor]:
    """The loss in what ``training_step`` returned (or what Lightning hands the batch-end hooks): a tensor, or the
    tensor under ``"loss"`` of a mapping; ``None`` otherwise (a step that returned ``None`` was skipped)."""
    if type(output) is dict:  # what Lightning hands over: checked first, the Mapping ABC check is slow per step
        loss = output.get("loss")
        return loss if isinstance(loss, torch.Tensor) else None
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        loss = output.get("loss")
        return loss if isinstance(loss, torch.Tensor) else None
    return None
