"""Small real models and data for tests: every test trains with a real Trainer on CPU in seconds.

Data ships with scikit-learn (the 8x8 digits) or is synthesized: nothing is downloaded.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L
import pytorch_lightning as pl

from diag import Finding, Severity


# ---- data ---------------------------------------------------------------------------------------------
def digits_tensors(standardize: bool = True, n: Optional[int] = None, seed: int = 0):
    """The 8x8 digits (1797 samples, 64 features, 10 classes) as float32/long tensors, shuffled with ``seed``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    if standardize:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    if n is not None:
        x, y = x[:n], y[:n]
    return torch.from_numpy(x), torch.from_numpy(y)


def digits_loaders(batch_size: int = 64, standardize: bool = True, n_train: int = 1400, seed: int = 0,
                   shuffle: bool = True):
    """Train and validation loaders over the digits (disjoint splits)."""
    x, y = digits_tensors(standardize=standardize, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=shuffle, generator=g)
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=256)
    return train, val


def spirals(n: int = 1000, classes: int = 2, noise: float = 0.2, seed: int = 0):
    rng = np.random.RandomState(seed)
    xs, ys = [], []
    per = n // classes
    for c in range(classes):
        r = np.linspace(0.1, 1.0, per)
        t = np.linspace(c * 2 * math.pi / classes, c * 2 * math.pi / classes + 3 * math.pi, per) + rng.randn(per) * noise
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], 1))
        ys.append(np.full(per, c))
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int64)
    order = rng.permutation(len(x))
    return torch.from_numpy(x[order]), torch.from_numpy(y[order])


def loaders_from(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0):
    n_val = int(len(x) * val_fraction)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x[n_val:], y[n_val:]), batch_size=batch_size, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(x[:n_val], y[:n_val]), batch_size=256) if n_val else None
    return train, val


# ---- models -------------------------------------------------------------------------------------------
def mlp(sizes: Sequence[int], activation: Callable[[], nn.Module] = nn.ReLU, norm: Optional[Callable[[int], nn.Module]] = None) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if norm is not None:
                layers.append(norm(b))
            layers.append(activation())
    return nn.Sequential(*layers)


class ClassifierMixin:
    """A LightningModule around any ``net``: cross-entropy by default, logs ``train_loss`` and ``val_loss``.

    ``optimizer`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or a callable ``params -> Optimizer``.
    ``Classifier`` is the ``pytorch_lightning`` one, ``LClassifier`` the ``lightning.pytorch`` one.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, optimizer: Any = "adam", momentum: float = 0.0,
                 weight_decay: float = 0.0, loss_fn: Optional[Callable] = None) -> None:
        super().__init__()
        self.net = net
        self.lr, self.optimizer_name, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self.loss_fn = loss_fn or nn.functional.cross_entropy

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        loss = self.loss_fn(out, y)
        self.log("val_loss", loss, prog_bar=False)
        if out.dim() == 2 and y.dtype == torch.long:
            self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if callable(self.optimizer_name):
            return self.optimizer_name(self.parameters())
        name = self.optimizer_name.lower()
        if name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(name)


class Classifier(ClassifierMixin, pl.LightningModule):
    pass


class LClassifier(ClassifierMixin, L.LightningModule):
    pass


def classifier_for(namespace):
    return LClassifier if namespace is L else Classifier


# ---- running ------------------------------------------------------------------------------------------
def trainer(tmp_path, callbacks: Iterable[Any] = (), max_epochs: int = 3, namespace=pl, **kwargs) -> Any:
    defaults = dict(default_root_dir=str(tmp_path), max_epochs=max_epochs, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                    log_every_n_steps=1, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return namespace.Trainer(callbacks=list(callbacks), **defaults)


def fit(tmp_path, module, train, val=None, callbacks: Iterable[Any] = (), seed: int = 0, **kwargs):
    """Seed, build a Trainer and fit; returns the trainer."""
    pl.seed_everything(seed, workers=True)
    t = trainer(tmp_path, callbacks, **kwargs)
    t.fit(module, train, val)
    return t


def codes(findings: Iterable[Finding], min_severity: str = "warning") -> set:
    """Codes of the findings at ``min_severity`` or worse."""
    rank = Severity(min_severity).rank
    return {f.code for f in findings if f.severity.rank >= rank}


def assert_silent(findings: Iterable[Finding], allowed: Iterable[str] = ()) -> None:
    """A healthy run: no warning or error (besides ``allowed``)."""
    bad = [f for f in findings if f.severity.rank >= Severity.WARNING.rank and f.code not in set(allowed)]
    assert not bad, "healthy run raised: " + "; ".join(f"{f.severity.value} {f.code} [{f.layer}] {f.message}" for f in bad)


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def count_calls(monitor: Any, hook: str) -> List[int]:
    """Count the calls of ``monitor.<hook>``: the returned list grows by one per call. The counting wrapper is bound to
    the monitor, so Diagnostics routes (retires, puts to sleep, wakes) it like the original hook."""
    calls: List[int] = []
    original = getattr(monitor, hook).__func__

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    setattr(monitor, hook, counting.__get__(monitor))
    return calls
