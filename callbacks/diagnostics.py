"""``Diagnostics``: every monitor with sane defaults, in one callback."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from diag.context import DiagContext
from diag.findings import Finding

from ._compat import CALLBACK_BASES
from .base import Monitor
from .monitors import (ActivationMonitor, DataMonitor, FitMonitor, GradientMonitor, LearningRateProbe, LossCurveMonitor,
                       SetupCheck)

# Every hook a Lightning callback can receive; Diagnostics hands each to the monitors that implement it.
_FORWARDED_HOOKS = sorted(
    {n for base in CALLBACK_BASES for n in vars(base) if n.startswith("on_")} | {"setup", "teardown"}
)


# Per-step hooks that Lightning dispatches through ``_call_callback_hooks``, which skips a non-callable attribute.
# (on_train_batch_end carries the root's duties and is never shadowed; checkpoint and setup hooks are called directly.)
_PER_STEP_HOOKS = frozenset({"on_train_batch_start", "on_before_backward", "on_after_backward",
                             "on_before_optimizer_step", "on_before_zero_grad", "on_validation_batch_start",
                             "on_validation_batch_end"})

_NEVER = float("inf")


def _pick(name: str, value: Any, cls: type) -> Optional[Monitor]:
    if value is True:
        return cls()
    if value is False or value is None:
        return None
    if isinstance(value, cls):
        return value
    raise TypeError(f"`{name}` must be True, False or a {cls.__name__} instance, got {type(value).__name__}: {value!r}.")


def _make_forwarder(hook: str):
    def forward(self: "Diagnostics", *args: Any, **kwargs: Any) -> None:
        methods = self._hooked[hook]
        for method in methods:
            method(*args, **kwargs)
        if self._hooked[hook] is not methods:
            # A monitor woke another during the loop (a probe request wakes the probe, last in monitor order): call
            # the newly woken now, at the position a monitor called every step would have had.
            called = set(methods)
            for method in self._hooked[hook]:
                if method not in called:
                    method(*args, **kwargs)

    forward.__name__ = hook
    forward.__doc__ = f"Hands ``{hook}`` to the monitors that implement it."
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
            _pick("setup_check", setup_check, SetupCheck),
            _pick("data", data, DataMonitor),
            _pick("loss_curve", loss_curve, LossCurveMonitor),
            _pick("gradients", gradients, GradientMonitor),
            _pick("activations", activations, ActivationMonitor),
            _pick("fit", fit, FitMonitor),
            _pick("lr_probe", lr_probe, LearningRateProbe),
        ]
        self.monitors: List[Monitor] = [m for m in chosen if m is not None]
        for monitor in self.monitors:
            monitor._attach(self._context)
        self._hooked: Dict[str, List[Callable]] = {}  # hook name -> the bound hooks of the monitors that implement it
        self._build_hook_table()

    def _build_hook_table(self) -> None:
        """Which monitors get which hook: those that implement it. Monitors retire from per-step hooks they are done
        with (see :meth:`Monitor._retire`); every fit starts from the full table again."""
        self._hooked.clear()
        self._wakeups: List[Tuple[int, Monitor, str]] = []  # (global step, monitor, hook) asleep until that step
        self._next_wakeup = _NEVER
        for hook in _FORWARDED_HOOKS:
            self._hooked[hook] = [getattr(m, hook) for m in self.monitors
                                  if getattr(type(m), hook, None) is not getattr(Monitor, hook, None)
                                  or hook in ("setup", "on_fit_start", "teardown")]
        for monitor in self.monitors:
            monitor._owner = self
        for hook in _PER_STEP_HOOKS:
            self._shadow(hook)

    def _route(self, monitor: Monitor, hook: str, on: bool) -> bool:
        """Add ``monitor`` to (``on``) or remove it from the receivers of ``hook`` (see :meth:`Monitor._retire`);
        ``False`` when it already was (or was not) a receiver."""
        current = self._hooked.get(hook)
        if current is None:
            return False
        present = [i for i, fn in enumerate(current) if fn.__self__ is monitor]
        if bool(present) == on:
            return False
        # a new list in monitor order (a loop running over the old one keeps it)
        if on:
            rank = self.monitors.index
            at = rank(monitor)
            i = 0
            while i < len(current) and rank(current[i].__self__) < at:
                i += 1
            self._hooked[hook] = current[:i] + [getattr(monitor, hook)] + current[i:]
        else:
            self._hooked[hook] = current[:present[0]] + current[present[0] + 1:]
        if len(current) <= 1:  # the hook went from no receiver to one, or back: show or hide it to Lightning
            self._shadow(hook)
        return True

    def _sleep(self, monitor: Monitor, hooks: Iterable[str], until_step: int) -> None:
        """Route ``hooks`` away from ``monitor`` until the global step reaches ``until_step`` (see
        :meth:`Monitor._sleep`): between its sampled steps a monitor costs nothing, not even an early return."""
        for hook in hooks:
            if self._route(monitor, hook, False):  # (a hook asleep already keeps its wake-up)
                self._wakeups.append((until_step, monitor, hook))
                self._next_wakeup = min(self._next_wakeup, until_step)

    def _after_batch(self, step: int) -> None:
        if step < self._next_wakeup:
            return
        due = [w for w in self._wakeups if w[0] <= step]
        self._wakeups = [w for w in self._wakeups if w[0] > step]
        self._next_wakeup = min((w[0] for w in self._wakeups), default=_NEVER)
        for _, monitor, hook in due:
            self._route(monitor, hook, True)

    def _shadow(self, hook: str) -> None:
        """Lightning calls a callback's hook only when the attribute is callable: a per-step hook that no monitor needs
        right now is set to ``None`` on this instance, so that Lightning skips it (no profiler context, no call)."""
        if hook not in _PER_STEP_HOOKS or getattr(type(self), hook, None) is not getattr(Diagnostics, hook, None):
            return  # not a per-step hook, or a subclass implements it: leave it to Lightning
        if self._hooked.get(hook):
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
        requests, as it did when each monitor read its own numbers."""
        methods = self._hooked["on_train_batch_end"]
        step = self._step_at_batch_end = int(trainer.global_step)  # (the root's duties after this hook use it too)
        if methods and isinstance(getattr(methods[-1], "__self__", None), LearningRateProbe):  # the probe comes last
            for method in methods[:-1]:
                method(trainer, pl_module, outputs, batch, batch_idx)
            self._read_at_step_end(step)
            methods[-1](trainer, pl_module, outputs, batch, batch_idx)
        else:
            for method in methods:
                method(trainer, pl_module, outputs, batch, batch_idx)
            self._read_at_step_end(step)
        if self._hooked["on_train_batch_end"] is not methods:  # a request woke the probe (see _make_forwarder)
            called = set(methods)
            for method in self._hooked["on_train_batch_end"]:
                if method not in called:
                    method(trainer, pl_module, outputs, batch, batch_idx)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Restores the full hook table (a second fit with the same callback) and hands ``setup`` to every monitor."""
        self._build_hook_table()
        for method in self._hooked["setup"]:
            method(trainer, pl_module, stage)
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
