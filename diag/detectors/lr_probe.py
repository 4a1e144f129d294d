"""The learning-rate probe's verdict: learning rate too high, too low, a code bug, or fine.

Every function returns a :class:`~diag.detectors.Verdict` (``lr_ok`` when the rate is fine: never reported); a verdict
that names a rate carries it in ``suggested_lr``.

Reads a :class:`diag.probe.ProbeResult` (per learning-rate factor: how far the loss on the fitted half of a
frozen batch fell, how the held-out half moved; plus the zero-input baseline) and says what a senior engineer
would say. Thresholds were set on the fault suite in ``tests/test_lr_probe.py`` (digits MLP/CNN, GRU on tokens,
a regression MLP) with the margins noted next to each.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from diag.detectors import Verdict
from diag.probe import FactorResult, ProbeResult

# A factor "fits" the batch when its steps remove at least half of the start loss (Karpathy's "overfit one
# batch": a working model and learning rate drive a tiny batch's loss towards zero). Healthy runs: the best factor
# removes >= 97% in 30 steps; the softmax-into-CrossEntropy bug cannot pass 37% on 10 classes (its loss is bounded
# below, see PROBABILITY_FLOOR_TOLERANCE; with 2-3 classes the bound lets it reach 50-55%).
FIT_PROGRESS = 0.5
# The current learning rate "barely moves" the batch below this progress (the issue: "< a few %"). Healthy runs:
# the current factor removes >= 24% (CNN+BatchNorm at step 30); too-low runs (SGD 1e-5, Adam 1e-7): < 0.1%.
STALL_PROGRESS = 0.05
# For lr_too_low, a larger factor must remove at least this much (Adam 1e-7 at 1e4x removes 54%, SGD 1e-5 73%).
LOW_LARGER_PROGRESS = 0.25
# lr_too_low only while the batch loss is still at least this share of the input-free loss (the model has not
# learned much yet): a converged model barely moves at any sane learning rate, and a larger one always "wins" on a
# single batch. Too-low runs: 1.0 (at chance); healthy runs at step 30: 0.25 (SGD+momentum) to 1.0 (GRU).
LOW_LR_MIN_REMAINING = 0.5
# Held-out loss after the steps over max(held-out start, fit start): above this the factor blew the model up even if
# it memorized the fitted half (CS231n: "cost above 3x the initial" means the learning rate is too high).
# Healthy runs at the current factor: <= 1.45 (GRU at step 1); Adam at 3.0: 7.4; SGD at 3.0 diverges.
HELDOUT_BLOWUP_RATIO = 3.0
BLOWUP_FLOOR_SHARE = 0.5
# "A smaller factor fits far better": its progress beats the current one's by this much while the current one does
# not fit. Healthy runs: the current factor always beats 1/10 of it (by >= 0.2); CNN at SGD lr=5: 0.87 vs 0.28.
SMALLER_MUCH_BETTER = 0.3
# No factor fits: the best factor removes less than this (model ignoring its input: 8%; healthy: >= 97%).
NO_FIT_PROGRESS = 0.10
# The loss ignores the input when, after fitting, the real-input loss is within this ratio of the zero-input loss,
# either way (Karpathy's input-independent baseline). Bugs: ratio 1.00 (the two fits see the same batch but for
# the inputs: an input-free model gives the same loss to within rounding); healthy runs <= 0.3 (low LR at its best
# factor); a slow sigmoid MLP on a plateau under plain SGD: 0.909 (it uses its input, only little yet: not a bug);
# wrecked weights (SGD at lr=8) fit the zeroed batch far better than the real one (ratio 1e6): not a bug.
INPUT_GAIN_RATIO = 0.97
# Labels not aligned with inputs: the loss monitor saw the loss stall (one of STALL_REASONS), after at least this
# many optimizer steps the current weights still do no better with the real inputs than with zeros (within
# INPUT_USE_RATIO), the batch can be memorized, and fitting it helps the held-out half by less than 1%.
# Shuffled digits labels at step 100-120: input-use ratio 0.93-0.99 (memorization slowly lowers it), held-out 1.00.
# Healthy runs: converged models <= 0.4 input-use; a hard task (two spirals, tanh MLP) 0.965 at step 60 and 0.90 at
# step 150 with held-out 0.97/0.96 - too close to call early, hence the stall requirement, the step minimum and the
# 1% bar. A preflight probe never makes this call (a hard task and misaligned labels look alike that early).
# "The batch can be memorized" means a factor takes the fitted half's loss down by FIT_PROGRESS without diverging,
# whatever it does to the held-out half: memorizing labels that do not depend on the inputs must make confidently wrong
# predictions on the held-out half, so its loss blowing up is what misaligned labels predict, not a sign against them
# (a 4-class MLP on shuffled labels at step 58: 10x memorizes the half, 100% progress, held-out loss 7x; 1x falls 28%).
STALL_REASONS = ("loss_stalled", "loss_plateau")
MIN_TRAINED_STEPS_FOR_ALIGNMENT = 50
INPUT_USE_RATIO = 0.9
HELDOUT_NO_GAIN = 0.99
MIN_HELDOUT_SAMPLES = 8
# Capacity: Zhang et al. 2017 ("Understanding deep learning requires rethinking generalization", Theorem 1): a
# two-layer ReLU network with 2n + d weights can fit any n samples in d dimensions. A model with fewer trainable
# parameters than this many per fitted sample may fail to fit the probe's batch, or gain little from its input,
# for lack of capacity rather than a bug (a linear classifier on two spirals: best progress 9%, real/zeroed-input
# loss 0.92). Then "nothing fits", "ignores the input" and "labels misaligned" are not called: the FitMonitor's
# underfitting rule speaks for such a model.
MEMORIZE_PARAMS_PER_SAMPLE = 2


def capacity_limited(result: ProbeResult) -> bool:
    return 0 < result.trainable_params < MEMORIZE_PARAMS_PER_SAMPLE * result.samples_fit


# For such a model lr_too_low also needs the larger factor to lower the held-out half's loss by this share.
LOW_LR_HELDOUT_GAIN = 0.1
# Any other model: by this share (SGD at 1e-5 on a 4-class MLP: 1e4x lowers the held-out half by 4.3% in 30 steps).
LOW_LR_HELDOUT_MIN_GAIN = 0.02


# Softmax fed to cross-entropy: on probability rows p of width C, cross-entropy (log-softmax of p) is bounded below by
# ln(e + C - 1) - 1, reached at a one-hot p (the function is convex on the simplex and every direction away from the
# vertex raises it). A model whose outputs look like probabilities and whose batch loss no factor can take below that
# floor, while the best factor stops at it (within this share) or nothing fits the batch, shows the bug's fingerprint;
# a legitimate softmax + log + NLL model memorizes the batch far below it. Measured: 3-class wine, 8-sample batch,
# the best factor stops at 1.000-1.002x the floor (progress 0.50: "fits" by FIT_PROGRESS alone, which called it
# lr_too_high through the wrecked-weights path).
PROBABILITY_FLOOR_TOLERANCE = 0.05


def cross_entropy_floor_on_probabilities(classes: int) -> float:
    """The lowest cross-entropy (mean over samples) that probability rows of width ``classes`` can score."""
    return math.log(math.e + classes - 1) - 1.0


# Vanishing gradients (AutoTrainer's first/last layer ratio, as the GradientMonitor uses): a deep sigmoid MLP under
# SGD gets 1e-5 of the last layer's gradient in its first layer; no learning rate fits the batch in 30 steps and the
# output barely depends on the input - a design problem that the gradient monitor names, not a code bug.
VANISHING_GRAD_RATIO = 1e-3


def _pct(progress: float) -> str:
    if not math.isfinite(progress):
        return "diverges"
    return f"falls {progress:.0%}" if progress >= 0 else f"rises {-progress:.0%}"


def _where(f: float) -> str:
    if math.isclose(f, 1.0):
        return "the current learning rate"
    return f"1/{1 / f:g} of the learning rate" if f < 1 else f"{f:g}x the learning rate"


def heldout_blowup(r: FactorResult, chance_loss: float = math.nan) -> float:
    # relative to the larger of the held-out and fitted start losses, and never to less than half the input-free
    # loss: a converged model (loss 0.01) that memorizes half a batch may double its tiny held-out loss harmlessly.
    if math.isnan(r.heldout_loss) and not r.diverged:
        return 0.0  # nothing held out (a batch that could not be split): no sign of a blow-up
    scale = max(r.heldout_start_loss, r.start_loss, BLOWUP_FLOOR_SHARE * chance_loss if chance_loss > 0 else 0.0)
    if r.diverged or not math.isfinite(r.heldout_loss) or not scale > 0:
        return math.inf
    return r.heldout_loss / scale


def fails(r: FactorResult, chance_loss: float = math.nan) -> bool:
    """The factor diverged, or blew the held-out half up."""
    return r.diverged or heldout_blowup(r, chance_loss) > HELDOUT_BLOWUP_RATIO


def fits(r: FactorResult, chance_loss: float = math.nan, threshold: float = FIT_PROGRESS) -> bool:
    return not fails(r, chance_loss) and r.progress >= threshold


def _best_heldout(candidates: Sequence[FactorResult]) -> FactorResult:
    return min(candidates, key=lambda r: (0.0 if math.isnan(r.heldout_loss) else r.heldout_loss, -r.progress))


# Every rate tried is too small to tell anything: no factor failed, the largest one made the most progress, and the
# decade below it made less than 1/SMALL_STEP_GAIN of that. In the small-step regime a loss moves in proportion to the
# rate (10x per decade); a model that cannot learn the batch (a cut graph: 0 at every rate; an ignored input: down to
# the label marginal, then flat; softmax into cross-entropy: down to its floor) stops gaining long before. Measured:
# StepLR(step_size=1, gamma=0.8) stepped every batch from 0.05 leaves SGD at 1.2e-10 by step 89; the sweep from 1/100
# to 1e5x of it moves a digits MLP's batch loss 2.4e-7, 1.8e-6, 2.4e-5, 2.4e-4, 2.4e-3 (10x per decade), and "no
# learning rate fits" became a code bug (and, re-probed from step 0's weights at step 0's rate, "training wrecked the
# weights, use 1.2e-11"). The code-bug rule's "no rate fits" then does not hold; lr_too_low says what does.
SMALL_STEP_GAIN = 3.0
# Below this the loss did not move at all (float32 rounding): every parameter gets a gradient, and yet no rate tried
# changes the loss. ExponentialLR(0.7) stepped every batch takes Adam from 1e-3 to 4e-14 by step 67; at up to 100x of
# that, the updates vanish in the weights' rounding. (A cut graph or a loss multiplied by zero leaves parameters
# without gradient, which the code-bug rule names on its own.)
UNMOVED = 1e-6


def below_useful_rates(result: ProbeResult) -> bool:
    """Whether the sweep never reached a rate that does anything: see ``SMALL_STEP_GAIN`` (and ``UNMOVED``)."""
    chance = result.zero_input_start_loss
    ordered = sorted(result.factors, key=lambda r: r.factor)
    if len(ordered) < 2 or any(fails(r, chance) for r in ordered):
        return False
    top, below = ordered[-1], ordered[-2]
    if all(abs(r.progress) < UNMOVED for r in ordered):
        return not result.params_without_gradient  # gradients flow, and no rate tried moves the loss at all
    return below.progress > 0 and top.progress >= SMALL_STEP_GAIN * below.progress \
        and top.progress >= max(r.progress for r in ordered) and top.progress < FIT_PROGRESS


# The loss has a floor the model reaches: fitted at the best factor, the model predicts the batch's own integer labels
# (argmax) for at least MEMORIZED_ACCURACY of the fitted half, and with the inputs zeroed for at most
# INPUT_FREE_ACCURACY (a model that ignores its input predicts one class for all: the batch's most frequent label, 19%
# of 16 digits). Then "no rate fits" (measured on the loss, against a floor of zero) and "the loss ignores the input"
# do not hold: the input decides the predictions. Cross-entropy with label_smoothing=0.9 on 10 classes cannot fall
# below 2.17 from 2.30: "the loss falls 1%" at every rate, real inputs 2.267 against zeroed 2.302 (within the 3% of
# INPUT_GAIN_RATIO), a code bug from any initialization before this check.
MEMORIZED_ACCURACY = 0.9
INPUT_FREE_ACCURACY = 0.5


def predicts_from_input(result: ProbeResult) -> bool:
    """Whether the fitted model predicts the batch's labels from its input: see ``MEMORIZED_ACCURACY``."""
    real, zero = result.real_input_accuracy, result.zero_input_accuracy
    return math.isfinite(real) and math.isfinite(zero) and real >= MEMORIZED_ACCURACY and zero <= INPUT_FREE_ACCURACY


