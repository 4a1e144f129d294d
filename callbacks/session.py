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

A loop that never closes its session still gets every ``diag/`` scalar in its event file: the scalars the collector
holds (it writes them every 50 steps, see :mod:`diag.collector`) and TensorBoard's queue are written when the
interpreter exits. Nothing is judged then: the last judgements and the summary belong to ``close()``.

The batch is known only at ``session.step``, after the forward: ``on_train_batch_start`` gets the previous
iteration's batch (the data monitor reads each of its first batches one iteration late; the first iteration gets
``None``). For the same reason the gradient noise scale, which needs the current batch before the optimizer step, is
not measured (``GradientMonitor(noise_scale_interval=0)``). The fit monitor, which needs validation losses per epoch,
is off by default.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from diag.findings import Finding

from diag.monitors.host import LoopHook, LoopPrecision, LoopTrainer, ModelView, unwrap_model, unwrap_optimizer
from diag.monitors.host import _Inert  # noqa: F401 (a model saved while watched by an earlier release names it here)

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


def _make_logger(log_dir: str) -> Any:
    """A Lightning ``TensorBoardLogger`` writing to ``log_dir`` itself (no ``name``/``version`` folders): the monitors'
    sinks then write to it exactly as in a Trainer (scalars, the findings table, the layout, ``diag/findings.jsonl``)."""
    return TENSORBOARD_LOGGERS[0](save_dir=log_dir, name="", version="", default_hp_metric=False)


def _write_held_scalars(diagnostics: Diagnostics, logger: Any) -> None:
    """At the exit of a loop that never closed its session: write the scalars still held and TensorBoard's queue."""
    try:
        diagnostics._context.collector.write_scalars()
        writer = getattr(logger, "_experiment", None)
        if writer is not None:
            writer.flush()
    except Exception:  # (at interpreter exit: nothing to report to)
        pass


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
        inner_optimizer = unwrap_optimizer(optimizer)
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
        self._module = unwrap_model(model)
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
                self._module.register_forward_pre_hook(LoopHook(self._on_forward)),
                inner_optimizer.register_step_pre_hook(self._before_optimizer_step),
                inner_optimizer.register_step_post_hook(self._after_optimizer_step),
            ]
            self._start_pending = True
        except Exception as exc:
            self._error("diag.watch", exc)
        finally:
            self._busy = False
        # (holds the monitors and the logger, not the session; detached by close)
        self._write_at_exit = None if self._closed else weakref.finalize(self, _write_held_scalars, self.diagnostics,
                                                                          self._logger)

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
        finalizer = getattr(self, "_write_at_exit", None)
        if finalizer is not None:
            finalizer.detach()
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

