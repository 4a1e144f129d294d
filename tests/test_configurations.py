"""Every training configuration a user may have: ``Diagnostics()`` at its defaults must watch it without failing
and without a false alarm.

Each case is a real, tiny ``Trainer.fit`` (the 8x8 digits, a few dozen steps) of a *healthy* model: the fit
finishes, no monitor switches itself off (``diag_internal_error``), no warning or error is raised, nothing
is logged at WARNING by the ``diag`` logger, and the JSONL file holds exactly the findings of ``.findings``.
The last part checks that bad input gets a clear error (bad arguments, an unwritable log directory, a corrupt
``findings.jsonl`` for ``diag report``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
import typing

import pytest
import torch
from torch import nn

import lightning.pytorch as L
import pytorch_lightning as pl

from diag import Severity
from diag.callbacks import (ActivationMonitor, DataMonitor, Diagnostics, FitMonitor, GradientMonitor,
                            LearningRateProbe, LossCurveMonitor, Monitor, SetupCheck)
from diag.sinks import read_findings
from tests.helpers import assert_silent, digits_loaders, mlp

NAMESPACES = {"pytorch_lightning": pl, "lightning.pytorch": L}
MONITOR_CLASSES = [LossCurveMonitor, LearningRateProbe, GradientMonitor, ActivationMonitor, FitMonitor, SetupCheck,
                   DataMonitor]


# ---- shared checks (also used by the other robustness test files) ---------------------------------------
class DiagLogRecords(logging.Handler):
    """Collects what the ``diag`` logger emits (console lines of findings, sink and monitor warnings)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, min_level: int = logging.WARNING) -> list:
        return [r.getMessage() for r in self.records if r.levelno >= min_level]


@pytest.fixture
def diag_log():
    handler = DiagLogRecords()
    logger = logging.getLogger("diag")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def internal_errors(findings) -> list:
    return [f"{f.layer}: {f.message}" for f in findings if f.code == "diag_internal_error"]


def assert_no_internal_error(findings) -> None:
    errors = internal_errors(findings)
    assert not errors, "a monitor crashed and switched itself off:\n" + "\n".join(errors)


def assert_healthy_fit(trainer, callback: Diagnostics, log: DiagLogRecords) -> None:
    """The fit finished, no monitor failed, no false alarm, nothing logged at WARNING, JSONL == ``.findings``."""
    assert trainer.state.finished, f"the fit did not finish: {trainer.state.status}"
    assert_no_internal_error(callback.findings)
    assert_silent(callback.findings)
    assert not log.messages(), "the diag logger warned on a healthy run:\n" + "\n".join(log.messages())
    path = callback.findings_file or os.path.join(trainer.log_dir or trainer.default_root_dir, "diag", "findings.jsonl")
    if callback._jsonl and os.path.exists(path):
        assert {f.key: f.severity for f in read_findings(path)} == {f.key: f.severity for f in callback.findings}
    elif callback._jsonl:
        assert not callback.findings, f"findings were raised but {path} was not written"


# ---- modules ------------------------------------------------------------------------------------------
class _Base:
    """A healthy digits classifier: 64 -> hidden -> 10, ReLU, Adam 1e-3 (the recipe's safe defaults)."""

    def __init__(self, hidden: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = mlp([64, hidden, 10])
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class _ReturnsDict(_Base):
    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return {"loss": loss, "batch_size": len(batch[0]), "detached": loss.detach() * 2}


class _ReturnsNothingLogsOnly(_Base):
    """Manual optimization that returns nothing: the loss exists only in ``self.log``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self._loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)


class _Manual(_Base):
    """Manual optimization with a scheduler and clipping done by hand, returning the detached loss."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self._loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=5.0, gradient_clip_algorithm="norm")
        opt.step()
        self.lr_schedulers().step()
        self.log("train_loss", loss)
        return loss.detach()

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.9)}


class _GAN(_Base):
    """GAN-style: a generator and a discriminator, two optimizers, manual optimization (Lightning's GAN recipe)."""

    def __init__(self, latent: int = 8) -> None:
        super().__init__()
        self.automatic_optimization = False
        del self.net
        self.latent = latent
        self.generator = nn.Sequential(nn.Linear(latent, 32), nn.LeakyReLU(0.2), nn.Linear(32, 64))
        self.discriminator = nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
        self._noise = torch.Generator().manual_seed(0)  # the module's own RNG: the run is reproducible

    def forward(self, z):
        return self.generator(z)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(x), self.latent, generator=self._noise)
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = self.generator(z)
        g_loss = bce(self.discriminator(fake), torch.ones(len(x), 1))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        real_loss = bce(self.discriminator(x), torch.ones(len(x), 1))
        fake_loss = bce(self.discriminator(fake.detach()), torch.zeros(len(x), 1))
        d_loss = (real_loss + fake_loss) / 2
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_d_real", torch.sigmoid(self.discriminator(x)).mean())

    def configure_optimizers(self):
        return (torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)))