def _code_bug(result: ProbeResult, trained_steps: int, reasons: Sequence[str]) -> Optional[Verdict]:
    chance = result.zero_input_start_loss
    seen: List[str] = []
    checks: List[str] = []
    ev: Dict[str, Any] = {}
    # How far the best factor took the fitted half down, whatever it did to the held-out half: "fits the batch" in the
    # overfit-one-batch sense. (A factor that memorizes the half while its held-out half blows up does fit the batch: a
    # GRU under SGD at lr=50, replayed from its start: 1/100 of the rate fits 98%, held-out 3.2x; calling that "no
    # learning rate fits" made a too-high rate look like a code bug.)
    best_progress = max((r.progress for r in result.factors if not r.diverged), default=-math.inf)
    lo, hi = min(r.factor for r in result.factors), max(r.factor for r in result.factors)
    vanishing = math.isfinite(result.first_last_grad_ratio) and result.first_last_grad_ratio < VANISHING_GRAD_RATIO
    small_model = capacity_limited(result) or vanishing
    if small_model:
        ev["trainable_params"] = result.trainable_params
        ev["first_last_grad_ratio"] = result.first_last_grad_ratio
    # Neither "no rate fits" nor "the loss ignores the input" holds when no rate tried did anything, or when the fitted
    # model predicts the batch's labels from its input (a loss with a floor): see below_useful_rates, predicts_from_input
    judged_on_loss = not small_model and not below_useful_rates(result) and not predicts_from_input(result)
    if best_progress < NO_FIT_PROGRESS and judged_on_loss:
        seen.append(f"no learning rate from {lo:g}x to {hi:g}x the current one fits a {result.samples_fit}-sample batch "
                    f"in {result.steps} steps (best: the loss {_pct(best_progress)})")
        ev["best_progress"] = best_progress
    if judged_on_loss and math.isfinite(result.zero_input_final_loss) and result.zero_input_final_loss > 0 and \
            INPUT_GAIN_RATIO * result.zero_input_final_loss <= result.real_input_final_loss \
            <= result.zero_input_final_loss / INPUT_GAIN_RATIO:
        seen.append(f"the loss does not depend on the input: fitted with the real inputs it reaches "
                    f"{result.real_input_final_loss:.4g}, with the inputs zeroed {result.zero_input_final_loss:.4g}")
        ev["input_gain_ratio"] = result.real_input_final_loss / result.zero_input_final_loss
        checks.append("the prediction uses the input: look for a forward() that ignores x, a broadcast in the loss "
                      "(an (N, 1) output against (N,) targets makes MSE fit only the mean), or the loss computed on the "
                      "wrong tensor")
    lowest = min((r.final_loss for r in result.factors if not r.diverged and math.isfinite(r.final_loss)),
                 default=math.nan)
    floor = cross_entropy_floor_on_probabilities(result.probability_width) if result.probability_width >= 2 else math.nan
    below_floor = lowest < (1 - PROBABILITY_FLOOR_TOLERANCE) * floor  # impossible for cross-entropy on probabilities
    stops_at_floor = lowest <= (1 + PROBABILITY_FLOOR_TOLERANCE) * floor and not below_floor
    if result.outputs_look_like_probabilities and not below_floor and (best_progress < FIT_PROGRESS or stops_at_floor):
        ev["lowest_batch_loss"] = lowest
        ev["cross_entropy_floor_on_probabilities"] = floor
        if stops_at_floor:
            seen.append(f"the model's outputs look like probabilities (in [0, 1], rows sum to 1) and no learning rate takes "
                        f"the batch loss below {lowest:.4g}: the floor ln(e + C - 1) - 1 = {floor:.4g} of cross-entropy "
                        f"applied to probabilities over C = {result.probability_width} classes")
        else:
            seen.append("the model's outputs look like probabilities (in [0, 1], rows sum to 1) and no learning rate fits "
                        "the batch")
        checks.insert(0, "remove the softmax at the end of the model: CrossEntropyLoss (F.cross_entropy) expects raw "
                         "logits and applies log-softmax itself; with probabilities its loss cannot fall far")
    # (Only while the current rate trains at all: at a rate far too small nothing is learned yet, so the model ignores
    # its input for that reason - SGD at 1e-5 on a 4-class MLP: input-use 0.997 at step 58 - and lr_too_low speaks.)
    current = result.current
    trains = current is not None and not current.diverged and current.progress >= STALL_PROGRESS
    memorized = [r for r in result.factors if not r.diverged and r.progress >= FIT_PROGRESS]
    if not seen and not small_model and trains and any(r in STALL_REASONS for r in reasons) and trained_steps >= MIN_TRAINED_STEPS_FOR_ALIGNMENT \
            and memorized and result.samples_heldout >= MIN_HELDOUT_SAMPLES and result.start_heldout_loss > 0 \
            and result.zero_input_start_loss > 0:
        uses_input = result.start_loss / result.zero_input_start_loss
        heldout_gain = min(r.heldout_loss / result.start_heldout_loss for r in result.factors if not fails(r, chance))
        if uses_input >= INPUT_USE_RATIO and heldout_gain >= HELDOUT_NO_GAIN:
            fit_best = min(memorized, key=lambda r: abs(math.log10(r.factor)))  # the rate closest to the current one
            seen.append(f"after {trained_steps} steps the model does no better with the real inputs than with zeros "
                        f"(loss {result.start_loss:.4g} vs {result.zero_input_start_loss:.4g}), and fitting the batch "
                        f"(at {_where(fit_best.factor)} the loss {_pct(fit_best.progress)}) does not help its held-out "
                        f"half (best: {heldout_gain:.2f}x its start): what is learned from one sample does not carry "
                        "over to the next")
            ev.update(input_use_ratio=uses_input, heldout_best_ratio=heldout_gain)
            checks.insert(0, "labels line up with inputs: the same index/shuffle for both, no sort or filter applied to "
                             "only one of them, the right label column")
    at_current = result.current
    if not seen and result.params_without_gradient and (at_current is None or at_current.progress < FIT_PROGRESS):
        # Trainable parameters the loss never reaches (a .detach(), an unused module) while the batch cannot be fitted
        # at the current rate: the rest of the model may fit it at a huge rate, but that is no learning-rate problem.
        seen.append(f"{len(result.params_without_gradient)} trainable parameter tensor(s) get no gradient at all "
                    f"({', '.join(result.params_without_gradient[:3])})")
        ev["params_without_gradient"] = len(result.params_without_gradient)
    if not seen:
        return None
    if result.params_without_gradient:
        checks.append(f"gradients reach every layer: these got none: {', '.join(result.params_without_gradient[:5])} "
                      "(a .detach(), .item() or torch.no_grad in forward, or an unused module)")
    generic = ["labels line up with inputs (the same index for both)",
               "logits, not softmax probabilities, reach CrossEntropyLoss",
               "gradients reach every layer (no .detach()/.item() in forward)",
               "inputs are normalized (zero mean, unit scale)",
               "the loss is computed on the model's output and the right targets, with matching shapes"]
    for item in generic:
        if not any(item.split(" ")[0] in c for c in checks):
            checks.append(item)
    message = "; ".join(seen).capitalize() + "."
    advice = "Check, in this order: " + "; ".join(f"({i}) {c}" for i, c in enumerate(checks, 1)) + "."
    return Verdict("suspected_code_bug", message, advice, ev)


