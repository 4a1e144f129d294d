"""Shared helpers for the numbered examples: data that ships with scikit-learn (or is synthesized), one small
LightningModule, ``run_variant`` (fit with ``Diagnostics()`` attached, return what it found) and printing.

Nothing here is needed to use lightning-diag: each example's model and data are ordinary PyTorch Lightning,
and the only lightning-diag line is ``callbacks=[Diagnostics()]`` in :func:`run_variant`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from diag import Finding, Severity
from diag.callbacks import Diagnostics
from diag.report import counts_line

DEFAULT_LOGDIR = "lightning_logs"

Loaders = Tuple[DataLoader, Optional[DataLoader]]


# ---- command line and quiet output ------------------------------------------------------------------------
def parse_args(doc: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags every example takes: ``--fast`` (smaller and shorter; what the tests run) and ``--logdir``."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a smaller, shorter run (what the tests use)")
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR,
                        help=f"root folder of the runs: <logdir>/<example>/<variant> (default: {DEFAULT_LOGDIR})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default: 0)")
    args = parser.parse_args(argv)
    quiet()
    return args


def quiet() -> None:
    """One thread (tiny models: fastest, and steady on a busy machine) and no Lightning banners."""
    torch.set_num_threads(1)
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*",
                    ".*The number of training batches.*", ".*treespec, LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---- data ---------------------------------------------------------------------------------------------------
def loaders(x: torch.Tensor, y: torch.Tensor, x_val: Optional[torch.Tensor] = None,
            y_val: Optional[torch.Tensor] = None, batch_size: int = 64, seed: int = 0) -> Loaders:
    """A shuffled training loader (seeded) and an optional validation loader."""
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = None
    if x_val is not None:
        val = DataLoader(TensorDataset(x_val, y_val), batch_size=512)
    return train, val


def digits(standardize: bool = True, n_train: int = 1400, seed: int = 0):
    """scikit-learn's 8x8 digits, shuffled and split: ``(x_train, y_train, x_val, y_val)``.

    Standardization uses the training split's statistics only.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    if standardize:
        mean, std = x[:n_train].mean(0), x[:n_train].std(0)
        x = (x - mean) / np.where(std > 1e-3, std, 1.0)  # pixels constant in the training split stay unscaled
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    return x_t[:n_train], y_t[:n_train], x_t[n_train:], y_t[n_train:]


def spirals(n: int = 1200, classes: int = 2, noise: float = 0.15, turns: float = 1.5, seed: int = 0):
    """Interleaved 2-D spirals (not linearly separable), standardized: ``(x, y)`` as float32/long tensors."""
    rng = np.random.RandomState(seed)
    per = n // classes
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.15, 1.0, per)
        t = c * 2 * math.pi / classes + turns * 2 * math.pi * r + rng.randn(per) * noise
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], 1))
        ys.append(np.full(per, c))
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int64)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    x = (x - x.mean(0)) / x.std(0)
    return torch.from_numpy(x), torch.from_numpy(y)


def split(x: torch.Tensor, y: torch.Tensor, val_fraction: float = 0.25):
    """``(x_train, y_train, x_val, y_val)``: the last ``val_fraction`` of the samples for validation."""
    n_val = int(round(len(x) * val_fraction))
    return x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]


