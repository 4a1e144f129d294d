"""The healthy suite: whole ``Diagnostics()`` on healthy runs of different shapes must raise no warning or error.

A warning on a healthy run is as serious a bug as a missed fault (SPEC). Each run is small and real.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl

from diag.callbacks import Diagnostics
from tests.helpers import Classifier, assert_silent, digits_loaders, digits_tensors, fit, loaders_from, mlp


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


class TokenClassifier(nn.Module):
    """Embedding -> LayerNorm -> GRU -> Linear, on token sequences."""

    def __init__(self, vocab=20, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        out, _ = self.rnn(self.norm(self.embed(tokens)))
        return self.head(out[:, -1])


def token_data(n=1200, length=12, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    labels = ((tokens < vocab // 2).sum(1) > length // 2).long()
    return tokens, labels


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = mlp([8, 64, 64, 1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def regression_data(n=1500, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, generator=g)
    return x, y


def _relu_mlp_adam():
    train, val = digits_loaders(batch_size=64)
    return Classifier(mlp([64, 128, 64, 10]), lr=1e-3, optimizer="adam"), train, val, dict(max_epochs=4)


def _cnn_batchnorm():
    train, val = digits_loaders(batch_size=64)
    return Classifier(DigitsCNN(), lr=3e-3, optimizer="adam"), train, val, dict(max_epochs=3)


def _sequence_layernorm():
    train, val = loaders_from(*token_data(), batch_size=64)
    return Classifier(TokenClassifier(), lr=3e-3, optimizer="adamw", weight_decay=1e-2), train, val, dict(max_epochs=4)


def _sgd_momentum_tanh():
    train, val = digits_loaders(batch_size=32)
    return Classifier(mlp([64, 64, 10], activation=nn.Tanh), lr=0.05, optimizer="sgd", momentum=0.9), train, val, dict(max_epochs=3)


def _short_run_still_improving():
    train, val = digits_loaders(batch_size=32)
    return Classifier(mlp([64, 32, 10]), lr=3e-4, optimizer="adam"), train, val, dict(max_epochs=1, limit_train_batches=20)


def _regression_mse():
    train, val = loaders_from(*regression_data(), batch_size=64)
    return Regressor(), train, val, dict(max_epochs=4)


def _dropout_no_validation():
    train, _ = digits_loaders(batch_size=64)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))
    return Classifier(net, lr=1e-3, optimizer="adam"), train, None, dict(max_epochs=3)


HEALTHY = {
    "relu_mlp_adam": _relu_mlp_adam,
    "cnn_batchnorm": _cnn_batchnorm,
    "sequence_layernorm_gru": _sequence_layernorm,
    "sgd_momentum_tanh": _sgd_momentum_tanh,
    "short_run_still_improving": _short_run_still_improving,
    "regression_mse": _regression_mse,
    "dropout_no_validation": _dropout_no_validation,
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_run_raises_no_warning(tmp_path, name):
    module, train, val, kwargs = HEALTHY[name]()
    diagnostics = Diagnostics()
    fit(tmp_path, module, train, val, callbacks=[diagnostics], **kwargs)
    assert not [f for f in diagnostics.findings if f.code == "diag_internal_error"], diagnostics.findings
    assert_silent(diagnostics.findings)
