"""lightning-diag quickstart: the same small classifier trained twice, once with three classic mistakes.

    python examples/quickstart.py            # about 15-30 s on 2 CPU cores
    python examples/quickstart.py --fast     # 4 epochs instead of 15: about 10 s
    python examples/quickstart.py --logdir /tmp/logs --variant flawed

The data are scikit-learn's 8x8 handwritten digits (1797 images, shipped with the package: nothing is
downloaded). Both runs are a plain PyTorch Lightning MLP with ``Diagnostics()`` attached and nothing else:

* flawed: raw pixel values (0..16, never normalized), sigmoid hidden layers (always positive outputs, the
  zig-zag cause in LeCun et al., "Efficient BackProp", 1998) and ``torch.optim.Adam(weight_decay=...)``
  (an L2 term that Adam rescales, not the decoupled decay of AdamW: Loshchilov & Hutter, 2019);
* fixed: standardized inputs, tanh hidden layers, ``torch.optim.AdamW`` with the same decay.

The script prints what lightning-diag actually found in each run (read back from the runs' findings.jsonl),
checks it against the mistakes made on purpose, and prints the commands that show the same findings in
TensorBoard and in the terminal. It claims nothing it did not measure.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings
from typing import Dict, List, Tuple

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from diag import Finding, Severity
from diag.callbacks import Diagnostics
from diag.report import counts_line, load_run
from diag.sinks import findings_path

EXPERIMENT = "quickstart"
WEIGHT_DECAY = 1e-2
LEARNING_RATE = 1e-3

# What each variant gets wrong on purpose, and the finding code that names it (see diag/codes.py).
VARIANTS: Dict[str, Dict] = {
    "flawed": dict(normalize=False, activation=nn.Sigmoid, optimizer=torch.optim.Adam,
                   description="raw pixels 0..16, sigmoid hidden layers, Adam(weight_decay=1e-2)",
                   mistakes=[("inputs are not normalized (pixel values 0..16)", "inputs_not_normalized"),
                             ("sigmoid outputs are all positive: the next layer's inputs are not zero-centered",
                              "non_zero_centered_activation"),
                             ("Adam with weight_decay is L2, not decoupled weight decay", "adam_coupled_weight_decay")]),
    "fixed": dict(normalize=True, activation=nn.Tanh, optimizer=torch.optim.AdamW,
                  description="standardized inputs, tanh hidden layers, AdamW(weight_decay=1e-2)", mistakes=[]),
}


class DigitsMLP(pl.LightningModule):
    """64 -> 64 -> 64 -> 10, cross-entropy; logs train_loss, val_loss and val_acc."""

    def __init__(self, activation: type, optimizer: type) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), activation(), nn.Linear(64, 64), activation(), nn.Linear(64, 10))
        self.optimizer_class = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return self.optimizer_class(self.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def digits_loaders(normalize: bool, batch_size: int = 64, seed: int = 0) -> Tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    n_train = 1400
    if normalize:  # statistics of the training split only
        mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
        x = (x - mean) / std
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    train = DataLoader(TensorDataset(x_t[:n_train], y_t[:n_train]), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(x_t[n_train:], y_t[n_train:]), batch_size=512)
    return train, val


def train(variant: str, logdir: str, epochs: int) -> Tuple[str, float]:
    """Fit one variant with Diagnostics(); returns its log_dir and final validation accuracy."""
    spec = VARIANTS[variant]
    run_dir = os.path.join(logdir, EXPERIMENT, variant)
    if os.path.isdir(run_dir):  # this demo's own run folder: replace it, so TensorBoard shows one run per variant
        shutil.rmtree(run_dir)
    pl.seed_everything(0, workers=True)
    train_loader, val_loader = digits_loaders(spec["normalize"])
    model = DigitsMLP(spec["activation"], spec["optimizer"])
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir, name=EXPERIMENT, version=variant),
        callbacks=[Diagnostics()],  # <- the only line lightning-diag needs
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=5,
    )
    print(f"\n=== training '{variant}': {spec['description']} ({epochs} epochs)", flush=True)
    trainer.fit(model, train_loader, val_loader)
    return trainer.log_dir, float(trainer.callback_metrics.get("val_acc", float("nan")))


def show(variant: str, log_dir: str, accuracy: float) -> List[Finding]:
    """Print the run's findings as written to disk, and check them against the mistakes made on purpose."""
    findings = load_run(findings_path(log_dir)).findings  # what `diag report` reads: worst first
    spec = VARIANTS[variant]
    print(f"\n[{variant}] {spec['description']}")
    print(f"  validation accuracy {accuracy:.3f}; lightning-diag found {counts_line(findings)}")
    for f in findings:  # the full message and advice were printed during the fit; `diag report` shows them again
        where = f" [{f.layer}]" if f.layer else ""
        print(f"  - {f.severity.value.upper():7s} {f.code}{where} at step {f.step}")
    found = {f.code for f in findings if f.severity.rank >= Severity.WARNING.rank}
    for mistake, code in spec["mistakes"]:
        mark = "diagnosed" if code in found else "NOT diagnosed"
        print(f"  mistake made on purpose: {mistake} -> {code}: {mark}")
    if not spec["mistakes"]:
        alarms = sorted(found)
        print("  no mistakes made on purpose: " + ("no warning or error, as it should be." if not alarms
                                                   else f"warnings/errors raised anyway: {', '.join(alarms)}."))
    return findings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="4 epochs instead of 15 (about 10 s; for tests)")
    parser.add_argument("--logdir", default="lightning_logs",
                        help="where the runs are written (default: lightning_logs in the current directory)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 15, or 4 with --fast)")
    parser.add_argument("--variant", choices=["both", *VARIANTS], default="both", help="which run(s) to train")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be a positive integer, got {args.epochs}")
    epochs = args.epochs or (4 if args.fast else 15)

    torch.set_num_threads(1)  # a tiny MLP: one thread is fastest, and stays fast on a busy machine
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # keep Lightning's banner quiet; diag's lines stay

    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    runs = [(v, *train(v, args.logdir, epochs)) for v in variants]

    print("\n" + "=" * 100 + "\nWhat lightning-diag found (read back from each run's diag/findings.jsonl):")
    for variant, log_dir, accuracy in runs:
        show(variant, log_dir, accuracy)

    experiment_dir = os.path.join(args.logdir, EXPERIMENT)
    print("\nSee the same findings")
    print(f"  in TensorBoard (Text tab: the findings table; Custom Scalars: the diagnostics charts):\n"
          f"    tensorboard --logdir {experiment_dir} --samples_per_plugin=text=100")
    print(f"  in the terminal, with the full messages and advice:\n    diag report {experiment_dir}")
    print(f"  as a CI gate (exit 1 on any warning or error):\n    diag report {experiment_dir} --fail-on warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
