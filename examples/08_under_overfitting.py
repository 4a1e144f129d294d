"""08 - Underfitting: add capacity. Overfitting: stop at the best epoch.

Claims (study note): "When underfitting: you can approach it by raising the network's complexity" and "check the
eval accuracy and Early Stopping at the moment it suddenly got good is also a good idea."

Sources: Karpathy, "A Recipe for Training Neural Networks" (2019) (first get a model large enough to overfit, then
regularize); Prechelt, "Early Stopping -- But When?" (1998) (the generalization loss GL: how far the validation
loss is above its best).

Four runs, same seed:
* underfit:  a far too small 2-2-2 tanh MLP (12 parameters) on two interleaved spirals: it cannot bend its boundary
  around them, the training loss stalls near chance and validation is the same -> underfitting;
* capacity:  a 2-64-64-2 ReLU MLP on the same spirals: it fits them;
* overfit:   a wide 64-256-256-10 MLP on only 40 digits with Adam, trained far past its best epoch: validation loss
  rises while the training loss keeps falling -> overfitting (and early_stop_suggested);
* early_stop: the same model and data with EarlyStopping(val_loss, patience=3) and ModelCheckpoint(save_top_k=1):
  training stops near the best epoch and the best weights are kept.
In the returned dict "broken" / "fixed" are the underfitting pair; "overfit" / "early_stop" the overfitting pair.

In TensorBoard (Custom Scalars): "generalization gap (val - train)" with the train and val losses, "best
validation epoch"; the Text tab (diag/findings).

    python examples/08_under_overfitting.py [--fast] [--logdir lightning_logs]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import pytorch_lightning as pl

import _common as C
from diag import Finding

EXAMPLE = "08_under_overfitting"
EXPECTED = {"broken": ["underfitting"], "fixed": [], "overfit": ["overfitting"], "early_stop": []}
# the TensorBoard scalar tags (prefixes) behind the charts the header points at
CHARTS = ["diag/generalization_gap", "diag/best_val_epoch"]
NAMES = ("broken", "fixed", "overfit", "early_stop")
LABELS = {"broken": "underfit", "fixed": "capacity", "overfit": "overfit", "early_stop": "early_stop"}
FEW_DIGITS = 40


def build(name: str, fast: bool) -> C.Variant:
    if name in ("broken", "fixed"):
        x, y = C.spirals(n=1000 if fast else 2000)
        # (a plain linear model underfits too, but lightning-diag's probe currently calls it suspected_code_bug: a
        # linear model cannot fit even one small batch of spirals, which the probe takes for a bug)
        net = C.mlp([2, 2, 2], nn.Tanh) if name == "broken" else C.mlp([2, 64, 64, 2], nn.ReLU)
        what = "2-2-2 tanh MLP" if name == "broken" else "2-64-64-2 ReLU MLP"
        module = C.Model(net, lambda p: torch.optim.Adam(p, lr=1e-2))
        return C.Variant(f"{LABELS[name]}: {what} on two spirals, Adam(1e-2)", module,
                         C.loaders(*C.split(x, y), batch_size=64), epochs=15 if fast else 20, expected=EXPECTED[name])
    x, y, x_val, y_val = C.digits(standardize=True, n_train=FEW_DIGITS)
    x_val, y_val = x_val[:400], y_val[:400]
    callbacks = []
    if name == "early_stop":
        callbacks = [pl.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=3),
                     pl.callbacks.ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1)]
    module = C.Model(C.mlp([64, 256, 256, 10], nn.ReLU), lambda p: torch.optim.Adam(p, lr=1e-2))
    what = " + EarlyStopping(patience=3) + ModelCheckpoint(best)" if name == "early_stop" else ""
    return C.Variant(f"{LABELS[name]}: 64-256-256-10 MLP on {FEW_DIGITS} digits, Adam(1e-2){what}", module,
                     C.loaders(x, y, x_val, y_val, batch_size=8), epochs=14 if fast else 30, expected=EXPECTED[name],
                     callbacks=callbacks, enable_checkpointing=name == "early_stop")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Finding]]:
    return C.compare(EXAMPLE, __doc__, argv, build, names=NAMES,
                     charts="Custom Scalars 'generalization gap (val - train)', 'best validation epoch'")


if __name__ == "__main__":
    main()
