"""A zoo of healthy training runs, each with ``Diagnostics()``: prints every warning/error raised (false alarms).

Not collected by pytest (a script): the default suite holds the fast healthy twins; this wider sweep checks that
thresholds keep their margin on models, data and settings the tests do not use.

    python tests/benchmarks/healthy_zoo.py [--only NAME ...] [--epochs-scale 1.0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
warnings.filterwarnings("ignore")

import pytorch_lightning as pl  # noqa: E402

from diag.callbacks import Diagnostics, LearningRateProbe  # noqa: E402
from tests.helpers import Classifier, digits_loaders, loaders_from, mlp, spirals  # noqa: E402
from tests.test_healthy_suite import DigitsCNN, Regressor, TokenClassifier, regression_data, token_data  # noqa: E402


def _standardize(x):
    x = x.astype(np.float32)
    return torch.from_numpy((x - x.mean(0)) / (x.std(0) + 1e-6))


def sk_data(name, seed=0):
    from sklearn import datasets

    if name == "wine":
        x, y = datasets.load_wine(return_X_y=True)
    elif name == "breast_cancer":
        x, y = datasets.load_breast_cancer(return_X_y=True)
    elif name == "moons":
        x, y = datasets.make_moons(2000, noise=0.2, random_state=seed)
    elif name == "classification":
        x, y = datasets.make_classification(3000, n_features=20, n_informative=10, n_classes=4, random_state=seed)
    else:
        raise ValueError(name)
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(x))
    return _standardize(x[order]), torch.from_numpy(y[order].astype(np.int64))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=20, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class ResidualMLP(nn.Module):
    def __init__(self, width=64, depth=6):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                                     for _ in range(depth)])
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def zoo():
    d64 = lambda bs=64: digits_loaders(batch_size=bs)  # noqa: E731
    return {
        "digits_relu_adam_b16": lambda: (Classifier(mlp([64, 128, 10]), 1e-3), *d64(16), 4),
        "digits_relu_adam_b256": lambda: (Classifier(mlp([64, 128, 10]), 3e-3), *d64(256), 12),
        "digits_deep_relu_adamw": lambda: (Classifier(mlp([64, 128, 128, 128, 128, 10]), 1e-3, "adamw", weight_decay=1e-2), *d64(), 4),
        "digits_gelu_residual_layernorm": lambda: (Classifier(ResidualMLP(), 1e-3, "adamw"), *d64(), 4),
        "digits_sgd_plain_lr0.1": lambda: (Classifier(mlp([64, 64, 10]), 0.1, "sgd"), *d64(32), 5),
        "digits_sgd_nesterov_bn": lambda: (Classifier(mlp([64, 128, 10], norm=nn.BatchNorm1d), 0.05,
                                                      lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)), *d64(), 4),
        "digits_cnn_sgd_momentum": lambda: (Classifier(DigitsCNN(), 0.05, "sgd", momentum=0.9), *d64(), 3),
        "digits_tanh_rmsprop": lambda: (Classifier(mlp([64, 64, 10], nn.Tanh), 1e-3, lambda p: torch.optim.RMSprop(p, lr=1e-3)), *d64(), 4),
        "digits_dropout_long": lambda: (Classifier(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10)), 1e-3), *d64(), 10),
        "moons_mlp_adam": lambda: (Classifier(mlp([2, 32, 32, 2]), 1e-2), *loaders_from(*sk_data("moons")), 6),
        "spirals_wide_mlp": lambda: (Classifier(mlp([2, 128, 128, 2]), 3e-3), *loaders_from(*spirals(2000)), 10),
        "classification_4c_mlp": lambda: (Classifier(mlp([20, 64, 64, 4]), 1e-3), *loaders_from(*sk_data("classification")), 5),
        "wine_small_data": lambda: (Classifier(mlp([13, 32, 3]), 1e-2), *loaders_from(*sk_data("wine"), batch_size=16), 10),
        "breast_cancer_binary": lambda: (Classifier(mlp([30, 32, 2]), 1e-3), *loaders_from(*sk_data("breast_cancer"), batch_size=32), 8),
        "tokens_transformer": lambda: (Classifier(TinyTransformer(), 1e-3, "adamw", weight_decay=1e-2), *loaders_from(*token_data(2000)), 4),
        "tokens_gru_layernorm": lambda: (Classifier(TokenClassifier(), 3e-3, "adam"), *loaders_from(*token_data(2000), batch_size=32), 4),
        "regression_mse": lambda: (Regressor(), *loaders_from(*regression_data(3000)), 6),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bad_runs = probe_runs = 0
    for name, make in zoo().items():
        if args.only and name not in args.only:
            continue
        pl.seed_everything(0, verbose=False)
        module, train, val, epochs = make()
        diagnostics = Diagnostics(console=False)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = pl.Trainer(max_epochs=epochs, callbacks=[diagnostics], default_root_dir=tmp, logger=False,
                                 enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                 num_sanity_val_steps=0, accelerator="cpu")
            trainer.fit(module, train, val)
        alarms = [f for f in diagnostics.findings if f.severity.rank >= 1 or f.code == "diag_internal_error"]
        infos = sorted({f.code for f in diagnostics.findings if f.severity.rank == 0})
        bad_runs += bool(alarms)
        probe = diagnostics.monitor(LearningRateProbe)
        probes = len(probe.results) if probe is not None else 0  # each costs ~100 steps: a healthy run should need none
        probe_runs += probes
        status = "ALARM" if alarms else "ok"
        print(f"{status:5s} {name:34s} {time.perf_counter() - started:5.1f}s steps={trainer.global_step} "
              f"probes={probes} info={infos}", flush=True)
        for f in alarms:
            print(f"      {f.severity.value} {f.code} [{f.layer}] {f.message} | {f.evidence}", flush=True)
    print(f"{bad_runs} run(s) with a warning/error; the learning-rate probe ran {probe_runs} time(s)")
    return bad_runs


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