LOWER_ADVICE = ("Lower the learning rate from {lr:.3g} to about {suggested:.2g}{or_less} (or add warm-up to it); "
                "gradient clipping (gradient_clip_val=1.0) guards against the occasional spike.")
RAISE_ADVICE = ("Raise the learning rate from {lr:.3g} to about {suggested:.2g} (a learning-rate range test, "
                "Smith 2017, narrows it down), or check that a scheduler has not shrunk it.")


def _rate_verdict(code: str, lr: float, pick: FactorResult, current: FactorResult, steps: str, now: str, advice: str,
                  or_less: str = "") -> Verdict:
    """``code`` suggesting the rate at factor ``pick``: what ``pick`` did to the fixed batch (in ``steps``), what the
    current rate did (``now``), and ``advice`` (a template of ``lr``, ``suggested`` and ``or_less``)."""
    suggested = lr * pick.factor
    message = (f"At {_where(pick.factor)} the loss on a fixed batch {_pct(pick.progress)}{steps}; {now}; "
               f"use about {suggested:.2g}{or_less}.")
    return Verdict(code, message, advice.format(lr=lr, suggested=suggested, or_less=or_less),
                   {"suggested_lr": suggested, "current_progress": current.progress}, suggested_lr=suggested)


def judge(result: ProbeResult, trained_steps: int = 0, reasons: Sequence[str] = ()) -> Verdict:
    """The verdict for one probe. ``trained_steps``: optimizer steps the run took before the probe."""
    bug = _code_bug(result, trained_steps, reasons)
    if bug is not None:
        return bug
    current = result.current
    if current is None:
        return Verdict("lr_ok", "")
    smaller = [r for r in result.factors if r.factor < 1]
    larger = [r for r in result.factors if r.factor > 1]
    lr = result.base_lr
    chance = result.zero_input_start_loss

    smaller_fit = [r for r in smaller if fits(r, chance)]
    much_better = [r for r in smaller_fit if r.progress >= current.progress + SMALLER_MUCH_BETTER]
    current_fails = fails(current, chance) or current.progress < STALL_PROGRESS or (
        current.progress < FIT_PROGRESS and bool(much_better))
    if current_fails and smaller_fit:
        if current.diverged:
            now = "at the current one it diverges"
        elif heldout_blowup(current, chance) > HELDOUT_BLOWUP_RATIO:
            now = (f"at the current one it {_pct(current.progress)} but the held-out half of the batch blows up "
                   f"({heldout_blowup(current, chance):.3g}x)")
        else:
            now = f"at the current one it {_pct(current.progress)}"
        return _rate_verdict("lr_too_high", lr, _best_heldout(smaller_fit), current, "", now, LOWER_ADVICE)

    if current.diverged:
        # The current rate diverges on the batch outright while a smaller one lowers its loss without diverging: too high,
        # even when no smaller factor fits the batch within the probe's steps (a 1-D conv net under SGD+momentum at lr=20,
        # replayed from its start: 1x diverges, 1/100 falls 25-35% in 30 steps), or the one that does overfits its
        # held-out half. A healthy run's current rate never diverges on its batch (it removes >= 24%, see STALL_PROGRESS).
        calmer = [r for r in smaller if not r.diverged and r.progress >= STALL_PROGRESS]
        if calmer:
            return _rate_verdict("lr_too_high", lr, _best_heldout(calmer), current, "",
                                 "at the current one it diverges", LOWER_ADVICE, or_less=" or less")

    larger_fit = [r for r in larger if fits(r, chance, LOW_LARGER_PROGRESS)]
    if result.start_heldout_loss > 0:
        # Memorizing one batch faster is not learning faster: demand that the held-out half improves too. A model too
        # small to memorize the batch shaves its loss with huge steps (a 2-2-2 MLP on spirals: -28% at 100x) and a
        # 3-layer sigmoid CNN under Adam memorizes the batch at 10x (85%) while no 10x rate trains it better; neither
        # carries over. Too-low rates (SGD 1e-5, Adam 1e-7 on the digits) improve the held-out half at the larger
        # factor as well.
        gain = LOW_LR_HELDOUT_GAIN if capacity_limited(result) else LOW_LR_HELDOUT_MIN_GAIN
        larger_fit = [r for r in larger_fit if r.heldout_loss <= (1 - gain) * result.start_heldout_loss]
    still_near_chance = not chance > 0 or result.start_loss >= LOW_LR_MIN_REMAINING * chance
    if current.progress < STALL_PROGRESS and not larger_fit and still_near_chance and below_useful_rates(result):
        top = max(result.factors, key=lambda r: r.factor)
        suggested = lr * top.factor * 10
        moved = (f"barely moves (it falls {100 * top.progress:.2g}% at the largest in {result.steps} steps), and each "
                 "10x buys about 10x more progress, the mark of steps far too small to train"
                 if abs(top.progress) >= UNMOVED else f"does not move at all in {result.steps} steps, though every "
                 "parameter gets a gradient: the steps vanish in the weights' rounding")
        message = (f"Every learning rate tried is too small: from the current one ({lr:.3g}) to {top.factor:g}x it "
                   f"({lr * top.factor:.3g}) the loss on a fixed batch {moved}; use at least {suggested:.2g}.")
        return Verdict("lr_too_low", message, RAISE_ADVICE.format(lr=lr, suggested=suggested),
                       {"suggested_lr": suggested, "current_progress": current.progress,
                        "largest_rate_progress": top.progress}, suggested_lr=suggested)
    if not fails(current, chance) and current.progress < STALL_PROGRESS and larger_fit and still_near_chance:
        # the smallest larger factor that makes real progress: one batch overstates the usable rate (no noise)
        pick = min(larger_fit, key=lambda r: r.factor)
        return _rate_verdict("lr_too_low", lr, pick, current, f" in {result.steps} steps",
                             f"at the current one it {_pct(current.progress)}", RAISE_ADVICE)
    return Verdict("lr_ok", "", suggested_lr=lr)


