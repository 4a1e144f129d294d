"""Never breaks the fit: hypothesis draws random small models and training configurations, healthy and broken
(NaN losses, learning rates of 1e6, unnormalized inputs, batches of one), and runs short fits with
``Diagnostics()``. No exception may escape the fit and no monitor may switch itself off (``diag_internal_error``).

CI runs a few derandomized examples; ``pytest tests/test_fuzz.py --fuzz-examples 200`` (or
``DIAG_FUZZ_EXAMPLES=200``) runs more, with fresh random draws.
"""

from __future__ import annotations

import math
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L
import pytorch_lightning as pl

from diag.callbacks import Diagnostics

CI_EXAMPLES = 8

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU,
               "elu": nn.ELU}
OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "adamw", "rmsprop", "adagrad")
FAULTS = ("none", "none", "log_of_negative", "huge_lr", "nan_inputs", "inf_loss_once", "constant_loss", "detached")


@st.composite
def configurations(draw):
    task = draw(st.sampled_from(["classification", "regression", "sequence"]))
    norm = draw(st.sampled_from(["none", "batchnorm", "layernorm"]))
    return dict(
        namespace=draw(st.sampled_from(["pytorch_lightning", "lightning.pytorch"])),
        task=task,
        depth=draw(st.integers(1, 4)),
        width=draw(st.sampled_from([1, 3, 8, 16, 32])),
        features=draw(st.integers(1, 12)),
        outputs=draw(st.integers(1, 10)) if task != "regression" else draw(st.integers(1, 3)),
        seq_len=draw(st.integers(1, 6)),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        norm=norm,
        dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
        optimizer=draw(st.sampled_from(OPTIMIZERS)),
        weight_decay=draw(st.sampled_from([0.0, 1e-2])),
        lr=10 ** draw(st.floats(-6, 1)),
        precision=draw(st.sampled_from(["32-true", "32-true", "bf16-mixed"])),
        accumulate=draw(st.sampled_from([1, 1, 2])),
        clip=draw(st.sampled_from([None, None, 1.0])),
        batch_size=draw(st.integers(2 if norm == "batchnorm" else 1, 32)),
        samples=draw(st.integers(32, 160)),
        input_scale=draw(st.sampled_from([1.0, 1.0, 100.0, 1e-4])),
        input_offset=draw(st.sampled_from([0.0, 0.0, 5.0])),
        fault=draw(st.sampled_from(FAULTS)),
        with_val=draw(st.booleans()),
        max_steps=draw(st.integers(3, 30)),
        manual=draw(st.sampled_from([False, False, False, True])),
        return_dict=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)),
    )


class _FuzzModule:
    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        act = ACTIVATIONS[cfg["activation"]]
        layers, size = [], cfg["features"]
        for _ in range(cfg["depth"] - 1):
            layers.append(nn.Linear(size, cfg["width"]))
            if cfg["norm"] == "batchnorm":
                layers.append(_SeqBatchNorm(cfg["width"]) if cfg["task"] == "sequence" else nn.BatchNorm1d(cfg["width"]))
            elif cfg["norm"] == "layernorm":
                layers.append(nn.LayerNorm(cfg["width"]))
            layers.append(act())
            if cfg["dropout"]:
                layers.append(nn.Dropout(cfg["dropout"]))
            size = cfg["width"]
        layers.append(nn.Linear(size, cfg["outputs"]))
        self.net = nn.Sequential(*layers)
        self.unused = nn.Linear(2, 2) if cfg["fault"] == "detached" else None
        if cfg["manual"]:
            self.automatic_optimization = False

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        out = self(x)
        task, fault = self.cfg["task"], self.cfg["fault"]
        if task == "classification":
            loss = nn.functional.cross_entropy(out, y) if self.cfg["outputs"] > 1 else \
                nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), (y % 2).float())
        elif task == "sequence":
            loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)) if self.cfg["outputs"] > 1 \
                else nn.functional.mse_loss(out.squeeze(-1), y.float())
        else:
            loss = nn.functional.mse_loss(out, y)
        if fault == "log_of_negative":
            loss = loss + torch.log(-loss.detach() - 1.0) * 0 + torch.log(out.mean() - out.abs().max() - 1.0)
        elif fault == "inf_loss_once" and self.global_step == 2:
            loss = loss * float("inf")
        elif fault == "constant_loss":
            loss = loss * 0 + 1.0
        elif fault == "detached":
            loss = loss.detach().requires_grad_(True)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, batch_size=len(batch[0]))
        if self.cfg["manual"]:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None
        return {"loss": loss, "extra": 1} if self.cfg["return_dict"] else loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), batch_size=len(batch[0]))

    def configure_optimizers(self):
        cfg, params = self.cfg, self.parameters()
        lr = 1e6 if cfg["fault"] == "huge_lr" else cfg["lr"]
        wd = cfg["weight_decay"]
        return {
            "sgd": lambda: torch.optim.SGD(params, lr=lr, weight_decay=wd),
            "sgd_momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
            "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=wd),
            "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
            "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr, weight_decay=wd),
            "adagrad": lambda: torch.optim.Adagrad(params, lr=lr, weight_decay=wd),
        }[cfg["optimizer"]]()


