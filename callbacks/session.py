"""``diag.watch``: the monitors of :class:`~diag.callbacks.Diagnostics` in a plain PyTorch or Fabric training loop.

No rule or statistic lives here. The session drives the very monitors the Lightning callback composes, through two
small stand-ins: :class:`LoopTrainer` holds what the monitors read from a Lightning ``Trainer`` (global step, optimizers,
world size and reduction, logger, log directory), and :class:`ModelView` is what they read from a ``LightningModule``
(the model's own parameters, modules, names and forward hooks, and a ``training_step`` that is the user's
``loss_fn(model, batch)``, which the learning-rate probe trains with). The session calls the monitors' Lightning hooks
at the matching moments of the user's loop, seen through hooks it registers itself:

- ``setup``, ``on_fit_start``, ``on_train_start``: in ``diag.watch(...)``;
- ``on_train_batch_start``: at the first forward of the model with gradients enabled after the previous
  ``session.step`` (a forward pre-hook on the model), before that forward runs;
- ``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``: in the optimizer's step pre-hook (after
  the loop's backward and any clipping);
- the global step + 1: in the optimizer's step post-hook;
- ``on_train_batch_end``: in ``session.step(loss, batch)``;
- ``on_train_epoch_end``, ``on_train_end``, ``on_fit_end``, ``teardown``: in ``session.close()`` (or at the end of the
  ``with`` block; ``on_exception`` and ``teardown`` when the block raises).

The batch is known only at ``session.step``, after the forward: ``on_train_batch_start`` gets the previous
iteration's batch (the data monitor reads each of its first batches one iteration late; the first iteration gets
``None``). For the same reason the gradient noise scale, which needs the current batch before the optimizer step, is
not measured (``GradientMonitor(noise_scale_interval=0)``). The fit monitor, which needs validation losses per epoch,
is off by default.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from diag.findings import Finding

from ._compat import TENSORBOARD_LOGGERS
from .diagnostics import Diagnostics
from .monitors import DataMonitor, GradientMonitor

log = logging.getLogger("diag")

# Diagnostics options that diag.watch passes through (its ``**options``).
OPTIONS = ("loss_curve", "lr_probe", "gradients", "activations", "fit", "setup_check", "data", "console", "jsonl",
           "tensorboard")
# The previous batch stands in for the current one in on_train_batch_start (see the module docstring). It is kept only
# while a monitor can still read it: the setup check reads the first one, the data monitor its first ``max_batches`` (8)
# for input statistics and hashes, and every batch of its first epoch for the label counts. A plain loop has no epochs:
# the data monitor's first epoch ends after this many batches (it then judges the labels and stops reading batches, as
# after a Trainer's first epoch); later iterations hand over None and hold no extra batch in memory.
STAND_IN_BATCHES = 16
MAX_MESSAGE = 500  # characters of an internal error's text in the one warning the session prints


def _unwrap_model(model: nn.Module) -> nn.Module:
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


def _unwrap_optimizer(optimizer: Any) -> Any:
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


class _Inert:
    """What a copy of a watched model gets in place of the session's hook: nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class _LoopHook:
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


def _make_logger(log_dir: str) -> Any:
    """A Lightning ``TensorBoardLogger`` writing to ``log_dir`` itself (no ``name``/``version`` folders): the monitors'
    sinks then write to it exactly as in a Trainer (scalars, the findings table, the layout, ``diag/findings.jsonl``)."""
    return TENSORBOARD_LOGGERS[0](save_dir=log_dir, name="", version="", default_hp_metric=False)


