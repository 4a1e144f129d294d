"""LightningCLI: ``Diagnostics`` added from the command line and from a YAML config (jsonargparse reads the typed
``__init__`` and the docstrings), in both namespaces, with a real ``fit``."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L
import pytorch_lightning as pl

pytest.importorskip("jsonargparse")

from diag.callbacks import Diagnostics, GradientMonitor  # noqa: E402
from diag.sinks import read_findings  # noqa: E402
from tests.helpers import digits_tensors  # noqa: E402
from tests.test_configurations import assert_no_internal_error  # noqa: E402


class _Model:
    """A digits classifier for the CLI.

    Args:
        hidden: width of the hidden layer.
        lr: Adam's learning rate.
    """

    def __init__(self, hidden: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class _Data:
    """The 8x8 digits, standardized.

    Args:
        batch_size: samples per batch.
    """

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        x, y = digits_tensors()
        self.train_set, self.val_set = TensorDataset(x[:480], y[:480]), TensorDataset(x[480:736], y[480:736])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=128)


class PLModel(_Model, pl.LightningModule):
    pass


class PLData(_Data, pl.LightningDataModule):
    pass


class LModel(_Model, L.LightningModule):
    pass


class LData(_Data, L.LightningDataModule):
    pass


def _cli(ns: str):
    if ns == "pytorch_lightning":
        from pytorch_lightning.cli import LightningCLI

        return LightningCLI, PLModel, PLData
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI, LModel, LData


COMMON = ["--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          "--trainer.enable_checkpointing=false", "--trainer.log_every_n_steps=1", "--seed_everything=0"]


def _the_diagnostics(trainer) -> Diagnostics:
    found = [cb for cb in trainer.callbacks if isinstance(cb, Diagnostics)]
    assert len(found) == 1, trainer.callbacks
    return found[0]


@pytest.mark.parametrize("ns", ["pytorch_lightning", "lightning.pytorch"])
def test_command_line_adds_diagnostics(tmp_path, ns):
    LightningCLI, model, data = _cli(ns)
    cli = LightningCLI(model, data, args=["fit", f"--trainer.default_root_dir={tmp_path}", *COMMON,
                                          "--trainer.callbacks+=diag.callbacks.Diagnostics",
                                          "--trainer.callbacks.init_args.console=false"],
                       save_config_kwargs={"overwrite": True})
    diagnostics = _the_diagnostics(cli.trainer)
    assert diagnostics._console is False and diagnostics._jsonl is True
    assert cli.trainer.state.finished
    assert_no_internal_error(diagnostics.findings)
    # the saved config names the callback with its arguments, so the run can be repeated from it
    saved = open(os.path.join(cli.trainer.log_dir, "config.yaml")).read()
    assert "diag.callbacks.Diagnostics" in saved and "console: false" in saved
    assert os.path.exists(os.path.join(cli.trainer.log_dir, "diag", "findings.jsonl"))


@pytest.mark.parametrize("ns", ["pytorch_lightning", "lightning.pytorch"])
def test_yaml_config_with_a_configured_monitor(tmp_path, ns):
    LightningCLI, model, data = _cli(ns)
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: diag.callbacks.Diagnostics
      init_args:
        console: false
        activations: false
        gradients:
          class_path: diag.callbacks.GradientMonitor
          init_args:
            interval: 3
            warmup_steps: 2
model:
  hidden: 16
""")
    cli = LightningCLI(model, data, args=["fit", f"--config={config}", *COMMON], save_config_kwargs={"overwrite": True})
    diagnostics = _the_diagnostics(cli.trainer)
    gradients = diagnostics.monitor(GradientMonitor)
    assert gradients is not None and gradients.interval == 3 and gradients.warmup_steps == 2
    assert "ActivationMonitor" not in {type(m).__name__ for m in diagnostics.monitors}
    assert cli.trainer.state.finished
    assert_no_internal_error(diagnostics.findings)
    path = os.path.join(cli.trainer.log_dir, "diag", "findings.jsonl")
    assert {f.key for f in read_findings(path)} == {f.key for f in diagnostics.findings}


def test_bad_value_from_the_command_line_is_refused_clearly(tmp_path, capsys):
    LightningCLI, model, data = _cli("lightning.pytorch")
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(model, data, args=["fit", f"--trainer.default_root_dir={tmp_path}", *COMMON,
                                        "--trainer.callbacks+=diag.callbacks.Diagnostics",
                                        "--trainer.callbacks.init_args.console=maybe"])
    assert exit_info.value.code != 0
    said = capsys.readouterr().err
    assert "console" in said and "maybe" in said


def test_help_shows_the_documented_arguments(capsys):
    LightningCLI, model, data = _cli("lightning.pytorch")
    with pytest.raises(SystemExit):
        LightningCLI(model, data, args=["fit", "--trainer.callbacks.help", "diag.callbacks.Diagnostics"])
    text = capsys.readouterr().out
    for argument in ("loss_curve", "gradients", "activations", "console", "jsonl", "tensorboard"):
        assert f"--trainer.callbacks.{argument}" in text, argument
    # the docstring's ``Args:`` became the help text of each argument
    assert "write ``<log_dir>/diag/findings.jsonl``" in text or "findings.jsonl" in text
