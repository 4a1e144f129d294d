"""``Diagnostics``: every monitor with sane defaults, in one callback."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from diag.context import DiagContext
from diag.findings import Finding
from diag.monitors.router import PER_STEP_HOOKS

from ._compat import CALLBACK_BASES
from .base import Monitor
from .monitors import (ActivationMonitor, DataMonitor, FitMonitor, GradientMonitor, LearningRateProbe, LossCurveMonitor,
                       SetupCheck)

# Every hook a Lightning callback can receive; Diagnostics hands each to the monitors that implement it.
_FORWARDED_HOOKS = sorted(
    {n for base in CALLBACK_BASES for n in vars(base) if n.startswith("on_")} | {"setup", "teardown"}
)


def _monitor_option(name: str, value: Any, cls: type) -> Optional[Monitor]:
    if value is True:
        return cls()
    if value is False or value is None:
        return None
    if isinstance(value, cls):
        return value
    raise TypeError(f"`{name}` must be True, False or a {cls.__name__} instance, got {type(value).__name__}: {value!r}.")


def _make_forwarder(hook: str):
    def forward(self: "Diagnostics", *args: Any, **kwargs: Any) -> None:
        self._router.call(hook, *args, **kwargs)

    forward.__name__ = hook
    forward.__doc__ = f"Hands ``{hook}`` to the monitors that receive it now (see :mod:`diag.monitors.router`)."
    return forward


class Diagnostics(Monitor):
    """Watches a training run and reports what is wrong and what to do: every lightning-diag monitor in one callback.

    Each argument switches a monitor on (``True``, its defaults), off (``False``) or passes a configured
    instance. Findings go to ``.findings``, the console (warnings and errors once, a summary at the end of fit),
    ``diag/findings.jsonl`` in each logger's run folder (``.findings_file``; without a logger a new
    ``<default_root_dir>/lightning_logs/version_N`` per fit) and, with a ``TensorBoardLogger``, to TensorBoard
    (``diag/...`` scalars, the ``diag/findings`` text table and a custom-scalars layout); MLflow and W&B runs get
    the table too (see ``diag.callbacks.outputs``). The same object used for a new fit starts it clean, with the
    monitors as constructed; resuming from a checkpoint restores its findings.

    Args:
        loss_curve: the training-loss monitor (non-finite, diverging, oscillating, plateau, initial loss).
        lr_probe: the learning-rate-versus-code-bug probe, run when the loss misbehaves.
        gradients: gradient norms, noise scale, exploding/vanishing/missing gradients, zig-zag updates.
        activations: non-zero-centered inputs, dead and saturated units.
        fit: underfitting, overfitting and early stopping, from the logged train/validation losses.
        setup_check: optimizer and normalization-layer checks when training starts.
        data: input normalization, class balance and train/validation overlap, on the batches Lightning hands over.
        console: print new warnings/errors and a summary table at the end of fit.
        jsonl: write ``<log_dir>/diag/findings.jsonl``.
        tensorboard: write scalars, the findings table and the layout to the attached logger(s).

    Example::

        from diag.callbacks import Diagnostics, GradientMonitor
        trainer = pl.Trainer(callbacks=[Diagnostics(gradients=GradientMonitor(interval=10))])
        trainer.fit(model, train_loader, val_loader)
        for finding in trainer.callbacks[0].findings: print(finding.code, finding.advice)
    """

    def __init__(
        self,
        loss_curve: Union[bool, LossCurveMonitor] = True,
        lr_probe: Union[bool, LearningRateProbe] = True,
        gradients: Union[bool, GradientMonitor] = True,
        activations: Union[bool, ActivationMonitor] = True,
        fit: Union[bool, FitMonitor] = True,
        setup_check: Union[bool, SetupCheck] = True,
        data: Union[bool, DataMonitor] = True,
        console: bool = True,
        jsonl: bool = True,
        tensorboard: bool = True,
    ) -> None:
        super().__init__()
        for flag_name, flag in (("console", console), ("jsonl", jsonl), ("tensorboard", tensorboard)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{flag_name}` must be True or False, got {flag!r}.")
        self._console, self._jsonl, self._tensorboard = console, jsonl, tensorboard
        # Order matters: checks and measurements first, the probe last so it sees this step's requests.
        chosen = [
            _monitor_option("setup_check", setup_check, SetupCheck),
            _monitor_option("data", data, DataMonitor),
            _monitor_option("loss_curve", loss_curve, LossCurveMonitor),
            _monitor_option("gradients", gradients, GradientMonitor),
            _monitor_option("activations", activations, ActivationMonitor),
            _monitor_option("fit", fit, FitMonitor),
            _monitor_option("lr_probe", lr_probe, LearningRateProbe),
        ]
        self.monitors: List[Monitor] = [m for m in chosen if m is not None]
        for monitor in self.monitors:
            monitor._attach(self._context)
            monitor._owner = self
        self._build_router()  # (again at each fit's setup: every fit starts with every hook)

    def _routed(self) -> List[Monitor]:
        return self.monitors

    def _forwarded_hooks(self) -> List[str]:
        return _FORWARDED_HOOKS

    @staticmethod
    def _implements(monitor: Monitor, hook: str) -> bool:
        # (a composed monitor's own duties run in these three: it takes the trainer, and releases its hooks)
        return Monitor._implements(monitor, hook) or hook in ("setup", "on_fit_start", "teardown")

    def _show(self, hook: str, on: bool) -> None:
        """Lightning calls a callback's hook only when the attribute is callable: a per-step hook that no monitor needs
        right now is set to ``None`` on this instance, so that Lightning skips it (no profiler context, no call)."""
        if hook not in PER_STEP_HOOKS or getattr(type(self), hook, None) is not getattr(Diagnostics, hook, None):
            return  # not a per-step hook, or a subclass implements it: leave it to Lightning
        if on:
            self.__dict__.pop(hook, None)
        else:
            self.__dict__[hook] = None

    @property
    def findings(self) -> List[Finding]:
        """All findings of every monitor so far, oldest first."""
        return self._context.collector.findings

    def monitor(self, cls: type) -> Optional[Monitor]:
        """The composed monitor of type ``cls``, if switched on."""
        return next((m for m in self.monitors if isinstance(m, cls)), None)

    for _hook in _FORWARDED_HOOKS:
        locals()[_hook] = _make_forwarder(_hook)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Hands ``on_train_batch_end`` to the monitors; on a read step (see ``READ_EVERY``) the batched host read comes
        after the measuring monitors and before the learning-rate probe, so that the probe acts on this step's
        requests."""
        step = self._step_at_batch_end = int(trainer.global_step)  # (the root's duties after this hook use it too)
        self._router.call_around("on_train_batch_end", lambda: self._read_at_step_end(step),
                                 (trainer, pl_module, outputs, batch, batch_idx))

    del _hook

    def _release(self) -> None:
        for monitor in self.monitors:
            monitor._release()

    def _start_clean(self) -> None:
        """A new fit: a new shared context (no findings, no signals); each monitor then starts clean in its own setup."""
        self._context = DiagContext()
        self._findings_file = None
        for monitor in self.monitors:
            monitor._attach(self._context)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["monitors"] = {type(m).__name__: m.state_dict() for m in self.monitors}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for monitor in self.monitors:
            sub = state_dict.get("monitors", {}).get(type(monitor).__name__)
            if sub:
                monitor.load_state_dict(sub)