# Training wrecked the weights: from the current ones no factor fits the batch, from an earlier snapshot one does.
# Dying units (ReLU behind a too-high rate) are the usual cause; the suggestion is the snapshot probe's own when it
# has one, else a tenth of the current rate (the study note: change the rate by an order of magnitude).
WRECKED_FALLBACK_FACTOR = 0.1


def nothing_fits_near_chance(result: ProbeResult, verdict: Verdict) -> bool:
    """Whether the current weights look wrecked and an earlier, healthy snapshot should be probed too: no factor fits
    the batch (the code-bug rule's "no learning rate fits", or an ``lr_ok`` from a sweep where nothing fits) while the
    loss is still near the input-free level (a converged model also "fits" little, but far below that level).
    Measured: a ViT-like digits model under AdamW at 0.3 (100x a working rate) stalls at chance with most units dead
    and its first layer's gradient at 6e-5 of the last's; from its weights no rate fits the batch (best 25%) and the
    output no longer depends on the input, which the vanishing-gradient guard rightly keeps from being a code bug."""
    if verdict.code == "suspected_code_bug":
        # nothing fits, or parameters get no gradient (a network whose ReLUs all died under a too-high rate looks cut)
        return "best_progress" in verdict.evidence or "params_without_gradient" in verdict.evidence
    if verdict.code != "lr_ok":
        return False
    chance = result.zero_input_start_loss
    best = max((r.progress for r in result.factors if not fails(r, chance)), default=-math.inf)
    return best < FIT_PROGRESS and chance > 0 and result.start_loss >= LOW_LR_MIN_REMAINING * chance


