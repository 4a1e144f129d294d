"""Rules on the train/validation curves: underfitting, overfitting, when to stop; and which logged metrics they are.

Each rule reads a :class:`~diag.stats.fit.FitHistory` (one entry per evaluation) and returns a
:class:`~diag.detectors.Verdict` or ``None``. Thresholds are named constants with their source. "Measured" figures come from
recorded runs (Adam, one validation per epoch, 30-60 epochs): linear and 2-3-2 MLP classifiers on two
interleaved spirals (underfit), a 64-256-256-10 MLP on 40 digits (overfit, lr 1e-3 and 1e-2), a 2-256-256-2
MLP on 40 spiral points (overfit), and healthy twins: a 2-128-128-2 MLP on 800 spiral points, the 64-256-256-10
MLP on 1400 digits for 60 epochs, a dropout MLP, linear / 64-2-10 models on digits, and 2-64-64-2 MLPs on two
moons with label noise 0.3 and 0.5 (Bayes-limited: the loss stalls high for lack of signal, not of capacity).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

from diag.detectors import Verdict
from diag.stats.fit import FitHistory
from diag.stats.numbers import finite_number

Evidence = Dict[str, Union[float, int, str]]


def _r(x: Optional[float]) -> Union[float, str]:
    if x is None or not math.isfinite(x):
        return "nan"
    return float(f"{x:.6g}")


# ==== which logged metrics are the losses ==================================================================
# Names people give the validation loss (Lightning's own examples use "val_loss"; torchmetrics/TensorBoard users
# often write "val/loss"); "_epoch" is the suffix Lightning adds for on_step=True, on_epoch=True.
VALIDATION_LOSS_NAMES = ("val_loss", "val/loss", "valid_loss", "valid/loss", "validation_loss", "validation/loss",
                         "loss/val", "loss/valid", "loss/validation", "val_loss_epoch", "val/loss_epoch",
                         "valid_loss_epoch", "validation_loss_epoch", "eval_loss", "eval/loss", "val_nll", "val/nll")
VALIDATION_ACCURACY_NAMES = ("val_acc", "val/acc", "val_accuracy", "val/accuracy", "valid_acc", "valid/acc",
                             "validation_acc", "validation_accuracy", "acc/val", "accuracy/val", "val_acc_epoch",
                             "val/acc_epoch")
# Only epoch-aggregated training losses are read from the logged metrics: a key without "_epoch" may be the last
# step's value (self.log's default in training_step), and the monitor's own mean of the returned loss is better.
TRAINING_LOSS_EPOCH_NAMES = ("train_loss_epoch", "train/loss_epoch", "training_loss_epoch", "training/loss_epoch",
                             "loss_epoch", "trn_loss_epoch", "loss/train_epoch")

_VAL_TOKENS = {"val", "valid", "validation", "eval"}
_TRAIN_TOKENS = {"train", "training", "trn"}


def _tokens(key: str) -> List[str]:
    return [t for t in re.split(r"[/_.\-\s]+", key.lower()) if t]


def _logged_key(keys: Iterable[str], names: Sequence[str], accept) -> Optional[str]:
    keys = list(keys)
    for name in names:
        if name in keys:
            return name
    matches = sorted((k for k in keys if accept(_tokens(k)) and not k.endswith("_step")), key=lambda k: (len(k), k))
    return matches[0] if matches else None


def find_validation_loss(keys: Iterable[str]) -> Optional[str]:
    """The logged key that holds the validation loss, if any (``val_loss``, ``val/loss``, ``valid_loss``, ...)."""
    return _logged_key(keys, VALIDATION_LOSS_NAMES, lambda t: bool(_VAL_TOKENS & set(t)) and ("loss" in t or "nll" in t))


def find_validation_accuracy(keys: Iterable[str]) -> Optional[str]:
    return _logged_key(keys, VALIDATION_ACCURACY_NAMES,
                 lambda t: bool(_VAL_TOKENS & set(t)) and bool({"acc", "accuracy"} & set(t)))


def find_training_loss_epoch(keys: Iterable[str]) -> Optional[str]:
    """The logged epoch-aggregated training loss (``train_loss_epoch``, ``train/loss_epoch``, ...), if any."""
    return _logged_key(keys, TRAINING_LOSS_EPOCH_NAMES,
                 lambda t: t[-1:] == ["epoch"] and "loss" in t and not (_VAL_TOKENS | {"test"}) & set(t)
                 and (bool(_TRAIN_TOKENS & set(t)) or t == ["loss", "epoch"]))


# ==== shared context =======================================================================================
@dataclasses.dataclass(frozen=True)
class Reference:
    """What "high" means for a loss: the chance level ln C (or the prior entropy) when known, else the first loss."""

    value: float
    kind: str  # "chance_level" | "initial_loss"

    @property
    def trusted(self) -> bool:
        # The first loss is only the loss "of knowing nothing" when training started from scratch; after a
        # fine-tuning start or a bad initialization it can be anything, so rules built on it say at most `info`.
        return self.kind == "chance_level"


# Karpathy, "A Recipe for Training Neural Networks" (2019): at initialization a C-class classifier's loss is about
# ln C. A class count read off the integer targets is trusted as the chance level only when the first loss agrees
# (within this ratio band): then the loss is a C-class cross-entropy and the model started from scratch. Integer
# targets that are not classes (sample ids, counts) or a pretrained start fail the check.
CHANCE_CONSISTENT_RATIO = (0.75, 1.5)


def inferred_chance_level(num_classes: Optional[int], first_loss: Optional[float]) -> Optional[float]:
    if not num_classes or num_classes < 2 or not finite_number(first_loss):
        return None
    chance = math.log(num_classes)
    low, high = CHANCE_CONSISTENT_RATIO
    return chance if low * chance <= first_loss <= high * chance else None


# Verdicts of other monitors that already explain a stalled loss: the learning rate or a bug, not capacity.
STALL_EXPLAINED_BY = ("lr_too_high", "lr_too_low", "suspected_code_bug", "nonfinite_loss", "loss_diverging",
                      "loss_oscillating")


def stall_explained_by(has_warning: Callable[[str], bool]) -> List[str]:
    """The codes among ``STALL_EXPLAINED_BY`` that another monitor has raised as a warning (``has_warning(code)``)."""
    return [code for code in STALL_EXPLAINED_BY if has_warning(code)]


PROBE_BLAMES = ("lr_too_high", "lr_too_low", "suspected_code_bug", "dead_units", "saturated_activations", "bad_initialization")


# ==== underfitting =========================================================================================
# "Stopped improving": over a window of at least 5 evaluations spanning at least 2 epochs (or 20 evaluations when
# validation runs many times per epoch) the best training loss improved by less than 1% on the best before it --
# and so did the validation loss. For comparison, PyTorch's ReduceLROnPlateau calls a plateau after 10 epochs
# below a 0.01% relative improvement. Measured: the linear model on spirals improves 0.05% over its last 5
# epochs; healthy runs still learning improve >= 3% per 5 epochs (the slowest, a 64-2-10 MLP on digits, ~3%).
STALL_MIN_EVALUATIONS = 5
STALL_MIN_EPOCHS = 2
STALL_ENOUGH_EVALUATIONS = 20
STALL_RELATIVE_IMPROVEMENT = 0.01
# "Still high": min(train, val) >= 75% of the chance level -- the model removed at most a quarter of the loss a
# guess makes. Measured: underfit linear / 2-3-2 models on spirals stall at 0.94-0.95 ln 2; the healthy but
# Bayes-limited two-moons runs (label noise 0.5 / 0.3) stall at 0.54 / 0.27 ln 2; trained digits models < 0.05.
# The min of train and val keeps a dropout model (train loss inflated by dropout) from looking high.
UNDERFIT_HIGH_FRACTION = 0.75
# Between 50% and 75% (or relative to the first loss rather than a known chance level), the finding is a hint.
UNDERFIT_HINT_FRACTION = 0.5
# "Validation close to training": val - train <= 10% of train (val below train is fine: regularization).
# Goodfellow et al., Deep Learning (2016) 5.2: underfitting = high training error with a small gap; a large gap is
# variance. Measured: underfit models 1.6-3.8%; the Bayes-limited healthy moons runs 12% and 47%.
UNDERFIT_GAP_TOLERANCE = 0.10
# At (or above) the chance level the model learned nothing at all: that is more often a bug than a small model.
UNDERFIT_AT_CHANCE_FRACTION = 0.97

# Capacity is only blamed when it can be the limit: Zhang et al., "Understanding deep learning requires rethinking
# generalization" (ICLR 2017), Theorem 1: a two-layer ReLU network with 2n + d weights can fit any labels of n
# samples in d dimensions. A model with >= 2 trainable parameters per training sample that still stalls high is
# held back by optimization or by noise in the labels, not by its size: a hint only. Measured: the underfit linear /
# 2-3-2 models have 0.01-0.02 parameters per sample; 2-64-64-2 MLPs on two moons with label noise 1.0 / 1.5 (healthy,
# Bayes-limited) stall at 0.78 / 0.87 ln 2 with 2.7 parameters per sample.
CAPACITY_PARAMETERS_PER_SAMPLE = 2.0

UNDERFIT_ADVICE = ("Give the model more capacity: make it wider (e.g. double the hidden units) or deeper (add a "
                   "layer or block); train longer; reduce regularization (dropout, weight decay, augmentation); "
                   "if the learning-rate probe has not run, try a higher learning rate (e.g. x3).")
UNDERFIT_AT_CHANCE_ADVICE = (" The loss is at the chance level: before adding capacity, check that the labels match "
                             "the inputs and that the inputs reach the model (the learning-rate probe can tell a "
                             "bug from a small model).")


def _stall(history: FitHistory) -> Optional[Evidence]:
    """Evidence that both curves stopped improving, or None while one of them still improves."""
    start = history.window_start(STALL_MIN_EVALUATIONS, STALL_MIN_EPOCHS, STALL_ENOUGH_EVALUATIONS)
    if start is None:
        return None
    window = history.since(start)
    before_train = history.best_train_before(start)
    now_train = min((r.train for r in window if finite_number(r.train)), default=math.nan)
    if not (finite_number(before_train) and finite_number(now_train)) or before_train <= 0:
        return None
    train_gain = (before_train - now_train) / abs(before_train)
    if train_gain >= STALL_RELATIVE_IMPROVEMENT:
        return None
    evidence: Evidence = {"window_evaluations": len(window), "window_epochs": window[-1].epoch - window[0].epoch,
                          "train_relative_improvement": _r(train_gain)}
    if any(finite_number(r.val) for r in window):
        before_val = history.best_val_before(start)
        now_val = min(history.badness(r.val) for r in window if finite_number(r.val))
        if finite_number(before_val) and before_val != 0:
            val_gain = (before_val - now_val) / abs(before_val)
            if val_gain >= STALL_RELATIVE_IMPROVEMENT:
                return None
            evidence["val_relative_improvement"] = _r(val_gain)
    return evidence


def underfitting(history: FitHistory, reference: Optional[Reference], comparable: bool, has_validation: bool,
                 explained_by: Sequence[str] = (), probe_verdict: Optional[str] = None,
                 loss_stalled: Optional[bool] = None, metric: str = "val_loss",
                 parameters_per_sample: Optional[float] = None) -> Optional[Verdict]:
    """The training loss stopped improving while still high, validation is about the same, and neither the learning
    rate nor a bug explains it. ``has_validation=False``: judged from the training loss alone (a hint at most)."""
    last = history.last
    if last is None or reference is None or reference.value <= 0 or not finite_number(last.train):
        return None
    if explained_by or probe_verdict in PROBE_BLAMES or loss_stalled is False:
        return None
    stall = _stall(history)
    if stall is None:
        return None
    train = last.train
    val = last.val if (has_validation and comparable and finite_number(last.val)) else math.nan
    level = min(train, val) if finite_number(val) else train
    fraction = level / reference.value
    if fraction < UNDERFIT_HINT_FRACTION:
        return None
    evidence: Evidence = {"train_loss": _r(train), "reference_loss": _r(reference.value),
                          "reference": reference.kind, "fraction_of_reference": _r(fraction),
                          "epoch": last.epoch, "evaluations": history.count, **stall}
    if finite_number(val):
        gap = val - train
        evidence.update({"val_loss": _r(val), "generalization_gap": _r(gap), "relative_gap": _r(gap / train)})
        if gap > UNDERFIT_GAP_TOLERANCE * train:
            return None  # validation far above training: variance, not (only) bias
    if finite_number(last.accuracy):
        evidence["val_accuracy"] = _r(last.accuracy)
    if probe_verdict:
        evidence["probe_verdict"] = probe_verdict
    if finite_number(parameters_per_sample):
        evidence["parameters_per_sample"] = _r(parameters_per_sample)
    enough_capacity = finite_number(parameters_per_sample) and parameters_per_sample >= CAPACITY_PARAMETERS_PER_SAMPLE
    strong = (fraction >= UNDERFIT_HIGH_FRACTION and reference.trusted and has_validation and finite_number(val)
              and not enough_capacity)
    severity = None if strong else "info"
    what = ("the chance level" if reference.kind == "chance_level" else "the first training loss")
    message = (f"The training loss has stopped improving at {train:.4g} ({fraction:.0%} of {what}, "
               f"{reference.value:.4g}; < {STALL_RELATIVE_IMPROVEMENT:.0%} better over the last "
               f"{stall['window_evaluations']} evaluations)")
    if finite_number(val):
        message += f" and the validation loss is about the same ({val:.4g}, {metric})"
    else:
        message += " (no validation metric to compare with)"
    message += ": the model is underfitting."
    advice = UNDERFIT_ADVICE
    if fraction >= UNDERFIT_AT_CHANCE_FRACTION:
        advice += UNDERFIT_AT_CHANCE_ADVICE
    if enough_capacity:
        advice = (f"The model has {parameters_per_sample:.3g} trainable parameters per training sample, enough to "
                  "memorize them (Zhang et al. 2017): before adding capacity, check the learning rate (the probe) "
                  "and whether the labels are noisy (then this loss may be the best reachable). " + advice)
    elif not strong:
        advice += (" (A hint: without a known chance level, a validation loss to compare with, or above "
                   f"{UNDERFIT_HIGH_FRACTION:.0%} of it, this may also be the noise floor of the data.)")
    return Verdict("underfitting", message, advice, evidence, severity)


# ==== overfitting ==========================================================================================
# Prechelt, "Early Stopping -- But When?" (1998): generalization loss GL(t) = 100 * (E_va(t) / E_opt(t) - 1), the
# validation loss's excess over its best in percent; UP_s: the validation error rose in s successive strips.
# We require the excess to hold at each of the last s = 3 evaluations (GL and UP combined: a single bad evaluation
# is not a trend), at least 3 evaluations and one epoch (or 12 evaluations) after the best.
OVERFIT_SUSTAINED_EVALUATIONS = 3
OVERFIT_MIN_EPOCHS_SINCE_BEST = 1
OVERFIT_ENOUGH_EVALUATIONS_SINCE_BEST = 12
# GL5 is Prechelt's stopping criterion: past it we say so as a hint. A warning needs GL >= 20: measured, healthy
# runs trained far past their best drift up slowly from over-confidence (the large MLP on 1400 digits: GL 6% 45
# epochs after its best), while real overfits reach 40-100% (40-sample runs).
OVERFIT_GL_HINT = 5.0
OVERFIT_GL_WARNING = 20.0
# The rise must also stand out of the evaluation-to-evaluation noise (3 x the spread of successive differences
# over the last 16 evaluations; a steady rise has none) and, for a warning, exceed 2% of the chance level /
# first loss: a near-perfect model's val loss of 0.006 rising to 0.009 is GL 50% but nothing to act on
# (measured: the healthy wide spirals MLP swings 0.006-0.01 late in training).
OVERFIT_NOISE_FACTOR = 3.0
OVERFIT_NOISE_WINDOW = 16
OVERFIT_MIN_RISE_OF_REFERENCE = 0.02
# "While the training loss keeps falling": at least 5% below its value at the best validation evaluation.
OVERFIT_TRAIN_FALL = 0.05

OVERFIT_ADVICE = ("Stop at the best validation epoch ({epoch}): early stopping with the best checkpoint "
                  "({callbacks}). Then regularize: dropout (p=0.1-0.5), weight decay (AdamW, 1e-2), data augmentation; "
                  "or get more training data, or use a smaller model.")
# Nothing carries over: the validation loss never got below the chance level ln C at any evaluation while the
# training loss fell under half of it. Overfitting starts from a model that generalized somewhat (its validation loss
# fell first); a validation set whose labels do not line up with its inputs (shuffled, another label mapping, another
# preprocessing) is never better than chance. Digits MLP, validation labels permuted: validation 2.35-3.9 against
# ln 10 = 2.30 at every evaluation, training 2.0 -> 0.05; the healthy digits runs are at 0.2-0.5 after one epoch.
NOTHING_CARRIES_TRAIN_SHARE = 0.5
NOTHING_CARRIES_ADVICE = ("First check the validation data: its labels must line up with its inputs (the same "
                          "indexing, label mapping and preprocessing as the training data), and it must come from the "
                          "same task; overfitting alone does not keep a model at chance on data like its training data. "
                          "If they are right (a task learned late, as in grokking), then: ")


def nothing_carries_over(history: FitHistory, reference: Optional[Reference]) -> bool:
    """Whether the validation loss stayed at or above the trusted chance level at every evaluation while the training
    loss fell below ``NOTHING_CARRIES_TRAIN_SHARE`` of it."""
    best, last = history.best, history.last
    return (history.mode == "min" and reference is not None and reference.trusted and best is not None
            and last is not None
            and finite_number(best.val) and best.val >= reference.value and finite_number(last.train)
            and last.train <= NOTHING_CARRIES_TRAIN_SHARE * reference.value)


@dataclasses.dataclass(frozen=True)
class Deterioration:
    """How far the validation value is above its best, sustained over the last evaluations."""

    generalization_loss: float  # Prechelt's GL in percent (sustained: the smallest over the last evaluations)
    rise: float  # sustained excess over the best, in the metric's units
    noise: float
    evaluations_since_best: int


def deterioration(history: FitHistory) -> Optional[Deterioration]:
    best, last = history.best, history.last
    if best is None or last is None:
        return None
    since = history.evaluations_since_best
    if since < OVERFIT_SUSTAINED_EVALUATIONS:
        return None
    if last.epoch - best.epoch < OVERFIT_MIN_EPOCHS_SINCE_BEST and since < OVERFIT_ENOUGH_EVALUATIONS_SINCE_BEST:
        return None
    tail = [r for r in list(history.recent)[-OVERFIT_SUSTAINED_EVALUATIONS:] if finite_number(r.val)]
    if len(tail) < OVERFIT_SUSTAINED_EVALUATIONS:
        return None
    best_badness = history.badness(best.val)
    rise = min(history.badness(r.val) for r in tail) - best_badness
    scale = abs(best.val)
    if scale == 0 and history.first is not None:
        scale = abs(history.badness(history.first.val) - best_badness)
    gl = 100.0 * rise / scale if scale > 0 else math.inf
    return Deterioration(gl, rise, history.difference_spread(OVERFIT_NOISE_WINDOW), since)


def _train_fall(history: FitHistory) -> Optional[float]:
    best, last = history.best, history.last
    if best is None or last is None or not (finite_number(best.train) and finite_number(last.train)) or best.train == 0:
        return None
    return (history.train_badness(best.train) - history.train_badness(last.train)) / abs(best.train)


def overfitting(history: FitHistory, reference: Optional[Reference], metric: str, callbacks_hint: str,
                comparable: bool = True) -> Optional[Verdict]:
    """The validation loss rose over several evaluations while the training loss kept falling."""
    d = deterioration(history)
    fall = _train_fall(history)
    if d is None or fall is None or fall < OVERFIT_TRAIN_FALL or d.generalization_loss < OVERFIT_GL_HINT:
        return None
    if not finite_number(d.noise) or d.rise < OVERFIT_NOISE_FACTOR * d.noise:
        return None  # (the noise needs 5 evaluations: none of the first four can show overfitting)
    best, last = history.best, history.last
    material = reference is not None and d.rise >= OVERFIT_MIN_RISE_OF_REFERENCE * reference.value
    strong = d.generalization_loss >= OVERFIT_GL_WARNING and material
    evidence: Evidence = {
        "metric": metric, "best_epoch": best.epoch, "best_step": best.step, "best_evaluation": best.index,
        "best_val": _r(best.val), "current_val": _r(last.val), "generalization_loss_percent": _r(d.generalization_loss),
        "evaluations_since_best": d.evaluations_since_best, "train_at_best": _r(best.train),
        "current_train": _r(last.train), "train_relative_fall": _r(fall),
    }
    if comparable and finite_number(last.train):
        evidence["generalization_gap"] = _r(last.val - last.train)
        evidence["gap_at_best"] = _r(best.val - best.train)
    if finite_number(d.noise):
        evidence["val_noise"] = _r(d.noise)
    if finite_number(best.accuracy) and finite_number(last.accuracy):
        evidence.update({"val_accuracy_at_best": _r(best.accuracy), "current_val_accuracy": _r(last.accuracy)})
    message = (f"{metric} is {d.generalization_loss:.0f}% worse than its best ({best.val:.4g} at epoch {best.epoch}; "
               f"now {last.val:.4g}, {d.evaluations_since_best} evaluations later) while the training loss fell "
               f"{fall:.0%} ({best.train:.4g} -> {last.train:.4g}): the model is overfitting.")
    if not strong:
        message = message.replace("the model is overfitting", "the model starts to overfit (Prechelt GL5)")
    advice = OVERFIT_ADVICE.format(epoch=best.epoch, callbacks=callbacks_hint)
    if nothing_carries_over(history, reference):
        evidence["val_never_below_chance"] = _r(reference.value)
        message = message[:-1] + (f"; but the validation loss was never below the chance level ln C = "
                                  f"{reference.value:.4g} (best {best.val:.4g}): nothing learned carries over to it.")
        advice = NOTHING_CARRIES_ADVICE + advice[0].lower() + advice[1:]
    return Verdict("overfitting", message, advice, evidence, None if strong else "info")


def clearly_overfit(verdict: Optional[Verdict]) -> bool:
    """Whether :func:`overfitting` said more than a hint (its warning holds): the run is clearly past its best."""
    return verdict is not None and verdict.code == "overfitting" and verdict.severity is None


# ==== early_stop_suggested =================================================================================
# Lightning's EarlyStopping counts validation checks without improvement (default patience 3); we wait for
# `patience` (default 5) evaluations without a new best before suggesting it. A warning only when the run is
# clearly past its best (the overfitting rule's warning holds) and nothing stops it.
DOUBLE_DESCENT_NOTE = ("If you expect a second descent (epoch-wise double descent, Nakkiran et al. 2019) or "
                       "grokking, keep training but keep the best checkpoint.")


def early_stop_lines(metric: str, mode: str, patience: int) -> Dict[str, str]:
    return {"early_stopping": f'EarlyStopping(monitor="{metric}", mode="{mode}", patience={patience})',
            "checkpoint": f'ModelCheckpoint(monitor="{metric}", mode="{mode}", save_top_k=1)'}


def early_stop_suggested(history: FitHistory, metric: str, mode: str, patience: int,
                         user_early_stopping_patience: Optional[int], user_has_checkpoint: bool,
                         clearly_past: bool) -> Optional[Verdict]:
    """The best evaluation is ``patience`` or more evaluations behind the current one."""
    best, last = history.best, history.last
    since = history.evaluations_since_best
    if best is None or last is None or since < patience:
        return None
    covered_by_user = user_early_stopping_patience is not None and since < user_early_stopping_patience
    if covered_by_user and user_has_checkpoint:
        return None  # their EarlyStopping will stop and their checkpoint keeps the best: nothing to add
    lines = early_stop_lines(metric, mode, patience)
    evidence: Evidence = {"metric": metric, "mode": mode, "best_epoch": best.epoch, "best_step": best.step,
                          "best_val": _r(best.val), "current_epoch": last.epoch, "current_val": _r(last.val),
                          "evaluations_since_best": since, "suggested_patience": patience}
    message = (f"The best {metric} ({best.val:.4g}) was at epoch {best.epoch}, {since} evaluations ago "
               f"(now {last.val:.4g}): further training has not improved validation.")
    if user_early_stopping_patience is None:
        advice = (f"Add {lines['early_stopping']}"
                  + ("" if user_has_checkpoint else f" and {lines['checkpoint']}")
                  + " to Trainer(callbacks=[...]), and evaluate the best checkpoint (trainer.test(ckpt_path=\"best\")).")
        evidence["user_early_stopping"] = "none"
    else:
        evidence["user_early_stopping_patience"] = user_early_stopping_patience
        if covered_by_user:
            advice = (f"Your EarlyStopping (patience={user_early_stopping_patience}) will stop this run, but it keeps "
                      f"the last weights, not the best: add {lines['checkpoint']} and evaluate ckpt_path=\"best\".")
        else:
            advice = (f"Your EarlyStopping on {metric} (patience={user_early_stopping_patience}) has not stopped the run "
                      f"{since} evaluations after the best: check its mode, min_delta and check_on_train_epoch_end"
                      + ("" if user_has_checkpoint else f", and add {lines['checkpoint']}") + ".")
    advice += " " + DOUBLE_DESCENT_NOTE
    severity = "warning" if clearly_past and user_early_stopping_patience is None else None
    return Verdict("early_stop_suggested", message, advice, evidence, severity)


# ==== no validation metric =================================================================================
def no_validation_metric(available: Sequence[str], monitor: Optional[str], validation_ran: bool,
                         epoch: int) -> Verdict:
    keys = ", ".join(sorted(available)[:20]) or "none"
    if monitor is not None:
        message = f"The validation metric {monitor!r} was not logged (logged metrics: {keys})."
        advice = f"Log it in validation_step (self.log(\"{monitor}\", loss)) or pass the right name to FitMonitor(monitor=...)."
    elif validation_ran:
        message = f"Validation ran but no validation loss was logged (logged metrics: {keys})."
        advice = ("Log the validation loss in validation_step (self.log(\"val_loss\", loss)) or name it with "
                  "FitMonitor(monitor=...): overfitting and early stopping can only be judged from it.")
    else:
        message = f"No validation has run by the end of epoch {epoch}: underfitting is judged from the training loss alone."
        advice = ("Pass a validation DataLoader to trainer.fit(model, train_loader, val_loader) and log "
                  "self.log(\"val_loss\", loss) in validation_step: overfitting and early stopping need it.")
    return Verdict("no_validation_metric", message, advice, {"monitor": monitor or "auto", "logged": keys[:500]})
