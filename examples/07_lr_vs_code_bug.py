"""07 - Is it the learning rate or a bug in the code? Change the learning rate a lot and see.

Claim (study note): "You have to change the learning rate by a lot to know whether it is a learning-rate problem
or a code problem."

Source: Karpathy, "A Recipe for Training Neural Networks" (2019): overfit one batch first; a model that cannot
drive the loss of a single small batch to zero at any learning rate has a bug (labels not matching inputs,
softmax fed to the loss, ...), while a too-high rate is fixed by a smaller one.

lightning-diag's LearningRateProbe, asked by the other monitors when the loss misbehaves, trains a copy of the
model on one fixed small batch at the current learning rate times 0.01 ... 10 (the real run is restored bitwise)
and compares the loss with the real inputs against zeroed inputs.

Three runs on scikit-learn's digits (standardized), a 64-64-10 ReLU MLP, same seed:
* broken:   plain SGD at lr=3.0, ten times too high: the loss diverges -> lr_too_high, with the suggested rate;
* code_bug: Adam(lr=1e-3), a fine optimizer, but the labels were shuffled apart from their images (a data-loading
  bug): no learning rate fits the batch in a way that carries over, which a learnable task still on its initial
  plateau (XOR, parity) shows for a while too, so the probe's info waits for the validation loss: the model memorizes
  its training digits while the validation loss stays put -> suspected_code_bug (about step 275);
* fixed:    plain SGD at lr=0.3 with the correct labels: nothing to report.

In TensorBoard (Custom Scalars): "learning-rate probe: loss fraction after probe per LR factor" (the probe's
verdict curve), "training loss"; the Text tab (diag/findings) for the verdicts and the suggested learning rate.

    python examples/07_lr_vs_code_bug.py [--fast] [--logdir lightning_logs]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import _common as C
from diag import Finding
from diag.callbacks import LearningRateProbe

EXAMPLE = "07_lr_vs_code_bug"
EXPECTED = {"broken": ["lr_too_high"], "code_bug": ["suspected_code_bug"], "fixed": []}
# the TensorBoard scalar tags (prefixes) behind the charts the header points at
CHARTS = ["diag/probe/"]
GOOD_LR = 0.3


def build(name: str, fast: bool) -> C.Variant:
    # 800 training digits in both modes: with 1400 the probe currently answers lr_ok on the shuffled labels
    x, y, x_val, y_val = C.digits(standardize=True, n_train=800)
    net = C.mlp([64, 64, 10], nn.ReLU)
    if name == "code_bug":
        y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]  # labels no longer match images
        module = C.Model(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
        description, epochs = "Adam(lr=1e-3), training labels shuffled apart from their images", 14 if fast else 16
    else:
        lr = 10 * GOOD_LR if name == "broken" else GOOD_LR
        module = C.Model(net, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
        description, epochs = f"SGD(lr={lr:g}){', 10x too high' if name == 'broken' else ''}", 3 if fast else 6
    # A probe sweep costs about 100 training steps of this model; the default budget (10% of the fit's time, sized for
    # real fits of minutes) would skip it in these 2-second demo fits and say so (probe_skipped). Lift it here.
    return C.Variant(description, module, C.loaders(x, y, x_val, y_val, batch_size=32), epochs=epochs,
                     expected=EXPECTED[name], diagnostics_kwargs={"lr_probe": LearningRateProbe(budget_fraction=None)})


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Finding]]:
    return C.compare(EXAMPLE, __doc__, argv, build, names=("broken", "code_bug", "fixed"),
                     charts="Custom Scalars 'learning-rate probe: loss fraction after probe per LR factor', "
                            "'training loss'")


if __name__ == "__main__":
    main()