class _SeqBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the features of (batch, time, features): normalizes across the sequence axis too."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _data(cfg):
    g = torch.Generator().manual_seed(cfg["seed"])
    n, f = cfg["samples"], cfg["features"]
    shape = (n, cfg["seq_len"], f) if cfg["task"] == "sequence" else (n, f)
    x = torch.randn(*shape, generator=g) * cfg["input_scale"] + cfg["input_offset"]
    if cfg["fault"] == "nan_inputs":
        x[0] = float("nan")
    if cfg["task"] == "regression":
        y = torch.randn(n, cfg["outputs"], generator=g)
    else:
        classes = max(cfg["outputs"], 2)
        y = torch.randint(0, classes, shape[:-1], generator=g)
    # BatchNorm cannot train on a batch of one (PyTorch raises): the model's limit, not ours, so no such batch
    drop_last = cfg["norm"] == "batchnorm" and n % cfg["batch_size"] == 1
    return DataLoader(TensorDataset(x, y), batch_size=cfg["batch_size"], shuffle=True, generator=g, drop_last=drop_last)


def run_configuration(cfg, root) -> Diagnostics:
    namespace = pl if cfg["namespace"] == "pytorch_lightning" else L
    torch.manual_seed(cfg["seed"])
    module = type("FuzzModule", (_FuzzModule, namespace.LightningModule), {})(cfg)
    diagnostics = Diagnostics(console=False)
    manual = cfg["manual"]
    trainer = namespace.Trainer(
        default_root_dir=str(root), max_steps=cfg["max_steps"], max_epochs=-1, accelerator="cpu", devices=1,
        precision=cfg["precision"], accumulate_grad_batches=1 if manual else cfg["accumulate"],
        gradient_clip_val=None if manual else cfg["clip"], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, num_sanity_val_steps=0, callbacks=[diagnostics])
    train = _data(cfg)
    val = _data(dict(cfg, seed=cfg["seed"] + 1)) if cfg["with_val"] else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    assert trainer.state.finished, trainer.state.status
    return diagnostics


def test_random_configurations_never_break_the_fit(tmp_path_factory, fuzz_examples):
    examples = fuzz_examples or CI_EXAMPLES
    counter = {"n": 0}

    @settings(max_examples=examples, deadline=None, derandomize=fuzz_examples is None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(configurations())
    def check(cfg):
        counter["n"] += 1
        root = tmp_path_factory.mktemp("fuzz")
        diagnostics = run_configuration(cfg, root)
        errors = [f.message for f in diagnostics.findings if f.code == "diag_internal_error"]
        assert not errors, f"a monitor crashed on {cfg}:\n" + "\n".join(errors)
        for f in diagnostics.findings:  # every finding is well formed
            assert f.message and f.advice and f.step >= 0
            assert all(isinstance(v, (int, float, str)) for v in f.evidence.values())
            assert all(not isinstance(v, float) or math.isfinite(v) for v in f.evidence.values())

    check()
    print(f"\nfuzz: {counter['n']} random configurations ran with Diagnostics(); none broke the fit")
    assert counter["n"] >= min(examples, CI_EXAMPLES)
