"""The learning-rate probe, without Lightning: train throw-away copies of the current state on one frozen batch.

The study note's rule: only a large change of the learning rate tells a learning-rate problem from a code
problem. :func:`run_probe` automates it. For each learning-rate factor (default 1e-2 ... 1e2 of the current
rate) it starts from the same weights and a fresh copy of the optimizer state, takes a few dozen steps on the
first half of a small frozen batch (part ``A``), and records how far the loss falls. It also fits the same
batch with the inputs zeroed (Karpathy's input-independent baseline) and measures every fit on the second half
of the batch (part ``B``), which the probe never trains on.

Everything the probe touches is restored bitwise when it returns (also when it fails): parameter values, buffers
(BatchNorm running statistics and ``num_batches_tracked``), ``.grad`` of every parameter (the same tensor
objects), ``requires_grad``, the train/eval mode of every submodule, the RNG states (torch CPU and CUDA, numpy,
Python ``random``) and the state of torchmetrics metrics inside the module. The user's optimizer and LR
schedulers are only read: each factor trains with a new optimizer of the same class built over the same
parameters and loaded with a deep copy of the state. The probe trains the real module in place and restores
it, instead of training a ``deepcopy``: a LightningModule holds its trainer (and with it the data loaders), and
parameter identity keeps the optimizer's per-parameter state aligned. Cost in memory: one extra copy of the
parameters and buffers, plus one optimizer state copy at a time.

The rules that turn a :class:`ProbeResult` into a verdict live in :mod:`diag.detectors.lr_probe`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import random
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from diag.batch import batch_size, halves, map_tensors, targets_of, zero_inputs  # noqa: F401 (zero_inputs: the probe's default)

# The factors of the current learning rate tried on the frozen batch: four orders of magnitude around it, as the
# issue asks ("1e-2 ... 1e2 of the current LR").
DEFAULT_FACTORS: Tuple[float, ...] = (1e-2, 1e-1, 1.0, 1e1, 1e2)
# When the best factor sits at an edge of the sweep and still improves, one more decade is tried in that direction,
# at most this many times (a learning rate 1000x too small or too large is still found; measured: Adam at 1e-7 on
# the digits needs 1e4x to fit the batch in 30 steps).
MAX_EXTRA_DECADES = 3
# The edge is extended only while the best factor is still short of fitting the batch, and beats its neighbour
# (downwards by at least EDGE_MIN_GAIN; upwards by anything).
EDGE_DONE_PROGRESS = 0.5
EDGE_MIN_GAIN = 1e-3
# Steps per factor: "a few dozen". Measured on the digits MLP/CNN and a GRU: a healthy model at a usable learning
# rate takes a 32-sample batch's loss down by more than half in 30 steps.
DEFAULT_STEPS = 30
# Samples in the frozen batch (split in half: A is trained on, B is held out).
DEFAULT_BATCH_SAMPLES = 64
# A loss this many times above its start counts as diverged: the factor's run stops early.
DIVERGED_RATIO = 10.0
# Every factor runs all its steps unless it diverges: stopping once the batch is fitted would hide what a too-high
# rate does to the held-out half in the later steps (measured: Adam at lr=3 looked fine when stopped early).
# The probe's cost is projected after this many steps of its first factor (and again after the whole first factor):
# a sweep that would not fit its time budget stops there, having cost a few steps.
BUDGET_CHECK_STEPS = 3
# Fixed seed inside the probe: every factor sees the same dropout masks; the caller's RNG state is restored after.
PROBE_SEED = 20240501


class ProbeUnavailable(Exception):
    """The probe cannot run on this model or optimizer (the reason is in the message); not an internal error."""


class ProbeOverBudget(ProbeUnavailable):
    """The sweep would take longer than the time it was given (projected from its first steps); nothing was judged."""

    def __init__(self, projected: float, allowed: float) -> None:
        super().__init__(f"a sweep would take about {projected:.2f}s (projected from its first steps), more than "
                         f"the {allowed:.2f}s its budget allows")
        self.projected, self.allowed = projected, allowed


@dataclasses.dataclass
class FactorResult:
    factor: float
    lr: float
    start_loss: float
    final_loss: float  # on A after the steps (nan/inf when it diverged)
    heldout_loss: float  # on B after the steps
    steps_run: int
    diverged: bool
    peak_loss: float = math.nan  # the highest loss on A seen during the steps
    heldout_start_loss: float = math.nan  # on B at the starting weights
    accuracy: float = math.nan  # on A after the steps: the share of argmax predictions equal to integer class targets

    @property
    def peak_ratio(self) -> float:
        """Highest loss during the steps over the start (1.0: never rose; inf: diverged)."""
        if self.diverged or not math.isfinite(self.peak_loss) or self.start_loss <= 0:
            return math.inf
        return max(self.peak_loss, self.final_loss) / self.start_loss

    @property
    def heldout_ratio(self) -> float:
        """Held-out loss after the steps over before (below 1: what was learned on A carried over to B)."""
        if math.isnan(self.heldout_loss) and not self.diverged:
            return 1.0  # nothing held out (a batch that could not be split)
        if self.diverged or not math.isfinite(self.heldout_loss):
            return math.inf
        if not self.heldout_start_loss > 0:
            return 1.0 if self.heldout_loss <= self.heldout_start_loss else math.inf
        return self.heldout_loss / self.heldout_start_loss

    @property
    def loss_fraction(self) -> float:
        """Final loss as a fraction of the start (0.15: fell 85%; 1.4: rose 40%; inf: diverged)."""
        if self.diverged or not math.isfinite(self.final_loss):
            return math.inf
        if self.start_loss <= 0:
            return 1.0
        return self.final_loss / self.start_loss

    @property
    def progress(self) -> float:
        """1 - loss_fraction: how much of the start loss the steps removed (negative: it rose)."""
        return 1.0 - self.loss_fraction


@dataclasses.dataclass
class ProbeResult:
    base_lr: float
    steps: int
    samples_fit: int
    samples_heldout: int
    start_loss: float  # on A at the probe's starting weights
    start_heldout_loss: float  # on B at the starting weights
    factors: List[FactorResult]
    # input-independent baseline, fitted at the best factor
    zero_input_factor: float = math.nan
    zero_input_start_loss: float = math.nan
    zero_input_final_loss: float = math.nan  # on zeroed A after the steps
    zero_input_heldout_loss: float = math.nan  # on zeroed B after the steps
    real_input_final_loss: float = math.nan  # on A after the steps at that factor (same as the factor's final_loss)
    zero_input_accuracy: float = math.nan  # argmax accuracy on zeroed A after the zero-input fit (see class_accuracy)
    real_input_accuracy: float = math.nan  # the same on A after the steps at that factor
    outputs_look_like_probabilities: bool = False
    probability_width: int = 0  # when the outputs look like probabilities: their width (the class count C)
    params_without_gradient: List[str] = dataclasses.field(default_factory=list)
    from_snapshot: bool = False
    seconds: float = 0.0
    trainable_params: int = 0  # parameters the optimizer trains (capacity, for the code-bug rules)
    first_last_grad_ratio: float = math.nan  # gradient norm of the first weight matrix over the last one's
    # Units that do nothing on the probe's batch at its starting weights, per activation module: (kind, share of units),
    # kind "dead" (a ReLU-family unit at zero for every sample) or "saturated" (sigmoid/tanh at its limits for all).
    unit_states: Dict[str, Tuple[str, float]] = dataclasses.field(default_factory=dict)
    whole_batch: bool = False  # the batch could not be split (a stateful model): fitted whole, nothing held out
    fresh_init: bool = False  # this sweep started from a fresh initialization (the control before a code-bug verdict)

    def factor(self, f: float) -> Optional[FactorResult]:
        return next((r for r in self.factors if math.isclose(r.factor, f, rel_tol=1e-6)), None)

    @property
    def current(self) -> Optional[FactorResult]:
        return self.factor(1.0)

    @property
    def best(self) -> Optional[FactorResult]:
        finite = [r for r in self.factors if not r.diverged and math.isfinite(r.final_loss)]
        if not finite:
            return None
        # ties (within 1% progress): prefer the factor closest to the current learning rate
        top = max(r.progress for r in finite)
        near = [r for r in finite if r.progress >= top - 0.01]
        return min(near, key=lambda r: abs(math.log10(r.factor)))

    def evidence(self) -> Dict[str, Any]:
        ev: Dict[str, Any] = {"current_lr": self.base_lr, "probe_steps": self.steps, "probe_samples": self.samples_fit,
                              "start_loss": self.start_loss}
        for r in sorted(self.factors, key=lambda r: r.factor):
            ev[f"loss_fraction@x{r.factor:g}"] = r.loss_fraction if math.isfinite(r.loss_fraction) else "diverged"
        if math.isfinite(self.zero_input_final_loss):
            ev["zero_input_loss_after_fit"] = self.zero_input_final_loss
            ev["real_input_loss_after_fit"] = self.real_input_final_loss
        if math.isfinite(self.real_input_accuracy):
            ev["real_input_accuracy_after_fit"] = self.real_input_accuracy
            ev["zero_input_accuracy_after_fit"] = self.zero_input_accuracy
            ev["heldout_loss_zero_input_fit"] = self.zero_input_heldout_loss
        if math.isfinite(self.zero_input_start_loss):
            ev["zero_input_loss_start"] = self.zero_input_start_loss
        ev["heldout_loss_start"] = self.start_heldout_loss
        ratios = [r.heldout_loss / self.start_heldout_loss for r in self.factors
                  if not r.diverged and math.isfinite(r.heldout_loss) and self.start_heldout_loss > 0]
        if ratios:
            ev["heldout_best_ratio"] = min(ratios)
        best = self.best
        if best is not None:
            ev["heldout_loss_best_fit"] = best.heldout_loss
        if self.outputs_look_like_probabilities:
            ev["outputs_look_like_probabilities"] = 1
        if self.params_without_gradient:
            ev["params_without_gradient"] = ", ".join(self.params_without_gradient[:8])
        if self.from_snapshot:
            ev["from_last_finite_snapshot"] = 1
        if self.whole_batch:
            ev["whole_batch_no_heldout"] = 1
        ev["probe_seconds"] = round(self.seconds, 4)
        return ev


# ---- saving and restoring ----------------------------------------------------------------------------------
def _metric_modules(module: nn.Module) -> List[nn.Module]:
    """torchmetrics ``Metric`` submodules: their accumulated states are attributes outside the state dict."""
    return [m for m in module.modules() if hasattr(m, "_defaults") and hasattr(m, "_update_count")]


_MODULE_DICTS = ("_parameters", "_buffers", "_modules")
_MISSING = object()


def _plain_attributes(m: nn.Module) -> Dict[str, Any]:
    """The bindings of a module's own attributes (not its parameters, buffers or submodules): a shallow copy."""
    return {k: v for k, v in m.__dict__.items() if k not in _MODULE_DICTS}


