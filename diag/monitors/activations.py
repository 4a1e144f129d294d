"""``ActivationMonitor``: non-zero-centered inputs, dead units and saturated units, from forward hooks.

Hooks exist only during the forward pass of a sampled training step: they are registered in
``on_train_batch_start`` of a sampled step and removed before the backward pass (``on_before_backward``) or at
the latest in ``on_train_batch_end``. Other steps, validation, sanity checking and the learning-rate probe never
see them. A hook reduces the tensor to per-feature vectors on the device at once (no host sync); when a window of
sampled steps closes, its summary is computed on the device and read with the other monitors' figures at the next
batched host read (see ``READ_EVERY`` in ``base.py``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from diag.detectors import activations as rules
from diag.stats.activations import FeatureMoments, summaries_from, summary_table

from .base import Monitor, Schedule, check_positive_int
from .state import load_state, save_state

# Layers whose input we measure (the note's "weight layer"): a per-feature mean, spread and sign.
_WEIGHT_LAYERS: Tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase)
# Activation modules by class name; subclasses are matched through their MRO.
_ACTIVATIONS = frozenset({"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU",
                          "Mish", "Softplus", "Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Hardswish", "Softsign",
                          "LogSigmoid", "Tanhshrink", "Threshold"})
_NORMS = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d", "LayerNorm",
                    "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm", "RMSNorm"})

# Smallest partial window (sampled steps) still judged at the end of training.
_MIN_PARTIAL_WINDOW = 2


def _kind_name(module: nn.Module, names: frozenset) -> Optional[str]:
    for cls in type(module).__mro__:
        if cls.__name__ in names:
            return cls.__name__
    return None


class _Layer:
    """What the monitor keeps per hooked module: its moments and what the forward order told about it."""

    __slots__ = ("name", "kind", "module_type", "moments", "data_facing", "normalized_in_front", "feeder",
                 "feeder_type", "fed_by_module")

    def __init__(self, name: str, kind: str, module_type: str) -> None:
        self.name, self.kind, self.module_type = name, kind, module_type
        self.moments = FeatureMoments(**rules.moment_settings(kind, module_type))
        self.data_facing = False
        self.normalized_in_front = False
        self.feeder: Optional[str] = None
        self.feeder_type: Optional[str] = None
        self.fed_by_module = False

    STATE = ("kind", "module_type", "data_facing", "normalized_in_front", "feeder", "feeder_type", "fed_by_module",
             "moments")

    def state_dict(self) -> Dict[str, Any]:
        return save_state(self, self.STATE)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_state(self, self.STATE, state)


class ActivationMonitor(Monitor):
    """Measures what flows between layers and flags non-zero-centered inputs, dead units and saturated units.

    Every ``interval`` optimizer steps the monitor hooks the training forward pass: the input of each weight
    layer (``Linear``, ``Conv*``, RNNs) and the output of each ReLU/sigmoid/tanh module. Over a window of
    ``window`` sampled steps it computes per layer the mean and spread of the activations, the share of input
    features that never go negative, the share of units that are zero for every sample (dead) and the share of
    sigmoid/tanh units stuck at their limits (saturated). It logs ``diag/activation_mean/<layer>``,
    ``diag/activation_std/<layer>``, ``diag/fraction_positive_inputs/<layer>``, ``diag/dead_fraction/<layer>`` and
    ``diag/saturated_fraction/<layer>`` when a window closes, and raises:

    - ``non_zero_centered_activation`` (LeCun et al. 1998): a warning only when always-positive inputs come with
      their symptom: sigmoid-like inputs (mean well above their spread) with no normalization in front, or
      offset inputs together with zig-zagging / stalled progress reported by the other monitors. ReLU inputs
      alone give at most an ``info``.
    - ``dead_units``: at least half of a layer's ReLU units zero for every sample of the window.
    - ``saturated_activations``: at least half of a layer's sigmoid/tanh units at their limits for most samples.

    Args:
        interval: measure every ``interval``-th optimizer step (other steps cost one integer comparison).
        window: sampled steps pooled before the rules judge (dead means "zero for every sample of the window").
        warmup: optimizer steps to skip before the first sampled step (0: measure the initialization too).
        max_backoff: after 10 sampled steps at ``interval`` the interval doubles each time the step count doubles, up
            to this factor (long runs cost less; ``1`` keeps it fixed).

    Example::

        from diag.callbacks import ActivationMonitor
        trainer = pl.Trainer(callbacks=[ActivationMonitor(interval=10, window=4)])
        trainer.fit(model, train_loader)
        print([(f.code, f.layer) for f in trainer.callbacks[0].findings])
    """

    STATE = ("_sampled_in_window", "_windows")  # checkpointed (see Monitor.STATE), and the layer records

    def __init__(self, interval: int = 10, window: int = 4, warmup: int = 0, max_backoff: int = 8) -> None:
        super().__init__()
        self.interval = check_positive_int("interval", interval)
        self.window = check_positive_int("window", window)
        self.warmup = check_positive_int("warmup", warmup, minimum=0)
        self.max_backoff = check_positive_int("max_backoff", max_backoff)
        self._schedule = Schedule(self.interval, self.max_backoff, offset=self.warmup)
        self._layers: Dict[str, _Layer] = {}
        self._plan: List[Tuple[nn.Module, str, str, str]] = []  # (module, name, role, type name)
        self._hooks: List[Tuple[nn.Module, bool, Any]] = []  # (module, pre-hook?, hook function), built with the plan
        self._handles: List[Any] = []
        self._sampled_in_window = 0
        self._windows = 0
        self._measuring = False
        self._sampled_now = False
        # forward-order state of the sampled forward pass
        self._weights_seen = 0
        self._act_since_weight: Optional[Tuple[str, str]] = None
        self._norm_since_weight = False
        self._last_feature_dim = -1
        self._last_output: Optional[Tuple[torch.Tensor, Any]] = None  # (tensor, its BatchMoments), this forward only

    def _state_key_args(self) -> Dict[str, Any]:
        return {"interval": self.interval, "window": self.window}

    # ---- which modules ------------------------------------------------------------------------------
    def _build_plan(self, pl_module: nn.Module) -> None:
        self._plan, self._hooks = [], []
        for name, module in pl_module.named_modules():
            if isinstance(module, _WEIGHT_LAYERS):
                role, type_name = "weight", type(module).__name__
            elif _kind_name(module, _ACTIVATIONS):
                type_name = _kind_name(module, _ACTIVATIONS)
                # the output is measured when it can die (exact zeros) or saturate
                role = "activation" if rules.judged_activation(type_name) else "order"
            elif _kind_name(module, _NORMS):
                role, type_name = "norm", _kind_name(module, _NORMS)
            else:
                continue
            self._plan.append((module, name or type(module).__name__, role, type_name))

    # ---- hooks ---------------------------------------------------------------------------------------
    def _layer(self, name: str, kind: str, type_name: str) -> _Layer:
        layer = self._layers.get(name)
        if layer is None:
            layer = self._layers[name] = _Layer(name, kind, type_name)
        return layer

    def _weight_hook(self, name: str, type_name: str, feature_dim: int):
        layer = self._layer(name, "weight", type_name)

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if not self._measuring:
                return None
            try:
                if self._weights_seen == 0:
                    layer.data_facing = True  # the first weight layer of the forward reads the data
                layer.normalized_in_front = self._norm_since_weight
                act = self._act_since_weight
                layer.feeder, layer.feeder_type = act or (None, None)
                layer.fed_by_module = act is not None
                self._weights_seen += 1
                self._act_since_weight, self._norm_since_weight = None, False
                self._last_feature_dim = feature_dim
                if args and isinstance(args[0], torch.Tensor):
                    x, last = args[0], self._last_output
                    if last is not None and last[0] is x and last[1].feature_dim == feature_dim % max(x.dim(), 1):
                        layer.moments.add(last[1])  # the activation's output, already reduced: no second pass
                    else:
                        layer.moments.update(x, feature_dim)
            except Exception as exc:  # a forward hook runs inside the user's forward: never raise there
                self._fail(exc, f"forward pre-hook of {name}")
            return None

        return pre_hook

    def _activation_hook(self, name: str, type_name: str, measured: bool):
        layer = self._layer(name, "activation", type_name) if measured else None
        order = (name, type_name)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._measuring:
                return None
            self._act_since_weight = order
            if layer is not None and isinstance(output, torch.Tensor):
                try:
                    dim = 1 if output.dim() > 2 and self._last_feature_dim == 1 else -1
                    batch = FeatureMoments.reduce(output, dim, layer.moments.saturation)
                    if batch is not None and layer.moments.add(batch):
                        self._last_output = (output, batch)
                except Exception as exc:  # never raise into the user's forward
                    self._fail(exc, f"forward hook of {name}")
            return None

        return hook

    def _norm_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._measuring:
            self._norm_since_weight = True
        return None

    def _register(self) -> None:
        self._remove()
        if not self._hooks:  # the hook functions, made once per plan
            for module, name, role, type_name in self._plan:
                if role == "weight":
                    dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
                    self._hooks.append((module, True, self._weight_hook(name, type_name, dim)))
                elif role in ("activation", "order"):
                    self._hooks.append((module, False, self._activation_hook(name, type_name, role == "activation")))
                else:
                    self._hooks.append((module, False, self._norm_hook))
        for module, pre, hook in self._hooks:
            self._handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))
        self._weights_seen, self._act_since_weight, self._norm_since_weight = 0, None, False
        self._last_feature_dim = -1
        self._measuring = True

    def _remove(self) -> None:
        self._measuring = False
        self._last_output = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _release(self) -> None:
        self._remove()

    # ---- Lightning hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._build_plan(pl_module)

    def _is_sampled(self, step: int) -> bool:
        return self._schedule.due(step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if not self._is_sampled(step):
            return
        if not self._plan:
            self._build_plan(pl_module)
        self._register()
        self._sampled_now = True

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self._handles:
            self._remove()  # the forward is done: backward recomputation (checkpointing) must not count

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._sampled_now:
            return
        self._remove()
        self._sampled_now = False
        self._sampled_in_window += 1
        if self._sampled_in_window >= self.window:
            self._close_window()

    def wants(self, step: int) -> Dict[str, float]:
        """The batch hooks of the next sampled step only."""
        wake = self._schedule.next_due(step)
        return {"on_train_batch_start": wake, "on_before_backward": wake, "on_train_batch_end": wake}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove()
        if self._sampled_in_window >= min(_MIN_PARTIAL_WINDOW, self.window):
            self._close_window()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._remove()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove()

    # ---- judging -------------------------------------------------------------------------------------
    def _close_window(self) -> None:
        layers = [layer for layer in self._layers.values() if not layer.moments.empty]
        self._sampled_in_window = 0
        if not layers:
            return
        if self.world_size() > 1:  # every rank closes its window at the same step, with the same layers
            flats = [layer.moments.flat() for layer in layers]
            total = self.reduce(torch.cat(flats), "sum")
            for layer, chunk in zip(layers, total.split([f.numel() for f in flats])):
                layer.moments.load_flat(chunk)
        moments = [layer.moments for layer in layers]
        table = summary_table(moments)
        for m in moments:
            m.reset()
        self._windows += 1
        if table is None:
            return
        step = self.step()
        self.read_on_host(table, lambda values: self._judge(layers, summaries_from(values, moments), step))

    def _judge(self, layers: List[_Layer], summaries: List[Mapping[str, float]], step: Optional[int] = None) -> None:
        signs = rules.symptoms(self._context.signals)
        scalars: Dict[str, float] = {}
        for layer, summary in zip(layers, summaries):
            view = rules.LayerView(
                name=layer.name, kind=layer.kind, module_type=layer.module_type, summary=summary,
                data_facing=layer.data_facing, normalized_in_front=layer.normalized_in_front, feeder=layer.feeder,
                feeder_type=layer.feeder_type,
                dead_from_input=layer.kind == "weight" and not layer.fed_by_module)
            scalars[f"diag/activation_mean/{layer.name}"] = summary["mean"]
            scalars[f"diag/activation_std/{layer.name}"] = summary["std"]
            if layer.kind == "weight":
                scalars[f"diag/fraction_positive_inputs/{layer.name}"] = summary["fraction_positive"]
            if rules.dead_units_applies(view):
                scalars[f"diag/dead_fraction/{layer.name}"] = summary["dead_fraction"]
            if rules.saturated_activations_applies(view):
                scalars[f"diag/saturated_fraction/{layer.name}"] = summary["saturated_fraction"]
            for verdict in (rules.non_zero_centered(view, signs), rules.dead_units(view),
                            rules.saturated_activations(view, signs)):
                self.report_verdict(verdict)
        self.log_scalars({k: v for k, v in scalars.items() if v == v}, step)  # NaN-free

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _monitor_state(self) -> Dict[str, Any]:
        return {**super()._monitor_state(), "layers": {name: layer.state_dict() for name, layer in self._layers.items()}}

    def _load_monitor_state(self, state: Mapping[str, Any]) -> None:
        super()._load_monitor_state(state)
        for name, saved in dict(state.get("layers", {})).items():  # a layer record is built first, then loaded
            self._layer(name, saved["kind"], saved["module_type"]).load_state_dict(saved)
