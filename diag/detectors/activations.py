"""Rules on activation statistics: non-zero-centered inputs, dead units, saturated units.

Each rule reads one layer's window summary (see :mod:`diag.stats.activations`) and returns a
:class:`Verdict` or ``None``. The monitor turns verdicts into findings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple
from diag.detectors import Verdict
from diag.stats.numbers import finite_number

# ---- shared ---------------------------------------------------------------------------------------
# "Zero for every sample" only means something when each unit was seen often enough: a unit active on 5% of
# samples looks dead over 64 samples with probability 0.95**64 = 4%.
MIN_SAMPLES_PER_UNIT = 64
# A share of a layer is only a warning when the layer has enough units for the share to mean something: in a
# 4-unit squeeze-and-excitation bottleneck one unit is 25% (measured: 3 of 4 dead in a healthy SE-CNN). Smaller
# layers get an info.
MIN_UNITS_FOR_WARNING = 8


@dataclasses.dataclass(frozen=True)
class LayerView:
    """What the rules know of one layer over one window."""

    name: str
    kind: str  # "weight" (statistics of the layer's input) or "activation" (of the module's output)
    module_type: str  # e.g. "Linear", "ReLU"
    summary: Mapping[str, float]
    data_facing: bool = False  # the first weight layer of the forward: its input is the data (DataMonitor's job)
    normalized_in_front: bool = False  # a BatchNorm/LayerNorm/GroupNorm ran since the previous weight layer
    feeder: Optional[str] = None  # the last activation module that ran before this weight layer
    feeder_type: Optional[str] = None  # its class name ("Sigmoid"); None for a functional activation
    dead_from_input: bool = False  # judge dead units on this weight layer's input (functional activation)


# ---- non_zero_centered_activation -----------------------------------------------------------------
# LeCun, Bottou, Orr & Müller, "Efficient BackProp" (1998) §4.3: inputs that are all positive make every weight
# of a unit move with the same sign, so updates zig-zag; the mean of the inputs adds an eigenvalue of about
# n * mean^2 to the Hessian of the next layer (the offset dominates the curvature when mean >> std).
POSITIVE_INPUT_SHARE = 0.9  # "(almost) all positive": >= 90% of the live input features never went negative
# The offset dominates the spread: rms of the per-feature means over the root-mean per-feature variance.
# Analytic: sigmoid(N(0,1)) gives 0.5 / 0.21 = 2.4; ReLU(N(0,1)) gives 0.399 / 0.584 = 0.68. Measured on our
# digits MLPs/CNNs: sigmoid-fed layers 2.4-180 (growing with depth); ReLU-fed layers 0.6-1.8 (deeper layers see
# positive pre-activation means). The offset alone does not separate them: the feeding module and "strictly
# positive" below do; 1.5 only demands that the mean clearly exceeds the spread.
OFFSET_RATIO = 1.5
# Which activation module fed the layer (the last one run since the previous weight layer). Offset inputs from a
# sigmoid are LeCun's §4.4 case; a ReLU's are not judged offset-dominated even when pooling makes them strictly
# positive and small (global average pooling of ReLU maps: mean >> spread, yet healthy CNNs train fine).
SIGMOID_TYPE_FEEDERS = frozenset({"Sigmoid", "Hardsigmoid", "Softplus"})
# A functional activation (F.sigmoid, torch.relu) leaves no module: then the statistics alone must show sigmoid-like
# inputs: strictly positive (never exactly 0; ReLU outputs are exactly 0 on 30-70% of samples) and inside [0, 1]
# for >= 90% of the live features. Measured: sigmoid layers 100%/100%; ReLU layers 0-23% strictly positive.
SIGMOID_LIKE_SHARE = 0.9
# Progress counts as stalled only far from a solved problem: the smoothed loss still above half of the chance
# level ln C (a converged run is flat too, and that is no symptom).
UNSOLVED_LOSS_FRACTION_OF_CHANCE = 0.5
SLOW_RELATIVE_PROGRESS = 0.01  # < 1% drop of the smoothed loss over the loss monitor's recent window

NON_ZERO_CENTERED_ADVICE = (
    "The inputs of {layer} are always positive (mean {mean:.3g}, std {std:.3g}), so all weights of a unit get "
    "gradients of the same sign and updates zig-zag (LeCun et al., Efficient BackProp, 1998). Either use a "
    "zero-centered activation in front of it (tanh instead of sigmoid), or put BatchNorm/LayerNorm right before "
    "{layer} (e.g. nn.BatchNorm1d after the activation)."
)


def symptoms(signals: Mapping[str, Any]) -> Dict[str, Any]:
    """Slow or zig-zagging progress, read from what the loss and gradient monitors published (may be absent)."""
    from diag import signals as s

    zigzag = signals.get(s.GRAD_ZIGZAG) is True
    progress = signals.get(s.LOSS_RELATIVE_PROGRESS)
    stalled = signals.get(s.LOSS_STALLED) is True or (finite_number(progress) and progress < SLOW_RELATIVE_PROGRESS)
    loss, chance = signals.get(s.LOSS_SMOOTHED), signals.get(s.LOSS_CHANCE_LEVEL)
    unsolved = finite_number(loss) and finite_number(chance) and chance > 0 and loss >= UNSOLVED_LOSS_FRACTION_OF_CHANCE * chance
    initial = signals.get(s.LOSS_INITIAL)
    reference = chance if finite_number(chance) and chance > 0 else initial
    # Training visibly works: the smoothed loss is below half of the chance level (or of the first loss).
    learning = finite_number(loss) and finite_number(reference) and reference > 0 and loss < UNSOLVED_LOSS_FRACTION_OF_CHANCE * reference
    out: Dict[str, Any] = {"zigzag": int(zigzag), "stalled": int(stalled), "unsolved": int(unsolved),
                           "learning": int(learning)}
    out["present"] = zigzag or (stalled and unsolved)
    out["weak"] = stalled  # stalled, but we cannot tell it from convergence
    return out


def non_zero_centered(layer: LayerView, signs: Mapping[str, Any]) -> Optional[Verdict]:
    """Always-positive inputs to a weight layer: a warning only together with their symptom.

    - a sigmoid module's output, mean >> spread, with no normalization since the previous weight layer: the
      setting of the BatchNorm paper's sigmoid MLP and LeCun's §4.4; warning.
    - sigmoid-type inputs (from a sigmoid/softplus module, or a functional activation whose output is strictly
      positive and inside [0, 1]), mean >> spread, together with slow (stalled far from a solved loss) or
      zig-zagging progress: warning.
    - sigmoid-type inputs without a symptom (e.g. BatchNorm before the sigmoid), or ReLU-like positive inputs
      with a symptom (a stall has likelier causes): info. ReLU networks feed positive inputs and usually train
      fine (DeepDiagnosis's "dead node" alarm fired on 58 healthy models): ReLU inputs alone raise nothing.
    """
    s = layer.summary
    if layer.kind != "weight" or layer.data_facing or not finite_number(s.get("fraction_positive")):
        return None
    if s["fraction_positive"] < POSITIVE_INPUT_SHARE:
        return None
    offset = finite_number(s.get("offset_ratio")) and s["offset_ratio"] >= OFFSET_RATIO
    strictly = s.get("fraction_strictly_positive", 0.0) >= SIGMOID_LIKE_SHARE
    bounded = s.get("fraction_bounded", 0.0) >= SIGMOID_LIKE_SHARE
    sigmoid_fed = layer.feeder_type in SIGMOID_TYPE_FEEDERS
    # sigmoid-type: a sigmoid/softplus module (or a functional activation) feeds it, and the numbers look like one:
    # strictly positive (so not a ReLU map gated by a sigmoid, as in squeeze-and-excitation) and inside [0, 1]
    # (softplus is not bounded).
    sigmoid_type = (offset and strictly and (bounded or layer.feeder_type == "Softplus")
                    and (sigmoid_fed or layer.feeder_type is None))
    present, zigzag = bool(signs.get("present")), bool(signs.get("zigzag"))
    symptom = "zig-zagging updates" if zigzag else "stalled progress far from a solved loss"
    if sigmoid_type and sigmoid_fed and layer.feeder_type != "Softplus" and not layer.normalized_in_front:
        severity, why = "warning", (f"the output of {layer.feeder} ({layer.feeder_type}), mean well above its spread, "
                                    "with no normalization in front")
    elif sigmoid_type and present:
        severity, why = "warning", f"sigmoid-like inputs, mean well above their spread, together with {symptom}"
    elif sigmoid_type or present:
        severity, why = "info", ("sigmoid-like inputs, mean well above their spread; no sign yet that it slows training"
                                 if sigmoid_type else
                                 "always-positive (ReLU-like) inputs while progress is slow; other causes are likelier")
    else:
        return None
    evidence = {"fraction_positive_inputs": s["fraction_positive"], "mean": s["mean"], "std": s["std"],
                "offset_ratio": s["offset_ratio"],
                "fraction_strictly_positive": s.get("fraction_strictly_positive", float("nan")),
                "fraction_bounded": s.get("fraction_bounded", float("nan")),
                "normalized_in_front": int(layer.normalized_in_front), "feeder": layer.feeder or "functional",
                "zigzag": signs.get("zigzag", 0), "stalled": signs.get("stalled", 0)}
    message = (f"{s['fraction_positive']:.0%} of the input features of {layer.name} ({layer.module_type}) never went "
               f"negative; mean {s['mean']:.3g}, std {s['std']:.3g} (offset ratio {s['offset_ratio']:.2f}): {why}.")
    advice = NON_ZERO_CENTERED_ADVICE.format(layer=layer.name, mean=s["mean"], std=s["std"])
    return Verdict("non_zero_centered_activation", message, advice, evidence, severity, layer.name)


# ---- dead_units -----------------------------------------------------------------------------------
# Per-sample sparsity of 50-70% is normal for ReLU (Glorot, Bordes & Bengio 2011 report 50-80% zeros); a unit
# that is zero for EVERY sample over a window of several sampled steps gets no gradient and stays dead.
# CS231n (Karpathy) notes "as much as 40% of your network can be dead" with a too-high learning rate, as a
# problem worth fixing; we warn from half of a layer (a healthy ReLU MLP/CNN measured ~0-5% dead over a window)
# and give an info from a quarter.
DEAD_FRACTION_WARNING = 0.5
DEAD_FRACTION_INFO = 0.25
# Only activations whose "off" state is exactly zero can be dead (LeakyReLU/GELU/ELU/SiLU units are never dead).
DEAD_CAPABLE = frozenset({"ReLU", "ReLU6", "Threshold", "functional"})

DEAD_ADVICE = (
    "{dead:.0%} of the {units_of} output zero for every sample, so they get no gradient and never recover. "
    "Check the bias initialization (a negative bias, e.g. -5, switches ReLUs off; use zeros), lower the learning "
    "rate (a too-large step pushes units into the dead region), or use LeakyReLU(0.01)/GELU, which keep a gradient."
)


def dead_units_applies(layer: LayerView) -> bool:
    """Whether :func:`dead_units` judges this layer: an activation module whose "off" state is exactly zero, or a
    weight layer fed by a functional activation (not the data)."""
    if layer.kind == "activation":
        return layer.module_type in DEAD_CAPABLE
    return layer.dead_from_input and not layer.data_facing


def _unit_share(layer: LayerView, applies: bool, key: str, info_at: float,
                warning_at: float) -> Optional[Tuple[float, int, str]]:
    """The share ``summary[key]`` of the layer's units in some state, its unit count and the severity they earn:
    ``warning`` from ``warning_at`` in a layer of at least ``MIN_UNITS_FOR_WARNING`` units, ``info`` from ``info_at``;
    ``None`` below that, with too few samples per unit to tell, or where the rule does not apply."""
    if not applies:
        return None
    s = layer.summary
    share = s.get(key)
    if not finite_number(share) or s.get("samples", 0) < MIN_SAMPLES_PER_UNIT or share < info_at:
        return None
    units = int(s.get("features", 0))
    return share, units, "warning" if share >= warning_at and units >= MIN_UNITS_FOR_WARNING else "info"


def dead_units(layer: LayerView) -> Optional[Verdict]:
    found = _unit_share(layer, dead_units_applies(layer), "dead_fraction", DEAD_FRACTION_INFO, DEAD_FRACTION_WARNING)
    if found is None:
        return None
    dead, units, severity = found
    s = layer.summary
    if layer.kind == "activation":
        what, units_of = f"units of {layer.name} ({layer.module_type})", f"units of {layer.name}"
    else:
        what = f"input features of {layer.name} ({layer.module_type}, fed by a functional activation)"
        units_of = f"units feeding {layer.name}"
    message = (f"{dead:.0%} of the {units} {what} were zero for every one of {int(s['samples'])} samples over the "
               f"window.")
    evidence = {"dead_fraction": dead, "units": units, "samples_per_unit": int(s["samples"]), "mean": s["mean"]}
    return Verdict("dead_units", message, DEAD_ADVICE.format(dead=dead, units_of=units_of), evidence, severity,
                   layer.name)


# ---- saturated_activations ------------------------------------------------------------------------
# A sigmoid/tanh unit is at its limit when sigmoid(z) < 0.01 or > 0.99 (|z| > 4.6) or |tanh(z)| > 0.99
# (|z| > 2.65): its local gradient is below 1% of the maximum. A unit is saturated when it sits there for most
# (>= half) of the samples; TheDeepChecker (Braiek & Khomh, 2022) flags layers whose units are saturated in this
# sense. We warn when most units of a layer are saturated (Glorot & Bengio 2010 show whole sigmoid layers
# stuck at 0 under a standard init) and give an info from a quarter. A healthy tanh MLP measured 0-2%.
SATURATION_LIMITS = {"Sigmoid": (0.01, 0.99), "Tanh": (-0.99, 0.99), "Hardtanh": (-0.99, 0.99),
                     "Hardsigmoid": (0.01, 0.99), "Softsign": (-0.99, 0.99)}
UNIT_SATURATED_SHARE = 0.5
SATURATED_FRACTION_WARNING = 0.5
SATURATED_FRACTION_INFO = 0.25

SATURATED_ADVICE = (
    "{sat:.0%} of the units of {layer} sit at the limits of {kind} for most samples, where its gradient is nearly "
    "zero. Scale down the initialization of the weight layer in front (Xavier/Glorot: std = sqrt(2 / (fan_in + "
    "fan_out))), standardize the inputs, lower the learning rate, or add BatchNorm/LayerNorm before {layer}."
)


def saturated_activations_applies(layer: LayerView) -> bool:
    """Whether :func:`saturated_activations` judges this layer: a bounded activation module (sigmoid/tanh family)."""
    return layer.kind == "activation" and layer.module_type in SATURATION_LIMITS


def judged_activation(module_type: str) -> bool:
    """Whether an activation module of this class is measured at all: its output can die or saturate."""
    return module_type != "functional" and (module_type in DEAD_CAPABLE or module_type in SATURATION_LIMITS)


def moment_settings(kind: str, module_type: str) -> Dict[str, Any]:
    """What the layer's :class:`~diag.stats.activations.FeatureMoments` must count for these rules: the saturation
    band of a bounded activation (``None`` elsewhere) and the share of samples that makes a unit saturated."""
    limits = SATURATION_LIMITS.get(module_type) if kind == "activation" else None
    return {"saturation": limits, "unit_share": UNIT_SATURATED_SHARE}


def saturated_activations(layer: LayerView, signs: Optional[Mapping[str, Any]] = None) -> Optional[Verdict]:
    """Most of a sigmoid/tanh layer's units at their limits. A warning only while training is not visibly working:
    a trained tanh network can drive many units to +-1 on purpose (a 2-64-64-2 tanh MLP that solved two spirals,
    validation loss 0.004, had 52% of a layer's units saturated), so once the loss is below half of the chance level
    (or of the first loss) it is at most ``info``."""
    found = _unit_share(layer, saturated_activations_applies(layer), "saturated_fraction", SATURATED_FRACTION_INFO,
                        SATURATED_FRACTION_WARNING)
    if found is None:
        return None
    sat, units, severity = found
    s = layer.summary
    if signs is not None and signs.get("learning"):
        severity = "info"
    message = (f"{sat:.0%} of the {units} units of {layer.name} ({layer.module_type}) were at their limits for at least "
               f"{UNIT_SATURATED_SHARE:.0%} of {int(s['samples'])} samples over the window.")
    evidence = {"saturated_fraction": sat, "units": units, "samples_per_unit": int(s["samples"]), "mean": s["mean"],
                "std": s["std"]}
    advice = SATURATED_ADVICE.format(sat=sat, layer=layer.name, kind=layer.module_type.lower())
    return Verdict("saturated_activations", message, advice, evidence, severity, layer.name)
