"""CUDA with fp16 AMP (``precision="16-mixed"``): gradients are measured after the grad scaler unscales them, and
the steps the scaler skips (inf/NaN gradients) are not reported as a non-finite loss or exploding gradients.
Skipped where no CUDA device is available; ``tests/gpu_check.sh`` runs these on a GPU machine."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pytorch_lightning as pl
from pytorch_lightning.plugins.precision import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diag.callbacks import Diagnostics
from tests.helpers import assert_silent, digits_loaders
from tests.test_configurations import assert_no_internal_error

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class _Net(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class _ReferenceGradNorm(pl.Callback):
    """The total gradient norm where Lightning hands the (unscaled) gradients to the optimizer."""

    def __init__(self) -> None:
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach().float() for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def _fit(tmp_path, callbacks, precision="16-mixed", plugins=None, epochs=3, lr=1e-3):
    train, val = digits_loaders(batch_size=64, n_train=1280)
    pl.seed_everything(0)
    kwargs = dict(plugins=plugins) if plugins else dict(precision=precision)
    trainer = pl.Trainer(default_root_dir=str(tmp_path), max_epochs=epochs, accelerator="cuda", devices=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=1, num_sanity_val_steps=0, callbacks=callbacks, **kwargs)
    trainer.fit(_Net(lr=lr), train, val)
    return trainer


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_healthy_cuda_run_is_silent(tmp_path, precision):
    diagnostics = Diagnostics()
    trainer = _fit(tmp_path, [diagnostics], precision=precision)
    assert trainer.state.finished
    assert_no_internal_error(diagnostics.findings)
    assert_silent(diagnostics.findings)


def test_gradients_are_measured_unscaled(tmp_path):
    diagnostics, reference = Diagnostics(), _ReferenceGradNorm()
    trainer = _fit(tmp_path, [diagnostics, reference])
    assert_no_internal_error(diagnostics.findings)
    acc = EventAccumulator(trainer.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert "diag/grad_norm" in acc.Tags()["scalars"], "GradientMonitor logged no diag/grad_norm"
    compared = 0
    for event in acc.Scalars("diag/grad_norm"):
        ref = reference.norms.get(event.step)
        if ref is None or not math.isfinite(ref):
            continue
        # scaled gradients would be ~65536x larger
        assert event.value == pytest.approx(ref, rel=0.05), (event.step, event.value, ref)
        compared += 1
    assert compared >= 3


def test_grad_scaler_skipped_steps_are_not_reported(tmp_path):
    """A grad scaler that starts at 2**40 overflows fp16 for the first ~25 steps: those steps are skipped and the
    scale halves each time. The loss stays finite throughout: no nonfinite_loss, no exploding gradients."""
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)
    diagnostics = Diagnostics()
    trainer = _fit(tmp_path, [diagnostics], plugins=[MixedPrecision("16-mixed", "cuda", scaler=scaler)])
    assert trainer.state.finished
    assert scaler.get_scale() < 2.0 ** 30, "the scaler skipped no step: the test did not test"
    assert_no_internal_error(diagnostics.findings)
    reported = {f.code for f in diagnostics.findings}
    assert "nonfinite_loss" not in reported
    assert "exploding_gradients" not in reported
    assert_silent(diagnostics.findings)


def test_probe_on_cuda_amp(tmp_path):
    """A stalled fp16 run (learning rate far too low) calls the probe on the GPU: it must not fail."""
    diagnostics = Diagnostics()
    trainer = _fit(tmp_path, [diagnostics], epochs=4, lr=1e-7)
    assert trainer.state.finished
    assert_no_internal_error(diagnostics.findings)
