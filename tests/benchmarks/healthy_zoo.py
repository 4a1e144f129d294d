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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
warnings.filterwarnings("ignore")

import pytorch_lightning as pl  # noqa: E402

from diag.callbacks import Diagnostics, LearningRateProbe  # noqa: E402
from tests.helpers import Classifier, digits_loaders, digits_tensors, loaders_from, mlp, spirals  # noqa: E402
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


# ---- settings and shapes the tests do not use (learning-rate schedules, a frozen layer, autoencoders, a mapping
# returned by training_step, a weight-shared block, GroupNorm, one logit under BCE, label smoothing, EmbeddingBag, a
# bidirectional GRU tagger, clipping, accumulation, bf16, frequent validation)
class Scheduled(Classifier):
    """AdamW under a per-step schedule: ``onecycle`` (OneCycleLR) or ``cosine`` (50 linear warm-up steps, then cosine)."""

    def __init__(self, net, lr, kind, steps):
        super().__init__(net, lr, "adamw")
        self.kind, self.steps = kind, steps

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)
        if self.kind == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.steps + 5)
        else:
            warm = torch.optim.lr_scheduler.LinearLR(opt, 0.01, 1.0, total_iters=50)
            sched = torch.optim.lr_scheduler.SequentialLR(
                opt, [warm, torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)], [50])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FrozenFirstLayer(Classifier):
    """Fine-tuning: the first ("pretrained") layer frozen and left out of the optimizer."""

    def __init__(self):
        net = mlp([64, 128, 64, 10])
        for p in net[0].parameters():
            p.requires_grad_(False)
        super().__init__(net, 1e-3)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class AutoEncoder(pl.LightningModule):
    """Reconstruction of the digits scaled to [0, 1] under MSE, sigmoid output (``conv``: strided convolutions and
    transposed convolutions)."""

    def __init__(self, conv=False):
        super().__init__()
        self.conv = conv
        if conv:
            self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
            self.dec = nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(8, 1, 4, 2, 1),
                                     nn.Sigmoid())
        else:
            self.enc = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
            self.dec = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64), nn.Sigmoid())

    def forward(self, x):
        return self.dec(self.enc(x))

    def _x(self, batch):
        return batch[0].view(-1, 1, 8, 8) if self.conv else batch[0]

    def training_step(self, batch, batch_idx):
        x = self._x(batch)
        loss = F.mse_loss(self(x), x)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x = self._x(batch)
        self.log("val_loss", F.mse_loss(self(x), x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


class MappingOutputs(Classifier):
    """``training_step`` returns a mapping with more than the loss, and logs with ``log_dict``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out, y)
        acc = (out.argmax(1) == y).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": acc})
        return {"loss": loss, "acc": acc.detach(), "logits": out.detach()}


class SharedBlock(nn.Module):
    """One tanh block applied twice in the forward (weight sharing: its hooks fire twice per forward)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.block = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(self.block(self.block(torch.tanh(self.inp(x)))))


class GroupNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                               nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.f(x.view(-1, 1, 8, 8))


class OneLogit(Classifier):
    """Binary classification with one logit and ``binary_cross_entropy_with_logits`` on float targets."""

    def __init__(self):
        super().__init__(mlp([30, 32, 1]), 1e-3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.binary_cross_entropy_with_logits(self(x).squeeze(1), y.float())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.binary_cross_entropy_with_logits(self(x).squeeze(1), y.float()))


class BagOfTokens(nn.Module):
    def __init__(self, vocab=500, classes=4):
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab, 32, mode="mean")
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.emb(x))


def bag_data(n=3000, vocab=500, length=10, seed=0):
    """The most frequent residue mod 4 of 10 tokens."""
    x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return x, (x % 4).mode(1).values


class BiGRUTagger(nn.Module):
    """One tag per position, (N, tags, length) logits for cross-entropy."""

    def __init__(self, vocab=30, tags=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, 32)
        self.rnn = nn.GRU(32, 64, batch_first=True, bidirectional=True)
        self.head = nn.Linear(128, tags)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0]).transpose(1, 2)