def judge_wrecked(current: ProbeResult, earlier: ProbeResult, earlier_step: int, trained_steps: int = 0,
                  reasons: Sequence[str] = (), rate_only: bool = False) -> Optional[Verdict]:
    """Verdict when nothing fits from the current weights (``current``) but the probe from an earlier snapshot
    (``earlier``) tells more; ``None`` keeps the current verdict (the batch does not fit from there either).
    ``rate_only``: only a rate verdict from the snapshot counts, not "it fitted from there" alone (when the current
    sweep found no bug: a hard task near chance, two spirals at step 65, fits its batch a little less well after 65
    healthy steps than at init)."""
    second = judge(earlier, trained_steps=trained_steps, reasons=reasons)
    if second.code in ("lr_too_high", "lr_too_low"):
        return dataclasses.replace(second, message=second.message.rstrip(".") + f" (probed from the weights of step "
                                   f"{earlier_step}: from the current ones no learning rate fits the batch).")
    chance = earlier.zero_input_start_loss
    if rate_only or second.code != "lr_ok" or not any(fits(r, chance) for r in earlier.factors):
        return None
    lr = current.base_lr
    smaller = [r for r in earlier.factors if r.factor < 1 and fits(r, chance)]
    suggested = lr * (_best_heldout(smaller).factor if smaller else WRECKED_FALLBACK_FACTOR)
    best_now = max((r.progress for r in current.factors), default=-math.inf)
    silent = ", ".join(current.params_without_gradient[:4])
    message = (f"Training has wrecked the weights: from the current ones no learning rate fits a fixed batch (best: the "
               f"loss {_pct(best_now)}), from the weights of step {earlier_step} it does"
               + (f"; layers without gradient now: {silent}" if silent else "")
               + f". The usual cause is a learning rate so high that units died or saturated; use about {suggested:.2g}.")
    advice = (f"Lower the learning rate from {lr:.3g} to about {suggested:.2g} and restart from a checkpoint before step "
              f"{trained_steps or earlier_step} (or from scratch); add warm-up, and gradient clipping "
              "(gradient_clip_val=1.0).")
    return Verdict("lr_too_high", message, advice,
                   {"suggested_lr": suggested, "wrecked_since_step": earlier_step, "best_progress_now": best_now},
                   suggested_lr=suggested)


# ---- the fresh-initialization control ------------------------------------------------------------------------------
# A code bug is what no learning rate fixes from ANY healthy initialization. Before ``suspected_code_bug`` is raised, a
# freshly initialized copy (each submodule's reset_parameters, fresh optimizer state) gets the same sweep on the same
# batch. When it fits the batch where the current weights could not, the weights are the problem, not the code: units
# that died or saturated (at init or during training), or weights that a too-high rate wrecked. A layer counts as
# dead/saturated in the message when at least this share of its units does nothing on the probe's batch.
IDLE_UNITS_SHARE = 0.5


def _control_fits(control: ProbeResult) -> bool:
    chance = control.zero_input_start_loss
    return any(fits(r, chance) for r in control.factors)


def _best_fit_text(result: ProbeResult) -> str:
    best = result.best
    if best is None:
        return "no learning rate kept the loss finite"
    return f"at {_where(best.factor)} the loss {_pct(best.progress)}"


def _no_verdict(verdict: Verdict, why: str, advice: str, ev: Dict[str, Any]) -> Verdict:
    """An ``info`` ``probe_skipped``: what the first sweep saw, and why that is not enough for a code bug."""
    seen = verdict.message.rstrip(".")
    return Verdict("probe_skipped", f"No verdict: {seen[:1].lower()}{seen[1:]}; {why}.", f"{advice}: {verdict.advice}",
                   ev, severity="info")


