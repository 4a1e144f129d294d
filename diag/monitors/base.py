"""The base of every monitor: findings, shared context, batched host reads, checkpoints, and never breaking the fit.

Nothing here imports Lightning. A monitor's hooks carry Lightning's names and arguments, and read from the object they
are handed as ``trainer`` only what :mod:`diag.monitors.host` lists; ``diag.callbacks`` makes each monitor a Lightning
``Callback`` (the Trainer is the host), ``diag.watch`` drives the same monitors from a plain or Fabric loop.
"""

from __future__ import annotations

import functools
import logging
import os
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from diag.codes import code_info
from diag.context import DiagContext
from diag.detectors import Verdict
from diag.findings import Finding, Severity, clip_text
from diag.sinks import ConsoleSink, JsonlSink
from diag.stats.host_read import BatchedRead

from .router import NEVER, PER_STEP_HOOKS, SCHEDULED_HOOKS, Router  # noqa: F401 (NEVER: for the monitors' wants)
from .state import load_state, save_state


log = logging.getLogger("diag")

# Hooks that run user-visible work: every one is guarded so that a failure disables the monitor instead of
# raising into the fit.
_GUARDED_PREFIXES = ("on_",)
_GUARDED_NAMES = {"setup", "teardown", "load_state_dict"}
# An internal error's text in its finding and its warning: the exception's first characters, on one line (the message
# stays under 500 characters; the full traceback goes to the ``diag`` logger at debug level).
INTERNAL_ERROR_DETAIL_CHARS = 200
INTERNAL_ERROR_MESSAGE_CHARS = 500
# The hooks that carry base duties (see Monitor._run_duty); the other hooks skip that bookkeeping, which on a
# ~5 ms step was a measurable share of the overhead (two extra calls per hook per monitor).
_DUTY_HOOKS = frozenset({"setup", "on_fit_start", "on_train_batch_end", "on_train_epoch_end", "on_validation_end",
                         "on_fit_end", "on_exception", "teardown"})


# Host reads (SPEC "Bounded cost": no host read on an unsampled step). A monitor measures on the device and hands its
# tensors to one BatchedRead; the callback that drives the steps reads them all with one ``tolist()`` at the end of the
# batch after which the global step reaches a multiple of READ_EVERY (global steps 9, 19, 29, ... without
# accumulation: the batch of the loss monitor's 10-step read), and between steps (validation end, epoch end, fit end).
# So at most one read per READ_EVERY steps, whatever the monitors and their intervals: a measurement taken between two
# read steps waits on the device (O(layers)) for the next one. 10 is the loss monitor's read interval and the
# activation monitor's sampling interval; the gradient monitor samples every 20 steps.
READ_EVERY = 10

# Sampling back-off (GradientMonitor, ActivationMonitor): the first BACKOFF_AFTER samples come at the configured
# interval (enough for every rule's minimum evidence in short runs: missing gradients 8 samples, zig-zag 5 pairs, noise
# 10 estimates, two activation windows); from then on the interval doubles each time the step count doubles, up to
# max_backoff times: BACKOFF_AFTER / 2 samples per doubling of the run (a log-uniform density) until the interval is
# max_backoff times the configured one. A fixed interval costs a fixed share of every step, a tenth of a 3 ms MLP
# step; the back-off keeps full detail early, when most faults show, and makes the cost shrink on long runs. It
# depends on the step alone: the same on every DDP rank and every machine.
BACKOFF_AFTER = 10


def backed_off_interval(interval: int, step: int, max_backoff: int) -> int:
    """The sampling interval at ``step``: ``interval`` until ``BACKOFF_AFTER * interval`` (the first ``BACKOFF_AFTER``
    samples), then doubling each time the step count doubles, at most ``max_backoff`` times ``interval``."""
    start = BACKOFF_AFTER * interval
    factor = 1
    while factor < max_backoff and step >= start * factor:
        factor *= 2
    return interval * min(factor, max_backoff)


