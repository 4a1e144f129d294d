"""02 - Batch Normalization lets a sigmoid MLP train with plain SGD (the BatchNorm paper's experiment, scaled down).

Claim (study note): "Batch Normalization adjusts the range so that the input vector has zero mean and unit
variance"; "make the input not always positive -> Batch Normalization".

Source: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate
Shift" (ICML 2015), section 4.1: a 3-hidden-layer sigmoid MLP on MNIST trained with plain SGD, with and without
BatchNorm; with BatchNorm it trains much faster and its activations keep a stable distribution.

Both runs: scikit-learn's 8x8 digits (standardized), three sigmoid hidden layers, plain SGD (no momentum, as in
the paper), same seed and learning rate.
* broken: Linear -> Sigmoid, three times: un-normalized pre-activations drift, every hidden layer feeds the next
  one inputs in (0, 1) with mean ~0.5 and a small spread, and plain SGD crawls (zig-zag, near-chance loss);
* fixed:  Linear -> BatchNorm1d -> Sigmoid, three times (the paper's placement, BN before the nonlinearity): each
  pre-activation is zero-mean and unit-variance, the sigmoids work in their responsive range and the same SGD
  trains quickly. Their outputs are still positive: lightning-diag notes that as an info ("no sign yet that it
  slows training"), not a warning, because a normalization layer sits in front of the sigmoid. (Putting BN after
  the sigmoid, right before the next Linear, also centers those inputs; it is the placement lightning-diag's
  advice names.)

In TensorBoard (Custom Scalars): "activation mean per layer" and "fraction of positive inputs per weight layer"
(always-positive inputs without BN), "training loss" (the plain net stays near chance for a long time),
"gradient norm (total, per layer)"; the Text tab (diag/findings) for the findings and advice.

    python examples/02_batchnorm_sigmoid.py [--fast] [--logdir lightning_logs]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import _common as C
from diag import Finding

EXAMPLE = "02_batchnorm_sigmoid"
EXPECTED = {"broken": ["non_zero_centered_activation"], "fixed": []}
# the TensorBoard scalar tags (prefixes) behind the charts the header points at
CHARTS = ["diag/activation_mean/", "diag/fraction_positive_inputs/", "diag/grad_norm"]
HIDDEN = 100  # the paper's 100 units per hidden layer
LEARNING_RATE = 0.5


def sigmoid_mlp(batchnorm: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    width = 64
    for _ in range(3):
        layers.append(nn.Linear(width, HIDDEN))
        if batchnorm:
            layers.append(nn.BatchNorm1d(HIDDEN))
        layers.append(nn.Sigmoid())
        width = HIDDEN
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def build(name: str, fast: bool) -> C.Variant:
    x, y, x_val, y_val = C.digits(standardize=True, n_train=800 if fast else 1400)
    batchnorm = name == "fixed"
    module = C.Model(sigmoid_mlp(batchnorm), optimizer=lambda p: torch.optim.SGD(p, lr=LEARNING_RATE))
    what = "Linear -> BatchNorm1d -> Sigmoid" if batchnorm else "Linear -> Sigmoid"
    return C.Variant(f"3 x ({what}), {HIDDEN} units, plain SGD(lr={LEARNING_RATE})", module,
                     C.loaders(x, y, x_val, y_val, batch_size=32), epochs=3 if fast else 8, expected=EXPECTED[name])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Finding]]:
    return C.compare(EXAMPLE, __doc__, argv, build,
                     charts="Custom Scalars 'activation mean per layer', "
                            "'fraction of positive inputs per weight layer', 'training loss', "
                            "'gradient norm (total, per layer)'")


if __name__ == "__main__":
    main()
