"""The host of the monitors: what they read from the object their hooks are handed as ``trainer`` (and as
``pl_module``), and the stand-ins that provide it in a plain PyTorch or Fabric loop (``diag.watch``).

A Lightning ``Trainer`` is a host as it is. A monitor reads, where it needs them: ``global_step``, ``current_epoch``,
``optimizers`` (possibly wrapped: ``.optimizer``), ``accumulate_grad_batches``, ``gradient_clip_val`` /
``gradient_clip_algorithm``, ``world_size`` / ``global_rank`` / ``is_global_zero``, ``strategy.reduce(tensor,
reduce_op)``, ``precision_plugin.train_step_context()`` and ``.scaler``, ``estimated_stepping_batches``,
``callback_metrics``, ``callbacks``, ``loggers`` / ``log_dir`` / ``default_root_dir``, ``sanity_checking``,
``lightning_module``. From the module: ``named_parameters``, ``named_modules``, forward hooks,
``automatic_optimization`` and ``training_step(batch, batch_idx)`` (the probe and the gradient noise pass call it).
:class:`LoopTrainer` and :class:`ModelView` are that host for a loop that is not Lightning's; :class:`LoopHook` wraps
the hook that ``diag.watch`` registers on the user's model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside Fabric's ``_FabricModule`` or a ``DistributedDataParallel`` wrapper."""
    for _ in range(4):
        inner = getattr(model, "_original_module", None)  # lightning.fabric's _FabricModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        break
    return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Fabric's ``_FabricOptimizer`` (its ``step`` reaches the inner one's hooks)."""
    inner = getattr(optimizer, "_optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class LoopStrategy:
    """``trainer.strategy`` for the monitors: ``reduce`` across processes and the root device."""

    def __init__(self, fabric: Any, device: torch.device) -> None:
        self._fabric = fabric
        self.root_device = device

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        if self._fabric is not None:
            return self._fabric.all_reduce(tensor, reduce_op=reduce_op)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            if reduce_op in ("mean", "avg"):
                tensor = tensor / dist.get_world_size()
        return tensor


class LoopPrecision:
    """``trainer.precision_plugin`` for the monitors: Fabric's autocast context and loss scaler, if any."""

    def __init__(self, fabric: Any) -> None:
        precision = getattr(getattr(fabric, "strategy", None), "precision", None) if fabric is not None else None
        self._precision = precision
        self.scaler = getattr(precision, "scaler", None)

    def train_step_context(self) -> Any:
        context = getattr(self._precision, "forward_context", None)
        return context() if callable(context) else contextlib.nullcontext()


class LoopTrainer:
    """What the monitors read from a Lightning ``Trainer``, for a plain loop: one epoch, automatic optimization with
    one optimizer, no gradient accumulation or clipping that the monitors could know of, no validation."""

    def __init__(self, optimizer: torch.optim.Optimizer, module: "ModelView", fabric: Any, device: torch.device,
                 log_dir: Optional[str], loggers: List[Any], total_steps: Optional[int] = None) -> None:
        self.global_step = 0
        # what a Trainer projects from max_epochs/max_steps (the probe's time budget is a share of the whole fit);
        # unknown in a plain loop unless diag.watch(..., total_steps=N) says it, like a Trainer with an iterable loader
        self.estimated_stepping_batches = float(total_steps) if total_steps else float("inf")
        self.current_epoch = 0
        self.optimizers = [optimizer]
        self.lightning_module = module
        self.accumulate_grad_batches = 1
        self.gradient_clip_val: Optional[float] = None
        self.gradient_clip_algorithm: Optional[str] = None
        self.callback_metrics: Dict[str, torch.Tensor] = {}
        self.callbacks: List[Any] = []
        self.sanity_checking = False
        self.check_val_every_n_epoch = 1
        self.state = None
        self.train_dataloader = None
        self.num_training_batches = float("inf")
        self.loggers = loggers
        self.logger = loggers[0] if loggers else None
        self.default_root_dir = log_dir
        self.log_dir = log_dir
        self.strategy = LoopStrategy(fabric, device)
        self.precision_plugin = LoopPrecision(fabric)
        if fabric is not None:
            self.world_size, self.global_rank = int(fabric.world_size), int(fabric.global_rank)
        else:
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized()
            self.world_size = dist.get_world_size() if distributed else 1
            self.global_rank = dist.get_rank() if distributed else 0
        self.is_global_zero = self.global_rank == 0


class _Inert:
    """What a copy of a watched model gets in place of the session's hook: nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class LoopHook:
    """The session's hook on the user's model. ``copy.deepcopy(model)`` (an EMA copy, a best-model snapshot) and
    ``torch.save(model)`` copy a module's hooks: the copy gets an inert hook, not a copy of the session (which holds
    open files, and would watch a model that is not trained)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __deepcopy__(self, memo: Any) -> _Inert:
        return _Inert()

    def __reduce__(self) -> Any:
        return (_Inert, ())


class ModelView(nn.Module):
    """What the monitors read from a ``LightningModule``: the user's model, seen as it is.

    Its parameters, buffers, modules, children, names and forward hooks are the model's own (names carry no prefix;
    the view itself is not one of its modules), so the learning-rate probe trains and restores the model's parameters
    in place and every per-layer finding names the model's layers. ``training_step(batch, batch_idx)`` is
    ``loss_fn(model, batch)``; without a ``loss_fn`` it raises the probe's ``ProbeUnavailable`` with what to pass, and
    the probe says once (at ``info``) why it did not run.
    """

    automatic_optimization = True

    def __init__(self, model: nn.Module, call_model: nn.Module, loss_fn: Optional[Callable[[nn.Module, Any], Any]],
                 precision: LoopPrecision) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: it would prefix every name
        object.__setattr__(self, "_call_model", call_model)
        object.__setattr__(self, "_loss_fn", loss_fn)
        object.__setattr__(self, "_precision", precision)

    # the model's own tree -------------------------------------------------------------------------
    def named_modules(self, memo: Any = None, prefix: str = "", remove_duplicate: bool = True) -> Iterator:
        return self._model.named_modules(memo, prefix, remove_duplicate)

    def named_children(self) -> Iterator[Tuple[str, nn.Module]]:
        if type(self._model).__name__ == "OptimizedModule":  # torch.compile: no hooks inside the compiled region
            return iter(())
        return self._model.named_children()

    def register_forward_hook(self, *args: Any, **kwargs: Any) -> Any:
        return self._model.register_forward_hook(*args, **kwargs)

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any) -> Any:
        return self._model.register_forward_pre_hook(*args, **kwargs)

    def train(self, mode: bool = True) -> "ModelView":
        self._model.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_model(*args, **kwargs)

    # what the probe trains with -------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self._loss_fn is None:
            from diag.probe import ProbeUnavailable

            raise ProbeUnavailable(
                "diag.watch(...) was given no loss_fn; pass loss_fn=lambda model, batch: <the loss of your loop> "
                "to let the probe tell a learning-rate problem from a code bug")
        with self._precision.train_step_context():
            return self._loss_fn(self._call_model, batch)
