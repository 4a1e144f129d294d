"""Rules on gradient statistics: exploding, vanishing, missing gradients, zig-zag updates, high gradient noise.

Each rule takes plain numbers (computed by :mod:`diag.stats.gradients` / :mod:`diag.stats.noise_scale`) and
returns a :class:`~diag.detectors.Verdict` or ``None``. Thresholds are named constants with their source or the measurement
that justifies them; "measured" figures are from the runs in ``tests/test_gradients.py`` (digits MLPs, spirals,
synthetic regression), quoted as healthy value vs fault value.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

from diag.detectors import Verdict

Number = Union[int, float, str]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ---- exploding gradients --------------------------------------------------------------------------------
# "Orders of magnitude": two decades above the early level (the median of the first sampled steps), on every one
# of the last few sampled steps so that a single spike (a hard batch, a loss spike Adam absorbs) does not count.
# Measured: healthy digits/spirals runs stay within 1.5 decades of their early level (SGD, Adam, momentum).
EXPLODE_GROWTH_DECADES = 2.0
EXPLODE_PERSISTENCE = 3  # consecutive sampled steps above the bar
# Healthy deep networks can grow their gradient norms while they learn (measured: a 9-layer ReLU MLP under Adam grows
# 1.45 decades over 10 epochs on digits while its loss falls), so growth counts only while the loss is not falling by more
# than this fraction over the recent window. Non-finite gradient norms count regardless.
EXPLODE_LOSS_IMPROVING = 0.05
EXPLODE_ADVICE = ("Clip gradients (Trainer(gradient_clip_val=1.0)), lower the learning rate, and check the "
                  "initialization scale (Kaiming/Xavier, not larger); normalization layers (BatchNorm/LayerNorm) or "
                  "residual connections keep gradient norms stable through depth.")


def exploding_gradients(early_log10_norm: float, recent_log10_norms: Sequence[float],
                        loss_progress: Optional[float]) -> Optional[Verdict]:
    """Gradient norms far above their early level (or non-finite) on each of the last few sampled steps, while the loss
    is not improving (growth alone is allowed: see EXPLODE_LOSS_IMPROVING)."""
    recent = list(recent_log10_norms)
    improving = loss_progress is not None and math.isfinite(loss_progress) and loss_progress > EXPLODE_LOSS_IMPROVING
    if len(recent) >= EXPLODE_PERSISTENCE:
        last = recent[-EXPLODE_PERSISTENCE:]
        nonfinite = all(not math.isfinite(v) for v in last)
        if math.isfinite(early_log10_norm) and (nonfinite or (
                not improving and all(v - early_log10_norm >= EXPLODE_GROWTH_DECADES for v in last))):
            now = last[-1]
            growth = "to non-finite values" if nonfinite else f"{10 ** (now - early_log10_norm):.3g}x"
            return Verdict(
                "exploding_gradients",
                message=(f"The total gradient norm grew {growth} over its early level "
                         f"({_fmt(10 ** early_log10_norm)}) and stayed there for the last {EXPLODE_PERSISTENCE} "
                         f"sampled steps (now {_fmt(10 ** now) if math.isfinite(now) else now})."),
                advice=EXPLODE_ADVICE,
                evidence={"early_grad_norm": 10 ** early_log10_norm,
                          "grad_norm": 10 ** now if math.isfinite(now) else "nonfinite",
                          "growth_factor": 10 ** (now - early_log10_norm) if math.isfinite(now) else "inf",
                          "threshold_factor": 10 ** EXPLODE_GROWTH_DECADES})
    return None


# ---- vanishing gradients --------------------------------------------------------------------------------
# AutoTrainer (Zhang et al., ICSE 2021) flags vanishing gradients when the first layer's gradient is below 1e-3 of
# the last layer's. A healthy deep network can sit there while learning, so we also require that training stalls.
VANISH_DEPTH_RATIO = 1e-3
VANISH_ADVICE = ("Use ReLU-family activations with He (Kaiming) initialization or tanh with Xavier initialization "
                 "instead of sigmoid with a small init, add BatchNorm/LayerNorm between layers, or residual "
                 "connections; a higher learning rate alone does not fix it.")


def vanishing_gradients(depth_log10_ratio: float, depth_samples: int, min_samples: int, stalled: Optional[bool],
                        first_layer: str, last_layer: str) -> Optional[Verdict]:
    if depth_samples < min_samples or not math.isfinite(depth_log10_ratio):
        return None
    if depth_log10_ratio >= math.log10(VANISH_DEPTH_RATIO) or not stalled:
        return None
    r = 10 ** depth_log10_ratio
    return Verdict(
        "vanishing_gradients",
        message=(f"The first layer ({first_layer}) gets {_fmt(r)}x the gradient norm of the last layer ({last_layer}) "
                 f"over {depth_samples} sampled steps, and the training loss is not improving."),
        advice=VANISH_ADVICE,
        evidence={"first_to_last_grad_norm_ratio": r, "threshold": VANISH_DEPTH_RATIO, "samples": depth_samples,
                  "first_layer": first_layer, "last_layer": last_layer})


# ---- missing gradients ----------------------------------------------------------------------------------
# A trainable parameter (requires_grad, in an optimizer) whose .grad is None on every one of this many sampled steps
# is cut from the graph. A handful of samples across the warm-up and later steps already rules out chance: a
# parameter that is used gets a gradient on every step (embedding rows aside, which is why we judge whole tensors).
MISSING_MIN_SAMPLES = 8
MISSING_ADVICE = ("Find where the graph is cut: a .detach(), .item()/.numpy() or torch.no_grad() in forward, a module "
                  "that is built but never called, or an output that does not reach the loss. If the parameters are "
                  "meant to stay fixed, freeze them with requires_grad_(False) (or leave them out of the optimizer).")
ZERO_GRAD_ADVICE = ("Gradients that exist but are exactly zero come from a graph cut by a constant (multiplication by "
                    "zero, a mask, a non-differentiable op such as argmax/round) or from units that never activate "
                    "(dead ReLUs upstream). Check the forward pass of these layers; freeze them if that is intended.")


def missing_gradients_applies(samples: int) -> bool:
    """Whether a parameter expected on ``samples`` sampled optimizer steps has been watched long enough to be judged."""
    return samples >= MISSING_MIN_SAMPLES


def missing_gradients(layer: str, none_params: List[str], zero_params: List[str], samples: int) -> Optional[Verdict]:
    if not missing_gradients_applies(samples) or not (none_params or zero_params):
        return None
    if none_params:
        return Verdict(
            "missing_gradients",
            message=(f"Trainable parameters of {layer} ({', '.join(none_params)}) never received a gradient "
                     f"(.grad is None on all {samples} sampled optimizer steps)."),
            advice=MISSING_ADVICE, layer=layer,
            evidence={"parameters": ", ".join(none_params + zero_params), "samples": samples, "kind": "none"})
    return Verdict(
        "missing_gradients",
        message=(f"Trainable parameters of {layer} ({', '.join(zero_params)}) get an exactly zero gradient on all "
                 f"{samples} sampled optimizer steps."),
        advice=ZERO_GRAD_ADVICE, layer=layer, severity="warning",
        evidence={"parameters": ", ".join(zero_params), "samples": samples, "kind": "zero"})


# ---- zig-zag updates ------------------------------------------------------------------------------------
# Consecutive updates of an SGD step on a quadratic point in opposite directions along eigen-directions with
# lr * curvature > 1 (Goodfellow et al., Deep Learning, ch. 8.3.2 on momentum; the stability limit is lr < 2/λ).
# Mini-batch noise keeps the cosine of consecutive updates near 0 in healthy runs (measured -0.05…0.3 on digits/spirals
# with SGD, momentum and Adam; -0.14 at worst with plain SGD on a badly scaled deep net); an ill-conditioned linear
# regression under plain SGD at 0.98x its stability limit gives -0.86.
ZIGZAG_COSINE = -0.5  # EMA of the cosine between consecutive updates (all parameters of the optimizer)
ZIGZAG_MIN_PAIRS = 5
# "Not improving fast": the smoothed loss did not halve over the recent window (measured: 0.37 on the zig-zagging
# regression, whose loss creeps down along its flat directions). The cosine is the primary evidence.
ZIGZAG_MAX_PROGRESS = 0.5
ZIGZAG_ADVICE = ("Use momentum (SGD(momentum=0.9)) or Adam, which average out the oscillating component; lower the "
                 "learning rate (the step overshoots along the steepest direction); and normalize (standardize) the "
                 "input features so that the loss surface is better conditioned.")


def zigzag_updates(cosine_ema: float, pairs: int, progress: Optional[float], stalled: Optional[bool],
                   worst_layer: Optional[str], worst_cosine: float) -> Optional[Verdict]:
    if pairs < ZIGZAG_MIN_PAIRS or not math.isfinite(cosine_ema) or cosine_ema > ZIGZAG_COSINE:
        return None
    slow = bool(stalled) or (progress is not None and math.isfinite(progress) and progress < ZIGZAG_MAX_PROGRESS)
    if not slow:
        return None
    evidence: Dict[str, Number] = {"update_cosine": cosine_ema, "threshold": ZIGZAG_COSINE, "pairs": pairs}
    if progress is not None and math.isfinite(progress):
        evidence["loss_relative_progress"] = progress
    if worst_layer is not None:
        evidence["worst_layer"], evidence["worst_layer_cosine"] = worst_layer, worst_cosine
    return Verdict(
        "zigzag_updates",
        message=(f"Consecutive updates point in opposite directions (cosine {_fmt(cosine_ema)} averaged over {pairs} "
                 f"pairs of steps) while the loss improves slowly: the optimizer bounces across a steep valley."),
        advice=ZIGZAG_ADVICE, evidence=evidence)


# ---- gradient noise -------------------------------------------------------------------------------------
# McCandlish et al. (2018): B_simple approximates the critical batch size; training at B << B_crit spends most of
# each step on noise (steps are ~B_crit/B times less effective than noise-free ones). We warn only far below it,
# where even 10x more samples per step would still be noise dominated. Measured (recent-window mean): healthy digits
# MLPs at batch 64 stay below 5x for 12 epochs (inf once converged); batch 2 with plain SGD gives 10x to inf.
NOISE_FACTOR = 10.0
# Single estimates are very noisy at small batches: we judge the arithmetic mean of the last NOISE_WINDOW estimates
# through a lower confidence bound on B_simple (|G|² raised by two standard errors).
NOISE_WINDOW = 10
# The noise scale also grows without bound as a healthy run converges (|G|² -> 0; McCandlish et al. fig. 4), so the
# ratio alone is only a hint (info). It is a warning when the loss is stuck (progress below 10% over the recent window)
# while still above half of its initial value: the noise floor, not the problem, limits the loss.
NOISE_MAX_PROGRESS = 0.1
NOISE_LOSS_STILL_HIGH = 0.5
# B_simple is also large where the true gradient vanishes (a plateau, a poor local minimum): there a larger batch does not
# help. Measured: a tanh MLP stuck on spirals at batch 64 has B_simple ≈ 1200 (19x) with a stalled loss, while batch 2
# on digits/spirals gives ≥ 500x or an unresolvable |G|². We warn only for batches below this size, where the noise is
# intrinsic to the batch; larger batches get the info hint.
NOISE_WARNING_MAX_BATCH = 16


NOISE_ADVICE = ("Gradient noise dominates each step. Use a larger batch (batch_size about {suggest}, or "
                "Trainer(accumulate_grad_batches={accum})), SGD momentum (0.9) or Adam to average the noise, or a "
                "lower learning rate.")


def noise_can_warn(batch_size: int) -> bool:
    """Whether gradient noise at this batch size can be a warning (below ``NOISE_WARNING_MAX_BATCH``), not only a hint:
    the monitor takes its costly estimate less often where it cannot."""
    return batch_size < NOISE_WARNING_MAX_BATCH


def high_gradient_noise(noise_scale: float, batch_size: int, estimates: int, stalled: Optional[bool],
                        progress: Optional[float], loss_fraction_of_initial: Optional[float]) -> Optional[Verdict]:
    """B_simple (recent window) many times the batch size; a warning only while the loss is stuck high."""
    if estimates < NOISE_WINDOW or batch_size <= 0 or not noise_scale > NOISE_FACTOR * batch_size:
        return None
    slow = bool(stalled) or (progress is not None and math.isfinite(progress) and progress < NOISE_MAX_PROGRESS)
    high = loss_fraction_of_initial is not None and loss_fraction_of_initial > NOISE_LOSS_STILL_HIGH
    severity = "warning" if slow and high and noise_can_warn(batch_size) else "info"
    finite = math.isfinite(noise_scale)
    shown = f"about {noise_scale:.0f}" if finite else "beyond measurement (|G|² indistinguishable from 0)"
    times = f"{noise_scale / batch_size:.3g}x" if finite else "many times"
    suggest = max(batch_size * 4, int(2 ** round(math.log2(max(noise_scale / 2, 1.0))))) if finite else batch_size * 8
    accum = max(2, int(round(suggest / batch_size)))
    state = ("while the loss is not improving and still at {:.0%} of its initial value".format(loss_fraction_of_initial)
             if severity == "warning" else "(the noise scale also grows as a run converges or sits on a plateau: a hint)")
    evidence: Dict[str, Number] = {"noise_scale": noise_scale if finite else "inf", "batch_size": batch_size,
                                   "critical_batch_size": noise_scale if finite else "inf",
                                   "threshold_factor": NOISE_FACTOR, "estimates": estimates,
                                   "suggested_batch_size": suggest}
    if loss_fraction_of_initial is not None:
        evidence["loss_fraction_of_initial"] = loss_fraction_of_initial
    if progress is not None and math.isfinite(progress):
        evidence["loss_relative_progress"] = progress
    return Verdict(
        "high_gradient_noise",
        message=(f"The gradient noise scale (critical batch size) is {shown}, {times} the batch size {batch_size} "
                 f"(mean of the last {estimates} estimates) {state}: each step's gradient is mostly noise."),
        advice=NOISE_ADVICE.format(suggest=suggest, accum=accum), severity=severity, evidence=evidence)


# ---- stalling (own evidence, used only when no loss monitor publishes LOSS_STALLED) ----------------------
# The loss fell less than 5% over the recent sampled window and less than 5% since the start: stalled.
# Measured: healthy digits runs fall > 50% within the first epoch; a vanishing-gradient sigmoid net < 1%.
STALL_PROGRESS = 0.05


def own_loss_stalled(progress: float, since_start: float) -> bool:
    """Stalled by the monitor's own loss samples: relative progress over the recent window and since the start both
    below ``STALL_PROGRESS``."""
    return progress < STALL_PROGRESS and since_start < STALL_PROGRESS


# ---- tiny gradients / small updates (published, judged elsewhere) ----------------------------------------
# Gradient norm relative to the weight norm below this is "tiny" (plateau / saddle evidence for the loss monitor).
# Measured: healthy digits/spirals runs 3e-3…1e-1; a deep sigmoid net with tiny init 1e-6.
TINY_GRAD_TO_WEIGHT = 1e-4
# TheDeepChecker (Ben Braiek & Khomh) accepts log10(|Δθ|/|θ|) in [-4, -1]; CS231n's rule of thumb is about 1e-3.
# Below the range the learning rate is likely too low: we only ask the learning-rate probe to check.
UPDATE_RATIO_LOW = 1e-4
UPDATE_RATIO_HIGH = 1e-1


def gradients_tiny(log10_grad_to_weight: float) -> bool:
    """Whether the gradient norm (log10 of its ratio to the weight norm) is tiny: what ``signals.GRAD_TINY`` says."""
    return log10_grad_to_weight < math.log10(TINY_GRAD_TO_WEIGHT)


def update_ratio_probe(log10_update_ratio: float) -> Optional[str]:
    """The reason to ask the learning-rate probe, when the update-to-weight ratio (log10) is outside the accepted range;
    else ``None``."""
    if log10_update_ratio < math.log10(UPDATE_RATIO_LOW):
        return "update_too_small"
    if log10_update_ratio > math.log10(UPDATE_RATIO_HIGH):
        return "update_too_large"
    return None
