"""05 - Gradient noise: a tiny batch with plain SGD spends its steps on noise; a reasonable batch does not.

Claim (study note): "SGD problem 1: it updates without seeing every gradient (batch processing), so gradient
noise accumulates and training may not go well" and "momentum: thanks to the velocity, the noise mixed into the
gradient estimate is averaged out."

Source: McCandlish, Kaplan, Amodei & the OpenAI Dota team, "An Empirical Model of Large-Batch Training" (2018):
the gradient noise scale B_simple = tr(Sigma) / |G|^2 estimates the critical batch size; far below it, each step
is mostly noise.

Both runs: scikit-learn's digits (standardized), a 64-64-32-10 ReLU MLP, plain SGD with learning rate 0.2, same
seed.
* broken: batch size 2: the loss swings around its starting value and accuracy stays near chance;
* fixed:  batch size 64 (each step averages 32x more samples), trained for 10x the epochs and still fewer steps
  (100 vs 320 with --fast, 440 vs 1400 without): it reaches over 95% validation accuracy.

In TensorBoard (Custom Scalars): "gradient noise scale vs batch size" (the noise scale many times the batch size),
"training loss"; the Text tab (diag/findings).

    python examples/05_gradient_noise.py [--fast] [--logdir lightning_logs]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import _common as C
from diag import Finding

EXAMPLE = "05_gradient_noise"
EXPECTED = {"broken": ["high_gradient_noise"], "fixed": []}
# the TensorBoard scalar tags (prefixes) behind the charts the header points at
CHARTS = ["diag/grad_noise_scale", "diag/batch_size"]


def build(name: str, fast: bool) -> C.Variant:
    x, y, x_val, y_val = C.digits(standardize=True, n_train=640 if fast else 1400)
    batch = 2 if name == "broken" else 64
    lr = 0.2
    module = C.Model(C.mlp([64, 64, 32, 10], nn.ReLU), optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    if name == "broken":
        epochs = 1 if fast else 2
    else:
        epochs = 10 if fast else 20
    return C.Variant(f"batch size {batch}, plain SGD(lr={lr})", module,
                     C.loaders(x, y, x_val, y_val, batch_size=batch), epochs=epochs, expected=EXPECTED[name])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Finding]]:
    return C.compare(EXAMPLE, __doc__, argv, build,
                     charts="Custom Scalars 'gradient noise scale vs batch size', 'training loss'")


if __name__ == "__main__":
    main()