class Schedule:
    """The steps at multiples of a backed-off interval (:func:`backed_off_interval`), counted from ``offset``, and every
    step below ``dense_until``. :meth:`due` costs one comparison on the steps between two events: it caches the next
    one (recomputed once an event has passed, or when the step goes backwards)."""

    def __init__(self, interval: int, max_backoff: int, offset: int = 0, dense_until: int = 0) -> None:
        self.interval, self.max_backoff, self.offset, self.dense_until = interval, max_backoff, offset, dense_until
        self._from, self._next = 0, -1

    def due(self, step: int) -> bool:
        if step < self.dense_until:
            return True
        since = step - self.offset
        if since < 0:
            return False
        if since > self._next or since < self._from:
            every = backed_off_interval(self.interval, since, self.max_backoff)
            self._from, self._next = since, -(-since // every) * every  # the next multiple at or after ``since``
        return since == self._next

    def next_due(self, step: int) -> int:
        """The first step at or after ``step`` at which :meth:`due` is true. Calling :meth:`due` only at that step (and
        not at the steps before it) gives the same answers as calling it at every step."""
        if self.due(step):
            return step
        since = step - self.offset
        if since < 0:
            return self.offset
        return self._next + self.offset

def _guard(name: str, fn: Callable) -> Callable:
    duty_hook = name in _DUTY_HOOKS
    duty_before = name in ("setup", "on_fit_start")  # see _run_duty: which duties run before, which after the hook
    duty_after = duty_hook and not duty_before
    # a monitor composed in Diagnostics (not the root) has duties only here: take the trainer, release its hooks
    composed_duty_hook = name in ("setup", "on_fit_start", "teardown")
    takes_trainer = name != "load_state_dict"

    @functools.wraps(fn)
    def guarded(self: "Monitor", *args: Any, **kwargs: Any) -> Any:
        if not self._host_known and takes_trainer and self._is_root and self._foreign_host(name, args):
            return None
        # The base duties (open/flush/close the sinks, set the trainer, release hooks) run once per hook call,
        # at the outermost override, even when the monitor is switched off and whether or not it calls super().
        outermost = duty_hook and (self._is_root or composed_duty_hook) and getattr(type(self), name, None) is guarded
        result = None
        if outermost and duty_before:
            self._run_duty(name, "before", args, kwargs)
        if not self._disabled and name not in self._off_hooks:
            try:
                result = fn(self, *args, **kwargs)
            except Exception as exc:  # never raised into the fit: see SPEC "Never breaks the user's fit"
                self._fail(exc, name)
                result = None
        if outermost and duty_after:
            self._run_duty(name, "after", args)
        return result

    guarded.__diag_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def _guard_class(cls: type) -> None:
    for name, value in list(vars(cls).items()):
        if callable(value) and not getattr(value, "__diag_guarded__", False) and (
            name.startswith(_GUARDED_PREFIXES) or name in _GUARDED_NAMES
        ):
            setattr(cls, name, _guard(name, value))


class Monitor:
    """Base of the lightning-diag monitors.

    A monitor used alone writes its own findings (JSONL, console, TensorBoard); monitors composed in
    :class:`~diag.callbacks.Diagnostics` share one context and the Diagnostics callback writes for all.

    Subclasses implement Lightning hooks as usual (the host hands them its ``trainer`` and module; see
    :mod:`diag.monitors.host`). Each hook is guarded: an exception switches the monitor off and becomes an ``info``
    finding ``diag_internal_error``. A subclass that holds resources (forward hooks) releases them in
    :meth:`_release`. Three declarations replace control flow:

    - :meth:`wants`: the per-step hooks it uses on a schedule, and from which step (the router routes them);
    - ``STATE``: the attributes its checkpoint holds (saved and loaded by the base);
    - its rules return a :class:`~diag.detectors.Verdict`, reported with :meth:`report_verdict` (which asks for the
      learning-rate probe when the verdict says so).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_class(cls)

    def __new__(cls, *args: Any, **kwargs: Any) -> "Monitor":
        self = super().__new__(cls)
        self._init_args = (args, kwargs)  # a new fit rebuilds the monitor's state from them (see _start_clean)
        return self

    def __init__(self) -> None:
        super().__init__()
        self._context = DiagContext()
        self._is_root = True
        self._disabled = False
        self._trainer: Any = None
        self._owner: Any = None  # the composing Diagnostics, which routes hooks to its monitors
        self._fits = 0  # fits this object has watched (a reused callback starts each new one clean)
        self._findings_file: Optional[str] = None
        self._host_reads = BatchedRead()  # used when this monitor drives the steps (alone, or as Diagnostics)
        self._read_block: Optional[int] = None  # global step // READ_EVERY at the last read step
        self._requested: set = set()  # reasons this monitor asked the probe for (see request_probe)

    # ---- identity ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def state_key(self) -> str:
        # Lightning reads state_key on every hook call (profiler names): build the string once.
        key = self.__dict__.get("_state_key_cache")
        if key is None:
            # Lightning's convention (Callback._generate_state_key): the class name and the distinguishing arguments
            key = self.__dict__["_state_key_cache"] = f"{type(self).__qualname__}{self._state_key_args()!r}"
        return key

    def _state_key_args(self) -> Dict[str, Any]:
        """Arguments that tell two instances of the same monitor apart (Lightning's ``state_key`` convention)."""
        return {}

    # ---- findings ---------------------------------------------------------------------------------
    @property
    def findings(self) -> List[Finding]:
        """All findings of this monitor so far, oldest first."""
        return self._context.collector.findings_of(self.name)

    @property
    def findings_file(self) -> Optional[str]:
        """The ``findings.jsonl`` of the current (or last) fit; ``None`` before a fit or when none could be written."""
        if not self._is_root and self._owner is not None:
            return self._owner.findings_file
        return self._findings_file

    @property
    def context(self) -> DiagContext:
        return self._context

    def _attach(self, context: DiagContext) -> None:
        """Share ``context`` with a composing callback, which then owns the sinks."""
        self._context = context
        self._is_root = False

    # ---- schedule (see diag.monitors.router) ------------------------------------------------------
    # A monitor woken between its steps when another asks for the learning-rate probe (the probe itself).
    WAKES_ON_PROBE_REQUEST = False
    # A monitor that acts on what the others measured in this batch: it gets ``on_train_batch_end`` after the batched
    # host read of a read step (the probe acts on this step's requests).
    ACTS_ON_REQUESTS = False

    def wants(self, step: int) -> Mapping[str, float]:
        """The per-step hooks this monitor uses on a schedule, each with the first global step (the step a training
        batch starts with) from which it needs it again: ``step`` or less for the next batch, ``NEVER`` for the rest of
        the fit. Asked after a batch, and again after each batch while a hook is needed, or once the earliest step has
        come. Hooks left out are received on every call. The default: nothing scheduled."""
        return {}

    def _routed(self) -> List["Monitor"]:
        """The monitors whose hooks this root routes: itself alone (:class:`Diagnostics` routes its monitors)."""
        return [self]

    def _build_router(self) -> None:
        self._off_hooks = set()
        self._router = Router(self._routed(), self._forwarded_hooks(), self._implements, self._show)
        self._context.on_probe_request = self._router.wake_on_request

    def _forwarded_hooks(self) -> Sequence[str]:
        """The hooks the router routes: those a monitor may schedule (:class:`Diagnostics` forwards every hook)."""
        return SCHEDULED_HOOKS

    @staticmethod
    def _implements(monitor: "Monitor", hook: str) -> bool:
        """Whether a monitor class (not this base, nor a host's no-op ``Callback``) defines ``hook``."""
        for cls in type(monitor).__mro__:
            if hook in vars(cls):
                return cls is not Monitor and issubclass(cls, Monitor)
        return False

    def _show(self, hook: str, on: bool) -> None:
        """The router's answer for a monitor used alone: a hook routed off is skipped (per-step hooks are hidden from
        the host, which calls only callable hook attributes; the others return at once, their base duties still run).
        :class:`Diagnostics` overrides it: it hides a forwarded hook that no monitor receives."""
        if on:
            self._off_hooks.discard(hook)
            if hook in PER_STEP_HOOKS and self.__dict__.get(hook, 0) is None:
                del self.__dict__[hook]
        else:
            self._off_hooks.add(hook)
            if hook in PER_STEP_HOOKS and hook not in self.__dict__:
                self.__dict__[hook] = None

    def step(self) -> int:
        return int(self._trainer.global_step) if self._trainer is not None else 0

    def epoch(self) -> int:
        return int(self._trainer.current_epoch) if self._trainer is not None else 0

    def report(self, code: str, message: str, advice: Optional[str] = None, evidence: Optional[Mapping[str, Any]] = None,
               layer: Optional[str] = None, severity: Optional[Severity] = None) -> Optional[Finding]:
        """Raise a finding; returns it when it is new (or more severe than before), else ``None``."""
        info = code_info(code)
        finding = Finding(code=code, severity=Severity(severity) if severity is not None else info.severity,
                          step=self.step(), epoch=self.epoch(), message=message, advice=advice or info.advice,
                          evidence=dict(evidence or {}), layer=layer)
        return self._context.collector.report(finding, source=self.name)

    def report_verdict(self, verdict: Optional[Verdict],
                       extra: Optional[Mapping[str, Any]] = None) -> Optional[Finding]:
        """Raise what a rule in :mod:`diag.detectors` concluded (nothing for ``None``), with ``extra`` evidence the
        monitor adds; when the verdict asks for the learning-rate probe (``verdict.probe``), ask for it
        (:meth:`request_probe`). Returns the finding when it is new (or more severe than before)."""
        if verdict is None:
            return None
        evidence = {**verdict.evidence, **extra} if extra else verdict.evidence
        finding = self.report(verdict.code, verdict.message, advice=verdict.advice, evidence=evidence,
                              layer=verdict.layer, severity=verdict.severity)
        if verdict.probe is not None:
            self.request_probe(verdict.probe)
        return finding

    def request_probe(self, reason: str) -> None:
        """Ask the learning-rate probe to run, at most once per reason and fit (its own budget limits it further)."""
        if reason not in self._requested:
            self._requested.add(reason)
            self._context.request_probe(reason)

    def log_scalars(self, scalars: Mapping[str, float], step: Optional[int] = None) -> None:
        """Scalars named ``diag/...`` at ``step`` (default: the current global step), to TensorBoard or the logger's
        ``log_metrics``. A measurement read at a later step is logged at the step it was taken."""
        self._context.collector.log_scalars(scalars, self.step() if step is None else step)

    # ---- host reads -------------------------------------------------------------------------------
    def read_on_host(self, values: Any, use: Callable[[List[float]], None]) -> None:
        """Hand ``values`` (a tensor on the model's device) to the next batched host read; ``use(list_of_floats)``
        runs then, at a read step or between steps (see ``READ_EVERY``), never in this call. An exception in ``use``
        switches this monitor off, as in a hook."""
        self._driver()._host_reads.submit(values, self._guarded_use(use))

    def read_scalars_on_host(self, values: Any, use: Callable[[List[float]], None]) -> None:
        """Like :meth:`read_on_host` for a list of scalars: tensors (read as their mean), numbers, ``None`` (NaN)."""
        self._driver()._host_reads.submit_scalars(values, self._guarded_use(use))

    def _guarded_use(self, use: Callable[[List[float]], None]) -> Callable[[List[float]], None]:
        def run(values: List[float]) -> None:
            if self._disabled:
                return
            try:
                use(values)
            except Exception as exc:  # never raised into the fit: see SPEC "Never breaks the user's fit"
                self._fail(exc, "a batched host read")
        return run

    def _driver(self) -> "Monitor":
        """The monitor that drives the steps: the composing Diagnostics, else this one."""
        return self._owner if self._owner is not None and not self._is_root else self

    def _read_at_step_end(self, step: int) -> None:
        """The driver, at the end of each training batch (``step``: the global step after it): read whatever waits
        when the global step has reached a new multiple of ``READ_EVERY``."""
        block = step // READ_EVERY
        if block == self._read_block:
            return
        if self._read_block is None:  # (no on_fit_start seen: the first batch sets the phase)
            self._read_block = block
            return
        self._read_block = block
        self._read_pending()

    def _read_pending(self) -> None:
        """The driver: read whatever waits now (between steps: validation end, epoch end, fit end, a checkpoint)."""
        if not len(self._host_reads):
            return
        try:
            self._host_reads.read()
        except Exception as exc:  # (each monitor's part is guarded; this is the read itself)
            log.warning("lightning-diag: %s could not read its statistics from the device: %s: %s", self.name,
                        type(exc).__name__, exc)

    def world_size(self) -> int:
        return int(getattr(self._trainer, "world_size", 1) or 1) if self._trainer is not None else 1

    def reduce(self, tensor: Any, op: str = "mean") -> Any:
        """Reduce a tensor of statistics across DDP ranks (``"mean"`` or ``"sum"``); a no-op on one process.

        Every rank must call this at the same point with a tensor of the same shape (no collective from one
        rank only): call it from hooks that run on every rank at the same steps.
        """
        if self.world_size() <= 1:
            return tensor
        return self._trainer.strategy.reduce(tensor, reduce_op=op)

    def is_global_zero(self) -> bool:
        return self._trainer is None or bool(getattr(self._trainer, "is_global_zero", True))

    # ---- failure ----------------------------------------------------------------------------------
    _off_hooks: Any = frozenset()  # hooks routed off a monitor used alone (see _show)
    _host_known = False  # a hook got a Trainer (or diag.watch's stand-in for one): see _foreign_host

    def _foreign_host(self, hook: str, args: tuple) -> bool:
        """Whether ``hook`` came without a Trainer: ``Fabric(callbacks=[...])`` hands hooks whatever ``fabric.call``
        passes. The monitor then stays off, with one warning that says what to use, instead of failing in every hook."""
        host = args[0] if args else None
        if hasattr(host, "global_step"):
            self._host_known = True
            return False
        if not self._disabled:
            self._disabled = True
            got = type(host).__name__ if args else "no arguments"
            log.warning("lightning-diag: %s is a Lightning Trainer callback, but %s got %s instead of a Trainer "
                        "(Fabric(callbacks=[...]) passes what fabric.call is given); it stays off. In a Fabric or plain "
                        "PyTorch loop use `session = diag.watch(model, optimizer, loss_fn=loss_fn, fabric=fabric)` and "
                        "call `session.step(loss, batch)` after each optimizer step (README: Fabric and plain PyTorch).",
                        self.name, hook, got)
        return True

    def _fail(self, exc: BaseException, hook: str) -> None:
        self._disabled = True
        try:
            self._release()
        except Exception:
            pass
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        location = f"{os.path.basename(where.filename)}:{where.lineno}" if where else "?"
        detail = clip_text(" ".join(str(exc).split()), INTERNAL_ERROR_DETAIL_CHARS)  # one line, bounded
        try:
            self.report(
                "diag_internal_error",
                clip_text(f"{self.name} failed in {hook} ({type(exc).__name__}: {detail}) at {location} and switched "
                          f"itself off.", INTERNAL_ERROR_MESSAGE_CHARS),
                advice="Training continues unaffected; the other monitors keep watching. Please report this message "
                       "to the lightning-diag maintainers.",
                evidence={"monitor": self.name, "hook": hook, "exception": type(exc).__name__, "detail": detail,
                          "location": location},
                layer=self.name,
            )
        except Exception:
            pass
        log.warning("lightning-diag: %s switched off after an internal error in %s: %s: %s", self.name, hook,
                    type(exc).__name__, detail)
        log.debug("lightning-diag: %s: the internal error in %s in full", self.name, hook, exc_info=exc)

    def _after_batch(self, step: int) -> None:
        """The root's last duty of each training batch, with the global step after it: the routing for the next."""
        router = self.__dict__.get("_router")
        if router is not None:
            router.plan(step)

    def _release(self) -> None:
        """Release resources (forward hooks, copies). Called at teardown and when the monitor fails."""

    # ---- Lightning plumbing shared by all monitors -------------------------------------------------
    # Subclasses override any hook freely (no need to call super()): the duties below run around the outermost
    # override of each hook, see _guard.
    def _run_duty(self, hook: str, when: str, args: tuple, kwargs: Optional[Mapping[str, Any]] = None) -> None:
        try:
            if when == "before" and hook in ("setup", "on_fit_start") and args:
                self._trainer = args[0]
                if hook == "on_fit_start":
                    self._read_block = int(getattr(args[0], "global_step", 0) or 0) // READ_EVERY
            if when == "before" and hook == "setup" and (kwargs or {}).get("stage", args[2:3] and args[2]) == "fit":
                if self._fits:  # the same callback object in a new fit (a checkpoint's state is loaded after setup)
                    self._start_clean()
                self._fits += 1
                if self._is_root:
                    self._build_router()
            if not self._is_root:
                if when == "after" and hook == "teardown":
                    self._release()
                return
            collector = self._context.collector
            if when == "before" and hook == "on_fit_start":
                sinks = self._make_sinks(args[0])
                collector.open(sinks)
                self._findings_file = next((s.path for s in sinks if isinstance(s, JsonlSink) and s.path
                                            and not s._failed), None)
            elif when == "after" and hook == "on_train_batch_end":
                step = self.__dict__.pop("_step_at_batch_end", None)  # (Diagnostics read it for its hook already)
                if step is None:
                    step = self.step()
                self._read_at_step_end(step)
                collector.flush(step)
                self._after_batch(step)
            elif when == "after" and hook in ("on_train_epoch_end", "on_validation_end"):
                self._read_pending()
                collector.flush(self.step())
            elif when == "after" and hook in ("on_fit_end", "on_exception"):
                self._read_pending()
                collector.flush(self.step(), force=True)
                collector.close()
            elif when == "after" and hook == "teardown":
                self._host_reads.clear()
                self._release()
        except Exception as exc:  # a sink failing must not break the fit either
            log.warning("lightning-diag: %s could not write its output in %s: %s: %s", self.name, hook,
                        type(exc).__name__, exc)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pass

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        pass

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        pass

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        pass

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        pass

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        pass

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pass

    # sink options, set by subclasses' __init__ through _set_output_options
    _console: bool = True
    _jsonl: bool = True
    _tensorboard: bool = True

    def _make_sinks(self, trainer: Any) -> list:
        """Where findings go for this run; the host adapter decides (``diag.callbacks``: the Trainer's loggers)."""
        if not getattr(trainer, "is_global_zero", True):
            return []  # findings are emitted once, on rank zero
        return [ConsoleSink()] if self._console else []

    def _start_clean(self) -> None:
        """Forget the last fit: its findings and statistics, as if the monitor were new (``EarlyStopping`` resets at
        fit start the same way). The state is rebuilt by the constructor, from the arguments it was given; what ties
        the monitor into the run (shared context, composing callback, per-instance hook overrides) stays."""
        if self._is_root:
            self._context = DiagContext()
        args, kwargs = self.__dict__.get("_init_args", ((), {}))
        try:
            fresh = type(self)(*args, **kwargs)
        except Exception as exc:  # a subclass that cannot be rebuilt: keep its statistics, start the findings clean
            log.debug("lightning-diag: %s keeps its statistics for the new fit (%s: %s)", self.name,
                      type(exc).__name__, exc)
            return
        kept = {name: value for name, value in self.__dict__.items()
                if name in _KEPT_ON_NEW_FIT or (callable(value) and (name.startswith(_HOOK_NAMES_PREFIX) or name in _GUARDED_NAMES))}
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        self.__dict__.update(kept)

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        try:
            if self._is_root:
                self._read_pending()  # a checkpoint holds every measurement taken so far
            state = {"monitor": self._monitor_state()}
            if self._is_root:
                state["collector"] = self._context.collector.state_dict()
            return state
        except Exception as exc:
            self._fail(exc, "state_dict")
            return {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if "collector" in state_dict and self._is_root:
            self._context.collector.load_state_dict(state_dict["collector"])
        if "monitor" in state_dict:
            self._load_monitor_state(state_dict["monitor"])

    #: The attributes a checkpoint holds (see :mod:`diag.monitors.state`: each saved under its name without the leading
    #: underscore, loaded back into the value the constructor built). A subclass adds to its parent's:
    #: ``STATE = LossCurveMonitor.STATE + ("_mine",)``.
    STATE: Tuple[str, ...] = ()

    def _monitor_state(self) -> Dict[str, Any]:
        """The monitor's own statistics, O(layers): the attributes named in ``STATE``."""
        return save_state(self, self.STATE)

    def _load_monitor_state(self, state: Mapping[str, Any]) -> None:
        """Restore the attributes named in ``STATE``; one the checkpoint lacks keeps its constructor value."""
        load_state(self, self.STATE, state)


# Every hook a host may call (Lightning's Callback hooks): the base answers those it does not define with a no-op, so a
# host that is not Lightning's (diag.watch's loop) can call any of them; a monitor receives only those it defines
# (see Monitor._implements).
HOOKS = ("setup", "teardown", "on_fit_start", "on_fit_end", "on_sanity_check_start", "on_sanity_check_end",
         "on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start",
         "on_train_batch_end", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
         "on_before_zero_grad", "on_validation_start", "on_validation_end", "on_validation_epoch_start",
         "on_validation_epoch_end", "on_validation_batch_start", "on_validation_batch_end", "on_test_start",
         "on_test_end", "on_test_epoch_start", "on_test_epoch_end", "on_test_batch_start", "on_test_batch_end",
         "on_predict_start", "on_predict_end", "on_predict_epoch_start", "on_predict_epoch_end",
         "on_predict_batch_start", "on_predict_batch_end", "on_exception", "on_save_checkpoint", "on_load_checkpoint")


def _no_op(self: "Monitor", *args: Any, **kwargs: Any) -> None:
    return None


for _name in HOOKS:
    if _name not in vars(Monitor):
        setattr(Monitor, _name, _no_op)
_guard_class(Monitor)
# What a monitor keeps when a new fit starts it clean (Monitor._start_clean): what ties it into the run, not its state.
_KEPT_ON_NEW_FIT = frozenset({"_context", "_is_root", "_owner", "_trainer", "_init_args", "_fits"})
# A per-instance hook override (a name of Lightning's callback hooks) is kept on a new fit too.
_HOOK_NAMES_PREFIX = "on_"


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return value


def check_fraction(name: str, value: Any, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"`{name}` must be a number in [{low}, {high}], got {value!r}.")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
    return float(value)