class AttributeBindings:
    """The plain attributes of every submodule of ``module`` (an RNN's ``self.hidden`` carried across batches, a step
    counter), to be put back after an extra ``training_step``: rebound ones get their old object, new ones go."""

    def __init__(self, module: nn.Module) -> None:
        self.saved = [(m, _plain_attributes(m)) for m in module.modules()]
        # the registries too: a reset_parameters() that assigns new nn.Parameter objects (instead of filling the old
        # ones in place) must not leave the module training tensors its optimizer does not hold
        self.registries = [(m, {name: dict(getattr(m, name)) for name in _MODULE_DICTS}) for m in module.modules()]

    def restore(self) -> None:
        for m, saved in self.saved:
            now = m.__dict__
            for name in [k for k in now if k not in saved and k not in _MODULE_DICTS]:
                del now[name]
            for name, value in saved.items():
                if now.get(name, _MISSING) is not value:
                    now[name] = value
        for m, registries in self.registries:
            for name, saved_items in registries.items():
                current = getattr(m, name)
                if current.keys() != saved_items.keys() or any(current[k] is not v for k, v in saved_items.items()):
                    current.clear()
                    current.update(saved_items)


def _no_log(*_args: Any, **_kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def quiet_logging(module: Any) -> Iterator[None]:
    """Silence ``self.log``/``self.log_dict`` of a LightningModule while an extra ``training_step`` runs (the probe's
    sweep, the gradient noise pass).

    The two methods are shadowed by instance attributes that do nothing, then the instance attributes are removed
    (or the user's own instance attributes put back), so nothing the extra step computes reaches the logger, the
    progress bar or ``trainer.callback_metrics``. Direct writes to ``self.logger.experiment`` cannot be caught.
    """
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    object.__setattr__(module, "log", _no_log)
    object.__setattr__(module, "log_dict", _no_log)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                object.__setattr__(module, name, saved[name])
            else:
                module.__dict__.pop(name, None)


class RestorePoint:
    """Everything of ``module`` (and the process RNGs) the probe may change, saved to be put back bitwise.

    ``parameters=False``: everything but the parameters (values, ``.grad``, ``requires_grad``), for a pass that only
    reads them (the gradient noise pass: ``torch.autograd.grad`` at the current weights); no copy of the weights then.
    """

    def __init__(self, module: nn.Module, parameters: bool = True) -> None:
        self.module = module
        self.params = [(p, p.detach().clone(), p.grad, p.requires_grad) for p in module.parameters()] if parameters \
            else []
        self.buffers = [(b, b.detach().clone()) for b in module.buffers()]
        self.modes = [(m, m.training) for m in module.modules()]
        # Plain attributes a training_step may rebind (an RNN's hidden state carried across batches: ``self.hidden``):
        # their bindings are put back between factors and at the end, so each factor starts from the same state and
        # the next training batch sees the state the last one left.
        self.attributes = AttributeBindings(module)
        self.metrics = [(m, {name: copy.deepcopy(getattr(m, name)) for name in m._defaults},
                         m._update_count, getattr(m, "_computed", None)) for m in _metric_modules(module)]
        self.rng_cpu = torch.get_rng_state()
        self.rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.rng_numpy = np.random.get_state()
        self.rng_python = random.getstate()
        self.grad_enabled = torch.is_grad_enabled()

    def restore_weights(self) -> None:
        """Parameter values, buffers and attribute bindings (between factors); grads are cleared."""
        with torch.no_grad():
            for p, saved, _, _ in self.params:
                p.copy_(saved)
                p.grad = None
            for b, saved in self.buffers:
                b.copy_(saved)
        self._restore_attributes()

    def _restore_attributes(self) -> None:
        self.attributes.restore()

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved, grad, requires_grad in self.params:
                p.copy_(saved)
                p.grad = grad
                p.requires_grad_(requires_grad)
            for b, saved in self.buffers:
                b.copy_(saved)
        for m, training in self.modes:
            m.training = training
        self._restore_attributes()
        for m, states, count, computed in self.metrics:
            for name, value in states.items():
                setattr(m, name, value)
            m._update_count = count
            if hasattr(m, "_computed"):
                m._computed = computed
        torch.set_rng_state(self.rng_cpu)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state_all(self.rng_cuda)
        np.random.set_state(self.rng_numpy)
        random.setstate(self.rng_python)
        torch.set_grad_enabled(self.grad_enabled)


@dataclasses.dataclass
class WeightSnapshot:
    """A copy of parameter values, buffers and optimizer state, on their own device: where the probe starts when the
    weights went NaN or training wrecked them.

    Memory: one copy of the parameters and buffers plus the optimizer state (about 3x the parameters for Adam), on the
    device the model lives on (no host copy, no transfer over PCIe); taking one is a device-side copy, and checking it
    is one fused finiteness test (one host read).
    """

    params: List[torch.Tensor]
    buffers: List[torch.Tensor]
    optimizer_state: Dict[str, Any]
    step: int

    @classmethod
    def take(cls, module: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> "WeightSnapshot":
        with torch.no_grad():
            params = [p.detach().clone() for p in module.parameters()]
            buffers = [b.detach().clone() for b in module.buffers()]
            state = copy.deepcopy(optimizer.state_dict())  # tensors are cloned on their device
        return cls(params, buffers, state, step)

    def is_finite(self) -> bool:
        """Parameters and optimizer state all finite: one fused check, one host read."""
        return all_finite(list(self.params) + _state_tensors(self.optimizer_state))

    def load_into(self, module: nn.Module) -> None:
        with torch.no_grad():
            for p, saved in zip(module.parameters(), self.params):
                p.copy_(saved)
            for b, saved in zip(module.buffers(), self.buffers):
                b.copy_(saved)


def _state_tensors(state: Dict[str, Any]) -> List[torch.Tensor]:
    return [v for per_param in state.get("state", {}).values() for v in per_param.values() if isinstance(v, torch.Tensor)]


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every floating tensor is finite: one reduction per device, one host read (not one per tensor)."""
    flags: Dict[Any, List[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            flags.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    if not flags:
        return True
    per_device = [torch.stack(v).all() for v in flags.values()]
    first = per_device[0].device
    return bool(torch.stack([f.to(first) for f in per_device]).all())


def weights_finite(module: nn.Module) -> bool:
    """One host read: are all floating parameters finite?"""
    return all_finite(list(module.parameters()))


def optimizer_state_finite(state: Dict[str, Any]) -> bool:
    """One host read: are all floating tensors of an optimizer state dict finite?"""
    return all_finite(_state_tensors(state))


def clone_optimizer(optimizer: torch.optim.Optimizer, state: Dict[str, Any], factor: float) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class over the same parameters, loaded with a deep copy of ``state`` (its
    per-parameter state: momenta, Adam moments) and the hyperparameters ``optimizer`` has now, every group's learning
    rate multiplied by ``factor``. The user's optimizer is not touched.

    The hyperparameters are the current ones even when ``state`` is a snapshot's: ``load_state_dict`` would bring
    back the rate the snapshot was taken at, and a schedule may have moved it since (StepLR stepped per batch: 0.05
    at step 0, 1.2e-10 at step 89), so that a sweep from the snapshot would run at other rates than the one from the
    current weights it is compared with, and be reported at the current ones."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
              for g in optimizer.param_groups]
    try:
        new = type(optimizer)(groups)
        new.load_state_dict(copy.deepcopy(state))
    except Exception as exc:  # an optimizer class that cannot be rebuilt from its param groups
        raise ProbeUnavailable(f"cannot rebuild {type(optimizer).__name__} from its param groups ({exc})") from exc
    for group, now in zip(new.param_groups, optimizer.param_groups):
        for key, value in now.items():
            if key != "params":
                group[key] = value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        lr = group["lr"]
        group["lr"] = (lr * factor) if not isinstance(lr, torch.Tensor) else lr.detach().clone() * factor
    return new


def step_needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` must be given a closure (``torch.optim.LBFGS``: it evaluates the loss several times
    per step); Lightning always passes one, the probe only where it is required."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def scheduled_peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The highest rate the first parameter group's schedule names: its current ``lr``, the ``initial_lr`` every torch
    ``LRScheduler`` records (the base rate a warm-up climbs to) and ``max_lr`` (``OneCycleLR``'s peak)."""
    group = optimizer.param_groups[0]
    rates = [group.get(key) for key in ("lr", "initial_lr", "max_lr")]
    return max(float(r.item() if isinstance(r, torch.Tensor) else r) for r in rates
               if isinstance(r, (int, float, torch.Tensor)) and not isinstance(r, bool))


# ---- the probe ----------------------------------------------------------------------------------------------
def _main_output(output: Any) -> Any:
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, dict):
        output = next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
    return output


def looks_like_probabilities(output: Any) -> bool:
    """Do the model's outputs look like probabilities (each row in [0, 1] and summing to 1 over the last axis)?

    One host sync. Also read by the loss monitor on the first batch (softmax fed to cross-entropy)."""
    output = _main_output(output)
    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() < 2 or output.shape[-1] < 2:
        return False
    out = output.detach().float()
    in_unit = bool(((out >= 0) & (out <= 1)).all())
    sums = out.sum(-1)
    return in_unit and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def class_accuracy(output: Any, targets: Any) -> float:
    """The share of argmax predictions equal to integer class targets: logits ``(N, C)`` or ``(N, ..., C)`` against
    targets ``(N,)`` or ``(N, ...)`` (classes last), or ``(N, C, ...)`` against ``(N, ...)`` (classes at dim 1, as
    ``F.cross_entropy`` takes them); NaN for anything else (regression, soft targets, several outputs)."""
    output = _main_output(output)
    if not (isinstance(output, torch.Tensor) and isinstance(targets, torch.Tensor)) or not output.is_floating_point() \
            or targets.is_floating_point() or targets.dtype == torch.bool or output.dim() != targets.dim() + 1 \
            or output.dim() < 2 or targets.numel() == 0:
        return math.nan
    if output.shape[:-1] == targets.shape and output.shape[-1] >= 2:
        predicted = output.argmax(-1)
    elif output.shape[:1] + output.shape[2:] == targets.shape and output.shape[1] >= 2:
        predicted = output.argmax(1)
    else:
        return math.nan
    return float((predicted == targets.to(predicted.device)).float().mean())


def _record_output(module: nn.Module, fn: Callable[[], Any]) -> Tuple[Any, Any]:
    """Run ``fn`` once and return (its value, the model's output): the top module's forward output if it was
    called, else the output of the last leaf module that ran."""
    seen: Dict[str, Any] = {}

    def top_hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        seen["top"] = out

    def leaf_hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        seen["leaf"] = out

    handles = [module.register_forward_hook(top_hook)]
    handles += [m.register_forward_hook(leaf_hook) for m in module.modules() if not list(m.children()) and m is not module]
    try:
        value = fn()
    finally:
        for h in handles:
            h.remove()
    return value, seen.get("top", seen.get("leaf"))


_DEAD_KINDS = (nn.ReLU, nn.ReLU6)
_SATURATING = {nn.Sigmoid: (0.0, 1.0), nn.Tanh: (-1.0, 1.0), nn.Hardtanh: (-1.0, 1.0)}
# A sigmoid/tanh unit is saturated when its output stays within this share of its range from a limit for every sample
# (its derivative is then below ~2% of its peak).
SATURATION_MARGIN = 0.01


def _unit_axis(t: torch.Tensor) -> int:
    return 1 if t.dim() == 4 else t.dim() - 1  # conv maps [N, C, H, W]: channels; else the last (feature) axis


def _record_unit_states(module: nn.Module) -> Tuple[Dict[str, Tuple[str, float]], List[Any]]:
    """Forward hooks that record, per activation module, the share of units that do nothing on the batch."""
    states: Dict[str, Tuple[str, float]] = {}
    handles = []

    def hook_for(name: str, kind: str, low: float = 0.0, high: float = 0.0) -> Callable:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or out.dim() < 2 or not out.is_floating_point() or name in states:
                return
            o = out.detach().float()
            o = o.movedim(_unit_axis(o), -1).reshape(-1, o.shape[_unit_axis(o)])
            if kind == "dead":
                idle = (o <= 0).all(0)
            else:
                margin = SATURATION_MARGIN * (high - low)
                idle = ((o <= low + margin) | (o >= high - margin)).all(0)
            states[name] = (kind, float(idle.float().mean()))
        return hook

    for name, m in module.named_modules():
        if isinstance(m, _DEAD_KINDS):
            handles.append(m.register_forward_hook(hook_for(name, "dead")))
        else:
            for cls, (low, high) in _SATURATING.items():
                if type(m) is cls:
                    handles.append(m.register_forward_hook(hook_for(name, "saturated", low, high)))
    return states, handles


def fresh_optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer``'s state dict without per-parameter state (momenta, Adam moments): a fresh start."""
    state = optimizer.state_dict()
    return {"state": {}, "param_groups": copy.deepcopy(state["param_groups"])}


def reinitialize(module: nn.Module, seed: int = PROBE_SEED) -> List[str]:
    """Re-initialize ``module`` in place with each submodule's ``reset_parameters()`` under a fixed seed (the
    caller saves and restores the weights and RNG states). Returns the names of submodules that hold parameters of
    their own but have no ``reset_parameters`` (they keep their current values)."""
    torch.manual_seed(seed)
    kept: List[str] = []
    with torch.no_grad():
        for name, m in module.named_modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                before = dict(m._parameters)
                reset()
                for key, old in before.items():  # a reset that assigned new Parameter objects: back into the old ones,
                    new = m._parameters.get(key)  # which the optimizer holds
                    if old is not None and new is not old:
                        if new is not None and new.shape == old.shape:
                            old.copy_(new)
                        m._parameters[key] = old
            elif any(True for _ in m.parameters(recurse=False)):
                kept.append(name or type(m).__name__)
    # a submodule reset after its parent may have been covered by the parent's reset already: harmless
    return kept


def run_probe(module: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Any], torch.Tensor],
              batch: Any, factors: Sequence[float] = DEFAULT_FACTORS, steps: int = DEFAULT_STEPS,
              batch_samples: int = DEFAULT_BATCH_SAMPLES, zero_fn: Callable[[Any], Any] = zero_inputs,
              snapshot: Optional[WeightSnapshot] = None, extra_decades: int = MAX_EXTRA_DECADES,
              opt_state: Optional[Dict[str, Any]] = None, budget_seconds: Optional[float] = None,
              prepare: Optional[Callable[[], None]] = None) -> Optional[ProbeResult]:
    """Sweep the learning rate on a frozen batch, starting from the current state (or ``snapshot``).

    Args:
        module: the model (trained in place, then restored bitwise).
        optimizer: the user's optimizer; only read (class, param groups, state).
        loss_fn: ``batch -> scalar loss`` with the model in its current mode; must not step any optimizer.
        batch: a training batch; the first ``batch_samples`` samples are copied and halved into A (fit) and B
            (held out).
        factors: learning-rate factors; must include 1.0 (the current rate).
        steps: optimizer steps per factor.
        zero_fn: ``batch -> batch`` with the inputs zeroed, for the input-independent baseline.
        snapshot: start from these weights and optimizer state instead of the current ones (non-finite weights).
        opt_state: start from this optimizer state instead of the optimizer's (or the snapshot's).
        budget_seconds: when the first factor's time says the whole sweep would take longer, raise
            :class:`ProbeOverBudget` (extra decades also stop when the time is used up).
        prepare: called once the state is saved and before anything runs (the fresh-initialization control
            re-initializes the module there); everything it changes is restored too.

    A batch whose halves the model cannot take (a stateful model whose hidden state is sized to the full batch) is
    fitted whole, with nothing held out (``whole_batch``). Returns ``None`` when the batch has fewer than 4 samples or
    the starting loss is not a positive finite number.
    """
    started = time.perf_counter()
    parts = halves(batch, batch_samples)
    if parts is None:
        return None
    point = RestorePoint(module)
    try:
        torch.set_grad_enabled(True)
        if prepare is not None:
            prepare()
        if snapshot is not None:
            snapshot.load_into(module)
        if opt_state is None:
            opt_state = snapshot.optimizer_state if snapshot is not None else copy.deepcopy(optimizer.state_dict())
        start = RestorePoint(module)  # the probe's starting weights (== the snapshot's when given)
        base_lr = current_lr(optimizer)

        def evaluate(b: Any) -> float:
            with torch.no_grad():
                loss = loss_fn(b)
            return float(loss.detach())

        fit_part, held_part = parts
        whole = False
        torch.manual_seed(PROBE_SEED)
        unit_states, unit_hooks = _record_unit_states(module)
        try:
            try:
                start_loss_t, output = _record_output(module, lambda: loss_fn(fit_part))
            except ProbeUnavailable:
                raise
            except Exception:
                # The model cannot take half a batch (a hidden state sized to the full batch): fit it whole.
                start.restore_weights()
                fit_part, held_part, whole = map_tensors(batch, lambda t: t.detach().clone()), None, True
                unit_states.clear()
                torch.manual_seed(PROBE_SEED)
                start_loss_t, output = _record_output(module, lambda: loss_fn(fit_part))
        finally:
            for h in unit_hooks:
                h.remove()
        start_loss = float(start_loss_t.detach())
        start.restore_weights()
        if not math.isfinite(start_loss) or start_loss <= 0:
            return None
        fit_zero = zero_fn(fit_part)
        held_zero = zero_fn(held_part) if held_part is not None else None
        start_held = math.nan
        if held_part is not None:
            torch.manual_seed(PROBE_SEED)
            start_held = evaluate(held_part)
            start.restore_weights()

        held_zero_start = math.nan  # set before the zero-input fit
        missing: List[str] = []
        grad_ratio = [math.nan]  # first / last weight-matrix gradient norm at the first probe step

        runs = len(factors) + 1  # the sweep's factors and the zero-input fit
        set_up = time.perf_counter() - started

        def train(factor: float, part: Any, held: Any, note_missing: bool = False) -> FactorResult:
            start.restore_weights()
            opt = clone_optimizer(optimizer, opt_state, factor)
            needs_closure = step_needs_closure(opt)
            torch.manual_seed(PROBE_SEED)
            ran, diverged, first, peak = 0, False, math.nan, -math.inf
            began = time.perf_counter()
            for i in range(steps):
                if note_missing and i == 1:
                    began = time.perf_counter()  # the first step pays first-call costs: time the next ones
                if note_missing and i == BUDGET_CHECK_STEPS + 1 and budget_seconds is not None:
                    projected = set_up + (time.perf_counter() - began) / BUDGET_CHECK_STEPS * steps * runs
                    if projected > budget_seconds:
                        raise ProbeOverBudget(projected, budget_seconds)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(part)
                value = float(loss.detach())
                peak = max(peak, value) if math.isfinite(value) else math.inf
                if i == 0:
                    first = value
                if not math.isfinite(value) or (math.isfinite(first) and first > 0 and value > DIVERGED_RATIO * first):
                    diverged = True
                    break
                loss.backward()
                if note_missing and i == 0:
                    names = {id(p): n for n, p in module.named_parameters()}
                    for group in opt.param_groups:
                        for p in group["params"]:
                            if p.requires_grad and (p.grad is None or not bool(p.grad.detach().abs().sum() > 0)):
                                missing.append(names.get(id(p), "?"))
                    # first and last weight matrices (module order) that get a non-zero gradient: vanishing gradients
                    weights = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2 and p.grad is not None]
                    norms = [float(p.grad.detach().float().norm()) for p in (weights[:1] + weights[-1:])] if weights else []
                    norms = [n for n in norms if n > 0]
                    if len(norms) == 2 and len(weights) > 1:
                        grad_ratio[0] = norms[0] / norms[1]
                if needs_closure:  # (LBFGS re-evaluates the loss inside its step)
                    def closure() -> torch.Tensor:
                        opt.zero_grad(set_to_none=True)
                        again = loss_fn(part)
                        again.backward()
                        return again
                    opt.step(closure)
                else:
                    opt.step()
                ran += 1
            accuracy = math.nan
            if diverged:
                final = math.inf
            else:
                with torch.no_grad():
                    final_t, out = _record_output(module, lambda: loss_fn(part))
                final = float(final_t.detach())
                accuracy = class_accuracy(out, targets_of(part))
            if math.isfinite(final) and final > DIVERGED_RATIO * start_loss:
                diverged = True
            held_loss = math.nan if held is None else math.inf if diverged else evaluate(held)
            del opt
            return FactorResult(factor, base_lr * factor, first, final, held_loss, ran, diverged, peak,
                                start_held if part is fit_part else held_zero_start, accuracy)

        results: List[FactorResult] = []
        ordered_factors = sorted(factors)
        for i, f in enumerate(ordered_factors):
            results.append(train(f, fit_part, held_part, note_missing=(i == 0)))
            if i == 0 and budget_seconds is not None:
                # the whole first factor's time, a closer figure: the runs still to come must fit too
                projected = (time.perf_counter() - started) * runs
                if projected > budget_seconds:
                    raise ProbeOverBudget(projected, budget_seconds)
        per_run = (time.perf_counter() - started) / max(len(results), 1)
        # extend the sweep by a decade while the best factor sits at an edge and improves on its neighbour
        for _ in range(extra_decades):
            if budget_seconds is not None and time.perf_counter() - started + 2 * per_run > budget_seconds:
                break  # keep the time for the zero-input fit
            ordered = sorted(results, key=lambda r: r.factor)
            best = max(ordered, key=lambda r: r.progress)
            if best.progress >= EDGE_DONE_PROGRESS:
                break
            # Upwards, any gain counts: at a rate 1e4x too small every factor up to 100x moves the loss by well under
            # 0.1% (SGD at 1e-6 on a 4-class MLP), and stopping there would call a too-low rate "nothing fits".
            if best is ordered[-1] and not best.diverged and best.progress > ordered[-2].progress:
                results.append(train(best.factor * 10, fit_part, held_part))
            elif best is ordered[0] and best.progress > ordered[1].progress + EDGE_MIN_GAIN:
                results.append(train(best.factor / 10, fit_part, held_part))
            elif all(r.diverged for r in ordered) or (ordered[0].diverged is False and best.progress < 0
                                                        and ordered[0].progress >= best.progress - EDGE_MIN_GAIN):
                results.append(train(ordered[0].factor / 10, fit_part, held_part))
            else:
                break
        probabilities = looks_like_probabilities(output)
        result = ProbeResult(base_lr=base_lr, steps=steps, samples_fit=batch_size(fit_part),
                             samples_heldout=batch_size(held_part),
                             start_loss=start_loss,
                             start_heldout_loss=start_held, factors=sorted(results, key=lambda r: r.factor),
                             outputs_look_like_probabilities=probabilities,
                             probability_width=int(_main_output(output).shape[-1]) if probabilities else 0,
                             params_without_gradient=missing, from_snapshot=snapshot is not None,
                             trainable_params=sum(p.numel() for g in optimizer.param_groups for p in g["params"]
                                                  if p.requires_grad),
                             first_last_grad_ratio=grad_ratio[0], unit_states=dict(unit_states),
                             whole_batch=whole, fresh_init=prepare is not None)
        best = result.best
        if best is not None:
            torch.manual_seed(PROBE_SEED)
            start.restore_weights()
            zero_start = evaluate(fit_zero)
            start.restore_weights()
            if held_zero is not None:
                torch.manual_seed(PROBE_SEED)
                held_zero_start = evaluate(held_zero)
            zero = train(best.factor, fit_zero, held_zero)
            result.zero_input_factor = best.factor
            result.zero_input_start_loss = zero_start
            result.zero_input_final_loss = zero.final_loss
            result.zero_input_heldout_loss = zero.heldout_loss
            result.real_input_final_loss = best.final_loss
            result.zero_input_accuracy = zero.accuracy
            result.real_input_accuracy = best.accuracy
        result.seconds = time.perf_counter() - started
        return result
    finally:
        point.restore()
