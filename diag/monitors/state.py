"""Declared checkpoint state: an object lists the attributes its checkpoint holds once, and these helpers save and load
them (as torchmetrics' ``Metric.add_state`` lists a metric's state once).

A monitor declares ``STATE = ("_windows", "stats", ...)``; :meth:`diag.monitors.Monitor.state_dict` saves each
attribute under its name without the leading underscore (``"windows"``, ``"stats"``), as plain data:

* an object with ``state_dict``/``load_state_dict`` (``EMA``, ``LossStatistics``, ``FeatureMoments``, ...) through
  those (loaded into the object the constructor built);
* a set, deque, tuple or list as a list (a set sorted), loaded back as the same container (a deque keeps its
  ``maxlen``);
* ``None``, bools, numbers and strings as they are (numbers as Python ``int``/``float``).

Loading is tolerant: a key the checkpoint lacks keeps the attribute's current (constructor) value.
"""

from __future__ import annotations

import collections
from typing import Any, Dict, Iterable, Mapping


def state_key(name: str) -> str:
    """The checkpoint key of attribute ``name``: the name without its leading underscore."""
    return name.lstrip("_")


def save_state(owner: Any, names: Iterable[str]) -> Dict[str, Any]:
    """The attributes ``names`` of ``owner`` as plain data, each under :func:`state_key` of its name."""
    return {state_key(name): to_plain(getattr(owner, name)) for name in names}


def load_state(owner: Any, names: Iterable[str], state: Mapping[str, Any]) -> None:
    """Restore what :func:`save_state` saved into the attributes ``names`` of ``owner``; a missing key keeps the
    attribute as it is."""
    renamed = getattr(owner, "STATE_RENAMED", None)
    if renamed:  # a checkpoint of an earlier release: its keys under their old names
        state = {**{new: state[old] for old, new in renamed.items() if old in state and new not in state}, **state}
    for name in names:
        key = state_key(name)
        if key in state:
            setattr(owner, name, from_plain(getattr(owner, name), state[key]))


def to_plain(value: Any) -> Any:
    """``value`` as data that ``torch.load(weights_only=True)`` reads back: dicts, lists, numbers, strings, ``None``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "state_dict"):
        return value.state_dict()
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)  # (a checkpoint of the same state is the same)
        except TypeError:
            return sorted(value, key=repr)
    if isinstance(value, (list, tuple, collections.deque)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    raise TypeError(f"cannot save a {type(value).__name__} in a checkpoint: declare plain data, containers of it, "
                    f"or objects with state_dict/load_state_dict")


def from_plain(current: Any, saved: Any) -> Any:
    """``saved`` (from :func:`to_plain`) in the form of ``current``, the attribute's value now: an object with
    ``load_state_dict`` loads it in place; a container or number is rebuilt as the same type."""
    if saved is None or current is None:
        return saved
    if hasattr(current, "load_state_dict"):
        current.load_state_dict(saved)
        return current
    if isinstance(current, collections.deque):
        return collections.deque(saved, maxlen=current.maxlen)
    if isinstance(current, (set, frozenset, tuple, list, bool, int, float)):
        return type(current)(saved)
    return saved
