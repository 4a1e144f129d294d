"""The schedule as data: which monitor receives which hook, worked out from what each monitor declares.

A monitor declares, in :meth:`~diag.monitors.base.Monitor.wants`, the first step at which it next needs each of its
per-step hooks; a monitor that declares nothing receives every hook it implements. After each training batch the
router asks only the monitors whose answer may have changed (one that needs a hook now, or whose next step has come)
and routes the hooks on or off. A probe request (``DiagContext.request_probe``) is the one event that wakes a
monitor between its steps: those that declare ``WAKES_ON_PROBE_REQUEST`` get every hook back at once.

Like Cockpit's ``should_compute(global_step)``: monitors never sleep or wake themselves; between its steps a monitor
costs nothing, not even an early return (on a ~4 ms step every call of a finished hook is a measurable cost).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence

NEVER = math.inf  # a hook not needed again in this fit
# Per-step hooks a host calls only when the callback's attribute is callable (Lightning's ``_call_callback_hooks``):
# one nobody needs is hidden. (``on_train_batch_end`` carries the root's duties and is never hidden.)
PER_STEP_HOOKS = frozenset({"on_train_batch_start", "on_before_backward", "on_after_backward",
                            "on_before_optimizer_step", "on_before_zero_grad", "on_validation_batch_start",
                            "on_validation_batch_end"})
# The hooks a monitor may schedule in ``wants``.
SCHEDULED_HOOKS = tuple(sorted(PER_STEP_HOOKS | {"on_train_batch_end"}))


class Router:
    """Receivers of each hook, in monitor order, for ``monitors``.

    Args:
        monitors: the monitors, in the order they receive each hook.
        hooks: every hook name that may be forwarded.
        implements: ``(monitor, hook) -> bool``, whether the monitor has the hook.
        show: called with ``(hook, has_receivers)`` when a hook gains its first receiver or loses its last (the host
            hides a hook nobody needs from Lightning).
    """

    def __init__(self, monitors: Sequence[Any], hooks: Sequence[str], implements: Callable[[Any, str], bool],
                 show: Callable[[str, bool], None] = lambda hook, on: None) -> None:
        self.monitors = list(monitors)
        self._rank = {id(m): i for i, m in enumerate(self.monitors)}
        self._show = show
        # the bound hooks, taken once: a hook routed off and on again is the same object (a per-instance override, e.g.
        # a wrapper, is kept; a hook hidden on the instance, None, is the class's)
        self._bound = {(id(m), hook): _bound_hook(m, hook) for m in self.monitors for hook in hooks
                       if implements(m, hook)}
        self.table: Dict[str, List[Callable]] = {
            hook: [self._bound[(id(m), hook)] for m in self.monitors if (id(m), hook) in self._bound] for hook in hooks}
        # A subclass that overrides a hook without declaring its own ``wants`` receives that hook on every call.
        self._undeclared = [_overridden_below_wants(m, hooks) for m in self.monitors]
        self._ask_at = [0.0] * len(self.monitors)  # the step from which each monitor's declaration is asked again
        self._next_ask = 0.0
        for hook in hooks:
            show(hook, bool(self.table[hook]))

    # ---- calling ------------------------------------------------------------------------------------------
    def call(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook`` on its receivers; a receiver woken during the loop (a probe request) is called too, at the
        position it has in monitor order."""
        methods = self.table[hook]
        for method in methods:
            method(*args, **kwargs)
        self._call_woken(hook, methods, args, kwargs)

    def call_around(self, hook: str, between: Callable[[], None], args: tuple) -> None:
        """Like :meth:`call`, with ``between()`` run before the first receiver that acts on what the others measured
        (``ACTS_ON_REQUESTS``), or after all of them."""
        methods = self.table[hook]
        done = False
        for method in methods:
            if not done and getattr(method.__self__, "ACTS_ON_REQUESTS", False):
                between()
                done = True
            method(*args)
        if not done:
            between()
        self._call_woken(hook, methods, args, {})

    def _call_woken(self, hook: str, called: List[Callable], args: tuple, kwargs: Dict[str, Any]) -> None:
        if self.table[hook] is not called:
            seen = set(called)
            for method in self.table[hook]:
                if method not in seen:
                    method(*args, **kwargs)

    # ---- routing --------------------------------------------------------------------------------------------
    def plan(self, step: int) -> None:
        """After a training batch (``step``: the global step the next batch starts with): route each hook a monitor
        declared to what it needs from ``step`` on."""
        if step < self._next_ask:
            return
        for i, monitor in enumerate(self.monitors):
            if self._ask_at[i] > step:
                continue
            needed_now, later = False, NEVER
            try:
                wanted = {} if getattr(monitor, "_disabled", False) else monitor.wants(step)
            except Exception as exc:  # a declaration that raises switches its monitor off, as a hook that raises does
                fail = getattr(monitor, "_fail", None)
                if fail is None:
                    raise
                fail(exc, "wants")
            if getattr(monitor, "_disabled", False):  # switched off: no per-step call at all for the rest of the fit
                for hook in SCHEDULED_HOOKS:
                    self.route(monitor, hook, False)
                self._ask_at[i] = NEVER
                continue
            for hook, at in wanted.items():
                if hook in self._undeclared[i]:
                    continue
                if at <= step:
                    needed_now = True
                    self.route(monitor, hook, True)
                else:
                    later = min(later, at)
                    self.route(monitor, hook, False)
            self._ask_at[i] = step if needed_now else later  # needed now: asked again after the next batch
        self._next_ask = min(self._ask_at, default=NEVER)

    def wake(self, monitor: Any) -> None:
        """Give ``monitor`` every hook it implements, at once (for the batch under way), and ask it again after it."""
        i = self._rank.get(id(monitor))
        if i is None or getattr(monitor, "_disabled", False):
            return
        for hook in self.table:
            self.route(monitor, hook, True)
        self._ask_at[i] = 0.0
        self._next_ask = 0.0

    def wake_on_request(self) -> None:
        """The one declared event: a probe was requested."""
        for monitor in self.monitors:
            if getattr(monitor, "WAKES_ON_PROBE_REQUEST", False):
                self.wake(monitor)

    def route(self, monitor: Any, hook: str, on: bool) -> bool:
        """Add ``monitor`` to (``on``) or remove it from the receivers of ``hook``; ``False`` when nothing changed."""
        current = self.table.get(hook)
        if current is None:
            return False
        present = next((i for i, fn in enumerate(current) if fn.__self__ is monitor), None)
        if (present is not None) == on:
            return False
        if on:  # a new list in monitor order (a loop running over the old one keeps it)
            at = self._rank[id(monitor)]
            i = 0
            while i < len(current) and self._rank[id(current[i].__self__)] < at:
                i += 1
            bound = self._bound.get((id(monitor), hook))
            if bound is None:
                return False
            self.table[hook] = current[:i] + [bound] + current[i:]
        else:
            self.table[hook] = current[:present] + current[present + 1:]
        if len(current) <= 1:  # no receiver to one, or back
            self._show(hook, bool(self.table[hook]))
        return True

    def receives(self, monitor: Any, hook: str) -> bool:
        return any(fn.__self__ is monitor for fn in self.table.get(hook, ()))


def _overridden_below_wants(monitor: Any, hooks: Sequence[str]) -> frozenset:
    mro = type(monitor).__mro__
    declared_at = next((i for i, cls in enumerate(mro) if "wants" in vars(cls)), len(mro))
    return frozenset(h for h in hooks if any(h in vars(cls) for cls in mro[:declared_at]))


def _bound_hook(monitor: Any, hook: str) -> Callable:
    own = monitor.__dict__.get(hook)
    return own if callable(own) else getattr(type(monitor), hook).__get__(monitor)
