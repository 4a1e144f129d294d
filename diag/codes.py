"""The catalogue of finding codes: each code's usual severity, its one-line meaning and its general advice.

Detectors raise findings with advice that names the values they measured; the advice here is the general
form, used by the README table and as the fallback when a rule has nothing more specific to say.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

from diag.findings import Severity


@dataclasses.dataclass(frozen=True)
class CodeInfo:
    code: str
    severity: Severity
    meaning: str
    advice: str


def _c(code: str, severity: str, meaning: str, advice: str) -> CodeInfo:
    return CodeInfo(code, Severity(severity), meaning, advice)


CATALOGUE: Dict[str, CodeInfo] = {
    c.code: c
    for c in [
        _c("nonfinite_loss", "error", "the training loss became NaN or infinite",
           "Lower the learning rate, clip gradients (gradient_clip_val=1.0), and check the loss for log(0) or division by zero."),
        _c("loss_diverging", "warning", "the loss is rising well above its best and its starting value",
           "Lower the learning rate (try 1/10 of it) or add warm-up; the learning-rate probe says which."),
        _c("loss_oscillating", "warning", "the loss swings up and down without net progress",
           "Lower the learning rate, or add momentum / a larger batch to average the gradient noise."),
        _c("loss_plateau", "warning", "the loss is flat far above its best reachable level while gradients are tiny",
           "Raise the learning rate or use momentum to leave the plateau/saddle; check initialization and normalization."),
        _c("unexpected_initial_loss", "warning", "the first loss is far from the chance level (ln C for C classes)",
           "Check the initialization of the last layer, that logits (not probabilities) reach the loss, and the class count."),
        _c("lr_too_high", "warning", "a smaller learning rate fixes the symptom on a fixed batch",
           "Lower the learning rate to the suggested value in the evidence."),
        _c("lr_too_low", "warning", "a larger learning rate makes much faster progress",
           "Raise the learning rate to the suggested value in the evidence."),
        _c("suspected_code_bug", "error", "no learning rate over 4 orders of magnitude fits a fixed small batch, or the loss ignores the input",
           "Check that labels line up with inputs, that logits (not softmax outputs) reach the loss, that gradients reach every layer, and that inputs are normalized."),
        _c("high_gradient_noise", "warning", "the gradient noise scale is many times the batch size",
           "Use a larger batch (or accumulate_grad_batches), momentum, or a lower learning rate."),
        _c("exploding_gradients", "warning", "gradient norms grow by orders of magnitude",
           "Clip gradients (gradient_clip_val=1.0), lower the learning rate, check initialization scale; add normalization layers."),
        _c("vanishing_gradients", "warning", "early layers' gradients vanish relative to late ones while training stalls",
           "Use ReLU-family or tanh activations with He/Xavier initialization, add BatchNorm/LayerNorm or residual connections."),
        _c("missing_gradients", "error", "trainable parameters never receive a gradient",
           "Find where the graph is cut (.detach(), .item(), torch.no_grad, a module never called in forward) or freeze the parameters with requires_grad_(False)."),
        _c("zigzag_updates", "warning", "consecutive updates point in opposite directions (poor conditioning)",
           "Use momentum (SGD momentum=0.9) or Adam, lower the learning rate, and normalize input features."),
        _c("non_zero_centered_activation", "warning", "a weight layer's input is (almost) always positive",
           "Use a zero-centered activation (tanh) or put BatchNorm/LayerNorm before the next weight layer."),
        _c("dead_units", "warning", "a large share of units never activate",
           "Lower the learning rate, fix a negative bias initialization, or use LeakyReLU/GELU."),
        _c("saturated_activations", "warning", "sigmoid/tanh units are stuck at their limits",
           "Scale down the initialization (Xavier), normalize inputs, or add BatchNorm before the activation."),
        _c("bad_initialization", "info", "from the initial weights no learning rate fits a fixed batch in the probe's steps, while a freshly initialized copy does",
           "If training stays slow, try the layers' default initialization (He/Kaiming for ReLU, Xavier for tanh/sigmoid) with zero biases; check custom init code."),
        _c("batchnorm_on_sequence", "warning", "BatchNorm normalizes across a sequence/token axis",
           "Use LayerNorm over the feature dimension for sequence models."),
        _c("batchnorm_small_batch", "warning", "BatchNorm sees too few samples per batch to estimate statistics",
           "Use a larger batch per device, or GroupNorm/LayerNorm instead of BatchNorm."),
        _c("adam_coupled_weight_decay", "warning", "Adam-type optimizer with weight_decay > 0 as an L2 term (not decoupled)",
           "Use torch.optim.AdamW with the same weight_decay as a starting point (Loshchilov & Hutter 2019)."),
        _c("sgd_without_momentum", "info", "plain SGD without momentum",
           "Use SGD(momentum=0.9) or Adam: momentum averages gradient noise, damps zig-zag and carries through saddle points."),
        _c("unusual_learning_rate", "info", "the learning rate lies far outside the usual range for its optimizer",
           "Unless the value was tuned, start from the usual value (Adam-type 1e-3, SGD 0.01-0.1) and let the probe refine it."),
        _c("underfitting", "warning", "the training loss stalls high and validation is about the same",
           "Add capacity (wider/deeper network), train longer, raise the learning rate or reduce regularization."),
        _c("overfitting", "warning", "validation loss rises while training loss falls",
           "Use early stopping with the best checkpoint, add regularization (dropout, weight decay), or get more data."),
        _c("early_stop_suggested", "info", "the best validation epoch is well behind the current one",
           "Add EarlyStopping and ModelCheckpoint(save_top_k=1) on the validation loss."),
        _c("no_validation_metric", "info", "no validation loss was found: fit is judged from the training loss alone",
           "Pass a validation DataLoader and log self.log(\"val_loss\", loss) in validation_step, or name the metric with FitMonitor(monitor=...)."),
        _c("inputs_not_normalized", "warning", "input features are far from zero mean / unit scale, or scales differ by orders of magnitude",
           "Standardize inputs (subtract the training mean, divide by the training std); scale 0-255 images to [0, 1] and normalize."),
        _c("targets_not_normalized", "info", "float regression targets are two orders of magnitude above unit scale",
           "Standardize the targets (training mean and std; undo it on the predictions), or initialize the output "
           "bias to their mean."),
        _c("class_imbalance", "warning", "the label distribution is heavily skewed",
           "Use class weights in the loss, a WeightedRandomSampler, or report per-class metrics."),
        _c("batches_not_shuffled", "info", "the first epoch's batches hold far fewer distinct labels than random "
           "batches would: the training data come in label order",
           "Pass shuffle=True to the training DataLoader (or a sampler that mixes the classes); ignore it if the "
           "sampler groups classes on purpose."),
        _c("train_val_overlap", "warning", "identical samples are in the training and validation data",
           "Deduplicate before splitting, and split by a group key (user, document) when samples are related."),
        _c("probe_skipped", "info", "a learning-rate probe was asked for but gave no verdict (budget, manual optimization, labels not lined up "
           "until the validation loss confirms it, ...)",
           "Read the reason in the message; a longer fit or LearningRateProbe(budget_fraction=...) lets the probe run."),
        _c("needs_live_run", "info", "`diag analyze` judged a run from its logged curves alone: telling a learning-rate "
           "problem from a code bug takes the model (the learning-rate probe of a live run)",
           "Train it again with Trainer(callbacks=[Diagnostics()]): the probe then says lr_too_high / lr_too_low "
           "(with the rate to use) or suspected_code_bug."),
        _c("diag_internal_error", "info", "a monitor failed internally and switched itself off",
           "Training continues unaffected; please report the message in the evidence to the lightning-diag maintainers."),
    ]
}


def code_info(code: str) -> CodeInfo:
    try:
        return CATALOGUE[code]
    except KeyError:
        raise ValueError(f"unknown finding code {code!r}; known codes: {', '.join(sorted(CATALOGUE))}") from None
