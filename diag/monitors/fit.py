"""``FitMonitor``: underfitting, overfitting and when to stop, from the training and validation losses."""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from diag import signals
from diag.batch import loss_of, targets_of
from diag.detectors import fit as rules
from diag.findings import Severity
from diag.stats.fit import ClassCountEstimator, Evaluation, FitHistory, RunningMean
from diag.stats.numbers import finite_number

from .base import Monitor, check_positive_int

NAN = float("nan")
# Class count for the chance level ln C is read off the integer targets of the first few training batches
# (one max per batch, kept on the device, one host sync when they are done).
CLASS_INFERENCE_BATCHES = 8


def _metrics(trainer: Any) -> Dict[str, Any]:
    """A copy of the trainer's ``callback_metrics``: taken once per hook (Lightning computes them anew on each access,
    from every logged result: tens of microseconds)."""
    return dict(getattr(trainer, "callback_metrics", {}) or {})


@functools.lru_cache(maxsize=64)
def _find_key(finder: Any, keys: Tuple[str, ...]) -> Optional[str]:
    """``finder(keys)``, remembered: the logged keys are the same at every evaluation of a fit."""
    return finder(keys)


def _metric(metrics: Mapping[str, Any], key: Optional[str]) -> Any:
    """The logged value of ``key`` as it is, not read: a tensor (read later with the other figures), a number, or
    ``None`` when absent or not a number."""
    if key is None or key not in metrics:
        return None
    value = metrics[key]
    if isinstance(value, torch.Tensor):
        return value.detach() if value.numel() and not value.is_complex() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_instance_named(obj: Any, name: str) -> bool:
    # EarlyStopping / ModelCheckpoint from either pytorch_lightning or lightning.pytorch (or a subclass)
    return any(cls.__name__ == name for cls in type(obj).__mro__)