class _Frozen(_Base):
    """A frozen 'pretrained' feature extractor (requires_grad=False, kept in eval mode) and a trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                 nn.Linear(32, 10))
        for p in self.net[:2].parameters():
            p.requires_grad_(False)

    def on_train_epoch_start(self):
        self.net[:2].eval()  # frozen BatchNorm statistics, as in fine-tuning recipes

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class _NaNAfter5(_Base):
    """A fault: the loss is NaN from step 5 on (e.g. a log of a negative number)."""

    def _loss(self, batch):
        loss = super()._loss(batch)
        return loss * float("nan") if self.global_step >= 5 else loss


class _Scheduled(_Base):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# Inductor's C++ code generation takes ~20 s on two busy cores and is no concern of ours: by default the tests
# compile with "eager" (Dynamo graph capture: what interacts with forward hooks and
# gradients). DIAG_COMPILE_BACKEND=inductor tests the full stack (tests/gpu_check.sh does).
COMPILE_BACKEND = os.environ.get("DIAG_COMPILE_BACKEND", "eager")


class _Compiled(_Base):
    def configure_model(self):
        self.net = torch.compile(self.net, backend=COMPILE_BACKEND)


def _module(cls, namespace):
    return type(cls.__name__.lstrip("_"), (cls, namespace.LightningModule), {})()


# ---- the configurations ----------------------------------------------------------------------------------
# name -> (module class, Trainer keyword arguments, whether there is a validation loader)
CONFIGS = {
    "default": (_Base, {}, True),
    "bf16_mixed": (_Base, {"precision": "bf16-mixed"}, True),
    "bf16_true": (_Base, {"precision": "bf16-true"}, True),
    "accumulate_grad_batches_2": (_Base, {"accumulate_grad_batches": 2}, True),
    "gradient_clip_norm": (_Base, {"gradient_clip_val": 1.0}, True),
    "gradient_clip_value": (_Base, {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}, True),
    "manual_optimization": (_Manual, {}, True),
    "manual_returns_nothing": (_ReturnsNothingLogsOnly, {}, True),
    "gan_two_optimizers": (_GAN, {}, True),
    "step_returns_dict": (_ReturnsDict, {}, True),
    "frozen_parts": (_Frozen, {}, True),
    "max_steps": (_Base, {"max_steps": 35, "max_epochs": -1}, True),
    "no_validation_loop": (_Base, {}, False),
    "fast_dev_run": (_Base, {"fast_dev_run": True}, True),
    "fast_dev_run_7": (_Base, {"fast_dev_run": 7}, True),
    "limit_train_batches": (_Base, {"limit_train_batches": 5, "max_epochs": 4}, True),
    "val_check_interval": (_Base, {"val_check_interval": 0.5, "limit_val_batches": 1}, True),
    "one_cycle_scheduler": (_Scheduled, {}, True),
    "logger_false": (_Base, {"logger": False}, True),
    "csv_logger": (_Base, {"logger": "csv"}, True),
    "sanity_check": (_Base, {"num_sanity_val_steps": 2}, True),
}
# Both namespaces for the configurations where Lightning's code paths differ most.
CASES = [(name, "pytorch_lightning") for name in CONFIGS] + [
    (name, "lightning.pytorch") for name in ("default", "bf16_mixed", "accumulate_grad_batches_2",
                                             "manual_optimization", "gan_two_optimizers", "frozen_parts")]
CONFIGS["compiled_submodule"] = (_Compiled, {}, True)  # run by test_compiled_model (skipped where compile fails)


def run_config(tmp_path, name: str, namespace, callbacks, max_epochs: int = 3):
    cls, kwargs, with_val = CONFIGS[name]
    kwargs = dict(kwargs)
    if kwargs.get("logger") == "csv":
        kwargs["logger"] = namespace.loggers.CSVLogger(str(tmp_path))
    train, val = digits_loaders(batch_size=32, n_train=640)
    pl.seed_everything(0, workers=True)
    module = _module(cls, namespace)
    defaults = dict(default_root_dir=str(tmp_path), max_epochs=max_epochs, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                    log_every_n_steps=1, num_sanity_val_steps=0)
    defaults.update(kwargs)
    trainer = namespace.Trainer(callbacks=list(callbacks), **defaults)
    trainer.fit(module, train, val if with_val else None)
    return trainer


@pytest.mark.parametrize("name,ns", CASES, ids=[f"{n}-{ns}" for n, ns in CASES])
def test_healthy_configuration(tmp_path, name, ns, diag_log):
    callback = Diagnostics()
    trainer = run_config(tmp_path, name, NAMESPACES[ns], [callback])
    assert_healthy_fit(trainer, callback, diag_log)


def _compile_works() -> str:
    """'' when torch.compile (inductor) builds on this machine, else why not."""
    try:
        fn = torch.compile(lambda x: torch.relu(x) + 1, backend=COMPILE_BACKEND)
        fn(torch.randn(3))
        return ""
    except Exception as exc:  # no compiler, unsupported Python, ...
        return f"torch.compile does not run here: {type(exc).__name__}: {exc}"[:300]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["submodule", "lightning_module"])
def test_compiled_model(tmp_path, how, diag_log):
    reason = _compile_works()
    if reason:
        pytest.skip(reason)
    callback = Diagnostics()
    if how == "submodule":
        trainer = run_config(tmp_path, "compiled_submodule", pl, [callback], max_epochs=2)
    else:  # Lightning's documented way: fit(torch.compile(model)), unwrapped by the Trainer
        train, val = digits_loaders(batch_size=32, n_train=640)
        try:  # does this torch/Lightning pair compile a LightningModule at all (without lightning-diag)?
            pl.Trainer(fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       accelerator="cpu").fit(torch.compile(_module(_Base, pl), backend=COMPILE_BACKEND), train)
        except Exception as exc:
            pytest.skip(f"torch {torch.__version__} with Lightning {pl.__version__} cannot fit a compiled "
                        f"LightningModule even without lightning-diag: {type(exc).__name__}: {str(exc)[:200]}")
        diag_log.records.clear()
        pl.seed_everything(0)
        trainer = pl.Trainer(default_root_dir=str(tmp_path), max_epochs=2, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
                             log_every_n_steps=1, num_sanity_val_steps=0, callbacks=[callback])
        trainer.fit(torch.compile(_module(_Base, pl), backend=COMPILE_BACKEND), train, val)
    assert_healthy_fit(trainer, callback, diag_log)


@pytest.mark.parametrize("ns", ["pytorch_lightning", "lightning.pytorch"])
def test_every_monitor_alone(tmp_path, ns, diag_log):
    """Each monitor is a callback of its own: all seven side by side (each with its own sinks) on one fit."""
    monitors = [cls() for cls in MONITOR_CLASSES]
    trainer = run_config(tmp_path, "default", NAMESPACES[ns], monitors, max_epochs=2)
    assert trainer.state.finished
    for m in monitors:
        assert_no_internal_error(m.findings)
        assert_silent(m.findings)
    assert not diag_log.messages(), diag_log.messages()


def test_monitors_side_by_side_share_one_jsonl(tmp_path, diag_log):
    """Monitors used as separate callbacks all write ``findings.jsonl``: every one's findings end up in it, intact."""
    monitors = [SetupCheck(), DataMonitor(), ActivationMonitor(), LossCurveMonitor()]
    train, val = digits_loaders(batch_size=32, n_train=320, standardize=False)  # raw 0..16 pixels
    module = _module(_Base, pl)
    module.net = nn.Sequential(nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 10))
    module.configure_optimizers = lambda: torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=1e-2)
    pl.seed_everything(0)
    trainer = pl.Trainer(default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False, max_epochs=1,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=monitors)
    trainer.fit(module, train, val)
    expected = {f.key: f.severity for m in monitors for f in m.findings}
    assert len({type(m).__name__ for m in monitors if m.findings}) >= 2, "the test needs findings from two monitors"
    assert len({m.findings_file for m in monitors}) == 1, "monitors of one fit write one file"
    assert monitors[0].findings_file == os.path.join(str(tmp_path), "lightning_logs", "version_0", "diag",
                                                     "findings.jsonl")
    written = {f.key: f.severity for f in read_findings(monitors[0].findings_file)}
    assert written == expected


