"""Rules on the training setup: the optimizer's weight decay, momentum and learning rate, and BatchNorm's inputs.

Each rule reads a ``torch.optim.Optimizer`` or what BatchNorm layers received on the first training batch and
returns :class:`Verdict` objects (or ``None``); the ``SetupCheck`` callback turns them into findings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from diag.detectors import Verdict


def fmt(value: float) -> str:
    """A number for a message: 3 significant digits, no trailing noise."""
    if value is None or not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"


def _float(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().reshape(-1)[0]) if value.numel() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _trainable_groups(optimizer: torch.optim.Optimizer) -> List[Tuple[int, Dict[str, Any]]]:
    return [(i, g) for i, g in enumerate(optimizer.param_groups)
            if any(getattr(p, "requires_grad", False) for p in g.get("params", []))]


def _peak_lr(group: Dict[str, Any]) -> Optional[float]:
    """The group's learning rate before schedulers lower it (warm-up starts low, one-cycle peaks at ``max_lr``)."""
    values = [_float(group.get(k)) for k in ("lr", "initial_lr", "max_lr")]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside Lightning's ``LightningOptimizer`` (or similar wrappers)."""
    # LightningOptimizer is a dynamic subclass of the optimizer's own class ("LightningAdam"): unwrap by attribute.
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


