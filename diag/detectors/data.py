"""Rules on the data: inputs not normalized, class imbalance, training/validation overlap.

Each rule reads summaries from :mod:`diag.stats.data` and returns a :class:`~diag.detectors.Verdict` or
``None``; the ``DataMonitor`` callback turns verdicts into findings.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from diag.detectors import Verdict
from diag.detectors.setup import fmt

# ---- inputs_not_normalized ------------------------------------------------------------------------------
# LeCun, Bottou, Orr & Müller, "Efficient BackProp" (1998) §4.3: each input variable should have a mean close to
# zero over the training set and the variables should have about the same spread (covariances); inputs far from
# this make some directions of the weight space much steeper than others (slow, zig-zagging descent).
#
# Offset: the median over features of |mean| / std. Past 3, zero lies outside the bulk of each feature's values:
# by Cantelli's inequality at least 1 - 1/(1+3^2) = 90% of the values share the sign of the mean, the case
# LeCun et al. describe (all weights of a unit updated with one sign). Binary 0/1 features are left out (a flag
# that is on 90% of the time has |mean|/std = 3 and needs no centering to train well). Measured: iris raw 4.6,
# wine raw 3.7; standardized data 0.0; digits 1.05; make_moons 0.5; images in [0, 1] about 1-2.
OFFSET_RATIO = 3.0
# Scale: the median over features of sqrt(mean^2 + var) (the magnitude the first layer sees). PyTorch's default
# initialization (Kaiming-uniform, bound 1/sqrt(fan_in)) is designed for inputs of about unit magnitude.
# Measured: standardized data 1.0, binary/one-hot 0.3-1, images in [0, 1] about 0.5; raw 8x8 digits (0-16) 7.5
# over the whole set (9.5 in one batch of 64); raw 0-255 pixels about 100. 5 keeps a margin of 5x from unit scale
# and 1.5x below the smallest unnormalized case we target.
LARGE_SCALE = 5.0
# Far below unit scale the input barely moves the first layer's output (its biases dominate): 1000x below.
# sklearn's pre-scaled diabetes data (each column scaled to unit norm, std 0.048) stays silent.
SMALL_SCALE = 1e-3
# Spread: the ratio of large to small per-feature stds (90th / 10th percentile over the non-constant features,
# so a few nearly-constant columns - e.g. rarely lit border pixels - do not decide). "Orders of magnitude": two.
# Measured: standardized 1.0, raw digits 30, 28x28 upsampled digits in [0, 1] 16; raw breast-cancer data 5000.
SPREAD_RATIO = 100.0
SPREAD_LOW_QUANTILE, SPREAD_HIGH_QUANTILE = 0.1, 0.9
# An input in [0, 1] whose median |mean|/std exceeds 1 (mean above its spread) is not centered: an info only.
UNCENTERED_UNIT_RANGE_RATIO = 1.0
# Raw 8-bit intensities: every value an integer in [0, 255] with a maximum above this (not a 0/1 mask).
RAW_INTENSITY_MIN_MAX = 2.0
MIN_VALUES_PER_FEATURE = 16  # fewer values per feature: no verdict (the moments would be noise)


def input_summary_figures(summary: Mapping[str, torch.Tensor]) -> Optional[Dict[str, float]]:
    """The figures the normalization rule uses, from a :class:`~diag.stats.data.FeatureMoments` summary."""
    mean, std, low, high, non_integer = (summary[k] for k in ("mean", "std", "min", "max", "non_integer"))
    finite = torch.isfinite(mean) & torch.isfinite(std) & torch.isfinite(low) & torch.isfinite(high)
    varying = finite & (high > low) & (std > 0)
    if float(summary["count"]) < MIN_VALUES_PER_FEATURE or not bool(varying.any()):
        return None
    binary = (low == 0) & (high == 1) & (non_integer == 0)
    m, s = mean[varying], std[varying]
    rms = (m.square() + s.square()).sqrt()
    centered_candidates = varying & ~binary
    offsets = (mean[centered_candidates].abs() / std[centered_candidates]) if bool(centered_candidates.any()) else None
    figures = {
        "features": int(mean.numel()),
        "varying_features": int(varying.sum()),
        "binary_features": int((binary & varying).sum()),
        "values_per_feature": int(float(summary["count"])),
        "median_feature_rms": float(torch.quantile(rms, 0.5)),  # (torch.median returns the lower middle value)
        "median_offset_ratio": float(torch.quantile(offsets, 0.5)) if offsets is not None else 0.0,
        "min_value": float(low[finite].min()),
        "max_value": float(high[finite].max()),
        "integer_valued": int(bool((non_integer[finite] == 0).all())),
        "mean_low": float(m.min()), "mean_high": float(m.max()),
        "std_low": float(s.min()), "std_high": float(s.max()),
    }
    if s.numel() >= 2:
        lo = torch.quantile(s, SPREAD_LOW_QUANTILE, interpolation="lower")
        hi = torch.quantile(s, SPREAD_HIGH_QUANTILE, interpolation="higher")
        figures["std_spread_ratio"] = float(hi / lo)
    else:
        figures["std_spread_ratio"] = 1.0
    return figures


def _reasons(fig: Mapping[str, float]) -> List[str]:
    reasons = []
    if fig["median_feature_rms"] > LARGE_SCALE:
        reasons.append(f"their typical magnitude is {fmt(fig['median_feature_rms'])} (median per-feature rms; "
                       f"about 1 is expected)")
    if fig["median_feature_rms"] < SMALL_SCALE:
        reasons.append(f"their typical magnitude is only {fmt(fig['median_feature_rms'])} (median per-feature rms)")
    if fig["median_offset_ratio"] > OFFSET_RATIO:
        reasons.append(f"their means sit {fmt(fig['median_offset_ratio'])} standard deviations from zero (median "
                       f"over features)")
    if fig["std_spread_ratio"] > SPREAD_RATIO:
        reasons.append(f"feature scales differ by a factor {fmt(fig['std_spread_ratio'])} (90th / 10th percentile "
                       f"of the per-feature std, {fmt(fig['std_low'])} to {fmt(fig['std_high'])})")
    return reasons


def _raw_intensities(fig: Mapping[str, float]) -> bool:
    return bool(fig["integer_valued"]) and fig["min_value"] >= 0 and RAW_INTENSITY_MIN_MAX < fig["max_value"] <= 255


def _normalize_advice(fig: Mapping[str, float], summary: Mapping[str, torch.Tensor], channels: bool) -> str:
    if _raw_intensities(fig):
        top = int(fig["max_value"])
        scale = 255 if top > 16 else top
        first = (f"These look like raw integer intensities (0..{top}): divide by {scale} to get [0, 1], then "
                 f"standardize with the training set's mean and std")
    else:
        first = "Standardize the inputs with the training set's statistics: x = (x - mean) / std per feature"
    mean, std = summary["mean"], summary["std"]
    if channels and mean.numel() <= 4:
        first += (f", e.g. torchvision.transforms.Normalize(mean={[round(float(v), 4) for v in mean]}, "
                  f"std={[round(float(v), 4) for v in std]}) (the per-channel values measured here)")
    else:
        first += (f" (measured here: means {fmt(fig['mean_low'])} to {fmt(fig['mean_high'])}, stds "
                  f"{fmt(fig['std_low'])} to {fmt(fig['std_high'])}); sklearn.preprocessing.StandardScaler fitted "
                  f"on the training split does this")
    return first + ". Compute the statistics on the training split only and apply the same transform to validation."


def normalized_in_model(first_layer_inputs: Mapping[str, torch.Tensor]) -> bool:
    """Whether the first weight layer receives normalized values (at most an ``info`` from
    :func:`inputs_not_normalized` on them): the model normalizes its raw inputs in forward."""
    if input_summary_figures(first_layer_inputs) is None:
        return False
    verdict = inputs_not_normalized(first_layer_inputs)
    return verdict is None or verdict.severity == "info"


def inputs_not_normalized(summary: Mapping[str, torch.Tensor], channels: bool = False,
                          normalized_inside: Optional[str] = None) -> Optional[Verdict]:
    """``warning`` when the inputs are far from zero mean / unit scale or their scales differ by orders of magnitude;
    ``info`` for inputs in [0, 1] that are not centered, or when the model normalizes them itself.

    Args:
        summary: per-feature moments of the training inputs (:class:`~diag.stats.data.FeatureMoments`).
        channels: the features are image/signal channels (advice in ``transforms.Normalize`` form).
        normalized_inside: the name of the first weight layer when its own input passed this rule although the raw
            batch does not (the model normalizes in ``forward``): then at most ``info``.
    """
    fig = input_summary_figures(summary)
    if fig is None:
        return None
    evidence = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in fig.items()}
    what = "per-channel" if channels else "per-feature"
    reasons = _reasons(fig)
    if reasons:
        raw = " (raw integer intensities)" if _raw_intensities(fig) else ""
        message = (f"The training inputs are not normalized{raw}: " + "; ".join(reasons) +
                   f" ({what} statistics over {fig['values_per_feature']} values per feature, "
                   f"range {fmt(fig['min_value'])} to {fmt(fig['max_value'])}).")
        advice = _normalize_advice(fig, summary, channels)
        if normalized_inside:
            evidence["normalized_inside_at"] = normalized_inside
            return Verdict("inputs_not_normalized",
                           message + f" The first weight layer ({normalized_inside}) receives normalized values, so the "
                           f"model appears to normalize them in forward.",
                           "Nothing to do if the normalization inside the model is intended; " + advice[0].lower() + advice[1:],
                           evidence, "info")
        return Verdict("inputs_not_normalized", message, advice, evidence, "warning")
    if fig["min_value"] >= 0 and fig["max_value"] <= 1 and fig["median_offset_ratio"] > UNCENTERED_UNIT_RANGE_RATIO:
        message = (f"The training inputs are scaled to [0, 1] but not centered: the median {what} mean is "
                   f"{fmt(fig['median_offset_ratio'])} standard deviations above zero.")
        return Verdict("inputs_not_normalized", message, _normalize_advice(fig, summary, channels), evidence, "info")
    return None


# ---- class_imbalance ------------------------------------------------------------------------------------
# Buda, Maki & Mazurowski, "A systematic study of the class imbalance problem in convolutional neural networks"
# (Neural Networks 2018): CNN accuracy drops as the max/min class-size ratio grows; their smallest imbalance
# studied is 10:1, where the effect is already visible. A warning from 10:1.
IMBALANCE_RATIO = 10.0
# Enough samples that a balanced class cannot look 10x rarer by chance: with 20 samples per class on average the
# rarest of 1000 balanced classes (Poisson) still has about 8, the most frequent about 35 (ratio ~4).
MIN_SAMPLES_PER_CLASS = 20


def class_imbalance(counts: Sequence[int], kind: str, classifier_confirmed: bool,
                    weighted_loss: bool = False) -> Optional[Verdict]:
    """Max/min class-frequency ratio of the labels seen in the first epoch.

    Args:
        counts: occurrences per label value ``0 .. K-1`` (labels never seen are left out of the ratio: we cannot
            tell an absent class from a gap in the numbering).
        kind: ``"integer"`` or ``"binary_float"`` (0/1 float targets, e.g. for ``BCEWithLogitsLoss``).
        classifier_confirmed: the model's output width (or the loss monitor) shows these are class labels; when it
            does not, integer targets may be a count or an ordinal regression target: at most ``info``.
        weighted_loss: the module holds a loss with class weights (``weight``/``pos_weight``): at most ``info``.
    """
    seen = [(label, c) for label, c in enumerate(counts) if c > 0]
    if len(seen) < 2:
        return None
    total = sum(c for _, c in seen)
    if total < MIN_SAMPLES_PER_CLASS * len(seen):
        return None
    (rare_label, rare), (common_label, common) = min(seen, key=lambda t: t[1]), max(seen, key=lambda t: t[1])
    ratio = common / rare
    if ratio < IMBALANCE_RATIO:
        return None
    probabilities = [c / total for _, c in seen]
    entropy = -sum(p * math.log(p) for p in probabilities) / math.log(len(seen))
    evidence = {"max_min_ratio": round(ratio, 3), "classes_seen": len(seen), "samples": total,
                "most_frequent_class": common_label, "most_frequent_count": common,
                "rarest_class": rare_label, "rarest_count": rare, "normalized_entropy": round(entropy, 4),
                "target_kind": kind}
    message = (f"The training labels are imbalanced {fmt(ratio)}:1 over the first epoch: class {common_label} "
               f"occurs {common} times, class {rare_label} only {rare} ({len(seen)} classes, {total} samples, "
               f"normalized entropy {entropy:.2f}).")
    if kind == "binary_float":
        weight = common / rare if common_label == 0 else rare / common
        fix = (f"use BCEWithLogitsLoss(pos_weight=torch.tensor({fmt(weight)})) (negatives / positives), or a "
               f"WeightedRandomSampler")
    else:
        fix = ("use class weights in the loss, e.g. CrossEntropyLoss(weight=N / (K * count_k)) - here "
               f"{fmt(total / (len(seen) * rare))} for class {rare_label} and {fmt(total / (len(seen) * common))} "
               f"for class {common_label} - or a WeightedRandomSampler")
    advice = (f"To keep the rare classes from being ignored, {fix}; judge the model by per-class recall, balanced "
              f"accuracy or F1 rather than accuracy.")
    severity = "warning"
    if weighted_loss:
        severity, message = "info", message + " The module holds a loss with class weights, which may compensate."
    elif not classifier_confirmed:
        severity = "info"
        message += " (The model's output width does not confirm these are class labels.)"
    return Verdict("class_imbalance", message, advice, evidence, severity)


# ---- batches_not_shuffled -------------------------------------------------------------------------------------------
# A training set ordered by label (sorted, or concatenated class by class) and loaded with shuffle=False gives batches
# of one or two classes: each step pulls the model towards those classes and away from the others. Measured: the 8x8
# digits sorted by label, a 64-128-10 MLP under Adam, 8 epochs: validation accuracy 0.904 against 0.972 shuffled, and
# no other finding said why. Randomly drawn batches of B samples hold E = sum_c P(class c in the batch) distinct labels
# (hypergeometric: 1 - C(N - n_c, B) / C(N, B)); the distinct count is a sum of negatively correlated indicators, so its
# variance is at most E and the mean over m batches deviates from E by sqrt(E / m) per standard deviation. Half of E
# over at least 8 batches with E >= 4 is then at least sqrt(E m) / 2 >= 2.8 standard deviations away (the digits:
# 1.3 labels per sorted batch against 9.9, 0.0 missing). Grouping by class can be deliberate (few-shot episodes, P x K
# batches for metric learning): an info that says so.
SHUFFLE_MIN_BATCHES = 8
SHUFFLE_MIN_EXPECTED = 4.0
SHUFFLE_SHARE = 0.5


def expected_distinct(counts: Sequence[int], batch_size: float) -> float:
    """Distinct labels in a batch of ``batch_size`` samples drawn without replacement from ``counts`` per label."""
    total = sum(counts)
    b = int(round(batch_size))
    if total <= 0 or b <= 0:
        return 0.0
    b = min(b, total)
    expected = 0.0
    for n_c in counts:
        if n_c <= 0:
            continue
        rest = total - n_c
        absent = 0.0 if rest < b else math.exp(math.lgamma(rest + 1) - math.lgamma(rest - b + 1)
                                               - math.lgamma(total + 1) + math.lgamma(total - b + 1))
        expected += 1.0 - absent
    return expected


def batches_not_shuffled(counts: Sequence[int], mean_distinct: float, batches: int,
                         mean_batch_size: float) -> Optional[Verdict]:
    """The first epoch's batches hold far fewer distinct labels than randomly drawn batches would."""
    if batches < SHUFFLE_MIN_BATCHES:
        return None
    expected = expected_distinct(counts, mean_batch_size)
    if expected < SHUFFLE_MIN_EXPECTED or mean_distinct > SHUFFLE_SHARE * expected:
        return None
    evidence = {"mean_distinct_labels_per_batch": round(mean_distinct, 3), "expected_if_shuffled": round(expected, 3),
                "batches": batches, "mean_batch_size": round(mean_batch_size, 2),
                "classes_seen": sum(1 for c in counts if c > 0)}
    message = (f"The first epoch's training batches hold {mean_distinct:.1f} distinct labels on average, where batches "
               f"of {mean_batch_size:.0f} samples drawn at random from the same labels would hold {expected:.1f} "
               f"({batches} batches): the training data come in label order, not shuffled.")
    advice = ("Pass shuffle=True to the training DataLoader (or a sampler that mixes the classes): batches of one or two "
              "classes pull each step towards them (the digits sorted by label: validation accuracy 0.90 against "
              "0.97 shuffled). If your sampler groups classes on purpose (few-shot episodes, P x K batches), ignore "
              "this.")
    return Verdict("batches_not_shuffled", message, advice, evidence, "info")


