"""Counting the host reads and torch calls that lightning-diag issues, per training step, on any device.

A host read (``.item()``, ``.tolist()``, ``float(t)``, a tensor used as a Python index, ``.cpu()``, ...) makes the CPU
wait until the accelerator has run every kernel queued so far: on a GPU it stalls the launch queue. On a CPU nothing
waits, so a timing cannot show them; counting can. :class:`HostReadCounter` is a ``TorchFunctionMode`` that sees every
torch call of the process and keeps those issued from the package's own frames (files under ``diag/`` and
``callbacks/``: the first frame outside torch that made the call); a callback attributes them to the training step
under way (``trainer.global_step`` when the batch started) or to the phase between steps (fit start, validation, epoch
end, fit end).

Used by ``tests/test_host_reads.py`` (the budget) and ``tests/benchmarks/overhead.py`` (the counts next to the
ratios). Example::

    counter = HostReadCounter()
    trainer = pl.Trainer(callbacks=[counter.callback(pl), Diagnostics()])
    with counter:
        trainer.fit(model, train_loader)
    print(counter.summary(dense_until=10))
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("diag", "callbacks"))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep

# Calls that wait for the device: the value goes to Python, or the output's size depends on the data.
HOST_READS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
                        "__complex__", "__array__", "__format__", "__repr__", "__str__", "equal", "allclose",
                        "is_nonzero", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
                        "bincount"})
# A copy between host and device (``torch.tensor(..., device=...)``, ``.to(device)``): a wait on a GPU too, when the
# source is pageable host memory or the copy comes back to the host. Counted apart: on CPU runs they are no-ops.
TRANSFERS = frozenset({"to", "cuda", "tensor", "as_tensor"})


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


def _is_transfer(name: str, args: tuple, kwargs: dict) -> bool:
    if name in ("tensor", "as_tensor"):
        return kwargs.get("device") is not None
    if name == "to":
        return any(isinstance(a, (str, torch.device)) for a in args[1:]) or "device" in kwargs
    return name == "cuda"


def _is_boolean_index(name: str, args: tuple) -> bool:
    """``t[mask]``: the output size depends on the mask, read on the host."""
    if name != "__getitem__" or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


class HostReadCounter(TorchFunctionMode):
    """Counts the torch calls from the package's frames, and among them the host reads, per step or phase."""

    def __init__(self, package_dirs: Tuple[str, ...] = PACKAGE_DIRS) -> None:
        super().__init__()
        self.package_dirs = package_dirs
        self.where: Any = ("start", -1)  # ("step", global step) inside a training batch, else (phase, global step)
        self.reads: Dict[Any, int] = collections.Counter()
        self.transfers: Dict[Any, int] = collections.Counter()
        self.ops: Dict[Any, int] = collections.Counter()
        self.sites: Dict[Tuple[str, int, str], int] = collections.Counter()  # (file, line, call) of each read
        self.transfer_sites: Dict[Tuple[str, int, str], int] = collections.Counter()
        self.read_log: List[Tuple[Any, Tuple[str, int, str]]] = []  # (where, site) of every read, in order
        self.op_log: Optional[List[Tuple[Any, str, int, str]]] = None  # every call, when set to a list
        self.steps_seen: List[int] = []

    # ---- the mode ---------------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(self.package_dirs):
            name = _name(func)
            self.ops[self.where] += 1
            if self.op_log is not None:
                self.op_log.append((self.where, os.path.relpath(frame.f_code.co_filename, _ROOT), frame.f_lineno, name))
            if name in HOST_READS or _is_boolean_index(name, args):
                self.reads[self.where] += 1
                site = (os.path.relpath(frame.f_code.co_filename, _ROOT), frame.f_lineno, name)
                self.sites[site] += 1
                self.read_log.append((self.where, site))
            elif name in TRANSFERS and _is_transfer(name, args, kwargs):
                self.transfers[self.where] += 1
                self.transfer_sites[(os.path.relpath(frame.f_code.co_filename, _ROOT), frame.f_lineno, name)] += 1
        return func(*args, **kwargs)

    # ---- attribution ------------------------------------------------------------------------------
    def callback(self, namespace: Any) -> Any:
        """A callback (of ``namespace.Callback``) that tells the counter where the fit is; put it first in the list, so
        that it runs before the monitors in every hook."""
        counter = self

        class _Where(namespace.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                counter.where = ("step", int(trainer.global_step))
                counter.steps_seen.append(int(trainer.global_step))

            def on_train_epoch_end(self, trainer, pl_module):
                counter.where = ("epoch_end", int(trainer.global_step))

            def on_validation_start(self, trainer, pl_module):
                counter.where = ("validation", int(trainer.global_step))

            def on_train_end(self, trainer, pl_module):
                counter.where = ("end", int(trainer.global_step))

        return _Where()

    # ---- results ----------------------------------------------------------------------------------
    def step_reads(self) -> Dict[int, int]:
        """Host reads per training step (steps without one are absent)."""
        return {s: n for (kind, s), n in self.reads.items() if kind == "step" and n}

    def between_steps_reads(self) -> Dict[Tuple[str, int], int]:
        """Host reads outside training batches: fit start, validation, epoch ends, fit end."""
        return {w: n for w, n in self.reads.items() if w[0] != "step" and n}

    def step_transfers(self) -> Dict[int, int]:
        return {s: n for (kind, s), n in self.transfers.items() if kind == "step" and n}

    def summary(self, dense_until: int = 0) -> Dict[str, Any]:
        """The figures the budget is about, for the steps at or after ``dense_until``, and over the whole fit."""
        steps = sorted(set(self.steps_seen))
        reads = self.step_reads()
        late = [s for s in steps if s >= dense_until]
        late_reads = {s: reads[s] for s in late if s in reads}
        worst = max(reads.items(), key=lambda kv: kv[1], default=(None, 0))
        return {
            "steps": len(steps),
            "steps_with_read": len(reads),
            "step_reads": sum(reads.values()),
            "worst_step": worst[0], "worst_step_reads": worst[1],
            "late_steps": len(late),
            "late_steps_with_read": len(late_reads),
            "late_share_with_read": len(late_reads) / len(late) if late else 0.0,
            "late_max_reads_per_step": max(late_reads.values(), default=0),
            "between_steps_reads": sum(self.between_steps_reads().values()),
            "step_transfers": sum(self.step_transfers().values()),
            "ops_per_step": sum(n for (kind, _), n in self.ops.items() if kind == "step") / max(1, len(steps)),
        }

    def top_sites(self, n: int = 10) -> List[Tuple[Tuple[str, int, str], int]]:
        return sorted(self.sites.items(), key=lambda kv: -kv[1])[:n]
