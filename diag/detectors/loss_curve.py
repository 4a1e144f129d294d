"""Rules on the training-loss curve: non-finite, diverging (sustained or a burst), oscillating, plateau, unexpected
initial loss; and when outputs that look like probabilities call for the probe.

Each rule reads :class:`~diag.stats.loss.LossStatistics` and returns a :class:`~diag.detectors.Verdict` (or ``None``); the
thresholds are named constants with their source. "Measured" figures come from 20 recorded runs on the 8x8
digits / spirals (MLP, CNN+BatchNorm, deep tanh MLP, MSE regression; Adam/AdamW/SGD(+momentum); batch 4..32)
and their faulty twins (SGD lr 3..1e4, Adam lr 0.05/0.1, raw 0..16 inputs, deep sigmoid net with tiny init,
last layer x100); window 50, EMA decay 0.95, checked every 10 steps.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

from diag.detectors import Verdict
from diag.stats.loss import LossStatistics, median

Evidence = Dict[str, Union[float, int, str]]


def _r(x: Optional[float]) -> float:
    return float("nan") if x is None else float(f"{x:.6g}")


# ---- nonfinite_loss ---------------------------------------------------------------------------------------
NONFINITE_ADVICE = ("Lower the learning rate (try 1/10 of it) and clip gradients (gradient_clip_val=1.0); look for "
                    "log(0), division by zero or sqrt of a negative in the loss (use F.cross_entropy on logits, "
                    "add an epsilon); with fp16 AMP keep the loss computation in float32.")


def nonfinite_loss(value: float, step: int, stats: LossStatistics) -> Verdict:
    kind = "NaN" if math.isnan(value) else "infinite"
    return Verdict(
        "nonfinite_loss",
        f"The training loss became {kind} at step {step} (last finite loss {stats.last!r}, smoothed "
        f"{_r(stats.smoothed)}).",
        NONFINITE_ADVICE,
        {"loss": str(value), "last_finite_loss": _r(stats.last), "smoothed_loss": _r(stats.smoothed),
         "finite_steps": stats.count, "nonfinite_steps": stats.nonfinite_count},
        probe="nonfinite_loss",  # a too-high learning rate or a bug in the loss: the probe tells which
    )


# ---- loss_diverging ---------------------------------------------------------------------------------------
# CS231n (Karpathy, "Neural Networks Part 3", babysitting the learning process): "if the cost is ever > 3 * original
# cost, break out early" -- the learning rate is too high. Measured: healthy runs keep smoothed/start <= 0.95, the
# Adam lr=0.1 oscillating run peaks at 2.26, SGD lr=3 passes 3 within 20 steps.
DIVERGE_FACTOR = 3.0
# Both the EMA and the median of the last few raw losses must be above DIVERGE_FACTOR x start: a single spike moves
# the EMA (by 5% of its size) but never the median, so a spike is not a divergence.
DIVERGE_RECENT_STEPS = 10


# A classifier's loss must also rise above the chance level ln C: a run that starts from trained weights (tiny
# start) and settles at 3x that tiny value is noisier, not diverging. Without ln C (regression), a loss that sits
# above 3x its start is only called diverging (warning) while still rising: the newer half-window's median at
# least DIVERGE_RISING_PROGRESS above the older's; otherwise ``info``.
DIVERGE_RISING_PROGRESS = -0.1


def loss_diverging(stats: LossStatistics, factor: float = DIVERGE_FACTOR,
                   chance_level: Optional[float] = None) -> Optional[Verdict]:
    # The "original cost": the lower of the first loss and the median of the first few (robust to one odd first
    # batch, and still the loss at init when the run explodes within its first few steps).
    start, smoothed = stats.start, stats.smoothed
    if start is None or stats.initial is None or smoothed is None or len(stats.window) < DIVERGE_RECENT_STEPS:
        return None
    start = min(start, stats.initial)
    if start <= 0:
        return None
    recent = stats.recent_level(DIVERGE_RECENT_STEPS)
    limit = factor * start
    if chance_level is not None:
        limit = max(limit, chance_level)
    if smoothed <= limit or recent <= limit:
        return None
    progress = stats.relative_progress()
    rising = progress is not None and progress <= DIVERGE_RISING_PROGRESS
    severity = None if (chance_level is not None or rising) else "info"
    return Verdict(
        "loss_diverging",
        f"The smoothed training loss rose to {smoothed:.4g}, {smoothed / start:.3g}x its starting value {start:.4g} "
        f"(best so far {stats.best:.4g}).",
        "Lower the learning rate (try 1/10 of it), add learning-rate warm-up, or clip gradients "
        "(gradient_clip_val=1.0); the learning-rate probe, when attached, suggests a value.",
        {"smoothed_loss": _r(smoothed), "start_loss": _r(start), "best_loss": _r(stats.best),
         "recent_median_loss": _r(recent), "ratio_to_start": _r(smoothed / start), "threshold_ratio": factor,
         "chance_level": _r(chance_level), "window_relative_progress": _r(progress)},
        severity,
        probe="loss_diverging" if severity is None else None,  # an info-level rise does not spend the probe's budget
    )


# ---- loss_diverging, transient: a spike ----------------------------------------------------------------------
# The same CS231n rule ("if the cost is ever > 3 * original cost"), on the smoothed loss alone and from the first check
# on (no warm-up, no sustained median): a burst of huge losses that the run then recovers from. Measured: Adam at
# lr=0.5 on two moons (5 initializations) jumps from 0.7 to raw losses of 18-85 within 3 steps; its EMA is 5.0-16x the
# first loss at step 10, and the median of the last 10 losses is back below 3x by step 20-40 in some of them, so the
# sustained rule above never speaks; units die on the way (the run settles 3-4x above its healthy twin). Healthy runs:
# the EMA never exceeds 1.00x the first loss at any check (17-run healthy zoo, from step 10 on). A spike alone does not
# say why (one bad batch, a too-high learning rate): an ``info``, and the probe, replayed from the weights saved before
# the spike, decides. Without a chance level (regression, a second fit from trained weights whose start is tiny and
# noisy) only the ``info``, no probe request.
def loss_spike(stats: LossStatistics, factor: float = DIVERGE_FACTOR,
               chance_level: Optional[float] = None) -> Optional[Verdict]:
    start, smoothed = stats.start, stats.smoothed
    if start is None or stats.initial is None or smoothed is None:
        return None
    start = min(start, stats.initial)
    if start <= 0:
        return None
    limit = factor * start
    if chance_level is not None:
        limit = max(limit, chance_level)
    if smoothed <= limit:
        return None
    recent = stats.recent_level(DIVERGE_RECENT_STEPS)
    return Verdict(
        "loss_diverging",
        f"The smoothed training loss jumped to {smoothed:.4g}, {smoothed / start:.3g}x its starting value {start:.4g}, "
        f"by step {stats.count} (median of the last {min(DIVERGE_RECENT_STEPS, len(stats.window))} losses "
        f"{recent:.4g}): a burst of very large losses.",
        "A burst this early usually means the learning rate is too high for the start of training: lower it (try 1/10) "
        "or add learning-rate warm-up, and clip gradients (gradient_clip_val=1.0); the learning-rate probe, when "
        "attached, replays the start of training at several rates and says whether the rate caused it.",
        {"smoothed_loss": _r(smoothed), "start_loss": _r(start), "recent_median_loss": _r(recent),
         "ratio_to_start": _r(smoothed / start), "threshold_ratio": factor, "chance_level": _r(chance_level),
         "steps_seen": stats.count, "transient": 1},
        "info",
        probe="loss_spike" if chance_level is not None else None,
    )


# ---- impossible loss: the objective is wrong -------------------------------------------------------------------
# Cross-entropy, NLL, BCE and KL are never below zero: a classifier's loss (C classes known) that starts at -ln C and
# keeps falling is the negated cross-entropy at init (the model is being trained to be wrong), and one below
# -2 max(1, ln C) is reachable by no bounded classification objective (a negated Dice score stops at -1, an entropy
# bonus at -ln C). Measured (digits MLP, loss = -cross_entropy): the first loss is -2.34 against -ln 10 = -2.30 for
# every optimizer; Adam 1e-3 reaches -3.8 by step 50, -137 by step 300; SGD+momentum 0.1 reaches -1400 by step 20.
# F.nll_loss on raw logits (the log_softmax left out) falls without bound the same way. Healthy classifiers never
# produce a negative loss.
NEGATED_START_TOLERANCE = 0.25  # first loss within 25% of -ln C (the unexpected-initial-loss rule allows 60% above)
NEGATED_FALL_MARGIN = 0.05  # ... and the smoothed and recent losses 5% of |ln C| below that first loss
IMPOSSIBLE_BELOW_CHANCE = 2.0  # a classifier's loss below -2 max(1, ln C)
# Without a class count (regression, custom objectives): a loss that went negative, sits at least this many times its
# first value's magnitude below zero, and falls at least as fast in the newest third of the window as in the one
# before (not levelling off: a Gaussian NLL whose variance shrinks decelerates like a logarithm) is falling without
# bound.
UNBOUNDED_MAGNITUDE = 10.0
UNBOUNDED_MIN_VALUES = 30


def _thirds(stats: LossStatistics) -> Optional[tuple]:
    values = list(stats.window)
    if len(values) < UNBOUNDED_MIN_VALUES:
        return None
    k = len(values) // 3
    return median(values[:k]), median(values[k:2 * k]), median(values[2 * k:])


def impossible_loss(stats: LossStatistics, chance_level: Optional[float] = None) -> Optional[Verdict]:
    """``suspected_code_bug`` when the loss is below what its objective can reach or falls without bound."""
    first, smoothed = stats.initial, stats.smoothed
    if first is None or smoothed is None or len(stats.window) < DIVERGE_RECENT_STEPS:
        return None
    recent = stats.recent_level(DIVERGE_RECENT_STEPS)
    level = max(smoothed, recent)  # both must be below the bound: one odd batch is not enough
    evidence: Evidence = {"first_loss": _r(first), "smoothed_loss": _r(smoothed), "recent_median_loss": _r(recent),
                          "steps_seen": stats.count}
    seen = ""
    if chance_level is not None and chance_level > 0:
        evidence["chance_level"] = _r(chance_level)
        negated_start = abs(first + chance_level) <= NEGATED_START_TOLERANCE * chance_level
        if negated_start and level < first - NEGATED_FALL_MARGIN * chance_level:
            seen = (f"The training loss started at {first:.4g}, about minus the chance level ln C = {chance_level:.4g}, "
                    f"and keeps falling (now {smoothed:.4g}): that is a negated cross-entropy, which training drives "
                    "towards confidently wrong predictions.")
        elif level < -IMPOSSIBLE_BELOW_CHANCE * max(1.0, chance_level):
            seen = (f"The training loss is {smoothed:.4g}, far below zero: no cross-entropy, NLL, BCE or KL can be "
                    f"negative (chance level ln C = {chance_level:.4g}).")
    if not seen and level < 0:
        thirds = _thirds(stats)
        if thirds is not None:
            older, middle, newest = thirds
            falling = older > middle > newest and (middle - newest) >= (older - middle)
            far = -level >= UNBOUNDED_MAGNITUDE * max(abs(first), 1e-12) and level < min(first, older)
            if falling and far:
                evidence.update(third_medians=f"{older:.4g}, {middle:.4g}, {newest:.4g}")
                seen = (f"The training loss fell from {first:.4g} to {smoothed:.4g} and is still falling as fast as ever "
                        f"(medians of the window's thirds {older:.4g}, {middle:.4g}, {newest:.4g}): a loss that falls "
                        "without bound has no minimum to find.")
    if not seen:
        return None
    return Verdict(
        "suspected_code_bug",
        seen,
        "The loss is being maximized or has no lower bound: check its sign (a stray minus, `-loss`, or a score such as "
        "accuracy or a log-likelihood returned as the loss), that F.nll_loss receives log_softmax outputs (not raw "
        "logits), and that the loss compares the model's output with the right targets.",
        evidence,
    )


# ---- loss_oscillating -------------------------------------------------------------------------------------
# Swing ratio = min(swing/level, swing/(start - best)) (see LossStatistics.swing_ratio), judged only when the window
# made no net progress (TheDeepChecker checks fluctuation "without decrease" over a window). Measured, on windows
# with no progress: healthy runs (batch 4..32, Adam/SGD/AdamW, MLP/CNN/MSE) <= 0.072 (0.29 / 0.37 for batch 4 /
# MSE batch 8 early windows, both ruled out by OSC_MIN_LEVEL_TO_START); Adam lr=0.1 >= 0.72 from its first window.
OSC_SWING_RATIO = 0.4
OSC_MAX_PROGRESS = 0.1  # the newer half-window's median is less than 10% below the older's
# "Without net progress" since the start too: the window's median is still above half the starting loss.
# Measured: healthy runs pass below 0.5x start before their noise could look like swings (see above).
OSC_MIN_LEVEL_TO_START = 0.5
OSC_CONSECUTIVE_CHECKS = 2  # seen at two checks in a row (about 10 steps apart)
# For a classifier: the loss keeps swinging back above the chance level ln C (the model repeatedly loses what it
# learned). Measured on windows after the first 50 steps: Adam lr=0.1 has 28-44% of its losses above ln C; healthy
# runs at most 24% while still near chance (where their swing ratio is <= 0.07) and ~0% once trained -- so a run
# that starts from trained weights (fine-tuning, a second fit) with a noisy but low loss is not called oscillating.
OSC_MIN_FRACTION_ABOVE_CHANCE = 0.15


def oscillation_evidence(stats: LossStatistics, swing_ratio: float = OSC_SWING_RATIO,
                         chance_level: Optional[float] = None) -> Optional[Evidence]:
    """The swing figures when the window shows the oscillation pattern, else None."""
    if not stats.window_full:
        return None
    ratio, progress, start = stats.swing_ratio(), stats.relative_progress(), stats.start
    if ratio is None or progress is None or start is None or start <= 0:
        return None
    level = stats.level()
    if ratio <= swing_ratio or progress >= OSC_MAX_PROGRESS or level <= OSC_MIN_LEVEL_TO_START * start:
        return None
    evidence: Evidence = {
        "swing_ratio": _r(ratio), "median_step_swing": _r(stats.swing()), "window_median_loss": _r(level),
        "start_loss": _r(start), "best_loss": _r(stats.best), "window_relative_progress": _r(progress),
        "window": stats.window_size, "threshold_swing_ratio": swing_ratio}
    if chance_level is not None:
        above = sum(1 for v in stats.window if v > chance_level) / len(stats.window)
        if above < OSC_MIN_FRACTION_ABOVE_CHANCE:
            return None
        evidence["fraction_above_chance"] = _r(above)
        evidence["chance_level"] = _r(chance_level)
    return evidence


def loss_oscillating(evidence: Evidence, consecutive_checks: int = OSC_CONSECUTIVE_CHECKS) -> Optional[Verdict]:
    """``evidence``: :func:`oscillation_evidence` of this check; ``consecutive_checks``: how many checks in a row
    (this one included) showed the pattern. A warning asks the probe for a learning rate."""
    if consecutive_checks < OSC_CONSECUTIVE_CHECKS:
        return None
    # Without a chance level (regression, unknown loss) the run may have started from trained weights, whose
    # minibatch noise looks the same: an ``info`` only.
    severity = None if "chance_level" in evidence else "info"
    return Verdict(
        "loss_oscillating",
        f"The training loss swings by {evidence['median_step_swing']:.3g} from step to step around "
        f"{evidence['window_median_loss']:.3g} without net progress over the last {evidence['window']} steps "
        f"(start {evidence['start_loss']:.3g}, best smoothed {evidence['best_loss']:.3g}).",
        "Lower the learning rate (try 1/3 to 1/10 of it); for plain SGD add momentum=0.9, or use a larger batch; "
        "the learning-rate probe, when attached, suggests a value.",
        evidence,
        severity,
        probe="loss_oscillating" if severity is None else None,  # an info-level swing does not spend the probe's budget
    )


# ---- loss_plateau / stalled -------------------------------------------------------------------------------
# "Flat": the newer half-window's median is within 1% of the older's. Measured: a deep sigmoid net at its plateau
# moves |0.001|; the slowest healthy run (plain SGD lr=0.01, still improving) moves >= 0.034 per half-window.
PLATEAU_MAX_PROGRESS = 0.01
# "Far above its best reachable level": for a classifier (C known), still at >= 90% of the chance level ln C --
# no learning has happened (also true when stuck above it). A converged healthy run is flat too, but far below
# ln C; a run that starts from trained weights is flat near its start, so without C only its start is known and
# we cannot tell a plateau from a converged model: then only ``info`` unless gradients are known to be tiny.
PLATEAU_NEAR_START = 0.9
# Without a gradient signal the loss must stay flat this many windows before a warning (stronger evidence);
# with ``GRAD_TINY`` one window is enough. Gradients known not to be tiny: an ``info`` (the probe decides).
PLATEAU_WINDOWS_WITHOUT_GRADIENTS = 2
PLATEAU_WINDOWS_WITH_TINY_GRADIENTS = 1
# Probe request: flat (< 1% per half-window) at two checks in a row (~10 steps apart) and near the start/chance,
# after a warm-up of ~40 steps, so the probe can still act in short runs. Measured: healthy runs progress >= 3.4%
# per half-window while near their start (one 2-class spirals window dipped to 1.9%, its next one was 4.4%);
# plateaus and an SGD lr=1e-4 run move < 0.3%.
STALL_MAX_PROGRESS = 0.01
STALL_CONSECUTIVE_CHECKS = 2
# The published ``signals.LOSS_STALLED``: progress below 2% per half-window (a looser "almost no progress" for
# the monitors that combine it with their own evidence, e.g. underfitting).
STALLED_SIGNAL_MAX_PROGRESS = 0.02


def stalled_signal(progress: Optional[float]) -> bool:
    """What the loss monitor publishes as ``signals.LOSS_STALLED`` (after its warm-up): almost no progress."""
    return progress is not None and progress < STALLED_SIGNAL_MAX_PROGRESS


def near_start(stats: LossStatistics, chance_level: Optional[float]) -> bool:
    """The window's median is still near the chance level (classifier) or, without one, near the start."""
    reference = chance_level if chance_level is not None else stats.start
    if reference is None or reference <= 0 or not stats.window:
        return False
    return stats.level() >= PLATEAU_NEAR_START * reference