# ---- targets_not_normalized -------------------------------------------------------------------------------
# Regression targets two orders of magnitude from unit scale. A freshly initialized output layer predicts about 0, and
# each optimizer step moves its output by about the learning rate times the width it sums over, so a target mean of
# thousands takes thousands of steps to reach while the squared error starts at its square (LeCun et al. 1998 §4.3
# ask the same of the outputs' scale as of the inputs'). Measured: an 8-64-64-1 MLP under Adam at 1e-3 on targets
# around 5000 (std 2000): the MSE fell from 2.9e7 to 5.0e6 in 15 epochs, and the probe answered lr_too_low (true: a
# 10x rate removes 67% of the batch loss), where standardizing the targets is the fix. Targets in [0, 1] (probabilities,
# soft labels, masks) and integer class labels are left alone. An info: a loss that works in the targets' own units
# (a scale-free loss, an output layer initialized to the targets' mean) trains fine.
TARGET_LARGE_SCALE = 100.0


def targets_not_normalized(summary: Mapping[str, torch.Tensor]) -> Optional[Verdict]:
    """``info`` when float regression targets are two orders of magnitude above unit scale (median per-target rms)."""
    fig = input_summary_figures(summary)
    if fig is None or (fig["min_value"] >= 0 and fig["max_value"] <= 1):
        return None
    scale = fig["median_feature_rms"]
    if scale < TARGET_LARGE_SCALE:
        return None
    evidence = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in fig.items()}
    message = (f"The regression targets are far from unit scale: their typical magnitude is {fmt(scale)} (median "
               f"per-target rms; means {fmt(fig['mean_low'])} to {fmt(fig['mean_high'])}, stds {fmt(fig['std_low'])} "
               f"to {fmt(fig['std_high'])}, over {fig['values_per_feature']} values). A freshly initialized output "
               "predicts about 0 and moves by about the learning rate per step, so the fit spends its first steps "
               "growing the output, with a squared error that starts near the targets' square.")
    advice = ("Standardize the targets with the training set's mean and std (and undo it on the predictions), or "
              "initialize the output layer's bias to the targets' mean; then judge the learning rate again.")
    return Verdict("targets_not_normalized", message, advice, evidence, "info")