class FitMonitor(Monitor):
    """Tells underfitting from overfitting and says when to stop, from the logged training and validation losses.

    Finds the validation loss among the logged metrics (``val_loss``, ``val/loss``, ``valid_loss``,
    ``validation_loss``, ``loss/val``, ...) unless ``monitor`` names it, and averages the training loss returned by
    ``training_step`` between evaluations (or reads an epoch-aggregated ``train_loss_epoch``). Every validation run
    is an evaluation (several per epoch with ``val_check_interval``); the sanity check is skipped.

    - ``underfitting``: the training loss stopped improving while still high (relative to the chance level ln C
      when known), validation is about the same, and no other monitor blames the learning rate.
    - ``overfitting``: the validation loss rose over several evaluations while the training loss kept falling
      (Prechelt 1998: generalization loss GL and successive increases).
    - ``early_stop_suggested``: the best evaluation is ``patience`` or more evaluations behind; the advice gives the
      ``EarlyStopping`` / ``ModelCheckpoint`` lines (adjusted when the trainer already has them).
    - ``no_validation_metric`` (info): no validation loss was found; only underfitting is judged, as a hint.

    Scalars: ``diag/train_loss``, ``diag/val_loss``, ``diag/generalization_gap`` (val - train) and
    ``diag/best_val_epoch`` at each evaluation.

    Args:
        monitor: the logged validation metric to judge (default: found automatically among the usual names).
        mode: ``"min"`` when a lower ``monitor`` is better (a loss), ``"max"`` when higher is better (an accuracy).
        train_monitor: the logged training counterpart of ``monitor`` (same units); default: the mean of the loss
            returned by ``training_step`` since the previous evaluation, or a logged ``train_loss_epoch``.
        patience: evaluations without a new best before early stopping is suggested (Lightning's
            ``EarlyStopping`` counts the same way).

    Example::

        from diag.callbacks import FitMonitor
        trainer = pl.Trainer(callbacks=[FitMonitor(monitor="val/loss", patience=5)])
        trainer.fit(model, train_loader, val_loader)
        [f.code for f in trainer.callbacks[0].findings]  # e.g. ["overfitting", "early_stop_suggested"]
    """

    STATE = ("history", "train_history", "_first_loss", "_num_classes", "_pending", "_evaluations_this_epoch",
             "_validation_seen", "_val_key", "_accuracy_key", "_since_evaluation")  # checkpointed (see Monitor.STATE)

    def __init__(self, monitor: Optional[str] = None, mode: str = "min", train_monitor: Optional[str] = None,
                 patience: int = 5) -> None:
        super().__init__()
        for name, value in (("monitor", monitor), ("train_monitor", train_monitor)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"`{name}` must be None or the name of a logged metric, got {value!r}.")
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' (lower is better) or 'max' (higher is better), got {mode!r}.")
        self.monitor = monitor
        self.mode = mode
        self.train_monitor = train_monitor
        self.patience = check_positive_int("patience", patience)
        # training values are losses (lower is better) unless train_monitor names the counterpart of monitor
        self.history = FitHistory(mode, train_mode=mode if train_monitor is not None else "min")
        self.train_history = FitHistory("min")  # per epoch, training loss only (for runs without validation)
        self._since_evaluation = RunningMean()  # training loss since the previous evaluation
        self._this_epoch = RunningMean()  # training loss since the start of the epoch
        self._classes = ClassCountEstimator()
        self._num_classes: Optional[int] = None
        self._first_loss_tensor: Optional[torch.Tensor] = None
        self._first_loss = NAN
        self._pending: Optional[Tuple[float, float, int, int]] = None  # (val, accuracy, epoch, step)
        self._evaluations_this_epoch = 0
        self._validation_seen = False
        self._val_key: Optional[str] = monitor
        self._accuracy_key: Optional[str] = None
        self._train_source = "none"
        self._capacity: Optional[float] = None  # trainable parameters per training sample (nan: unknown)
        self._loss_scale = 1  # undoes Lightning's division of the loss by accumulate_grad_batches (set per fit)

    def _state_key_args(self) -> Dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode}

    # ---- hooks ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # (state restored from a checkpoint is loaded before this hook: keep the history and the pending evaluation)
        self._this_epoch.reset()
        # Lightning divides the returned loss by accumulate_grad_batches (automatic optimization): undone per batch
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        self._loss_scale = accumulate if accumulate > 1 and getattr(pl_module, "automatic_optimization", True) else 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:  # a validation ran mid-epoch and training went on: its interval is complete
            self._close(trainer, at_epoch_end=False, metrics=_metrics(trainer))
        loss = loss_of(outputs)
        if loss is not None:
            if self._loss_scale != 1:
                loss = loss * self._loss_scale
            self._since_evaluation.update(loss)
            if self.history.count == 0:  # the per-epoch training history serves runs without a validation metric
                self._this_epoch.update(loss)
            if self._first_loss_tensor is None and not finite_number(self._first_loss):
                self._first_loss_tensor = loss.detach().float().mean().clone()
        if self._num_classes is None and self._classes.batches < CLASS_INFERENCE_BATCHES:
            self._classes.update(targets_of(batch))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False) or not self._fitting(trainer):
            return
        self._validation_seen = True
        metrics = _metrics(trainer)
        if self._val_key is None or self._val_key not in metrics:
            self._val_key = self.monitor or _find_key(rules.find_validation_loss, tuple(metrics))
        if self._val_key is None or self._val_key not in metrics:
            self.report_verdict(rules.no_validation_metric(list(metrics), self.monitor, True, self.epoch()))
            return
        if self._accuracy_key is None:
            self._accuracy_key = _find_key(rules.find_validation_accuracy,
                                           tuple(k for k in metrics if k != self._val_key))
        if self._pending is not None:  # two validations without training in between
            self._close(trainer, at_epoch_end=False, metrics=metrics)
        epoch, step = self.epoch(), self.step()

        def use(values: List[float]) -> None:  # at the callback's read at the end of this validation (one for all)
            self._pending = (values[0], values[1], epoch, step)

        self.read_scalars_on_host([_metric(metrics, self._val_key), _metric(metrics, self._accuracy_key)], use)
        self._evaluations_this_epoch += 1

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = _metrics(trainer)
        if self._pending is not None:
            self._close(trainer, at_epoch_end=True, metrics=metrics)
        self._evaluations_this_epoch = 0
        logged, _ = self._logged_train(metrics, at_epoch_end=True)
        mine = self._this_epoch.mean_tensor()
        self._this_epoch.reset()
        epoch, step, keys = self.epoch(), self.step(), list(metrics)
        every = getattr(trainer, "check_val_every_n_epoch", 1)

        def use(values: List[float]) -> None:  # at the callback's read at the end of this epoch (one for all)
            train = values[0]
            if not finite_number(train):
                train = self._reduce([values[1]])[0]
            self.train_history.update(epoch, step, train=train)
            if self._has_validation_metric():
                return
            if not self._validation_seen and isinstance(every, int) and epoch + 1 >= every:
                self.report_verdict(rules.no_validation_metric(keys, self.monitor, False, epoch))
            if finite_number(train):
                self.log_scalars({"diag/train_loss": train}, step)
            if self._context.collector.has("no_validation_metric"):
                self._judge_training_only()

        self.read_scalars_on_host([logged, mine], use)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is not None:
            self._close(trainer, at_epoch_end=False, metrics=_metrics(trainer))
        if not self._validation_seen and not self._context.collector.has("no_validation_metric"):
            metrics = _metrics(trainer)
            self.report_verdict(rules.no_validation_metric(list(metrics), self.monitor, False, self.epoch()))

    # ---- evaluations ------------------------------------------------------------------------------
    def _fitting(self, trainer: Any) -> bool:
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return fn is None or getattr(fn, "value", fn) == "fit"

    def _has_validation_metric(self) -> bool:
        return self.history.count > 0

    def _logged_train(self, metrics: Mapping[str, Any], at_epoch_end: bool) -> Tuple[Any, str]:
        """The logged training value (see :func:`_metric`: not read yet) and its key."""
        if self.train_monitor is not None:
            return _metric(metrics, self.train_monitor), self.train_monitor
        if at_epoch_end:
            key = _find_key(rules.find_training_loss_epoch, tuple(metrics))
            if key is not None:
                return _metric(metrics, key), key
        return None, "none"

    def _reduce(self, values: List[float]) -> List[float]:
        if self.world_size() <= 1:
            return values
        device = getattr(getattr(self._trainer, "strategy", None), "root_device", None) or "cpu"
        return self.reduce(torch.tensor(values, dtype=torch.float64, device=device), "mean").tolist()

    def _close(self, trainer: Any, at_epoch_end: bool, metrics: Mapping[str, Any]) -> None:
        """Record the pending evaluation with the training loss of the same interval, log and judge: the training
        figures are read with the callback's next batched host read (at once between steps: an epoch end, a validation
        end; at the next read step when training went on after a validation)."""
        val, accuracy, epoch, step = self._pending
        self._pending = None
        logged, source = None, "none"
        if self.train_monitor is not None or (at_epoch_end and self._evaluations_this_epoch == 1):
            logged, source = self._logged_train(metrics, at_epoch_end)
        own = self._since_evaluation.mean_tensor()
        self._since_evaluation.reset()
        first, classes = self._unresolved()

        def use(values: List[float]) -> None:
            train, train_source = values[0], source
            if not finite_number(train):
                train, train_source = values[1], "training_step loss"
            self._resolve(values[2], values[3])
            reduced_val, reduced_train, reduced_accuracy = self._reduce([val, train, accuracy])
            self._train_source = train_source
            self.history.update(epoch, step, val=reduced_val, train=reduced_train, accuracy=reduced_accuracy)
            if self.mode == "min" and finite_number(reduced_val) and finite_number(reduced_train):
                self._context.publish(signals.FIT_EVALUATION, (step, float(reduced_train), float(reduced_val)))
            self._log(self.history.last, step)
            self._judge()

        self.read_scalars_on_host([logged, own, first, classes], use)

    def _log(self, record: Evaluation, step: Optional[int] = None) -> None:
        scalars: Dict[str, float] = {}
        if self.mode == "min":
            if finite_number(record.val):
                scalars["diag/val_loss"] = record.val
            if finite_number(record.train):
                scalars["diag/train_loss"] = record.train
        if self._comparable() and finite_number(record.val) and finite_number(record.train):
            scalars["diag/generalization_gap"] = record.val - record.train
        if self.history.best is not None:
            scalars["diag/best_val_epoch"] = float(self.history.best.epoch)
        self.log_scalars(scalars, step)

    # ---- judging ----------------------------------------------------------------------------------
    def _comparable(self) -> bool:
        # validation and training values share units: both losses, or a train_monitor named as the counterpart
        return self.train_monitor is not None or self.mode == "min"

    def _unresolved(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The first loss and the largest target seen, still on the device (``None`` when known or absent), taken
        away to be read with other figures and handed back to :meth:`_resolve`."""
        first, self._first_loss_tensor = self._first_loss_tensor, None
        classes = None
        if self._num_classes is None and self._classes.maximum is not None:
            classes = self._classes.maximum
            self._classes.reset()
            self._classes.batches = CLASS_INFERENCE_BATCHES  # done: never read targets again
        return first, classes

    def _resolve(self, first: float, largest_target: float) -> None:
        if finite_number(first):
            self._first_loss = first
        if self._num_classes is None and finite_number(largest_target):
            classes = int(largest_target) + 1
            self._num_classes = classes if classes >= 2 else None

    def _resolve_first_loss(self) -> None:
        """The first loss and the class count, read now (between steps: checkpoints, training-only judging)."""
        first, classes = self._unresolved()
        self._resolve(float(first.item()) if first is not None else NAN,
                      float(classes.item()) if classes is not None else NAN)

    def _reference(self) -> Optional[rules.Reference]:
        chance = self._context.get(signals.LOSS_CHANCE_LEVEL)
        if finite_number(chance) and chance > 0:
            return rules.Reference(float(chance), "chance_level")
        first = self._context.get(signals.LOSS_INITIAL)
        first = float(first) if finite_number(first) else self._first_loss
        inferred = rules.inferred_chance_level(self._num_classes, first)
        if inferred is not None:
            return rules.Reference(inferred, "chance_level")
        return rules.Reference(first, "initial_loss") if finite_number(first) and first > 0 else None

    def _parameters_per_sample(self) -> Optional[float]:
        """Trainable parameters per training sample (None when the sample count is unknown); computed once."""
        if self._capacity is None:
            self._capacity = math.nan
            try:
                module = self._trainer.lightning_module
                parameters = sum(p.numel() for p in module.parameters() if p.requires_grad)
                loader = self._trainer.train_dataloader
                samples = len(loader.dataset)
                batch_size = getattr(loader, "batch_size", None)
                batches = self._trainer.num_training_batches
                if batch_size and isinstance(batches, int):
                    samples = min(samples, batches * batch_size)
                samples *= self.world_size()
                if samples > 0:
                    self._capacity = parameters / samples
            except Exception:  # an iterable dataset, several loaders: unknown
                pass
        return None if math.isnan(self._capacity) else self._capacity

    def _explained_by(self) -> List[str]:
        collector = self._context.collector
        return rules.stall_explained_by(lambda code: collector.has(code, Severity.WARNING))

    def _user_callbacks(self) -> Tuple[Optional[int], bool]:
        callbacks = list(getattr(self._trainer, "callbacks", []) or [])
        stoppers = [cb for cb in callbacks if _is_instance_named(cb, "EarlyStopping")
                    and getattr(cb, "monitor", None) == self._val_key]
        checkpoints = [cb for cb in callbacks if _is_instance_named(cb, "ModelCheckpoint")
                       and getattr(cb, "monitor", None) == self._val_key]
        patience = min((int(getattr(cb, "patience", 0)) for cb in stoppers), default=None)
        return patience, bool(checkpoints)

    def _judge(self) -> None:
        ctx = self._context
        reference = self._reference()
        metric = self._val_key or "val_loss"
        stalled = ctx.get(signals.LOSS_STALLED)
        if self.history.train_mode == "min":  # underfitting is about a training *loss* staying high
            # with mode="max" the validation value is not a loss: judge from the training loss alone (a hint)
            loss_val = self.mode == "min"
            under = rules.underfitting(
                self.history, reference, comparable=loss_val, has_validation=loss_val,
                explained_by=self._explained_by(), probe_verdict=ctx.get(signals.PROBE_VERDICT),
                loss_stalled=stalled if isinstance(stalled, bool) else None, metric=metric,
                parameters_per_sample=self._parameters_per_sample())
            # (The probe is not asked about a stall: on a model too small to fit its probe batch it cannot tell
            # capacity from a bug. Its verdict is used when another monitor had it run.)
            self.report_verdict(under, extra={"train_source": self._train_source})
        user_patience, user_checkpoint = self._user_callbacks()
        lines = rules.early_stop_lines(metric, self.mode, self.patience)
        hint = (("your EarlyStopping" if user_patience is not None else lines["early_stopping"]) + " + "
                + ("your ModelCheckpoint" if user_checkpoint else lines["checkpoint"]))
        over = rules.overfitting(self.history, reference, metric, hint, self._comparable())
        self.report_verdict(over, extra={"train_source": self._train_source})
        clearly_past = rules.clearly_overfit(over)
        self.report_verdict(rules.early_stop_suggested(self.history, metric, self.mode, self.patience, user_patience,
                                                       user_checkpoint, clearly_past))

    def _judge_training_only(self) -> None:
        self._resolve_first_loss()
        ctx = self._context
        stalled = ctx.get(signals.LOSS_STALLED)
        self.report_verdict(rules.underfitting(
            self.train_history, self._reference(), comparable=False, has_validation=False,
            explained_by=self._explained_by(), probe_verdict=ctx.get(signals.PROBE_VERDICT),
            loss_stalled=stalled if isinstance(stalled, bool) else None,
            parameters_per_sample=self._parameters_per_sample()))

    # ---- checkpoints ------------------------------------------------------------------------------
    def _monitor_state(self) -> Dict[str, Any]:
        if self._first_loss_tensor is not None:
            self._resolve_first_loss()  # (one host read, between steps)
        return super()._monitor_state()

    def _load_monitor_state(self, state: Mapping[str, Any]) -> None:
        super()._load_monitor_state(state)
        self._first_loss_tensor = None  # the first loss is the checkpoint's
        # a checkpoint of an earlier release wrote "none yet" as 0, "" and []
        self._num_classes = self._num_classes or None
        self._val_key, self._accuracy_key = self._val_key or self.monitor, self._accuracy_key or None
        self._pending = tuple(self._pending) if self._pending else None