def judge_control(verdict: Verdict, result: ProbeResult, control: Optional[ProbeResult], trained_steps: int,
                  kept: Sequence[str] = (), reasons: Sequence[str] = ()) -> Verdict:
    """The verdict once a fresh initialization has had the same sweep (``control``; ``None`` when it could not run).

    Returns ``verdict`` (a ``suspected_code_bug``) confirmed when the fresh copy fails too; a finding that names the weight
    state when the fresh copy learns; an ``info`` when the control could not run (a code bug is never claimed
    unconfirmed)."""
    ev = dict(verdict.evidence)
    if control is None:
        return _no_verdict(verdict, "but a freshly initialized copy could not be probed within the time budget, and "
                           "without it a weight state that a new initialization fixes cannot be told from a code bug",
                           "Run a longer fit or lift the probe's budget (LearningRateProbe(budget_fraction=None)) to "
                           "get the verdict; meanwhile", ev)
    ev["fresh_init_best_progress"] = max((r.progress for r in control.factors if not r.diverged), default=-math.inf)
    for r in control.factors:
        ev[f"fresh_init_loss_fraction@x{r.factor:g}"] = r.loss_fraction if math.isfinite(r.loss_fraction) else "diverged"
    if kept:
        ev["not_reinitialized"] = ", ".join(kept[:6])
    # judged by the same rules, as if it had been trained as long (the labels-misaligned rule asks for that)
    control_verdict = judge(control, trained_steps=trained_steps, reasons=reasons)
    if control_verdict.code == "suspected_code_bug":  # the fresh copy fails by the same rules: the code
        note = (" A freshly initialized copy fails the same way (" + _best_fit_text(control) + ")"
                + (f"; {len(kept)} module(s) without reset_parameters kept their weights: {', '.join(kept[:3])}"
                   if kept else "") + ": it is not the weights.")
        return Verdict("suspected_code_bug", verdict.message.rstrip(".") + "." + note, verdict.advice, ev)
    if not _control_fits(control):
        # Neither: the fresh copy passes the code-bug rules without fitting the batch (an LSTM language model at 100x
        # a working rate, replayed from its start: no rate fits from its own init, best 4%; the fresh copy 48% at 1/10).
        return _no_verdict(verdict, f"a freshly initialized copy does not fail that way ({_best_fit_text(control)}) "
                           "but does not fit the batch either, so a code bug is not shown", "Check the items below, "
                           "and whether a lower learning rate or the layers' default initialization trains better", ev)
    # The fresh copy learns: name the weight state.
    idle = sorted(((share, name, kind) for name, (kind, share) in result.unit_states.items() if share >= IDLE_UNITS_SHARE),
                  reverse=True)
    fresh = _best_fit_text(control)
    lr = result.base_lr
    since = "from the initialization" if trained_steps <= 0 else f"by step {trained_steps}"
    ev["trained_steps_before_probe"] = trained_steps
    if idle:
        share, name, kind = idle[0]
        others = ", ".join(f"{n} ({s:.0%})" for s, n, k in idle[1:4] if k == kind)
        ev.update(idle_unit_share=share, idle_layers=", ".join(n for _, n, _ in idle[:6]))
        if kind == "dead":
            message = (f"{share:.0%} of the units of {name} are dead (zero for every sample of the probe's batch)"
                       + (f", also {others}" if others else "") + f" {since}: from these weights no learning rate fits "
                       f"a fixed batch, while a freshly initialized copy does ({fresh}). The weights, not the code, "
                       "stop the learning.")
            advice = ("Re-initialize: no negative bias init (zero or small positive biases), He/Kaiming init for ReLU "
                      "layers; or use LeakyReLU/GELU. If the units died during training, lower the learning rate "
                      f"(from {lr:.3g}) or add warm-up.")
            return Verdict("dead_units", message, advice, ev, layer=name)
        message = (f"{share:.0%} of the units of {name} are saturated (stuck at their limits for every sample of the "
                   f"probe's batch)" + (f", also {others}" if others else "") + f" {since}: from these weights no "
                   f"learning rate fits a fixed batch, while a freshly initialized copy does ({fresh}).")
        advice = ("Re-initialize with smaller weights (Xavier/Glorot for tanh/sigmoid), normalize the inputs, or put "
                  "BatchNorm/LayerNorm before the activation; if it happened during training, lower the learning rate "
                  f"(from {lr:.3g}).")
        return Verdict("saturated_activations", message, advice, ev, layer=name)
    if trained_steps > 0:
        # No dead or saturated units to show for it, and the fresh copy is not the user's own initialization: it may
        # only suit the batch better in the probe's 30 steps (a causal Transformer with labels one position off: the
        # fresh copy memorizes the batch at 10x; an LSTM language model 100x too slow: the fresh copy fits at 100x). No
        # verdict either way; the snapshot re-probe (same initialization, earlier step) is what tells a wrecked run.
        return _no_verdict(verdict, f"but a freshly initialized copy does fit the batch ({fresh}), and no dead or "
                           "saturated units explain why these weights do not, so neither a code bug nor a weight state "
                           "is shown", "Check the items below; if none applies, compare a run from a fresh "
                           "initialization", ev)
    # No dead or saturated units to show for it: a custom init may only be slower to train than the layers' default
    # (Lightning's demo LSTM language model, uniform +-0.1 init: in the probe's 30 steps nothing fits from it, while
    # the default init fits at 1/10; over 1000 steps it trains fine at a healthy rate). A hint, not a warning.
    message = (f"From the initial weights no learning rate fits a fixed batch in the probe's steps, while a freshly "
               f"initialized copy (each layer's reset_parameters) does ({fresh}): the initialization may slow the "
               "start of training; not a code bug.")
    advice = ("If training stays slow, try the layers' default initialization (or He/Kaiming for ReLU, Xavier/Glorot "
              "for tanh/sigmoid) with zero biases, and check custom init code for scale and sign.")
    return Verdict("bad_initialization", message, advice, ev, severity="info")


# ---- misaligned labels: confirmed by the validation loss ------------------------------------------------------------
# The misaligned-labels evidence alone (the model ignores its input after stalling, and fitting a batch does not help its
# held-out half, from the trained weights and from a fresh initialization) is also what a learnable task shows while it
# is still on its initial plateau: XOR of two signs under a small tanh MLP, sparse parities (3 of 20 or 30 bits) under
# Adam at 1e-3 stall at chance for 300-1000 steps, with exactly this probe evidence at step 50, and then learn to 96-100%
# validation accuracy. One batch cannot tell them apart (the plateau's model cannot generalize from 32 samples any more
# than from random labels); the run can. Misaligned labels get memorized and nothing carries over: the training loss
# falls below the validation loss by the rule's own INPUT_USE_RATIO while the validation loss gains less than
# HELDOUT_NO_GAIN on where it stood; a task leaving its plateau lowers both (the parities: the validation loss 7% and more
# below its plateau level by the time the training loss is 10% below the validation loss). So the probe's verdict is
# an ``info`` until the fit monitor's evaluations (``signals.FIT_EVALUATION``) confirm it, or clear it once the
# validation loss falls 10% (INPUT_USE_RATIO) below where it stood. Without evaluations the info stays.
# Shuffled digits (MLP, fault zoo): confirmed at steps 198-264 of 300, validation loss 2.33-2.43 against 2.07-2.14 on
# the training side.
LABELS_AWAIT = "awaiting_validation"  # evidence key of the deferred verdict


def labels_only(verdict: Verdict) -> bool:
    """Whether ``verdict`` is a ``suspected_code_bug`` whose only evidence is the misaligned-labels one."""
    return verdict.code == "suspected_code_bug" and "input_use_ratio" in verdict.evidence \
        and LABELS_SHIFT not in verdict.evidence  # (input_use_ratio: set by that rule alone)


def defer_labels(verdict: Verdict) -> Verdict:
    """The ``info`` a misaligned-labels verdict is until the validation loss confirms it."""
    why = ("but a learnable task still on its initial plateau (XOR, parity: flat at chance for hundreds of steps, then "
           "learned) looks the same for a while, so the verdict waits for the validation loss: labels that do not line "
           "up with the inputs get memorized while the validation loss does not improve")
    advice = ("A plateau is often shortened by a 10x higher learning rate (XOR of signs and a sparse parity: learned "
              "within 400 steps at 10x, not at 1x); if the model should have learned by now")
    return _no_verdict(verdict, why, advice, {**verdict.evidence, LABELS_AWAIT: 1})