# ---- model --------------------------------------------------------------------------------------------------
def mlp(sizes: Sequence[int], activation: Callable[[], nn.Module] = nn.Tanh,
        norm: Optional[Callable[[int], nn.Module]] = None) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` (and ``norm`` before it, when given) between them."""
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if norm is not None:
                layers.append(norm(b))
            layers.append(activation())
    return nn.Sequential(*layers)


class Model(pl.LightningModule):
    """Any ``net`` with a loss and an optimizer: logs ``train_loss``, ``val_loss`` and (classification) ``val_acc``.

    Args:
        net: the network.
        optimizer: ``params -> torch.optim.Optimizer``.
        loss_fn: ``(output, target) -> loss``; cross-entropy by default.
    """

    def __init__(self, net: nn.Module, optimizer: Callable[[Any], torch.optim.Optimizer],
                 loss_fn: Optional[Callable] = None) -> None:
        super().__init__()
        self.net = net
        self.make_optimizer = optimizer
        self.loss_fn = loss_fn or nn.functional.cross_entropy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", self.loss_fn(out, y))
        if out.dim() == 2 and y.dtype == torch.long:
            self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


# ---- running and printing -----------------------------------------------------------------------------------
def run_variant(example: str, name: str, module: pl.LightningModule, data: Loaders, epochs: int, logdir: str,
                description: str = "", callbacks: Iterable[Any] = (), diagnostics: Optional[Diagnostics] = None,
                seed: int = 0, **trainer_kwargs: Any) -> Tuple[List[Finding], Dict[str, float]]:
    """Fit ``module`` with ``Diagnostics()`` attached; returns its findings and the final logged metrics.

    The run is written to ``<logdir>/<example>/<name>`` (TensorBoard events and ``diag/findings.jsonl``); an
    earlier run in that exact folder is replaced, so TensorBoard shows one run per variant.
    """
    run_dir = os.path.join(logdir, example, name)
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    diagnostics = diagnostics or Diagnostics()
    pl.seed_everything(seed, workers=True)
    settings = dict(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=5,
                    num_sanity_val_steps=0)
    settings.update(trainer_kwargs)
    trainer = pl.Trainer(logger=TensorBoardLogger(logdir, name=example, version=name),
                         callbacks=[diagnostics, *callbacks],  # <- Diagnostics() is all lightning-diag needs
                         **settings)
    print(f"\n=== {example} / {name}: {description} ({epochs} epochs)", flush=True)
    start = time.perf_counter()
    train, val = data
    trainer.fit(module, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    metrics["seconds"] = time.perf_counter() - start
    metrics["global_step"] = float(trainer.global_step)
    metrics["epochs_run"] = float(trainer.current_epoch)
    return list(diagnostics.findings), metrics


def alarms(findings: Iterable[Finding]) -> List[str]:
    """Codes of the warnings and errors, sorted."""
    return sorted({f.code for f in findings if f.severity.rank >= Severity.WARNING.rank})


DEFAULT_METRICS = ("train_loss_epoch", "val_loss", "val_acc")


def show(name: str, description: str, findings: Sequence[Finding], metrics: Dict[str, float],
         expected: Sequence[str] = (), metric_names: Sequence[str] = DEFAULT_METRICS) -> None:
    """Print what the run measured and what lightning-diag found, and compare with the fault made on purpose."""
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in metric_names if k in metrics)
    print(f"\n[{name}] {description}")
    print(f"  {shown}{'; ' if shown else ''}{metrics['seconds']:.1f} s; "
          f"lightning-diag found {counts_line(list(findings))}")
    for f in sorted(findings, key=lambda f: (-f.severity.rank, f.step)):
        where = f" [{f.layer}]" if f.layer else ""
        print(f"  - {f.severity.value.upper():7s} {f.code}{where} at step {f.step}: {f.message}")
        if f.severity.rank >= Severity.WARNING.rank and f.advice:
            print(f"      advice: {f.advice}")
    found = set(alarms(findings))
    if expected:
        for code in expected:
            print(f"  fault made on purpose -> {code}: {'diagnosed' if code in found else 'NOT diagnosed'}")
    else:
        print("  no fault made on purpose: " + ("no warning or error, as it should be." if not found
                                               else f"warnings/errors raised anyway: {', '.join(sorted(found))}."))


def footer(example: str, logdir: str, charts: str) -> None:
    """Where to see the same findings."""
    experiment_dir = os.path.join(logdir, example)
    print(f"\nIn TensorBoard: tensorboard --logdir {experiment_dir} --samples_per_plugin=text=100")
    print(f"  look at: {charts}; the Text tab (diag/findings) lists every finding with its advice.")
    print(f"In the terminal: diag report {experiment_dir}")


# ---- one example: every variant, then what was found ----------------------------------------------------------
class Variant:
    """One run of an example: what it does, the module, the data and how long it trains.

    ``expected`` lists the finding codes the fault made on purpose should produce (empty for a healthy run).
    """

    def __init__(self, description: str, module: pl.LightningModule, data: Loaders, epochs: int,
                 expected: Sequence[str] = (), callbacks: Sequence[Any] = (),
                 metric_names: Sequence[str] = DEFAULT_METRICS, diagnostics_kwargs: Optional[Dict[str, Any]] = None,
                 **trainer_kwargs: Any) -> None:
        self.description, self.module, self.data, self.epochs = description, module, data, epochs
        self.diagnostics_kwargs = dict(diagnostics_kwargs or {})  # Diagnostics(...) arguments beyond the defaults
        self.expected, self.callbacks, self.trainer_kwargs = list(expected), list(callbacks), trainer_kwargs
        self.metric_names = metric_names


def compare(example: str, doc: str, argv: Optional[Sequence[str]], build: Callable[[str, bool], Variant],
            names: Sequence[str] = ("broken", "fixed"), charts: str = "") -> Dict[str, List[Finding]]:
    """Parse the flags, build and fit each variant with ``Diagnostics()``, print what was found.

    Returns ``{variant name: its findings}``.
    """
    args = parse_args(doc, argv)
    results: Dict[str, List[Finding]] = {}
    runs = []
    for name in names:
        pl.seed_everything(args.seed, workers=True)  # the same initial weights whatever ran before
        variant = build(name, args.fast)
        findings, metrics = run_variant(example, name, variant.module, variant.data, variant.epochs, args.logdir,
                                        variant.description, callbacks=variant.callbacks, seed=args.seed,
                                        # console=False: the printout below lists every finding instead
                                        diagnostics=Diagnostics(console=False, **variant.diagnostics_kwargs),
                                        **variant.trainer_kwargs)
        results[name] = findings
        runs.append((name, variant, findings, metrics))
    print("\n" + "=" * 100 + f"\n{example}: what lightning-diag found in each run")
    for name, variant, findings, metrics in runs:
        show(name, variant.description, findings, metrics, variant.expected, variant.metric_names)
    footer(example, args.logdir, charts)
    return results