def flat(stats: LossStatistics, max_progress: float = PLATEAU_MAX_PROGRESS) -> bool:
    progress = stats.relative_progress()
    return progress is not None and abs(progress) < max_progress


def stalled_near_start(stats: LossStatistics, chance_level: Optional[float]) -> bool:
    """One check's evidence of a stall worth a probe: flat by ``STALL_MAX_PROGRESS`` and still near the start/chance."""
    return near_start(stats, chance_level) and flat(stats, STALL_MAX_PROGRESS)


def stall_probe(consecutive_checks: int) -> Optional[str]:
    """The probe request once :func:`stalled_near_start` held at ``STALL_CONSECUTIVE_CHECKS`` checks in a row (LR too
    low or a code bug: the probe tells which); else ``None``."""
    return "loss_stalled" if consecutive_checks >= STALL_CONSECUTIVE_CHECKS else None


def loss_plateau(stats: LossStatistics, flat_steps: int, chance_level: Optional[float],
                 gradients_tiny: Optional[bool]) -> Optional[Verdict]:
    """``flat_steps``: for how many steps the loss has been flat and near its start (counted by the caller)."""
    windows_needed = (PLATEAU_WINDOWS_WITH_TINY_GRADIENTS if gradients_tiny else PLATEAU_WINDOWS_WITHOUT_GRADIENTS)
    if flat_steps < windows_needed * stats.window_size:
        return None
    sure = gradients_tiny is True or (gradients_tiny is None and chance_level is not None)
    severity = None if sure else "info"
    level = stats.level()
    grads = {True: "gradients are tiny", False: "gradients are not tiny", None: "gradients not measured"}[gradients_tiny]
    where = (f"at or above the chance level ln C = {chance_level:.4g}" if chance_level is not None
             else f"near its start {stats.start:.4g}")
    return Verdict(
        "loss_plateau",
        f"The training loss has been flat at {level:.4g} for {flat_steps} steps, {where} ({grads}).",
        "Raise the learning rate (the probe, when attached, suggests a value) or use momentum/Adam to leave the "
        "plateau; check the initialization (He/Xavier, not tiny weights), use ReLU-family activations instead of "
        "sigmoid in deep nets, and add BatchNorm/LayerNorm.",
        {"window_median_loss": _r(level), "start_loss": _r(stats.start), "best_loss": _r(stats.best),
         "chance_level": _r(chance_level), "flat_steps": flat_steps,
         "window_relative_progress": _r(stats.relative_progress()), "gradients": grads},
        severity,
    )


