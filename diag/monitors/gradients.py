"""``GradientMonitor``: gradient norms, update-to-weight ratio, update cosine, gradient noise scale, and the rules
exploding / vanishing / missing gradients, zig-zag updates and high gradient noise.

Which hook, which step, which rule: the monitor. Statistics live in :mod:`diag.stats.gradients` and
:mod:`diag.stats.noise_scale` (its extra pass on part of the batch in :mod:`diag.stats.noise_pass`), rules in
:mod:`diag.detectors.gradients`.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

import torch

from diag import signals
from diag.batch import batch_size, loss_of, take_samples
from diag.detectors import gradients as rules
from diag.stats.gradients import (EMA, LayerEMA, LayerGrouping, UpdateTracker, squared_norms, stack_norms,
                                  update_figures)
from diag.stats.noise_pass import MIN_SPLIT_BATCH, PartBatchRefused, part_batch_figures, part_size, rest_sq_norm
from diag.stats.noise_scale import GradientNoiseScale

from .base import BACKOFF_AFTER, NEVER, Monitor, Schedule, backed_off_interval, check_positive_int  # noqa: F401 (re-exported)
from .state import load_state, save_state

log = logging.getLogger("diag")

EARLY_SAMPLES = 5  # sampled steps that define the "early" gradient level
NOISE_RARE_FACTOR = 4  # noise estimates this many times rarer at batches where they can only be information
RECENT_LOSSES = 6  # sampled losses kept to judge recent progress when no loss monitor publishes it


def _norm_view(grad: torch.Tensor) -> torch.Tensor:
    """A dense tensor with the norm of ``grad``: a sparse gradient's stored values (coalesced: duplicates summed, as
    ``nn.Embedding(sparse=True)`` leaves them), else ``grad`` itself."""
    layout = grad.layout
    if layout == torch.strided:
        return grad
    if layout == torch.sparse_coo:
        return grad.coalesce().values()
    return grad.values()  # compressed sparse layouts store no duplicates


class _OptimizerState:
    """What the monitor tracks for one optimizer: its parameters grouped into layers and the running statistics."""

    # checkpointed: the counts per parameter only into the same parameters (by name), the rest always
    PER_PARAMETER = ("expected", "got", "had_grad")
    STATE_RENAMED = {"early": "early_log10_norms", "recent": "recent_log10_norms"}  # checkpoints of earlier releases
    STATE = PER_PARAMETER + ("early_log10_norms", "recent_log10_norms", "depth", "depth_layers", "cosine",
                             "layer_cosine", "log_ratio", "grad_to_weight", "samples", "clip_checks", "clipped")

    def __init__(self, names: List[str], params: List[torch.nn.Parameter]) -> None:
        self.grouping = LayerGrouping(zip(names, params))
        self.tracker = UpdateTracker(self.grouping)
        self.param_count = len(params)
        self.expected = [0] * len(params)  # sampled steps on which the parameter was trainable
        self.got = [0] * len(params)  # ... and had a non-zero gradient
        self.had_grad = [0] * len(params)  # ... and had a gradient at all (not None)
        self.early_log10_norms: List[float] = []
        self.recent_log10_norms: Deque[float] = collections.deque(maxlen=rules.EXPLODE_PERSISTENCE)
        self.depth = EMA(0.9)  # log10(first-layer norm / last-layer norm)
        self.depth_layers: Tuple[str, str] = ("", "")
        self.cosine = EMA(0.8)
        self.layer_cosine = LayerEMA(0.8)
        self.log_ratio = EMA(0.9)  # log10 of the median update-to-weight ratio
        self.grad_to_weight = EMA(0.9)
        self.samples = 0
        self.clip_checks = 0
        self.clipped = 0
        # built once, not on every sample: each layer's scalar names, each parameter's short name (missing gradients)
        layers = self.grouping.layers
        self.grad_norm_tags = [f"diag/grad_norm/{layer}" for layer in layers]
        self.ratio_tags = [f"diag/update_to_weight_ratio/{layer}" for layer in layers]
        self.cosine_tags = [f"diag/update_cosine/{layer}" for layer in layers]
        self.short_names = [name.rsplit(".", 1)[-1] for name in self.grouping.names]

    def state_dict(self) -> Dict[str, Any]:
        return {"names": list(self.grouping.names), **save_state(self, self.STATE)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        same_parameters = list(state.get("names", [])) == self.grouping.names
        load_state(self, self.STATE if same_parameters else self.STATE[len(self.PER_PARAMETER):], state)


class GradientMonitor(Monitor):
    """Watches gradients and updates on sampled optimizer steps.

    Measures (on sampled steps only; other steps cost an integer comparison per hook):

    * gradient norms, total and per layer (``diag/grad_norm``, ``diag/grad_norm/<layer>``), before clipping and
      unscaled under AMP; the fraction of sampled steps clipped when ``gradient_clip_val`` is set;
    * the update-to-weight ratio ``‖Δθ‖/‖θ‖`` across the optimizer step, logged as log10
      (``diag/update_to_weight_ratio``: median over layers, and per layer), published for the learning-rate probe;
    * the cosine between consecutive updates (``diag/update_cosine``, total and per layer);
    * the gradient noise scale ``B_simple = tr Σ / |G|²`` (``diag/grad_noise_scale`` next to ``diag/batch_size``).

    Rules: ``exploding_gradients``, ``vanishing_gradients`` (only while training stalls), ``missing_gradients``,
    ``zigzag_updates`` (only while the loss improves slowly), ``high_gradient_noise``.

    Noise-scale sources (McCandlish et al. 2018, appendix A.1): with ``accumulate_grad_batches > 1`` the first
    micro-batch's gradient vs the accumulated one (free); otherwise the gradient of a quarter of the sampled batch
    (half, below 16 samples), recomputed with ``training_step`` at the same parameters through
    ``torch.autograd.grad`` (``.grad``, RNG states, buffers such as BatchNorm statistics and ``self.log`` calls are
    left untouched). Under DDP the small estimate is each rank's local (micro- or quarter-) batch gradient, its
    squared norm averaged across ranks, and the big one the all-reduced gradient of the global batch. Assumes the loss is a mean over samples. Skipped under manual
    optimization.

    Args:
        interval: measure every ``interval``-th optimizer step (after the warm-up).
        warmup_steps: measure each of the first ``warmup_steps`` optimizer steps (defines the early gradient level).
        noise_scale_interval: estimate the noise scale every ``noise_scale_interval``-th step (the batch split costs
            about a quarter of a training step each time); at batches of 16 samples or more, where the gradient noise
            can only be an ``info`` finding, 4 times less often (unless accumulating or under DDP). ``0`` switches
            the noise scale off.
        track_updates: measure update-to-weight ratios and update cosines (keeps up to two copies of the parameters
            for two steps after each sampled step).
        max_backoff: after 10 samples at ``interval`` (and 10 noise estimates at ``noise_scale_interval``) the
            intervals double each time the step count doubles, up to this factor; ``1`` keeps them fixed.

    Example::

        from diag.callbacks import GradientMonitor
        trainer = pl.Trainer(callbacks=[GradientMonitor(interval=20)])
        trainer.fit(model, train_loader)
        print([f.code for f in trainer.callbacks[0].findings])
    """

    STATE = ("_noise", "_noise_window", "_early_losses", "_loss_ema", "_recent_losses",
             "_probe_requested")  # checkpointed (see Monitor.STATE), and each optimizer's (_OptimizerState.STATE)

    def __init__(self, interval: int = 20, warmup_steps: int = 5, noise_scale_interval: int = 25,
                 track_updates: bool = True, max_backoff: int = 8) -> None:
        super().__init__()
        self.interval = check_positive_int("interval", interval)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
        self.noise_scale_interval = check_positive_int("noise_scale_interval", noise_scale_interval, minimum=0)
        if not isinstance(track_updates, bool):
            raise ValueError(f"`track_updates` must be True or False, got {track_updates!r}.")
        self.track_updates = track_updates
        self.max_backoff = check_positive_int("max_backoff", max_backoff)
        self._states: Dict[int, _OptimizerState] = {}
        self._names: Dict[int, str] = {}
        self._noise = GradientNoiseScale(beta=0.9)  # logged: follows the run
        # judged: the recent window of raw estimates, averaged arithmetically with a confidence bound
        self._noise_window: Deque[Tuple[float, float, float, float]] = collections.deque(maxlen=rules.NOISE_WINDOW)
        self._batch: Any = None
        self._batch_idx = 0
        self._window_samples = 0
        self._backwards_in_window = 0
        self._micro_sq: Optional[torch.Tensor] = None  # on the device
        self._micro_size = 0
        self._sampled_step = -1  # the optimizer step just measured (for on_train_batch_end)
        self._own_loss = True
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_count = 0
        self._early_losses: List[float] = []
        self._loss_ema = EMA(0.9)
        self._recent_losses: Deque[float] = collections.deque(maxlen=RECENT_LOSSES)
        self._probe_requested = False
        self._pending_load: Dict[int, Dict[str, Any]] = {}
        self._accumulating = False
        self._automatic = True
        self._noise_rarity = 1  # noise_scale_interval multiplier (see _set_noise_rarity)
        self._build_schedules()

    def _state_key_args(self) -> Dict[str, Any]:
        return {"interval": self.interval, "warmup_steps": self.warmup_steps}

    # ---- sampling -----------------------------------------------------------------------------------
    def _build_schedules(self) -> None:
        self._samples = Schedule(self.interval, self.max_backoff, dense_until=self.warmup_steps)
        self._noise_steps = Schedule(max(1, self.noise_scale_interval) * self._noise_rarity, self.max_backoff)

    def _is_sampled(self, step: int) -> bool:
        return self._samples.due(step)

    def _is_noise_step(self, step: int) -> bool:
        if self.noise_scale_interval == 0:
            return False
        # with gradient accumulation the estimate is free (no extra pass): take it on every sampled step too
        return self._noise_steps.due(step) or (self._accumulating and self._samples.due(step))

    def _set_noise_rarity(self, trainer: Any, batch: Any) -> None:
        """The extra pass costs a quarter of a step. Noise can be the problem (a warning) only below
        ``NOISE_WARNING_MAX_BATCH`` samples; at larger batches the estimate is information, taken ``NOISE_RARE_FACTOR``
        times less often. Decided on the first batch; under DDP (ranks must agree) and with accumulation (the estimate
        is free) the interval stays as configured."""
        world = int(getattr(trainer, "world_size", 1) or 1)
        if self._accumulating or world > 1 or rules.noise_can_warn(batch_size(batch)):
            self._noise_rarity = 1
        else:
            self._noise_rarity = NOISE_RARE_FACTOR
        self._build_schedules()

    # ---- hooks --------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._names = {id(p): n for n, p in pl_module.named_parameters()}
        self._accumulating = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) > 1
        self._automatic = bool(getattr(pl_module, "automatic_optimization", True))
        self._noise_rarity = 0  # decided (and the schedules rebuilt) on the first batch of this fit

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._noise_rarity == 0:
            self._set_noise_rarity(trainer, batch)
        if self._is_noise_step(trainer.global_step):
            if self._batch is None or self._backwards_in_window == 0:
                self._batch, self._batch_idx = batch, batch_idx
            self._window_samples += batch_size(batch)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if not self._accumulating:
            return  # the count only matters within an accumulation window (see wants)
        self._backwards_in_window += 1
        if (self._backwards_in_window == 1 and trainer.accumulate_grad_batches > 1
                and self._is_noise_step(trainer.global_step) and pl_module.automatic_optimization):
            # The first micro-batch of the window: .grad holds its gradient alone, scaled by 1/accumulate (Lightning
            # divides the loss) and by the AMP loss scale when a GradScaler is used.
            grads = [_norm_view(p.grad) for p in pl_module.parameters() if p.grad is not None]
            if grads:
                # kept on the device (read with the step's other figures): |g|^2 * (accumulate / loss scale)^2
                sq = squared_norms(grads).sum().double() * float(trainer.accumulate_grad_batches) ** 2
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                if scaler is not None and scaler.is_enabled():
                    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
                    if isinstance(scale, torch.Tensor):
                        sq = sq / scale.to(device=sq.device, dtype=torch.float64) ** 2
                    else:
                        sq = sq / float(scaler.get_scale()) ** 2
                self._micro_sq = sq
                self._micro_size = batch_size(self._batch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        noise_step = noise = self._is_noise_step(step)
        sampled = self._is_sampled(step)
        if sampled or noise:
            self._measure(trainer, pl_module, optimizer, step, sampled, noise)
        elif self.track_updates:
            state = self._states.get(id(optimizer))
            if state is not None and state.tracker.pending:
                self._measure_update(self._state_for(trainer, pl_module, optimizer), step)
        self._backwards_in_window = 0
        if noise_step:
            self._batch, self._window_samples, self._micro_sq = None, 0, None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Our own loss evidence (only used when no loss monitor publishes its signals): the mean training loss since the
        # last sampled step, summed on the device without a host sync and read once per sampled step.
        if self._own_loss:
            loss = loss_of(outputs)
            if loss is not None:
                loss = loss.detach()
                self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
                self._loss_count += 1
        if self._sampled_step >= 0:
            self._sampled_step = -1
            if self._own_loss and self._context.get(signals.LOSS_SMOOTHED) is not None:
                self._own_loss = False  # a loss monitor publishes better evidence
            if self._loss_sum is not None and self._loss_count:
                count = self._loss_count
                self.read_on_host(self._loss_sum.float(), lambda values: self._observe_loss(values[0] / count))
            self._loss_sum, self._loss_count = None, 0

    def wants(self, step: int) -> Dict[str, float]:
        """With automatic optimization (one optimizer step per batch at most, taken at the step the batch started with):
        the optimizer-step hook from the next sampled or noise step, and now while an update pair is open; the batch's
        start at noise steps (it keeps the batch for the estimate; when accumulating, every sampled step is one); its
        end every step while no loss monitor publishes the loss (our own evidence), else at sampled steps;
        ``on_after_backward`` only when accumulating. Under manual optimization a batch can take several steps: every
        hook, every step."""
        if not self._automatic:
            wake = pair = start = sample = step
        else:
            sample = self._samples.next_due(step)
            noise = self._noise_steps.next_due(step) if self.noise_scale_interval else NEVER
            wake = min(sample, noise)
            start = wake if self._accumulating else noise
            pair = step if self.track_updates and any(state.tracker.pending for state in self._states.values()) \
                else wake
        return {"on_train_batch_start": start, "on_before_optimizer_step": pair,
                "on_train_batch_end": step if self._own_loss else sample,
                "on_after_backward": wake if self._accumulating else NEVER}

    def _release(self) -> None:
        for state in self._states.values():
            state.tracker.release()
        self._batch = None

    # ---- measurement --------------------------------------------------------------------------------
    def _state_for(self, trainer: Any, pl_module: Any, optimizer: Any) -> _OptimizerState:
        state = self._states.get(id(optimizer))
        count = sum([len(g["params"]) for g in optimizer.param_groups])
        if state is None or state.param_count != count:
            if not self._names:
                self._names = {id(p): n for n, p in pl_module.named_parameters()}
            params = [p for g in optimizer.param_groups for p in g["params"]]
            names = [self._names.get(id(p), f"param{i}") for i, p in enumerate(params)]
            new = _OptimizerState(names, params)
            if state is not None:  # param groups added (e.g. unfreezing): keep the running statistics by name
                old = dict(zip(state.grouping.names, zip(state.expected, state.got, state.had_grad)))
                for i, n in enumerate(names):
                    if n in old:
                        new.expected[i], new.got[i], new.had_grad[i] = old[n]
                new.early_log10_norms = state.early_log10_norms
            index = self._optimizer_index(trainer, optimizer)
            if index in self._pending_load:
                new.load_state_dict(self._pending_load.pop(index))
            state = self._states[id(optimizer)] = new
        return state

    @staticmethod
    def _optimizer_index(trainer: Any, optimizer: Any) -> int:
        for i, opt in enumerate(getattr(trainer, "optimizers", []) or []):
            if opt is optimizer or getattr(opt, "optimizer", None) is optimizer:
                return i
        return 0

    def _measure(self, trainer: Any, pl_module: Any, optimizer: Any, step: int, sampled: bool, noise: bool) -> None:
        """Take this step's figures on the device and hand them to the next batched host read (no host sync here);
        :meth:`_use_measurement` gets the numbers."""
        state = self._state_for(trainer, pl_module, optimizer)
        params = state.grouping.params
        trainable: List[int] = []
        with_grad: List[int] = []
        grads: List[torch.Tensor] = []
        for i, p in enumerate(params):  # (one pass: each attribute of a parameter is a call into torch)
            if p.requires_grad:
                trainable.append(i)
                grad = p.grad
                if grad is not None:
                    with_grad.append(i)
                    grads.append(_norm_view(grad))
        if not with_grad:  # training_step returned None: no backward, and the optimizer step changes nothing
            self._measure_update(state, step)
            return
        n = len(with_grad)
        clip_val = getattr(trainer, "gradient_clip_val", None)
        value_clip = bool(clip_val) and str(getattr(trainer, "gradient_clip_algorithm", "norm") or "norm").lower() \
            .endswith("value")
        extra: List[torch.Tensor] = []  # figures of other dtypes or shapes, after the norms
        with torch.no_grad():  # (no autograd bookkeeping for norms of parameters, instead of a detach per tensor)
            # gradient and weight norms of the same parameters in one batched norm (weights: gradient-to-weight ratio,
            # and the weights' norms of a new update pair when every parameter has a gradient); squared on the host
            norms = list(torch._foreach_norm(grads + (params if n == len(params) else [params[i] for i in with_grad])))
            if value_clip:
                device = grads[0].device
                inf_norms = torch._foreach_norm(grads, float("inf"))
                extra.append(torch.stack([x if x.device == device else x.to(device) for x in inf_norms]).amax()[None]
                             .float())
        update = None
        if self.track_updates:
            update = state.tracker.observe_norm_list(sampled, step, norms[n:] if n == len(params) else None)
        update_kind, n_update = None, 0
        if update is not None:  # stacked with this step's norms (one stack, read with them)
            update_kind, n_update = update[0], len(update[1])
            norms += update[1]
        # an update's figures are logged at the step its pair started (one TensorBoard event per gradient sample)
        update_step = self._update_step(state, step) if update is not None else step
        small = self._noise_small(trainer, pl_module, state.grouping, with_grad) if noise else None
        if small is not None:
            extra.append(small[0])
        if sampled:
            self._sampled_step = step
        layout = (n, value_clip, update_kind, n_update, small[1:] if small is not None else None)

        def use(values: List[float]) -> None:
            self._use_measurement(state, step, sampled, trainable, with_grad, clip_val, layout, values, update_step)

        figures = stack_norms(norms)
        self.read_on_host(torch.cat([figures] + extra) if extra else figures, use)

    def _measure_update(self, state: _OptimizerState, step: int) -> None:
        """The second or third step of an update pair (see :class:`UpdateTracker`), or a step without gradients."""
        update = state.tracker.observe_norms(False, step) if self.track_updates else None
        if update is not None:
            kind, update_step = update[0], self._update_step(state, step)
            self.read_on_host(update[1], lambda values: self._use_update(state, kind, values, update_step))

    @staticmethod
    def _update_step(state: _OptimizerState, step: int) -> int:
        """The step the pair of the update just observed started at (where its figures are logged)."""
        return state.tracker.update_step if state.tracker.update_step is not None else step

    def _use_measurement(self, state: _OptimizerState, step: int, sampled: bool, trainable: List[int],
                         with_grad: List[int], clip_val: Any, layout: Tuple[Any, ...], values: List[float],
                         update_step: int) -> None:
        """The numbers of one :meth:`_measure`, read from the device: statistics, scalars (at ``step``) and the rules."""
        g = state.grouping
        n, value_clip, update_kind, n_update, noise_layout = layout
        param_sq = [v * v for v in values[:n]]
        weight_total_sq = sum([v * v for v in values[n:2 * n]])
        update_values, rest = values[2 * n:2 * n + n_update], values[2 * n + n_update:]
        max_abs = None
        if value_clip:
            max_abs, rest = rest[0], rest[1:]
        small_values = rest
        total_sq = sum(param_sq)
        if noise_layout is not None and math.isfinite(total_sq):
            b_smalls, b_big, split = noise_layout
            if split is not None:  # the pass's [|G_a|², |G_big|², <G_a, G_big>]: |G_b|² of the rest of the batch
                first_sq, big_sq, dot = small_values
                small_values = [first_sq, rest_sq_norm(first_sq, big_sq, dot, *split)]
            for small_sq, b_small in zip(small_values, b_smalls):
                if math.isfinite(small_sq) and b_small < b_big:
                    self._noise.update(small_sq, total_sq, b_small, b_big)
                    self._noise_window.append((small_sq, total_sq, b_small, b_big))
        if update_kind is not None:
            self._use_update(state, update_kind, update_values, update_step)
        if not sampled:
            return
        state.samples += 1
        # per-layer gradient norms
        layer_sq = [0.0] * len(g.layers)
        layer_has = [False] * len(g.layers)
        layer_index, expected, had_grad, got = g.layer_index, state.expected, state.had_grad, state.got
        for i in trainable:
            expected[i] += 1
        for i, sq in zip(with_grad, param_sq):
            j = layer_index[i]
            layer_sq[j] += sq
            layer_has[j] = True
            had_grad[i] += 1
            if sq != 0.0:
                got[i] += 1
        total = math.sqrt(total_sq) if total_sq >= 0 else float("nan")
        if total != 0:  # an all-zero gradient (e.g. zeroed, not freed, on a skipped step) says nothing about growth
            log_total = math.log10(total) if total > 0 and math.isfinite(total) else float("inf")
            if math.isfinite(log_total) and len(state.early_log10_norms) < EARLY_SAMPLES:
                state.early_log10_norms.append(log_total)
            state.recent_log10_norms.append(log_total)
        scalars: Dict[str, float] = {"diag/grad_norm": total}
        nonzero_layers = [j for j in range(len(g.layers)) if layer_has[j] and layer_sq[j] > 0 and math.isfinite(layer_sq[j])]
        for j in nonzero_layers:
            scalars[state.grad_norm_tags[j]] = math.sqrt(layer_sq[j])
        if weight_total_sq > 0 and math.isfinite(total):
            state.grad_to_weight.update(math.log10(max(total, 1e-30)) - 0.5 * math.log10(weight_total_sq))
            tiny = state.grad_to_weight.count >= EARLY_SAMPLES and rules.gradients_tiny(state.grad_to_weight.compute())
            self._context.publish(signals.GRAD_TINY, bool(tiny))
        if len(nonzero_layers) >= 2:
            first, last = nonzero_layers[0], nonzero_layers[-1]
            state.depth.update(0.5 * (math.log10(layer_sq[first]) - math.log10(layer_sq[last])))
            state.depth_layers = (g.layers[first], g.layers[last])
        if clip_val:
            state.clip_checks += 1
            clipped = (max_abs is not None and max_abs > clip_val) if value_clip else total > clip_val
            state.clipped += int(clipped)
            scalars["diag/grad_clip_fraction"] = state.clipped / state.clip_checks
        if noise_layout is not None:
            est = self._noise.compute()
            if math.isfinite(est["noise_scale"]):
                scalars["diag/grad_noise_scale"] = est["noise_scale"]
            scalars["diag/batch_size"] = noise_layout[1]
        self.log_scalars(scalars, step)
        self._judge(state, step)

    def _noise_small(self, trainer: Any, pl_module: Any, g: LayerGrouping, with_grad: List[int]
                     ) -> Optional[Tuple[torch.Tensor, List[int], int, Optional[Tuple[int, int]]]]:
        """Squared norms of gradients over fewer samples at the current parameters, on the device, with their sample
        counts and the big batch's: ``(squared norms, [b_small, ...], b_big, None)``; or, from the batch split on one
        device, ``(part_batch_figures, [part, rest], b_big, (size, part))`` for the host to split (``rest_sq_norm``);
        ``None`` when unavailable."""
        if not pl_module.automatic_optimization or not with_grad:
            return None
        world = max(1, int(getattr(trainer, "world_size", 1) or 1))
        device = g.params[with_grad[0]].device
        if any(g.params[i].grad.layout != torch.strided for i in with_grad):
            # The pass compares two gradients entry by entry; sparse ones (nn.Embedding(sparse=True)) hold different
            # entries. Their norms are measured above; the noise scale is not.
            self.noise_scale_interval = 0
            log.info("lightning-diag: GradientMonitor does not estimate the gradient noise scale: the model has sparse "
                     "gradients (gradient norms and updates are still measured).")
            return None
        if trainer.accumulate_grad_batches > 1:
            if self._micro_sq is None or not self._micro_size or self._window_samples <= self._micro_size:
                return None
            small, b_smalls = self._micro_sq.reshape(1), [self._micro_size]
            b_big = self._window_samples * world
        else:
            size = batch_size(self._batch)
            if size < MIN_SPLIT_BATCH:
                return None
            part = part_size(size)
            figures = self._part_batch_figures(trainer, pl_module, part, [g.params[i] for i in with_grad])
            if figures is None:
                return None
            if world == 1:
                return figures, [part, size - part], size, (size, part)
            # Under DDP .grad is the all-reduced gradient, not this rank's whole batch: only the first part is usable.
            small, b_smalls = figures[:1], [part]
            b_big = size * world
        if world > 1:  # every rank reaches this at the same (globally sampled) step: average the local estimates
            small = self.reduce(small.to(device=device, dtype=torch.float64), "mean")
        return small, b_smalls, b_big, None

    def _part_batch_figures(self, trainer: Any, pl_module: Any, part: int,
                            params: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """The extra pass (:func:`diag.stats.noise_pass.part_batch_figures`): ``training_step`` on the first ``part``
        samples of the batch, under the Trainer's precision; the estimate is switched off for the run when it raises."""
        self._context.publish(signals.GRAD_EXTRA_PASS, True)
        try:
            return part_batch_figures(pl_module, lambda b: pl_module.training_step(b, self._batch_idx),
                                      take_samples(self._batch, 0, part), params, [p.grad for p in params],
                                      trainer.precision_plugin.train_step_context())
        except PartBatchRefused as refused:
            self.noise_scale_interval = 0
            log.info("lightning-diag: GradientMonitor stops estimating the gradient noise scale: training_step "
                     "on part of a batch raised %s", refused)
            return None
        finally:
            self._context.publish(signals.GRAD_EXTRA_PASS, False)

    def _use_update(self, state: _OptimizerState, second: bool, norms: List[float], step: int) -> None:
        """The figures of one update (see :meth:`UpdateTracker.observe_norms`): ratios, cosine, scalars at ``step``."""
        layers = state.grouping.layers
        parts = update_figures(second, norms, state.grouping.layer_index, len(layers))
        update_sq, weight_sq = parts["update_sq"], parts["weight_sq"]
        scalars: Dict[str, float] = {}
        log_ratios = []
        for j, tag in enumerate(state.ratio_tags):
            if update_sq[j] > 0 and weight_sq[j] > 0 and math.isfinite(update_sq[j]):
                lr = 0.5 * (math.log10(update_sq[j]) - math.log10(weight_sq[j]))
                log_ratios.append(lr)
                scalars[tag] = lr
        if log_ratios:
            median = statistics.median(log_ratios)
            state.log_ratio.update(median)
            scalars["diag/update_to_weight_ratio"] = median
            self._context.publish(signals.GRAD_UPDATE_TO_WEIGHT_RATIO, 10 ** state.log_ratio.compute())
        if "dot" in parts:
            dot, prev_sq = parts["dot"], parts["previous_update_sq"]
            total_dot, total_a, total_b = sum(dot), sum(update_sq), sum(prev_sq)
            if total_a > 0 and total_b > 0 and math.isfinite(total_dot):
                c = total_dot / math.sqrt(total_a * total_b)
                state.cosine.update(c)
                scalars["diag/update_cosine"] = c
            per_layer = {}
            for j, layer in enumerate(layers):
                if update_sq[j] > 0 and prev_sq[j] > 0 and math.isfinite(dot[j]):
                    per_layer[layer] = dot[j] / math.sqrt(update_sq[j] * prev_sq[j])
                    scalars[state.cosine_tags[j]] = per_layer[layer]
            state.layer_cosine.update(per_layer)
        if scalars:
            self.log_scalars(scalars, step)

    def _observe_loss(self, loss: float) -> None:
        if not math.isfinite(loss):
            return
        if len(self._early_losses) < EARLY_SAMPLES:
            self._early_losses.append(loss)
        self._loss_ema.update(loss)
        self._recent_losses.append(self._loss_ema.compute())

    # ---- judging ------------------------------------------------------------------------------------
    def _progress(self) -> Tuple[Optional[float], Optional[bool]]:
        """(relative loss progress over the recent window, stalled?) from the loss monitor, else our own samples."""
        progress = self._context.get(signals.LOSS_RELATIVE_PROGRESS)
        stalled = self._context.get(signals.LOSS_STALLED)
        if progress is None and len(self._recent_losses) == self._recent_losses.maxlen:
            old, new = self._recent_losses[0], self._recent_losses[-1]
            progress = (old - new) / abs(old) if old != 0 else 0.0
        if stalled is None and len(self._early_losses) == EARLY_SAMPLES and progress is not None:
            early = statistics.median(self._early_losses)
            since_start = (early - self._loss_ema.compute()) / abs(early) if early else 0.0
            stalled = rules.own_loss_stalled(progress, since_start)
        return progress, stalled

    def _loss_fraction_of_initial(self) -> Optional[float]:
        initial, now = self._context.get(signals.LOSS_INITIAL), self._context.get(signals.LOSS_SMOOTHED)
        if initial is None or now is None:
            if len(self._early_losses) < EARLY_SAMPLES:
                return None
            initial, now = statistics.median(self._early_losses), self._loss_ema.compute()
        return float(now) / float(initial) if initial and math.isfinite(float(now)) and float(initial) > 0 else None

    def _judge(self, state: _OptimizerState, step: int) -> None:
        min_samples = EARLY_SAMPLES
        early = statistics.median(state.early_log10_norms) if state.early_log10_norms else float("nan")
        progress, stalled = self._progress()
        self.report_verdict(rules.exploding_gradients(early, state.recent_log10_norms, progress))
        self.report_verdict(rules.vanishing_gradients(state.depth.compute(), state.depth.count, min_samples, stalled,
                                                      *state.depth_layers))
        self._judge_missing(state)
        worst_layer, worst = None, float("nan")
        for layer, c in state.layer_cosine.compute().items():
            if math.isfinite(c) and not (c >= worst):
                worst_layer, worst = layer, c
        found = rules.zigzag_updates(state.cosine.compute(), state.cosine.count, progress, stalled, worst_layer, worst)
        self._context.publish(signals.GRAD_ZIGZAG, found is not None)
        self.report_verdict(found)
        window = self._window_noise()
        est = window.compute()
        b = int(window.last_b_big) if window.count else 0
        self.report_verdict(rules.high_gradient_noise(est["noise_scale"], b, window.count, stalled, progress,
                                                      self._loss_fraction_of_initial()))
        # plateau evidence for the loss monitor, and the learning-rate probe's trigger
        ratio = state.log_ratio.compute()
        if state.log_ratio.count >= min_samples and math.isfinite(ratio) and not self._probe_requested:
            reason = rules.update_ratio_probe(ratio)
            if reason is not None:
                self.request_probe(reason)
                self._probe_requested = True  # one request per fit, whichever way the ratio left the range

    def _window_noise(self) -> GradientNoiseScale:
        window = GradientNoiseScale(beta=None)
        for item in self._noise_window:
            window.update(*item)
        return window

    def _judge_missing(self, state: _OptimizerState) -> None:
        if 0 not in state.got:  # (got <= had_grad) every parameter had a non-zero gradient once: nothing to report
            return
        by_layer: Dict[str, Tuple[List[str], List[str]]] = {}
        samples = 0
        for i, short in enumerate(state.short_names):
            exp = state.expected[i]
            samples = max(samples, exp)
            if not rules.missing_gradients_applies(exp):
                continue
            layer = state.grouping.layers[state.grouping.layer_index[i]]
            if state.had_grad[i] == 0:
                by_layer.setdefault(layer, ([], []))[0].append(short)
            elif state.got[i] == 0:
                by_layer.setdefault(layer, ([], []))[1].append(short)
        for layer, (none_params, zero_params) in by_layer.items():
            self.report_verdict(rules.missing_gradients(layer, none_params, zero_params, samples))

    # ---- checkpoints --------------------------------------------------------------------------------
    def _monitor_state(self) -> Dict[str, Any]:
        """The declared state and each optimizer's, by its index in ``trainer.optimizers`` (a resumed fit has new
        optimizer objects): applied on its first sampled step (see _state_for)."""
        optimizers = list(getattr(self._trainer, "optimizers", []) or []) if self._trainer is not None else []
        per_optimizer = {}
        for state_id, state in self._states.items():
            index = next((i for i, o in enumerate(optimizers) if id(o) == state_id
                          or id(getattr(o, "optimizer", None)) == state_id), 0)
            per_optimizer[str(index)] = state.state_dict()
        for index, pending in self._pending_load.items():  # loaded but not yet applied (no sampled step since)
            per_optimizer.setdefault(str(index), pending)
        return {**super()._monitor_state(), "optimizers": per_optimizer}

    def _load_monitor_state(self, state: Mapping[str, Any]) -> None:
        super()._load_monitor_state(state)
        self._pending_load = {int(k): v for k, v in state.get("optimizers", {}).items()}
