"""Work out the inputs and targets of a batch, for the common shapes; ``None`` whenever unsure.

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
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "pixel_values", "input_ids")
TARGET_KEYS = ("y", "label", "labels", "target", "targets")
MASK_KEYS = ("attention_mask",)

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
    if isinstance(batch, torch.Tensor):
        return BatchParts(batch, None) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        parts = _from_mapping(batch)
        return parts if parts.inputs is not None or parts.targets is not None else None
    if is_dataclass_batch(batch):
        fields = dataclass_fields(batch)
        named = split_batch(fields)  # obvious field names first, then the fields in order, like a tuple
        return named if named is not None and named.inputs is not None else split_batch(tuple(fields.values()))
    if isinstance(batch, (tuple, list)) and batch:
        inputs = _tensor(batch[0])
        if inputs is None or inputs.dim() == 0:
            return None  # e.g. ((x1, x2), y): several inputs, we do not guess which one matters
        targets = _tensor(batch[1]) if len(batch) == 2 else None
        return BatchParts(inputs, _same_batch(inputs, targets))
    return None


def _pick(batch: Any, key: Key) -> Optional[torch.Tensor]:
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
    inputs = _pick(batch, input_key) if input_key is not None else guessed.inputs
    targets = _pick(batch, target_key) if target_key is not None else guessed.targets
    if inputs is None and targets is None:
        return None
    return BatchParts(inputs, _same_batch(inputs, targets), guessed.mask if inputs is guessed.inputs else None)