# ---- clear errors for bad input ----------------------------------------------------------------------
def test_diagnostics_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"`gradients` must be True, False or a GradientMonitor.*'yes'"):
        Diagnostics(gradients="yes")
    with pytest.raises(TypeError, match="`lr_probe` must be True, False or a LearningRateProbe.*GradientMonitor"):
        Diagnostics(lr_probe=GradientMonitor())
    with pytest.raises(TypeError, match="`jsonl` must be True or False"):
        Diagnostics(jsonl="no")


def _typed_parameters(cls):
    hints = typing.get_type_hints(cls.__init__)
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name != "self" and hints.get(name) in (int, float, bool):
            yield name, hints[name]


@pytest.mark.parametrize("cls", MONITOR_CLASSES, ids=lambda c: c.__name__)
def test_monitor_arguments_are_validated(cls):
    """Every int/float/bool argument of every monitor refuses a string at once, naming the argument."""
    params = list(_typed_parameters(cls))
    if not params:
        pytest.skip(f"{cls.__name__} has no int/float/bool arguments (yet)")
    for name, hint in params:
        with pytest.raises((TypeError, ValueError), match=name):
            cls(**{name: "not-a-" + hint.__name__})
        if hint is not bool:
            bad = float("nan")
            try:
                cls(**{name: bad})
            except (TypeError, ValueError) as exc:
                assert name in str(exc), f"{cls.__name__}({name}=nan): the error does not name the argument: {exc}"
            else:
                pytest.fail(f"{cls.__name__}({name}=nan) was accepted")