# ---- adam_coupled_weight_decay --------------------------------------------------------------------------
# Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019): in adaptive methods an L2 term added
# to the gradient is divided by the adaptive denominator, so weights with large gradients are barely decayed;
# weight decay applied to the weights directly (AdamW) regularizes as intended and generalizes better.
# Optimizers whose `weight_decay` is such an L2 term (unless a `decoupled_weight_decay` flag is set):
COUPLED_DECAY_OPTIMIZERS = tuple(getattr(torch.optim, n) for n in
                                 ("Adam", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta")
                                 if hasattr(torch.optim, n))
# Optimizers that have a `decoupled_weight_decay=True` switch (torch >= 2.x for NAdam/RAdam, 2.6+ for Adam).
_HAS_DECOUPLED_SWITCH = ("Adam", "NAdam", "RAdam")
# The learning-rate scale of Adagrad/Adadelta differs from Adam's (Adadelta's default is 1.0): AdamW's default then.
_ADAMW_DEFAULT_LR = 1e-3


def _decoupled(optimizer: torch.optim.Optimizer, group: Dict[str, Any]) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def adam_coupled_weight_decay(optimizer: torch.optim.Optimizer, layer: Optional[str] = None) -> Optional[Verdict]:
    """``warning`` when an adaptive optimizer applies ``weight_decay > 0`` as an L2 term in any trainable group."""
    if not isinstance(optimizer, COUPLED_DECAY_OPTIMIZERS):
        return None
    offending = [(i, g) for i, g in _trainable_groups(optimizer)
                 if (_float(g.get("weight_decay")) or 0.0) > 0 and not _decoupled(optimizer, g)]
    if not offending:
        return None
    name = type(optimizer).__name__
    decays = sorted({_float(g["weight_decay"]) for _, g in offending})
    lrs = [lr for lr in (_peak_lr(g) for _, g in offending) if lr is not None]
    lr = lrs[0] if lrs else _ADAMW_DEFAULT_LR
    decay = decays[-1]
    if name in ("Adagrad", "Adadelta"):
        lr = _ADAMW_DEFAULT_LR
    where = "" if len(optimizer.param_groups) == 1 else f" in {len(offending)} of {len(optimizer.param_groups)} parameter groups"
    message = (f"{name} applies weight_decay={fmt(decay)}{where} as an L2 term added to the gradient; the adaptive "
               f"step divides it by the gradient's running magnitude, so weights with large gradients are barely "
               f"decayed (Loshchilov & Hutter 2019).")
    switch = (f" (or {name}(..., decoupled_weight_decay=True))"
              if name in _HAS_DECOUPLED_SWITCH and "decoupled_weight_decay" in optimizer.defaults else "")
    advice = (f"Use torch.optim.AdamW(params, lr={fmt(lr)}, weight_decay={fmt(decay)}){switch} as a starting point, "
              f"then tune the decay: decoupled decay is not scaled by the adaptive denominator, so it usually needs "
              f"a larger value (AdamW's default is 1e-2). Exclude biases and normalization weights from decay.")
    evidence = {"optimizer": name, "weight_decay": decay, "lr": lr, "groups_with_coupled_decay": len(offending),
                "param_groups": len(optimizer.param_groups)}
    return Verdict("adam_coupled_weight_decay", message, advice, evidence, "warning", layer)


# ---- sgd_without_momentum -------------------------------------------------------------------------------
# The study note (CS231n-style): plain SGD suffers from gradient noise, zig-zag under poor conditioning and
# saddle points; momentum averages the noise, damps the zig-zag and carries through flat regions (Polyak 1964;
# Sutskever et al. 2013, "On the importance of initialization and momentum in deep learning": 0.9 and above).
SUGGESTED_MOMENTUM = 0.9


def sgd_without_momentum(optimizer: torch.optim.Optimizer, symptom: Optional[str] = None,
                         layer: Optional[str] = None) -> Optional[Verdict]:
    """``info`` for ``torch.optim.SGD`` with ``momentum=0`` in a trainable group; ``warning`` when ``symptom``
    (zig-zag updates or a plateau seen by another monitor) is given."""
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    plain = [(i, g) for i, g in _trainable_groups(optimizer) if (_float(g.get("momentum")) or 0.0) == 0.0]
    if not plain:
        return None
    lr = _peak_lr(plain[0][1])
    message = f"torch.optim.SGD runs without momentum (momentum=0, lr={fmt(lr) if lr is not None else '?'})."
    if symptom:
        message += f" The run shows what momentum fixes: {symptom}."
    lower = fmt(lr * (1 - SUGGESTED_MOMENTUM)) if lr is not None else "lr/10"
    advice = (f"Use torch.optim.SGD(params, lr={fmt(lr) if lr is not None else 'lr'}, momentum={SUGGESTED_MOMENTUM}) "
              f"(nesterov=True is a good default too) or Adam(lr=1e-3): momentum averages the gradient noise, damps "
              f"zig-zag and carries through plateaus and saddle points. The effective step becomes lr/(1-momentum), "
              f"10x larger: if the loss turns unstable, lower lr to about {lower}.")
    evidence = {"optimizer": "SGD", "momentum": 0.0, "lr": lr if lr is not None else "?", "groups_without_momentum": len(plain)}
    if symptom:
        evidence["symptom"] = symptom
    return Verdict("sgd_without_momentum", message, advice, evidence, "warning" if symptom else "info", layer)


# ---- unusual_learning_rate (info) -----------------------------------------------------------------------
# Adam-type: the study note's usual range is 1e-5 ... 1e-3 (Adam's default 1e-3, Kingma & Ba 2015; fine-tuning
# 1e-5 ... 5e-5). "Far outside" = more than 10x beyond either end.
ADAM_LR_HIGH, ADAM_LR_LOW = 1e-2, 1e-6
ADAM_TYPE = tuple(getattr(torch.optim, n) for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam") if hasattr(torch.optim, n))
# SGD: Bengio, "Practical recommendations for gradient-based training of deep architectures" (2012): with
# standardized inputs typical values are below 1 and above 1e-6.
SGD_LR_HIGH, SGD_LR_LOW = 1.0, 1e-6


def unusual_learning_rate(optimizer: torch.optim.Optimizer, layer: Optional[str] = None) -> Optional[Verdict]:
    """``info`` when the (peak) learning rate of a trainable group lies far outside the usual range."""
    if isinstance(optimizer, ADAM_TYPE):
        family, high, low, usual = "Adam-type", ADAM_LR_HIGH, ADAM_LR_LOW, "1e-5 to 1e-3"
    elif isinstance(optimizer, torch.optim.SGD):
        family, high, low, usual = "SGD", SGD_LR_HIGH, SGD_LR_LOW, "1e-3 to 0.1 (below 1)"
    else:
        return None
    for i, group in _trainable_groups(optimizer):
        lr = _peak_lr(group)
        if lr is None or lr <= 0:
            continue  # lr 0: deliberately frozen (or a schedule we cannot read)
        if lr > high or lr < low:
            direction = "above" if lr > high else "below"
            name = type(optimizer).__name__
            where = "" if len(optimizer.param_groups) == 1 else f" (parameter group {i})"
            message = (f"{name}'s learning rate {fmt(lr)}{where} is far {direction} the usual range for {family} "
                       f"optimizers ({usual}).")
            target = 1e-3 if family == "Adam-type" else 0.01
            advice = (f"Unless this value was tuned, try about {fmt(target)} (then 3x steps up or down); the "
                      f"learning-rate probe and the loss monitor say whether it is too high or too low.")
            return Verdict("unusual_learning_rate", message, advice,
                           {"optimizer": name, "lr": lr, "usual_low": low * 10, "usual_high": high / 10,
                            "param_group": i}, "info", layer)
    return None


# ---- BatchNorm: what the layers received on the first training batch ------------------------------------
@dataclasses.dataclass(frozen=True)
class NormInput:
    """One BatchNorm layer's input on the first training batch."""

    name: str
    module_type: str
    shape: Tuple[int, ...]
    training: bool
    synchronized: bool = False  # SyncBatchNorm: statistics over all devices


SEQUENCE_LAYER_TYPES: Tuple[type, ...] = (nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                                          nn.TransformerDecoderLayer, nn.Transformer)


def is_sequence_layer(module: nn.Module) -> bool:
    """Recurrent or attention layers: torch's own, or a class named ``...Attention``/``...LSTM``/``...GRU`` (e.g.
    Hugging Face's ``BertSelfAttention``) that holds no BatchNorm itself (so it is not the whole model)."""
    if isinstance(module, SEQUENCE_LAYER_TYPES):
        return True
    name = type(module).__name__
    return name.endswith(("Attention", "LSTM", "GRU")) and not any(is_batchnorm(m) for m in module.modules())


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


# ---- batchnorm_small_batch ------------------------------------------------------------------------------
# Wu & He, "Group Normalization" (ECCV 2018), Fig. 1 / Table 2: ResNet-50 on ImageNet with BN, error 23.6% at 32
# images per GPU, 24.8% at 8, 27.3% at 4, 34.7% at 2 (GN stays at ~24%). Below 8 samples the batch statistics are
# too noisy: a warning. 8-15: BN is already behind GN: an info.
SMALL_BATCH_WARNING = 8
SMALL_BATCH_INFO = 16


def batchnorm_small_batch(inputs: Sequence[NormInput], world_size: int = 1) -> Optional[Verdict]:
    """BatchNorm layers in training mode that estimate their statistics from fewer than 8 (16) samples."""
    seen = []
    for obs in inputs:
        if not obs.training or len(obs.shape) < 2:
            continue
        samples = int(obs.shape[0]) * (max(1, world_size) if obs.synchronized else 1)
        seen.append((samples, obs))
    if not seen:
        return None
    samples, first = min(seen, key=lambda t: t[0])
    if samples >= SMALL_BATCH_INFO:
        return None
    layers = [o.name for s, o in seen if s == samples]
    severity = "warning" if samples < SMALL_BATCH_WARNING else "info"
    message = (f"BatchNorm layer{'s' if len(layers) > 1 else ''} {', '.join(layers[:3])}"
               f"{f' and {len(layers) - 3} more' if len(layers) > 3 else ''} normalize{'s' if len(layers) == 1 else ''} "
               f"with statistics of only {samples} sample{'s' if samples != 1 else ''} per batch (per device); batch "
               f"statistics this noisy hurt accuracy (Wu & He 2018: ImageNet error 23.6% at 32 images per GPU, 27.3% "
               f"at 4, 34.7% at 2).")
    advice = (f"Use at least {SMALL_BATCH_INFO} (better 32) samples per device, or replace BatchNorm with "
              f"nn.GroupNorm(num_groups=32, num_channels=C) (or LayerNorm), which does not depend on the batch; "
              f"under DDP, nn.SyncBatchNorm.convert_sync_batchnorm(model) pools the statistics of all devices.")
    evidence = {"samples_per_batch": samples, "layers": len(layers), "first_layer": first.name,
                "layer_type": first.module_type, "input_shape": "x".join(str(d) for d in first.shape)}
    return Verdict("batchnorm_small_batch", message, advice, evidence, severity)


# ---- batchnorm_on_sequence ------------------------------------------------------------------------------
# The study note: BatchNorm assumes independent samples and, at test time, uses statistics gathered in training;
# the tokens of a sentence are strongly dependent and padding enters the batch statistics, so text models use
# LayerNorm, which normalizes each token along its feature dimension. Shen et al., "PowerNorm: Rethinking Batch
# Normalization in Transformers" (ICML 2020): BatchNorm in NLP transformers degrades markedly against LayerNorm
# because batch statistics fluctuate strongly across batches of text.
# Float sequences (audio, time series) are a different case: Conformer (Gulati et al. 2020) uses BatchNorm over
# time in its convolution module on purpose, and time-series transformers sometimes prefer it: only an info there.


def _sequence_axis(obs: NormInput, batch_size: Optional[int]) -> Optional[str]:
    shape = obs.shape
    if len(shape) == 3 and shape[2] > 1:
        return f"input {tuple(shape)}: statistics pooled over the batch and a sequence axis of length {shape[2]}"
    if len(shape) == 2 and batch_size and shape[0] > batch_size and shape[0] % batch_size == 0:
        return (f"input {tuple(shape)}: {shape[0] // batch_size} tokens per sample flattened into the batch axis "
                f"({batch_size} samples)")
    return None


def batchnorm_on_sequence(inputs: Sequence[NormInput], batch_size: Optional[int], token_inputs: Optional[str],
                          sequence_layer: Optional[str]) -> Optional[Verdict]:
    """BatchNorm in training mode that pools statistics across the tokens of sequences.

    Args:
        inputs: what each BatchNorm layer received on the first training batch.
        batch_size: samples in that batch (to recognize tokens flattened into the batch axis).
        token_inputs: a description of the evidence that the model reads token sequences (integer ``(N, T)``
            inputs going through an ``nn.Embedding``), or ``None``: then a ``warning``.
        sequence_layer: the name of a recurrent/attention layer (float sequences): then only an ``info``.
    """
    if not token_inputs and not sequence_layer:
        return None
    hits = [(obs, why) for obs in inputs if obs.training for why in [_sequence_axis(obs, batch_size)] if why]
    if not hits:
        return None
    first, why = hits[0]
    names = [o.name for o, _ in hits]
    layers = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if token_inputs:
        severity = "warning"
        context = f"the model reads token sequences ({token_inputs})"
    else:
        severity = "info"
        context = f"the model processes sequences ({sequence_layer}) of float features"
    message = (f"BatchNorm ({layers}) pools its statistics over the positions of sequences: {why}, and "
               f"{context}. The positions (tokens) of one sequence are not independent samples, and padding enters "
               f"the batch statistics that are then frozen for evaluation.")
    if severity == "info":
        message += " For audio/time-series models this can be deliberate (e.g. Conformer's convolution module)."
    advice = ("Replace it with nn.LayerNorm(feature_dim) applied on the feature axis of (batch, time, features) "
              "tensors, as transformers and RNN language models do: LayerNorm normalizes each token along its "
              "features, independently of the other tokens and samples.")
    evidence = {"layers": len(names), "first_layer": first.name, "input_shape": "x".join(str(d) for d in first.shape),
                "batch_size": batch_size if batch_size else "?",
                "evidence": token_inputs or sequence_layer or ""}
    return Verdict("batchnorm_on_sequence", message, advice, evidence, severity, first.name)