def tag_data(n=2000, vocab=30, length=16, seed=0):
    """tag[t] = (token[t] + token[t-1]) mod 5."""
    x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return x, (x + torch.roll(x, 1, 1)) % 5


def digits_unit_range():
    x, y = digits_tensors(standardize=False)
    return loaders_from(x / 16.0, y)


def zoo(scale: float = 1.0):
    """name -> () -> (module, train loader, val loader, epochs[, Trainer arguments]); ``scale``: the fits' length factor
    (the schedules span the scaled fit)."""
    steps = round(22 * 8 * scale)  # 8 epochs of 22 digits batches
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
        # (a fifth element: Trainer arguments)
        "onecycle_adamw": lambda: (Scheduled(mlp([64, 128, 10]), 3e-3, "onecycle", steps), *d64(), 8),
        "warmup_cosine_layernorm_gelu": lambda: (Scheduled(nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(),
                                                                         nn.Linear(64, 10)), 3e-3, "cosine", steps), *d64(), 8),
        "frozen_first_layer": lambda: (FrozenFirstLayer(), *d64(), 6),
        "autoencoder_sigmoid_mse": lambda: (AutoEncoder(), *digits_unit_range(), 8),
        "conv_autoencoder_transposed": lambda: (AutoEncoder(conv=True), *digits_unit_range(), 6),
        "training_step_returns_mapping": lambda: (MappingOutputs(mlp([64, 64, 10]), 1e-3), *d64(), 5),
        "shared_tanh_block": lambda: (Classifier(SharedBlock(), 1e-3), *d64(), 6),
        "groupnorm_silu_cnn_adamw": lambda: (Classifier(GroupNormCNN(), 3e-3, "adamw", weight_decay=0.05), *d64(), 4),
        "one_logit_bce": lambda: (OneLogit(), *loaders_from(*sk_data("breast_cancer"), batch_size=32), 10),
        "label_smoothing": lambda: (Classifier(mlp([64, 128, 10]), 1e-3,
                                               loss_fn=lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1)), *d64(), 5),
        "embedding_bag_text": lambda: (Classifier(BagOfTokens(), 3e-3), *loaders_from(*bag_data()), 6),
        "bigru_tagger": lambda: (Classifier(BiGRUTagger(), 3e-3), *loaders_from(*tag_data()), 6),
        "clipped_sgd_momentum": lambda: (Classifier(mlp([64, 128, 10]), 0.1, "sgd", momentum=0.9), *d64(), 5,
                                         dict(gradient_clip_val=1.0)),
        "accumulate_4": lambda: (Classifier(mlp([64, 128, 10]), 1e-3), *d64(16), 5, dict(accumulate_grad_batches=4)),
        "bf16_mixed": lambda: (Classifier(mlp([64, 128, 10]), 1e-3), *d64(), 5, dict(precision="bf16-mixed")),
        "validate_every_10_steps": lambda: (Classifier(mlp([64, 64, 10]), 1e-3), *d64(), 4, dict(val_check_interval=10)),
        "sgd_weight_decay_long": lambda: (Classifier(mlp([64, 64, 64, 10]), 0.05, "sgd", momentum=0.9,
                                                     weight_decay=5e-4), *d64(32), 12),
        "adam_1e-2": lambda: (Classifier(mlp([64, 64, 10]), 1e-2), *d64(), 6),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="every fit this many times as long")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bad_runs = probe_runs = 0
    for name, make in zoo(args.epochs_scale).items():
        if args.only and name not in args.only:
            continue
        pl.seed_everything(0, verbose=False)
        module, train, val, epochs, *settings = make()
        diagnostics = Diagnostics(console=False)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = pl.Trainer(max_epochs=max(1, round(epochs * args.epochs_scale)), callbacks=[diagnostics], default_root_dir=tmp, logger=False,
                                 enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                 num_sanity_val_steps=0, accelerator="cpu", **(settings[0] if settings else {}))
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
