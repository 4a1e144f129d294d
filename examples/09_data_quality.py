"""09 - Look at the data first: normalization, label balance, leakage between training and validation.

Claim (study note): "The most important thing is to check how much data there is and how good it is."

Sources: Karpathy, "A Recipe for Training Neural Networks" (2019), step 1 "become one with the data"; LeCun et al.,
"Efficient BackProp" (1998), section 4.3 (normalize the inputs: zero mean, similar scale); Kaufman et al.,
"Leakage in Data Mining" (2012) (validation samples that are also in the training set inflate the score).

Both runs: a 64-64-10 tanh MLP with Adam on scikit-learn's digits, same seed.
* broken: three data faults at once: raw pixel values 0..16 (never standardized), a training set in which the
  digit 0 makes up about 90% of the labels, and a validation set half of which is copied from the training set;
* fixed:  standardized inputs, the natural (balanced) labels, a disjoint validation split.

lightning-diag's DataMonitor reads the first batches Lightning hands over (inputs' moments, label counts, hashes
of training and validation samples). In TensorBoard: the Text tab (diag/findings); "generalization gap" shows
the too-good validation loss of the leaky split.

    python examples/09_data_quality.py [--fast] [--logdir lightning_logs]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import _common as C
from diag import Finding

EXAMPLE = "09_data_quality"
EXPECTED = {"broken": ["inputs_not_normalized", "class_imbalance", "train_val_overlap"], "fixed": []}
# the TensorBoard scalar tags (prefixes) behind the charts the header points at
CHARTS = ["diag/generalization_gap"]
MAJORITY_SHARE = 0.9


def imbalanced(x: torch.Tensor, y: torch.Tensor):
    """Keep every 0 and only enough of the other digits that 0 makes up MAJORITY_SHARE of the labels (no repeats)."""
    zeros = (y == 0).nonzero().flatten()
    others = (y != 0).nonzero().flatten()
    keep = int(len(zeros) * (1 - MAJORITY_SHARE) / MAJORITY_SHARE)
    idx = torch.cat([zeros, others[:keep]])
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))]
    return x[idx], y[idx]


def build(name: str, fast: bool) -> C.Variant:
    broken = name == "broken"
    x, y, x_val, y_val = C.digits(standardize=not broken, n_train=1497)
    if broken:
        x, y = imbalanced(x, y)  # every 0 of the training split (~150) and ~17 other digits
        x_val = torch.cat([x_val[:150], x[:150]])  # half of the validation samples are training samples
        y_val = torch.cat([y_val[:150], y[:150]])
    else:
        x_val, y_val = x_val[:300], y_val[:300]
    module = C.Model(C.mlp([64, 64, 10], nn.Tanh), lambda p: torch.optim.Adam(p, lr=1e-3))
    description = ("raw 0..16 pixels, 90% of training labels are 0, half of validation copied from training"
                   if broken else "standardized pixels, balanced labels, disjoint validation")
    return C.Variant(description, module, C.loaders(x, y, x_val, y_val, batch_size=32), epochs=4 if fast else 10,
                     expected=EXPECTED[name])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Finding]]:
    return C.compare(EXAMPLE, __doc__, argv, build,
                     charts="Custom Scalars 'generalization gap (val - train)'")


if __name__ == "__main__":
    main()
