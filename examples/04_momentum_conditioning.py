"""04 - Momentum on an ill-conditioned problem: plain SGD zig-zags, SGD with momentum goes straight.

Claim (study note): "Poor conditioning: the gradient is very sensitive, so a zigzagging behavior appears and
training becomes very slow" and "SGD + Momentum: the velocity accelerates the step and reduces the zigzagging
caused by the gradient direction changing all the time."

Sources: Sutskever, Martens, Dahl & Hinton, "On the importance of initialization and momentum in deep learning"
(ICML 2013); Goodfellow, Bengio & Courville, "Deep Learning" (2016), section 8.3.2.

Both runs: least-squares linear regression on synthetic data whose two features are standardized but strongly
correlated (condition number of the Hessian about 400), same seed.
* broken: plain SGD at a learning rate just under the stability limit of the steep direction: the updates flip
  sign from step to step and the flat direction crawls;
* fixed:  SGD with momentum 0.9 at half that learning rate: along the steep direction the velocity damps the
  flip-flopping, along the flat one it adds up (effective step lr / (1 - momentum)), so the loss falls several
  times lower in the same number of steps.

In TensorBoard (Custom Scalars): "update direction cosine (zig-zag < 0)" (about -1 vs positive), "training loss";
the Text tab (diag/findings).

    python examples/04_momentum_conditioning.py [--fast] [--logdir lightning_logs]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import _common as C
from diag import Finding

EXAMPLE = "04_momentum_conditioning"
EXPECTED = {"broken": ["zigzag_updates"], "fixed": []}
# the TensorBoard scalar tags (prefixes) behind the charts the header points at
CHARTS = ["diag/update_cosine"]
CORRELATION = 0.995  # Hessian eigenvalues 1 +- 0.995: condition number ~400


def regression_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    x = torch.stack([z[:, 0], CORRELATION * z[:, 0] + (1 - CORRELATION ** 2) ** 0.5 * z[:, 1]], 1)
    w_true = torch.tensor([[2.0], [-3.0]])
    y = x @ w_true + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def build(name: str, fast: bool) -> C.Variant:
    x, y = regression_data(2048 if fast else 4096)
    # stability limit of plain gradient descent: lr < 2 / lambda_max, lambda_max = 2 * (1 + CORRELATION) for the MSE
    limit = 2.0 / (2.0 * (1 + CORRELATION))
    if name == "broken":
        lr, momentum = 0.98 * limit, 0.0
    else:
        lr, momentum = 0.5 * limit, 0.9  # heavy-ball is stable up to lr < 2 (1 + momentum) / lambda_max
    module = C.Model(nn.Linear(2, 1), optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum),
                     loss_fn=nn.functional.mse_loss)
    return C.Variant(f"linear regression, correlated features, SGD(lr={lr:.3g}, momentum={momentum})", module,
                     C.loaders(*C.split(x, y), batch_size=64), epochs=4 if fast else 10, expected=EXPECTED[name],
                     metric_names=("train_loss_epoch", "val_loss"))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Finding]]:
    return C.compare(EXAMPLE, __doc__, argv, build,
                     charts="Custom Scalars 'update direction cosine (zig-zag < 0)', 'training loss'")


if __name__ == "__main__":
    main()
