"""01 - Non-zero-centered activations make the updates zig-zag: use a zero-centered activation.

Claim (study note): "Fixing the problem of non-zero-centered inputs: use a zero-centered activation function,
or make sure the input is not always positive (Batch Normalization)."

Source: LeCun, Bottou, Orr & Mueller, "Efficient BackProp" (1998), sections 4.3 and 4.4: when every input of a
unit is positive, all its weight gradients share one sign, so the weights can only move together and the
updates zig-zag; a symmetric, zero-centered activation (tanh) converges faster than the logistic sigmoid.

Both runs: scikit-learn's 8x8 digits (standardized), a 64-64-64-10 MLP, SGD with momentum 0.9, same seed.
* broken: sigmoid hidden layers (outputs in (0, 1), mean about 0.5: the next layer's inputs are always positive);
* fixed:  tanh hidden layers (outputs in (-1, 1), centered on 0).

In TensorBoard (Custom Scalars): "fraction of positive inputs per weight layer" (1.0 on net.2 / net.4 for
sigmoid), "activation mean per layer" (about 0.5 vs about 0), "training loss" (the sigmoid net lags), and the
Text tab (diag/findings) for the finding and its advice.

    python examples/01_zero_centered.py [--fast] [--logdir lightning_logs]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import _common as C
from diag import Finding

EXAMPLE = "01_zero_centered"
EXPECTED = {"broken": ["non_zero_centered_activation"], "fixed": []}
# the TensorBoard scalar tags (prefixes) behind the charts the header points at
CHARTS = ["diag/fraction_positive_inputs/", "diag/activation_mean/"]


def build(name: str, fast: bool) -> C.Variant:
    x, y, x_val, y_val = C.digits(standardize=True, n_train=800 if fast else 1400)
    activation = nn.Sigmoid if name == "broken" else nn.Tanh
    module = C.Model(C.mlp([64, 64, 64, 10], activation),
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    return C.Variant(f"{activation.__name__.lower()} hidden layers, SGD(lr=0.05, momentum=0.9)", module,
                     C.loaders(x, y, x_val, y_val, batch_size=32), epochs=3 if fast else 8, expected=EXPECTED[name])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Finding]]:
    return C.compare(EXAMPLE, __doc__, argv, build,
                     charts="Custom Scalars 'fraction of positive inputs per weight layer', "
                            "'activation mean per layer', 'training loss'")


if __name__ == "__main__":
    main()