class WatchSession:
    """A plain PyTorch or Fabric training loop, watched by the monitors of :class:`Diagnostics`.

    Made by :func:`diag.watch`; see there for the arguments. The loop calls :meth:`step` once per iteration, after the
    optimizer step, and :meth:`close` at the end (or uses the session as a context manager).

    Example::

        with diag.watch(model, optimizer, loss_fn=loss_fn, log_dir="runs/exp1") as session:
            for batch in loader:
                loss = loss_fn(model, batch)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
                session.step(loss, batch)
        print(session.findings)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 loss_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
                 log_dir: Optional[Union[str, "os.PathLike[str]"]] = None, fabric: Any = None,
                 **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        inner_optimizer = _unwrap_optimizer(optimizer)
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be one torch.optim.Optimizer (or Fabric's wrapper of one), got "
                                    f"{type(optimizer).__name__}.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be a callable (model, batch) -> loss or None, got {loss_fn!r}.")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"`log_dir` must be a path or None, got {type(log_dir).__name__}: {log_dir!r}.")
        if fabric is not None and not (callable(getattr(fabric, "all_reduce", None))
                                       and hasattr(fabric, "world_size") and hasattr(fabric, "global_rank")):
            raise TypeError(f"`fabric` must be a lightning Fabric object (or None), got {type(fabric).__name__}.")
        total_steps = options.pop("total_steps", None)
        resume = options.pop("resume", None)
        if resume is not None and not (isinstance(resume, dict) and "diagnostics" in resume):
            raise TypeError(f"`resume` must be a dict from session.state_dict() or None, got {type(resume).__name__}.")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"`total_steps` must be a positive integer (the optimizer steps the loop will take) or "
                             f"None, got {total_steps!r}.")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; diag.watch takes total_steps, resume "
                             f"and the options of Diagnostics: {', '.join(OPTIONS)}.")

        self._log_dir = os.fspath(log_dir) if log_dir is not None else None
        self._fabric = fabric
        self._optimizer = inner_optimizer
        self._module = _unwrap_model(model)
        device = next((p.device for p in self._module.parameters()), torch.device("cpu"))
        precision = LoopPrecision(fabric)
        world = int(getattr(fabric, "world_size", 1) or 1) if fabric is not None else 1
        # The probe's (and any extra pass's) forward: the model as the loop calls it, except under DDP, whose wrapper
        # would synchronize gradients of a pass that only this process makes.
        call_model = model if world == 1 and not isinstance(model, nn.parallel.DistributedDataParallel) else self._module
        self.view = ModelView(self._module, call_model, loss_fn, precision)

        settings: Dict[str, Any] = {"fit": False, "gradients": True}
        settings.update(options)
        gradients = settings["gradients"]
        if gradients is True:
            settings["gradients"] = GradientMonitor(noise_scale_interval=0)
        elif isinstance(gradients, GradientMonitor) and gradients.noise_scale_interval:
            log.info("lightning-diag: diag.watch does not measure the gradient noise scale (it needs the batch before "
                     "the optimizer step); GradientMonitor(noise_scale_interval=%d) set to 0.",
                     gradients.noise_scale_interval)
            gradients.noise_scale_interval = 0
        if self._log_dir is None:  # no folder to write to: findings reach .findings and the console
            settings["jsonl"] = settings["tensorboard"] = False
        self.diagnostics = Diagnostics(**settings)

        self._logger = _make_logger(self._log_dir) if self._log_dir is not None else None
        self.trainer = LoopTrainer(inner_optimizer, self.view, fabric, device, self._log_dir,
                                   [self._logger] if self._logger is not None else [], total_steps)
        self._busy = False  # the session is calling the monitors (their own forward passes are not the loop's)
        self._closed = False
        self._failed = False
        self._start_pending = False
        self._batch_idx = 0
        self._previous_batch: Any = None
        self._handles: List[Any] = []
        self._busy = True
        try:
            self._call("setup", self.trainer, self.view, "fit")
            if resume is not None:  # as a Trainer restores a checkpoint: after setup, before on_fit_start
                self.trainer.global_step = int(resume.get("global_step", 0))
                self._batch_idx = int(resume.get("batch_idx", 0))
                self.diagnostics.load_state_dict(resume["diagnostics"])
            for hook in ("on_fit_start", "on_train_start", "on_train_epoch_start"):
                self._call(hook, self.trainer, self.view)
            self._handles = [
                self._module.register_forward_pre_hook(_LoopHook(self._on_forward)),
                inner_optimizer.register_step_pre_hook(self._before_optimizer_step),
                inner_optimizer.register_step_post_hook(self._after_optimizer_step),
            ]
            self._start_pending = True
        except Exception as exc:
            self._error("diag.watch", exc)
        finally:
            self._busy = False

    # ---- what the user sees -------------------------------------------------------------------------
    @property
    def findings(self) -> List[Finding]:
        """All findings so far, oldest first."""
        return self.diagnostics.findings

    @property
    def global_step(self) -> int:
        """Optimizer steps seen so far."""
        return self.trainer.global_step

    @property
    def log_dir(self) -> Optional[str]:
        return self._log_dir

    def state_dict(self) -> Dict[str, Any]:
        """The monitors' state (findings included, O(layers)) and the step count: save it with the model's checkpoint
        and pass it back as ``diag.watch(..., resume=state)``; the resumed session keeps the findings and does not
        report them again."""
        return {"global_step": self.trainer.global_step, "batch_idx": self._batch_idx,
                "diagnostics": self.diagnostics.state_dict()}

    def step(self, loss: Any = None, batch: Any = None) -> None:
        """Call once per iteration, after ``optimizer.step()``, with the iteration's loss and batch."""
        if self._closed:
            if not self._failed:
                self._warn_once("session.step was called after session.close(); the session no longer watches.")
            return
        self._busy = True
        try:
            if self._start_pending:  # the model's forward did not go through its __call__ (or no forward at all)
                self._start_batch()
            self._call("on_train_batch_end", self.trainer, self.view, self._outputs(loss), batch, self._batch_idx)
            self._batch_idx += 1
            self._previous_batch = batch if self._batch_idx < STAND_IN_BATCHES else None
            if self._batch_idx == STAND_IN_BATCHES:
                self._end_data_epoch()
            self._start_pending = True
        except Exception as exc:
            self._error("session.step", exc)
        finally:
            self._busy = False

    def close(self) -> None:
        """End the watch: last judgements, the summary, files closed, every hook removed. Idempotent."""
        self._end(None)

    def __enter__(self) -> "WatchSession":
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        self._end(exc)

    # ---- the loop's moments -------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if self._start_pending and not self._busy and torch.is_grad_enabled():
            self._busy = True
            try:
                self._start_batch()
            except Exception as exc:
                self._error("the model's forward", exc)
            finally:
                self._busy = False

    def _start_batch(self) -> None:
        self._start_pending = False
        self._call("on_train_batch_start", self.trainer, self.view, self._previous_batch, self._batch_idx)

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._busy or self._closed:
            return
        self._busy = True
        try:
            if self._start_pending:
                self._start_batch()
            self._call("on_before_backward", self.trainer, self.view, None)
            self._call("on_after_backward", self.trainer, self.view)
            self._call("on_before_optimizer_step", self.trainer, self.view, self._optimizer)
        except Exception as exc:
            self._error("the optimizer's step", exc)
        finally:
            self._busy = False

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._busy and not self._closed:
            self.trainer.global_step += 1

    def _end_data_epoch(self) -> None:
        """The end of the data monitor's first epoch (see ``STAND_IN_BATCHES``); the other monitors have no epochs here."""
        for monitor in self.diagnostics.monitors:
            if isinstance(monitor, DataMonitor):
                monitor.on_train_epoch_end(self.trainer, self.view)

    def _end(self, exc: Optional[BaseException]) -> None:
        if self._closed:
            return
        self._busy = True
        try:
            if exc is None:
                self._call("on_train_epoch_end", self.trainer, self.view)
                self._call("on_train_end", self.trainer, self.view)
                self._call("on_fit_end", self.trainer, self.view)
            else:
                self._call("on_exception", self.trainer, self.view, exc)
            self._call("teardown", self.trainer, self.view, "fit")
        except Exception as error:
            self._error("session.close", error)
        finally:
            self._busy = False
        self._shut()

    # ---- plumbing -----------------------------------------------------------------------------------
    @staticmethod
    def _outputs(loss: Any) -> Any:
        """What Lightning hands ``on_train_batch_end``: ``{"loss": <detached 0-d tensor>}``."""
        if isinstance(loss, torch.Tensor):
            return {"loss": loss.detach()}
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return {"loss": torch.tensor(float(loss))}
        return None  # no loss this iteration: the monitors skip it, as Lightning does for a training_step returning None

    def _call(self, hook: str, *args: Any) -> None:
        method = getattr(self.diagnostics, hook, None)
        if callable(method):  # (Diagnostics hides a per-step hook no monitor needs right now: see its _shadow)
            method(*args)

    def _error(self, where: str, exc: Exception) -> None:
        """Never break the loop (SPEC "Never breaks the user's fit"): an error of the session itself (the monitors guard
        their own) ends the watch, with one bounded warning; the traceback goes to the ``diag`` logger at debug level."""
        self._failed = True
        detail = " ".join(str(exc).split())[:MAX_MESSAGE]
        self._warn_once(f"diag.watch stopped watching after an internal error in {where}: {type(exc).__name__}: "
                        f"{detail}")
        log.debug("lightning-diag: diag.watch internal error in %s", where, exc_info=exc)
        self._shut()

    def _warn_once(self, message: str) -> None:
        if not getattr(self, "_warned", False):
            self._warned = True
            log.warning("lightning-diag: %s", message)

    def _shut(self) -> None:
        """Remove every hook of the session and release the monitors' resources and the TensorBoard writer."""
        self._closed = True
        self._start_pending = False
        self._previous_batch = None
        for handle in self._handles:
            try:
                handle.remove()
            except Exception:
                pass
        self._handles = []
        try:
            self.diagnostics._release()
        except Exception:
            pass
        writer = getattr(self._logger, "_experiment", None)
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "watching"
        return (f"WatchSession({state}, step={self.trainer.global_step}, findings={len(self.findings)}, "
                f"log_dir={self._log_dir!r})")