def confirm_labels(reference_val: float, train: float, val: float) -> Optional[bool]:
    """One evaluation after the deferred verdict (``reference_val``: the validation loss where it stood then): ``True``
    confirms it (the training loss at most INPUT_USE_RATIO of the validation loss, which gained less than
    HELDOUT_NO_GAIN), ``False`` clears it (the validation loss at most INPUT_USE_RATIO of its reference), ``None``
    waits."""
    if not (math.isfinite(reference_val) and reference_val > 0 and math.isfinite(train) and math.isfinite(val)):
        return None
    if val <= INPUT_USE_RATIO * reference_val:
        return False
    if val >= HELDOUT_NO_GAIN * reference_val and train <= INPUT_USE_RATIO * val:
        return True
    return None


def confirmed_labels(message: str, advice: Optional[str], evidence: Dict[str, Any], since: int, reference_val: float,
                     step: int, train: float, val: float) -> Verdict:
    """The ``suspected_code_bug`` of a deferred misaligned-labels verdict that the evaluations confirmed."""
    ev = {k: v for k, v in evidence.items() if k != LABELS_AWAIT}
    ev.update(labels_seen_at_step=since, val_loss_then=reference_val, val_loss_now=val, train_loss_now=train,
              confirmed_at_step=step)
    return Verdict("suspected_code_bug", message.rstrip(".") + f". From step {since} to step {step} the training loss "
                   f"fell to {train:.4g} while the validation loss stayed at {val:.4g} ({reference_val:.4g} at step "
                   f"{since}): the model memorizes its training samples and nothing carries over to new ones, as with "
                   "labels that do not depend on the inputs (a task leaving its plateau lowers both).", advice, ev)


# ---- labels one position off: a sequence model's labels, shifted back into place ---------------------------------------
# A tagger fed a language model's shift (x = s[:, :-1] with the tags of s[:, 1:]) asks a causal model for the label of
# the next position, which it cannot see: the misaligned-labels evidence, and no amount of training memorizes it (an
# LSTM tagger on i.i.d. tokens: training loss 1.372 against 1.399 on validation after 300 steps, 1.386 at chance). Rolled
# back by one position the same labels are learnable, which a freshly initialized copy shows on the probe's batch at once:
# its held-out half improves (by at least 1 - INPUT_USE_RATIO, and by that much more than on the labels as they are:
# a causal Transformer's fresh copy picks up some token statistics of the unshifted labels too, which made its control
# inconclusive) as it never does on misaligned labels. Not tried when the
# targets are the inputs shifted by one (a language model's next-token targets: rolled back they are the inputs, a copy
# task any model learns).
MIN_SEQUENCE_LENGTH = 4
LABELS_SHIFT = "labels_shift"  # evidence key: the roll (+1 or -1 positions) under which the labels are learned


def sequence_labels(inputs: Any, targets: Any) -> bool:
    """Whether ``targets`` are integer labels per position of a sequence aligned with ``inputs`` ((N, T, ...) and (N, T)),
    and not a language model's next-token targets (``targets[:, :-1] == inputs[:, 1:]``)."""
    if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)) or targets.dim() != 2 \
            or targets.is_floating_point() or targets.shape[1] < MIN_SEQUENCE_LENGTH or inputs.dim() < 2 \
            or tuple(inputs.shape[:2]) != tuple(targets.shape):
        return False
    if inputs.dim() == 2 and not inputs.is_floating_point() and \
            bool(torch.equal(inputs[:, 1:].to(targets.device), targets[:, :-1])):
        return False
    return True


def heldout_best(result: ProbeResult) -> float:
    """The lowest held-out loss over its start among the rates that do not blow the model up (inf: none)."""
    chance = result.zero_input_start_loss
    if not result.start_heldout_loss > 0:
        return math.inf
    return min((r.heldout_loss / result.start_heldout_loss for r in result.factors
                if not fails(r, chance) and math.isfinite(r.heldout_loss)), default=math.inf)


def carries_over(result: ProbeResult, baseline: Optional[ProbeResult] = None) -> bool:
    """Whether some rate that does not blow the model up lowers the held-out half's loss by 1 - INPUT_USE_RATIO, and by
    that much more than ``baseline`` (the same fresh copy on the labels as they are) does."""
    bar = INPUT_USE_RATIO * (min(1.0, heldout_best(baseline)) if baseline is not None else 1.0)
    return heldout_best(result) <= bar


def labels_shifted(verdict: Verdict, shift: int, control: ProbeResult) -> Verdict:
    """The misaligned-labels verdict, confirmed: rolled by ``shift`` positions the labels are learned."""
    best = heldout_best(control)
    ev = {**verdict.evidence, LABELS_SHIFT: shift, "shifted_heldout_best_ratio": best}
    where = "t - 1" if shift > 0 else "t + 1"
    message = (verdict.message.rstrip(".") + f". With each label moved to the position it belongs to (the label of "
               f"position t taken from position {where}) a freshly initialized copy learns them: its held-out half falls "
               f"to {best:.2f}x its start. The labels are one position {'ahead of' if shift > 0 else 'behind'} their "
               "inputs.")
    advice = ("Align labels with inputs position by position: only next-token prediction shifts them (x = s[:, :-1], "
              "y = s[:, 1:]); a tagger's label of position t belongs to token t (check the slicing of inputs and "
              "labels, and the padding of one of them). Then: " + (verdict.advice or ""))
    return Verdict("suspected_code_bug", message, advice, ev)


# ---- lr_too_low where the design explains the slow start ------------------------------------------------------------
# A fixed batch overstates the usable rate: it has no noise and no later stage to destabilize. When the network's own
# design already explains a slow start (always-positive inputs into weight layers, saturated units, vanishing
# gradients: the study note's zig-zag and plateau causes), a 10x rate that memorizes the probe's batch is a hint, not a
# verdict. Measured: a 3-layer sigmoid CNN under Adam at 3e-3 on its initial plateau (step 45): 10x fits the batch 85%
# and halves the held-out loss, yet trained 300 steps at 10x it stays at chance while 3e-3 reaches 0.78.
DESIGN_EXPLAINS_SLOW = ("non_zero_centered_activation", "saturated_activations", "vanishing_gradients")