# ---- outputs that look like probabilities ---------------------------------------------------------------------
# The classic bug of feeding softmax probabilities to CrossEntropyLoss (which applies log-softmax itself): for C classes
# its loss is bounded below by ln(e + C - 1) - 1 (C = 3: 0.55 = 0.50 ln C; C = 4: 0.74 = 0.54 ln C) and its gradients
# are scaled down. Depending on the task the curve either falls slowly near ln C (4-class make_classification, Adam
# 1e-3: 0.98-0.99 ln C at step 40) or quickly flattens at the bound (3-class wine, SGD+momentum: at 0.52 ln C by step
# 90) - neither is a curve the other rules call wrong. The loss monitor sees the model's output on the first batch
# instead: rows in [0, 1] summing to 1. A model may output probabilities legitimately (softmax, then log and NLL in
# the loss; PyTorch advises log_softmax), so this is no finding: after the warm-up the monitor asks the probe once, and
# its sweep tells the two apart (no learning rate fits a batch through the bounded loss). Cost: one probe in a fit
# whose model outputs probabilities.
def probabilities_to_probe(stats: LossStatistics, outputs_are_probabilities: bool,
                           chance_level: Optional[float]) -> Optional[str]:
    """The probe request for a classifier (C known) whose first-batch outputs looked like probabilities, with some
    losses seen (softmax fed to cross-entropy, or a legitimate NLL: the probe tells which); else ``None``."""
    if bool(outputs_are_probabilities) and chance_level is not None and stats.count > 0:
        return "probability_outputs"
    return None