# ---- train_val_overlap ----------------------------------------------------------------------------------
# A validation sample also seen in training is scored as memorized, inflating validation metrics by up to the
# overlapping share. Differences between models are often judged at ~1 point, so 1% of the validation set is
# where the overlap starts to distort decisions. Measured: a random split of the 8x8 digits has no exact duplicate.
OVERLAP_SHARE = 0.01
MIN_OVERLAP_MATCHES = 3  # fewer matching validation samples: an info (a handful can be chance duplicates)
# When the hashed training samples already repeat one another this much, the inputs take few distinct values
# (e.g. a handful of binary features) and identical train/validation inputs are expected: an info only.
MIN_DISTINCT_TRAIN_SHARE = 0.9


def train_val_overlap(train_counts: Mapping[bytes, int], train_samples: int, val_counts: Mapping[bytes, int],
                      train_total: Optional[float] = None) -> Optional[Verdict]:
    """The share of validation samples whose exact input also occurs among the training samples.

    Args:
        train_counts: digest -> occurrences among the hashed training samples.
        train_samples: training samples hashed (with repeats).
        val_counts: digest -> occurrences among the hashed validation samples.
        train_total: training samples per epoch (to scale up from the hashed share of the training set).
    """
    if not train_counts or not val_counts or train_samples <= 0:
        return None
    matched = sum(1 for d in val_counts if d in train_counts)
    if matched == 0:
        return None
    val_distinct = len(val_counts)
    lower_bound = matched / val_distinct
    fraction_hashed = min(1.0, train_samples / train_total) if train_total and train_total > 0 else 1.0
    share = min(1.0, lower_bound / fraction_hashed)
    train_hits = sum(c for d, c in train_counts.items() if d in val_counts)
    distinct_train = len(train_counts) / train_samples
    evidence = {"overlap_share": round(share, 4), "overlap_share_lower_bound": round(lower_bound, 4),
                "validation_samples_hashed": val_distinct, "validation_samples_matched": matched,
                "train_samples_hashed": train_samples, "train_fraction_hashed": round(fraction_hashed, 4),
                "train_samples_in_validation": train_hits, "distinct_train_share": round(distinct_train, 4)}
    estimated = "" if fraction_hashed >= 1.0 else f" (estimated from {fraction_hashed:.0%} of the training set)"
    message = (f"{share:.1%} of the validation samples{estimated} also occur in the training data: {matched} of "
               f"{val_distinct} hashed validation inputs are identical to one of {train_samples} hashed training inputs.")
    advice = ("Deduplicate the data before splitting, and split by a group key (patient, user, document, source "
              "image) when samples are related; check that the validation dataloader does not reuse training data. "
              "Until then validation metrics are optimistic by up to the overlap share.")
    severity = "warning"
    if matched < MIN_OVERLAP_MATCHES or share < OVERLAP_SHARE:
        severity = "info"
    elif distinct_train < MIN_DISTINCT_TRAIN_SHARE:
        severity = "info"
        message += (f" The training inputs repeat one another too ({distinct_train:.0%} distinct), so the inputs "
                    f"take few distinct values and some overlap is expected.")
    return Verdict("train_val_overlap", message, advice, evidence, severity)