class _ReportsEveryStep(Monitor):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.report("loss_plateau", f"test finding at batch {batch_idx}", layer=f"layer{batch_idx % 3}")


def test_unwritable_log_dir_warns_once_and_keeps_training(tmp_path, diag_log):
    """A log directory that cannot be created (its parent is a file): one warning, the fit goes on, ``.findings`` fill."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    root = blocker / "run"
    train, val = digits_loaders(batch_size=32, n_train=320)
    monitor = _ReportsEveryStep()
    pl.seed_everything(0)
    trainer = pl.Trainer(default_root_dir=str(root), logger=False, enable_checkpointing=False, max_epochs=2,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    trainer.fit(_module(_Base, pl), train, val)
    assert trainer.state.finished
    assert len(monitor.findings) == 3
    warned = [m for m in diag_log.messages() if "cannot write findings" in m]
    assert len(warned) == 1, diag_log.messages()
    assert str(root) in warned[0]


def test_unwritable_log_dir_with_diagnostics_and_a_fault(tmp_path, diag_log):
    """Same with ``Diagnostics()`` on a run whose loss becomes NaN: the findings still reach ``.findings``."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    train, _ = digits_loaders(batch_size=32, n_train=320)
    callback = Diagnostics()
    pl.seed_everything(0)
    module = _module(_NaNAfter5, pl)
    trainer = pl.Trainer(default_root_dir=str(blocker / "run"), logger=False, enable_checkpointing=False,
                         max_epochs=2, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, train)
    assert trainer.state.finished
    assert_no_internal_error(callback.findings)
    assert [m for m in diag_log.messages() if "cannot write findings" in m].__len__() == 1
    assert "nonfinite_loss" in {f.code for f in callback.findings if f.severity is Severity.ERROR}


def _cli_module_available() -> bool:
    try:
        import diag.cli  # noqa: F401
        return True
    except ImportError:
        return False


def _diag_command():
    exe = os.path.join(os.path.dirname(sys.executable), "diag")
    return [exe] if os.path.exists(exe) else [sys.executable, "-c", "import sys; from diag.cli import main; sys.exit(main())"]


@pytest.mark.skipif(not _cli_module_available(), reason="diag/cli.py (the report command) is not there yet")
def test_report_names_the_corrupt_line(tmp_path):
    run = tmp_path / "run"
    (run / "diag").mkdir(parents=True)
    good = {"code": "lr_too_high", "severity": "warning", "step": 3, "epoch": 0, "message": "m", "advice": "a",
            "evidence": {}, "layer": None}
    (run / "diag" / "findings.jsonl").write_text(json.dumps(good) + "\n" + '{"code": "lr_too_high", "sev\n')
    proc = subprocess.run(_diag_command() + ["report", str(run)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    said = proc.stdout + proc.stderr
    assert "line 2" in said, said
    assert "Traceback" not in said, said


@pytest.mark.skipif(not _cli_module_available(), reason="diag/cli.py (the report command) is not there yet")
def test_report_on_a_missing_directory_says_so(tmp_path):
    proc = subprocess.run(_diag_command() + ["report", str(tmp_path / "nowhere")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "nowhere" in said and "Traceback" not in said, said