# ---- unexpected_initial_loss ------------------------------------------------------------------------------
# Karpathy, "A Recipe for Training Neural Networks" (2019), "verify loss @ init": a C-class softmax classifier
# scores about ln C at init. Default PyTorch init gives logits with std ~0.3-1 and a loss within ~0.5 nat of ln C;
# logits with std 2 give ln C + 1.0..1.9, std 3 give ln C + 1.2..4.3 (C = 2..1000, measured on Gaussian logits).
# We flag a first loss above both thresholds below: about logit std >= 2..3, a badly scaled last layer (x100 gives
# 16x ln C). A first loss BELOW ln C is never flagged (a pre-trained model starts lower).
INIT_LOSS_RATIO = 1.6  # first loss above 1.6 x ln C ...
INIT_LOSS_MIN_EXCESS = 1.0  # ... and at least 1 nat above it
# A loss summed (not averaged) over the batch starts near B x ln C: a deliberate choice, not an init problem.
INIT_SUMMED_TOLERANCE = 0.3


def unexpected_initial_loss(first_loss: float, num_classes: int, batch_size: Optional[int], inferred: bool,
                            ratio: float = INIT_LOSS_RATIO) -> Optional[Verdict]:
    if num_classes < 2 or not math.isfinite(first_loss):
        return None
    chance = math.log(num_classes)
    if first_loss <= ratio * chance or first_loss - chance <= INIT_LOSS_MIN_EXCESS:
        return None
    if batch_size and batch_size > 1 and abs(first_loss / (batch_size * chance) - 1.0) < INIT_SUMMED_TOLERANCE:
        return None  # reduction="sum": about B x ln C, as expected
    how = "inferred from the output width and integer targets" if inferred else "given"
    return Verdict(
        "unexpected_initial_loss",
        f"The first training loss is {first_loss:.4g}, {first_loss / chance:.3g}x the chance level ln {num_classes} = "
        f"{chance:.4g} expected at initialization ({num_classes} classes, {how}).",
        f"The logits start too large: initialize the last layer with small weights (e.g. nn.init.zeros_ or std 0.01 "
        f"on its weight, bias 0, or the log class priors), check inputs are normalized, and check the class count "
        f"({num_classes}); a loss near ln {num_classes} = {chance:.3g} at step 0 is the target (Karpathy 2019).",
        {"first_loss": _r(first_loss), "chance_level": _r(chance), "num_classes": num_classes,
         "ratio_to_chance": _r(first_loss / chance), "num_classes_source": "inferred" if inferred else "given",
         "threshold_ratio": ratio},
    )