def temper_too_low(verdict: Verdict, explained_by: Sequence[str]) -> Verdict:
    if verdict.code != "lr_too_low" or not explained_by:
        return verdict
    return dataclasses.replace(
        verdict, severity="info",
        message=verdict.message.rstrip(".") + f"; but {', '.join(explained_by)} already explains a slow start, and a "
        "fixed batch overstates the rate a whole run can take.",
        advice=f"Fix the design first ({', '.join(explained_by)}: see those findings); then, if training is still slow, "
               + verdict.advice[0].lower() + verdict.advice[1:])


# ---- lr_too_low while a warm-up is still raising the rate ------------------------------------------------------------
# A warm-up starts far below the rate it climbs to (LinearLR from 1e-4 or 1e-3 of it, OneCycleLR from 1/25): probed
# during it, the current rate is too low by design. AdamW on the digits MLP, warm-up over 500 or 1000 steps to 1e-3: at
# step 23 the probe (asked by update_too_small or a stall) answered lr_too_low, "use about 0.00046" and "0.0024", while
# the run trains fine once the schedule reaches 1e-3. lr_too_low means a rate at least 10x away fixes the symptom (the
# probe's grid is in decades); while the rate has risen since the fit started and the schedule's peak is within 10x of
# the suggested rate (above the largest rate the probe saw fail), it is an info. A peak 10x or more below stays a
# warning (the same warm-up to 1e-6: "use about 0.00046").
def temper_warmup(verdict: Verdict, lr_now: float, lr_at_start: float, peak: float) -> Verdict:
    """``lr_too_low`` as an ``info`` while a warm-up (the rate ``lr_now`` above ``lr_at_start``) still climbs to a
    ``peak`` within 10x of the suggested rate; any other verdict unchanged."""
    suggested = verdict.suggested_lr
    if verdict.code != "lr_too_low" or not (lr_now > lr_at_start and math.isfinite(suggested) and 10 * peak > suggested):
        return verdict
    return dataclasses.replace(
        verdict, severity="info", evidence={**verdict.evidence, "warmup_lr_now": lr_now, "warmup_peak_lr": peak},
        message=verdict.message.rstrip(".") + f"; but the learning rate is still warming up ({lr_now:.3g} now, "
        f"{lr_at_start:.3g} when training started) towards {peak:.3g}, within 10x of that: the schedule is raising it.",
        advice=f"Nothing to change yet; if the loss still barely moves once the rate has reached {peak:.3g}, raise the "
               f"peak rate of the schedule.")


# ---- lr_too_low after a schedule decayed the rate ---------------------------------------------------------------------
# A schedule that lowered the rate 100x or more below the one it started from (its ``initial_lr``) explains a rate
# too low, and the fix is in the schedule: a per-epoch StepLR stepped every batch (``"interval": "step"``), a gamma or
# a step size off by a unit. StepLR(step_size=1, gamma=0.8) per batch from 0.05: 1.2e-10 at step 89.
DECAYED_BY_SCHEDULE = 100.0


def note_decay(verdict: Verdict, lr_now: float, start: float) -> Verdict:
    """``lr_too_low`` naming the schedule when it has lowered the rate from ``start`` (the schedule's base rate) by
    ``DECAYED_BY_SCHEDULE`` or more; any other verdict unchanged."""
    if verdict.code != "lr_too_low" or not (lr_now > 0 and start >= DECAYED_BY_SCHEDULE * lr_now):
        return verdict
    return dataclasses.replace(
        verdict, evidence={**verdict.evidence, "schedule_start_lr": start},
        message=verdict.message.rstrip(".") + f"; a learning-rate schedule has lowered it {start / lr_now:.2g}x, "
        f"from {start:.3g}.",
        advice=f"Check the learning-rate scheduler first: it has taken the rate from {start:.3g} to {lr_now:.3g}. A "
               "per-epoch scheduler (StepLR, ExponentialLR, MultiStepLR) returned with \"interval\": \"step\" decays "
               "every batch; check its gamma and step_size too. " + verdict.advice)


# ---- a collapse after progress ---------------------------------------------------------------------------------------
# The loss fell to at most this share of its start and then blew up (non-finite, diverging, or swinging back): the run
# could learn at this rate and then became unstable, the classic sign of a learning rate too high for the later stage of
# training (Cohen et al. 2021, "edge of stability": a step size above 2/sharpness makes training leave the valley). It
# is never a code bug: the pipeline has shown that it learns. Measured: digits MLP, SGD lr 1.5, batch 16-32: the loss
# falls 2.3 -> 0.0-0.4, then rises to 5-1e37 or NaN; healthy runs never leave their best smoothed loss by 3x.
COLLAPSE_PROGRESS = 0.5
COLLAPSE_REASONS = ("nonfinite_loss", "loss_diverging", "loss_oscillating", "loss_spike")


def collapsed_after_progress(reasons: Sequence[str], initial_loss: Optional[float], best_loss: Optional[float]) -> bool:
    return (any(r in COLLAPSE_REASONS for r in reasons) and initial_loss is not None and best_loss is not None
            and initial_loss > 0 and best_loss <= COLLAPSE_PROGRESS * initial_loss)


def judge_collapse(verdict: Optional[Verdict], lr: float, initial_loss: float, best_loss: float, step: int,
                   snapshot_step: Optional[int]) -> Verdict:
    """``lr_too_high`` for a run that learned and then collapsed; the probe's own suggestion when it has one."""
    if verdict is not None and verdict.code == "lr_too_high":
        return verdict
    suggested = lr * WRECKED_FALLBACK_FACTOR
    probed = ""
    if verdict is not None and snapshot_step is not None:
        probed = (f" From the weights of step {snapshot_step} the probe found no rate that fails on a single batch: "
                  "the instability builds up over many batches.")
    message = (f"The training loss fell from {initial_loss:.4g} to {best_loss:.4g} and then collapsed by step {step}: the "
               f"run learns at this learning rate until it becomes unstable.{probed} Use about {suggested:.2g}.")
    advice = (f"Lower the learning rate from {lr:.3g} to about {suggested:.2g}, or keep it and add a decaying schedule "
              "(cosine, or ReduceLROnPlateau) with warm-up, and gradient clipping (gradient_clip_val=1.0). If the loss "
              "still turns NaN at the lower rate, look for log(0) or a division by zero in the loss (use "
              "F.cross_entropy / BCEWithLogitsLoss on logits).")
    ev: Dict[str, Any] = {"suggested_lr": suggested, "start_loss": initial_loss, "best_loss": best_loss,
                          "collapsed_by_step": step}
    if verdict is not None:
        ev["probe_verdict_from_snapshot"] = verdict.code
    return Verdict("lr_too_high", message, advice, ev, suggested_lr=suggested)
