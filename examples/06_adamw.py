"""06 - Adam with weight_decay is L2 regularization, not weight decay: use AdamW.

Claim (study note): "AdamW: the method that adds Weight Decay to Adam."

Source: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019): in Adam an L2 term is divided by
the running gradient scale, so weights with large gradients are barely regularized; decoupling the decay from the
gradient update (AdamW) restores weight decay and generalizes better.

Both runs: scikit-learn's digits (standardized), a 64-128-128-10 ReLU MLP, learning rate 1e-3, decay 1e-2, same seed.
* broken: torch.optim.Adam(weight_decay=1e-2) (coupled: an L2 term in the gradient);
* fixed:  torch.optim.AdamW(weight_decay=1e-2) (decoupled).

lightning-diag's SetupCheck reads the optimizer when training starts. In TensorBoard: the Text tab
(diag/findings); "update-to-weight ratio (log10)" shows how the two decays act on the weights.

    python examples/06_adamw.py [--fast] [--logdir lightning_logs]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import _common as C
from diag import Finding

EXAMPLE = "06_adamw"
EXPECTED = {"broken": ["adam_coupled_weight_decay"], "fixed": []}
# the TensorBoard scalar tags (prefixes) behind the charts the header points at
CHARTS = ["diag/update_to_weight_ratio"]
WEIGHT_DECAY = 1e-2


def build(name: str, fast: bool) -> C.Variant:
    x, y, x_val, y_val = C.digits(standardize=True, n_train=800 if fast else 1400)
    optimizer = torch.optim.Adam if name == "broken" else torch.optim.AdamW
    module = C.Model(C.mlp([64, 128, 128, 10], nn.ReLU),
                     optimizer=lambda p: optimizer(p, lr=1e-3, weight_decay=WEIGHT_DECAY))
    return C.Variant(f"{optimizer.__name__}(lr=1e-3, weight_decay={WEIGHT_DECAY})", module,
                     C.loaders(x, y, x_val, y_val, batch_size=64), epochs=2 if fast else 10, expected=EXPECTED[name])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Finding]]:
    return C.compare(EXAMPLE, __doc__, argv, build,
                     charts="Custom Scalars 'update-to-weight ratio (log10)', 'training loss'")


if __name__ == "__main__":
    main()
