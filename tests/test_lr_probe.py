"""LearningRateProbe: the fault suite (LR too high / too low / code bugs / healthy), restoration, outputs, arguments.

Every scenario is a real ``Trainer.fit`` on CPU; the probe is forced at a chosen step (``preflight_step``, or a
request from a test-only monitor, as the loss monitor would send), so these tests do not depend on the loss
monitor's own triggers.
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning.pytorch as L
import pytorch_lightning as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diag import signals
from diag.callbacks import Diagnostics, LearningRateProbe, Monitor
from diag.probe import run_probe, zero_inputs
from tests.helpers import (Classifier, classifier_for, codes, count_calls, digits_loaders, digits_tensors, fit,
                           loaders_from, mlp, spirals, state_equal)

VERDICTS = {"lr_too_high", "lr_too_low", "suspected_code_bug"}


# ---- models and data for the scenarios ------------------------------------------------------------------
class IgnoresInput(nn.Module):
    """Bug: the prediction never sees x."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp([64, 32, 10])

    def forward(self, x):
        return self.net(torch.zeros_like(x))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                               nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x):
        return self.f(x.view(-1, 1, 8, 8))


class TokenGRU(nn.Module):
    """Embedding + GRU + LayerNorm on synthetic token sequences."""

    def __init__(self, vocab: int = 6, width: int = 16) -> None:
        super().__init__()
        self.emb, self.gru = nn.Embedding(vocab, width), nn.GRU(width, width, batch_first=True)
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, 2)

    def forward(self, x):
        h, _ = self.gru(self.emb(x))
        return self.out(self.norm(h[:, -1]))


def token_data(n: int = 1024, length: int = 8, vocab: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return x, ((x == 1).sum(1) > (x == 2).sum(1)).long()  # more 1s than 2s?


def regression_data(n: int = 1024, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    y = x @ w + 0.1 * torch.randn(n, generator=g)
    return x, (y - y.mean()) / y.std()


def mse_broadcast(out, y):
    """Bug: an (N, 1) output against (N,) targets broadcasts to (N, N): MSE can only fit the mean."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return F.mse_loss(out, y)


def digits():
    return digits_loaders(n_train=1024)[0]


def four_classes():
    """A 4-class tabular task (scikit-learn's make_classification, standardized): not the digits."""
    from sklearn.datasets import make_classification

    x, y = make_classification(3000, n_features=20, n_informative=10, n_classes=4, random_state=0)
    x = (x - x.mean(0)) / x.std(0)
    return loaders_from(torch.tensor(x, dtype=torch.float32), torch.tensor(y))[0]


def shuffled_digits():
    x, y = digits_tensors()
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    return loaders_from(x, y, val_fraction=0)[0]


# scenario -> (model factory, loader factory, probe step, epochs, expected verdict or None for healthy[, the reason a
# monitor gives when it asks for the probe; default: a preflight probe at that step])
SCENARIOS = {
    # learning rate too high
    "sgd_lr8_diverging": (lambda: Classifier(mlp([64, 64, 10]), lr=8.0, optimizer="sgd"), digits, 10, 2, "lr_too_high"),
    "adam_lr3_oscillating": (lambda: Classifier(mlp([64, 64, 10]), lr=3.0, optimizer="adam"), digits, 10, 2, "lr_too_high"),
    "adam_lr1_oscillating": (lambda: Classifier(mlp([64, 64, 10]), lr=1.0, optimizer="adam"), digits, 20, 2, "lr_too_high"),
    "cnn_batchnorm_sgd_lr5": (lambda: Classifier(SmallCNN(), lr=5.0, optimizer="sgd"), digits, 20, 2, "lr_too_high"),
    "sgd_lr20_nan": (lambda: Classifier(mlp([64, 64, 10]), lr=20.0, optimizer="sgd"), digits, 25, 2, "lr_too_high"),
    # learning rate too low
    "sgd_lr1e-5": (lambda: Classifier(mlp([64, 64, 10]), lr=1e-5, optimizer="sgd"), digits, 30, 2, "lr_too_low"),
    "adam_lr1e-7": (lambda: Classifier(mlp([64, 64, 10]), lr=1e-7, optimizer="adam"), digits, 30, 2, "lr_too_low"),
    # far too low on another data set, asked for by a stall: the sweep must reach 1e5x (nothing moves the loss by 0.1%
    # up to 100x), and a model that has learned nothing yet is not a label bug
    "four_classes_sgd_lr1e-5_stalled": (lambda: Classifier(mlp([20, 64, 64, 4]), lr=1e-5, optimizer="sgd"), four_classes,
                                        58, 2, "lr_too_low", "loss_stalled"),
    # code bugs
    "prediction_ignores_input": (lambda: Classifier(IgnoresInput(), lr=1e-3), digits, 30, 2, "suspected_code_bug"),
    "softmax_into_cross_entropy": (lambda: Classifier(nn.Sequential(mlp([64, 64, 10]), nn.Softmax(1)), lr=1e-3), digits,
                                   30, 2, "suspected_code_bug"),
    "mse_broadcast_n1_vs_n": (lambda: Classifier(mlp([8, 32, 1]), lr=1e-3, loss_fn=mse_broadcast),
                              lambda: loaders_from(*regression_data(), val_fraction=0)[0], 30, 2, "suspected_code_bug"),
    # healthy
    "relu_mlp_adam": (lambda: Classifier(mlp([64, 64, 10]), lr=1e-3), digits, 30, 2, None),
    "cnn_batchnorm": (lambda: Classifier(SmallCNN(), lr=1e-3), digits, 30, 2, None),
    "gru_layernorm_tokens": (lambda: Classifier(TokenGRU(), lr=3e-3),
                             lambda: loaders_from(*token_data(), val_fraction=0)[0], 30, 2, None),
    "sgd_momentum": (lambda: Classifier(mlp([64, 64, 10]), lr=0.05, optimizer="sgd", momentum=0.9), digits, 30, 2, None),
    "short_run_still_improving": (lambda: Classifier(mlp([64, 64, 10]), lr=0.05, optimizer="sgd"), digits, 3, 1, None),
    # labels shuffled apart from their inputs: one probe (and no validation loss) gives no verdict, an info that waits
    # for the validation loss (see test_misaligned_labels_wait_for_the_validation_loss)
    "labels_shuffled": (lambda: Classifier(mlp([64, 64, 10]), lr=1e-3), shuffled_digits, 100, 4, None,
                        "loss_stalled"),
    # a hard task the loss monitor calls stalled: no misaligned-labels verdict (the held-out half still improves)
    "spirals_tanh_stalled": (lambda: Classifier(mlp([2, 64, 64, 2], nn.Tanh), lr=1e-2),
                             lambda: loaders_from(*spirals(), val_fraction=0)[0], 65, 6, None, "loss_stalled"),
    # a model far too small for its data (6 parameters, two spirals): it cannot fit the probe's batch either, which is
    # underfitting (the FitMonitor's call), not a code bug
    "linear_on_spirals_underfits": (lambda: Classifier(nn.Linear(2, 2), lr=1e-2),
                                    lambda: loaders_from(*spirals(), val_fraction=0)[0], 65, 6, None, "loss_stalled"),
    "regression_mlp": (lambda: Classifier(mlp([8, 32, 1]), lr=1e-3, loss_fn=lambda o, y: F.mse_loss(o.squeeze(1), y)),
                       lambda: loaders_from(*regression_data(), val_fraction=0)[0], 30, 2, None),
}


_RUNS: dict = {}


def scenario_result(tmp_path, name):
    """Each scenario is fitted once per test session; several tests read the same run."""
    if name not in _RUNS:
        _RUNS[name] = run_scenario(tmp_path, name)
    return _RUNS[name]


def run_scenario(tmp_path, name, **probe_kwargs):
    make_model, make_loader, step, epochs, _, *reason = SCENARIOS[name]
    pl.seed_everything(0)
    model, loader = make_model(), make_loader()
    if reason:
        probe = LearningRateProbe(**{"budget_fraction": None, **probe_kwargs})
        asker = Asker(step, reason[0])
        asker._attach(probe.context)
        callbacks = [asker, probe]
    else:
        probe = LearningRateProbe(preflight_step=step, **{"budget_fraction": None, **probe_kwargs})
        callbacks = [probe]
    started = time.perf_counter()
    fit(tmp_path, model, loader, None, callbacks, max_epochs=epochs, logger=False)
    return probe, time.perf_counter() - started


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault_suite(tmp_path, name):
    expected = SCENARIOS[name][4]
    probe, elapsed = scenario_result(tmp_path, name)
    assert len(probe.results) == 1, "the forced probe did not run"
    verdict = probe.context.get(signals.PROBE_VERDICT)
    found = codes(probe.findings) & VERDICTS
    detail = "; ".join(f"{f.code}: {f.message}" for f in probe.findings) + f" | {probe.results[0].evidence()}"
    if expected is None:
        assert verdict == "lr_ok", detail
        assert not codes(probe.findings), detail  # healthy: no warning or error at all
    else:
        assert verdict == expected and found == {expected}, detail
        finding = next(f for f in probe.findings if f.code == expected)
        assert "loss_fraction@x1" in finding.evidence and "loss_fraction@x0.01" in finding.evidence
        if expected in ("lr_too_high", "lr_too_low"):
            suggested = probe.context.get(signals.PROBE_SUGGESTED_LR)
            current = probe.results[0].base_lr
            assert finding.evidence["suggested_lr"] == pytest.approx(suggested)
            assert (suggested < current) if expected == "lr_too_high" else (suggested > current)
            assert f"{suggested:.2g}" in finding.message and f"{suggested:.2g}" in finding.advice
    # a single probe costs well under a few seconds on these models
    assert probe.probe_seconds < 8.0


def test_too_high_message_and_nan_snapshot(tmp_path):
    probe, _ = scenario_result(tmp_path, "sgd_lr20_nan")
    result = probe.results[0]
    assert result.from_snapshot  # the weights were NaN at step 25: the probe started from the last finite snapshot
    finding = next(f for f in probe.findings if f.code == "lr_too_high")
    assert "use about" in finding.message and finding.evidence["from_last_finite_snapshot"] == 1
    assert finding.evidence["loss_fraction@x1"] == "diverged"


def test_code_bug_advice_matches_what_was_seen(tmp_path):
    probe, _ = scenario_result(tmp_path, "softmax_into_cross_entropy")
    bug = next(f for f in probe.findings if f.code == "suspected_code_bug")
    assert "softmax" in bug.advice.split("(2)")[0] and bug.severity.value == "error"
    probe, _ = scenario_result(tmp_path, "prediction_ignores_input")
    bug = next(f for f in probe.findings if f.code == "suspected_code_bug")
    assert "does not depend on the input" in bug.message
    assert "net.net.0.weight" in bug.advice  # the first layer never gets a gradient (its input is all zeros)


# ---- restoration: a probe mid-training leaves no trace ------------------------------------------------------
class Asker(Monitor):
    """Test-only: asks for a probe at one step, as the loss monitor does when it sees a symptom."""

    def __init__(self, at: int, reason: str = "loss_diverging") -> None:
        super().__init__()
        self.at, self.reason = at, reason

    def _state_key_args(self):
        return {"at": self.at, "reason": self.reason}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            self._context.request_probe(self.reason)


class Busy(pl.LightningModule):
    """Dropout, BatchNorm, a scheduler, a torchmetrics-like accumulated state and logging: everything to restore."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 10))
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.seen_batches = 0
        self.random_draws = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        self.log_dict({"train_extra": loss.detach() * 2})
        return {"loss": loss}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.random_draws.append(float(torch.rand(())))  # the RNG stream must continue as if no probe ran

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 7, 0.5)}


def _busy_fit(tmp_path, callbacks, namespace=pl):
    import numpy as np
    import random
    pl.seed_everything(0)
    model = Busy()
    train = digits()
    t = fit(tmp_path, model, train, None, callbacks, max_epochs=2, namespace=namespace)
    return model, t, (np.random.rand(), random.random(), float(torch.rand(())))


def test_probe_restores_everything_bitwise(tmp_path):
    base_model, base_trainer, base_rng = _busy_fit(tmp_path / "a", [])
    probe = LearningRateProbe(budget_fraction=None)
    asker = Asker(at=9)
    asker._attach(probe.context)
    model, t, rng = _busy_fit(tmp_path / "b", [asker, probe])
    assert len(probe.results) == 1 and probe.context.probe_requests == []
    assert state_equal(base_model, model)  # weights, BatchNorm running stats and num_batches_tracked
    assert base_model.random_draws == model.random_draws and base_rng == rng  # torch / numpy / python RNG streams
    opt_a, opt_b = base_trainer.optimizers[0], t.optimizers[0]
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert all(torch.equal(sa["state"][k][n], sb["state"][k][n]) for k in sa["state"] for n in sa["state"][k])
    assert sa["param_groups"] == sb["param_groups"]
    assert base_trainer.lr_scheduler_configs[0].scheduler.state_dict() == t.lr_scheduler_configs[0].scheduler.state_dict()
    assert not model.frozen.weight.requires_grad and model.training
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__
    assert set(base_trainer.callback_metrics) == set(t.callback_metrics)
    assert all(torch.equal(base_trainer.callback_metrics[k], t.callback_metrics[k]) for k in t.callback_metrics)


def test_restore_point_puts_back_grads_modes_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model(torch.randn(8, 4)).sum().backward()
    model[2].eval()
    grads = [p.grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    opt_before = json.dumps({k: str(v) for k, v in opt.state_dict().items()})
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    rng = torch.get_rng_state()
    result = run_probe(model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]), batch, steps=5)
    assert result is not None and len(result.factors) >= 5
    assert all(a is b for a, b in zip(grads, [p.grad for p in model.parameters()]))  # the same grad tensors
    assert not model[2].training and model[1].training
    assert json.dumps({k: str(v) for k, v in opt.state_dict().items()}) == opt_before
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if "running" in k or "num_batches" in k)
    assert torch.equal(torch.get_rng_state(), rng)


def test_zero_inputs_keeps_targets():
    x, y = torch.randn(4, 3), torch.arange(4)
    zx, zy = zero_inputs((x, y))
    assert torch.equal(zx, torch.zeros_like(x)) and zy is y
    out = zero_inputs({"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": y[:2]})
    assert out["input_ids"].abs().sum() == 0 and out["labels"] is not None and out["labels"].sum() == 1


# ---- triggers, budget, outputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("namespace", [pl, L], ids=["pytorch_lightning", "lightning.pytorch"])
def test_requests_trigger_once_per_reason_and_tensorboard(tmp_path, namespace):
    probe = LearningRateProbe(max_probes=3, budget_fraction=None)
    askers = [Asker(at=5, reason="loss_diverging"), Asker(at=8, reason="loss_diverging"),
              Asker(at=12, reason="loss_oscillating")]
    for a in askers:
        a._attach(probe.context)
    pl.seed_everything(0)
    model = classifier_for(namespace)(mlp([64, 64, 10]), lr=3.0, optimizer="adam")
    logger = namespace.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    fit(tmp_path, model, digits(), None, [*askers, probe], max_epochs=1, namespace=namespace, logger=logger,
        log_every_n_steps=50)
    assert len(probe.results) == 2  # "loss_diverging" twice is probed once; "loss_oscillating" once more
    assert "lr_too_high" in codes(probe.findings)
    assert probe.findings[0].evidence["trigger"] == "loss_diverging"
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "diag/probe/loss_fraction@x0.01" in tags and "diag/probe/loss_fraction@x1" in tags
    assert [e.step for e in acc.Scalars("diag/probe/loss_fraction@x0.01")] == [5, 12]
    assert acc.Scalars("diag/probe/loss_fraction@x0.01")[0].value < 0.5
    assert not any(t.startswith("train_") and "probe" in t for t in tags)


def test_in_diagnostics_with_logger_false_writes_jsonl(tmp_path):
    probe = LearningRateProbe(preflight_step=10, budget_fraction=None)
    diag = Diagnostics(loss_curve=False, gradients=False, activations=False, fit=False, setup_check=False, data=False,
                       lr_probe=probe, console=False)
    pl.seed_everything(0)
    fit(tmp_path, Classifier(mlp([64, 64, 10]), lr=8.0, optimizer="sgd"), digits(), None, [diag], max_epochs=1,
        logger=False)
    assert "lr_too_high" in codes(diag.findings)
    paths = glob.glob(os.path.join(str(tmp_path), "**", "findings.jsonl"), recursive=True)
    assert len(paths) == 1, paths
    lines = [json.loads(line) for line in open(paths[0])]
    assert any(line["code"] == "lr_too_high" and "suggested_lr" in line["evidence"] for line in lines)


def test_budget_holds_for_every_probe_the_first_included(tmp_path):
    # 10% of a 16-step fit is far less than a sweep: no probe runs, and a loss symptom's request says why
    probe = LearningRateProbe(max_probes=5, budget_fraction=0.1)
    askers = [Asker(at=3, reason="loss_stalled"), Asker(at=6, reason="r6")]
    for a in askers:
        a._attach(probe.context)
    pl.seed_everything(0)
    fit(tmp_path, Classifier(mlp([64, 64, 10]), lr=1e-3), digits(), None, [*askers, probe], max_epochs=1, logger=False)
    assert probe.results == []
    skipped = [f for f in probe.findings if f.code == "probe_skipped"]
    assert len(skipped) == 1 and skipped[0].severity.value == "info" and skipped[0].step == 3
    assert "budget" in skipped[0].message and "loss_stalled" in skipped[0].message
    # not even started: the cheapest sweep this fit's step time allows does not fit (or, nearly so, stopped after its
    # first steps, whose time said the whole sweep would not fit)
    assert "takes at least" in skipped[0].message or "would take about" in skipped[0].message
    if "takes at least" in skipped[0].message:
        assert probe.probe_seconds == 0.0  # skipped before a single probe step
    # without a budget, max_probes still limits
    probe2 = LearningRateProbe(max_probes=1, budget_fraction=None)
    askers = [Asker(at=s, reason=f"r{s}") for s in (3, 6)]
    for a in askers:
        a._attach(probe2.context)
    fit(tmp_path / "b", Classifier(mlp([64, 64, 10]), lr=1e-3), digits(), None, [*askers, probe2], max_epochs=1,
        logger=False)
    assert len(probe2.results) == 1


def test_manual_optimization_is_skipped(tmp_path):
    class Manual(Classifier):
        def __init__(self):
            super().__init__(mlp([64, 16, 10]))
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = F.cross_entropy(self(batch[0]), batch[1])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return loss

    probe = LearningRateProbe(preflight_step=2)
    fit(tmp_path, Manual(), digits(), None, [probe], max_epochs=1, logger=False)
    assert probe.results == [] and not probe.findings


def test_optimizer_that_cannot_be_rebuilt_is_skipped_quietly(tmp_path):
    class Picky(torch.optim.SGD):
        def __init__(self, params, secret):  # a constructor argument the probe cannot know
            super().__init__(params, lr=0.05)

    probe = LearningRateProbe(preflight_step=2)
    fit(tmp_path, Classifier(mlp([64, 16, 10]), optimizer=lambda p: Picky(p, secret=1)), digits(), None, [probe],
        max_epochs=1, logger=False)
    assert probe.results == [] and not probe.findings  # no diag_internal_error either


@pytest.mark.parametrize("kwargs, match", [
    ({"factors": (0.1, 1.0, 10.0)}, "four orders of magnitude"),
    ({"factors": (0.01, 0.1, 10.0, 100.0)}, "must include 1.0"),
    ({"factors": (0.0, 1.0, 1e4)}, "positive numbers"),
    ({"factors": "abc"}, "positive numbers"),
    ({"budget_fraction": -0.5}, "budget_fraction"),
    ({"max_probes": -1}, "max_probes"),
    ({"steps": 1}, "steps"),
    ({"preflight_step": -3}, "preflight_step"),
    ({"batch_samples": 2}, "batch_samples"),
    ({"snapshot_interval": 1.5}, "snapshot_interval"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearningRateProbe(**kwargs)
    with pytest.raises(TypeError, match="input_zeroer"):
        LearningRateProbe(input_zeroer=3)


# ---- end to end: the loss monitor's triggers and the probe's verdict in one fit --------------------------------
def moons():
    from sklearn.datasets import make_moons

    x, y = make_moons(2000, noise=0.2, random_state=0)
    x = (x - x.mean(0)) / x.std(0)
    return loaders_from(torch.tensor(x, dtype=torch.float32), torch.tensor(y))[0]


def wine():
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return loaders_from(torch.tensor(x, dtype=torch.float32), torch.tensor(y), batch_size=16)[0]


class WaveConv(nn.Module):
    """A 1-D conv net over a sequence of 32 samples, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 5, padding=2), nn.ReLU(),
                               nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x):
        return self.f(x.unsqueeze(1))


def waves(n: int = 1200, length: int = 32):
    """Noisy sine, square and triangle waves of random frequency and phase: which kind is it?"""
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, length)
    freq, phase = 2 + 4 * torch.rand(n, 1, generator=g), 6.28 * torch.rand(n, 1, generator=g)
    kind = torch.randint(0, 3, (n,), generator=g)
    sine = torch.sin(6.28 * freq * t + phase)
    x = torch.where(kind[:, None] == 0, sine, torch.where(kind[:, None] == 1, torch.sign(sine), torch.asin(sine)))
    return loaders_from(x + 0.3 * torch.randn(n, length, generator=g), kind, val_fraction=0)[0]


def seeded(seed, make):
    def build():
        torch.manual_seed(seed)
        return make()
    return build


def four_classes_shuffled():
    loader = four_classes()
    x, y = loader.dataset.tensors
    return loaders_from(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))], val_fraction=0)[0]


def softmax_then_nll(probabilities, y):
    """Legitimate: a model that outputs probabilities, with the log taken in the loss."""
    return F.nll_loss(torch.log(probabilities.clamp_min(1e-12)), y)


# scenario -> (model factory, loader factory, epochs, expected verdict or None for healthy, the request that must lead
# to it). Healthy twins: the same task with the fault removed must raise no warning or error and not run the probe
# (it costs about 100 training steps), except where noted.
END_TO_END = {
    # Adam at lr=0.5: the loss jumps ~10-100x within 3 steps, then recovers; units die on the way
    "moons_adam_lr0.5_spike": (lambda: Classifier(mlp([2, 32, 32, 2]), lr=0.5), moons, 1, "lr_too_high", "loss_spike"),
    "moons_adam_lr1e-2": (lambda: Classifier(mlp([2, 32, 32, 2]), lr=1e-2), moons, 2, None, None),
    "four_classes_adam": (lambda: Classifier(mlp([20, 64, 64, 4]), lr=1e-3), four_classes, 2, None, None),
    # softmax fed to cross-entropy: the loss falls slowly towards a floor far above zero
    "four_classes_softmax_into_cross_entropy": (lambda: Classifier(nn.Sequential(mlp([20, 64, 64, 4]), nn.Softmax(1)),
                                                                   lr=1e-3), four_classes, 2, "suspected_code_bug",
                                                "probability_outputs"),
    # the same bug on 3 classes: the loss quickly flattens at its floor ln(e + 2) - 1 = 0.55, which is half of ln 3, so
    # "no learning rate fits the batch" alone cannot tell (the best factor removes 50%); the floor can
    "wine_softmax_into_cross_entropy": (lambda: Classifier(nn.Sequential(mlp([13, 32, 3]), nn.Softmax(1)), lr=0.05,
                                                           optimizer="sgd", momentum=0.9), wine, 6, "suspected_code_bug",
                                        "probability_outputs"),
    # SGD+momentum at lr=20: the loss bursts in the first steps; replayed from the start, 1x diverges on the batch and
    # 1/100 of it lowers the loss without fitting the batch in the probe's 30 steps (this initialization)
    "waves_conv1d_sgd_lr20_spike": (seeded(1002, lambda: Classifier(WaveConv(), lr=20.0, optimizer="sgd", momentum=0.9)),
                                    waves, 1, "lr_too_high", "loss_spike"),
    "waves_conv1d_sgd_lr0.05": (seeded(1002, lambda: Classifier(WaveConv(), lr=0.05, optimizer="sgd", momentum=0.9)),
                                waves, 2, None, None),
    "wine_sgd_momentum": (lambda: Classifier(mlp([13, 32, 3]), lr=0.05, optimizer="sgd", momentum=0.9), wine, 6, None,
                          None),
}


def run_end_to_end(tmp_path, make_model, make_loader, epochs):
    diagnostics = Diagnostics(gradients=False, activations=False, fit=False, setup_check=False, data=False,
                              console=False, jsonl=False, tensorboard=False,
                              lr_probe=LearningRateProbe(budget_fraction=None))  # short fits: the verdict, not the cost
    torch.manual_seed(1000)  # the model's initialization
    model, loader = make_model(), make_loader()
    fit(tmp_path, model, loader, None, [diagnostics], max_epochs=epochs, logger=False)
    return diagnostics, diagnostics.monitor(LearningRateProbe)


@pytest.mark.parametrize("name", list(END_TO_END))
def test_loss_monitor_triggers_reach_the_right_verdict(tmp_path, name):
    make_model, make_loader, epochs, expected, reason = END_TO_END[name]
    diagnostics, probe = run_end_to_end(tmp_path, make_model, make_loader, epochs)
    detail = "; ".join(f"{f.severity.value} {f.code}: {f.message}" for f in diagnostics.findings)
    if expected is None:
        assert not codes(diagnostics.findings), detail
        assert probe.results == [] and diagnostics.context.probe_requests == [], detail
        return
    assert codes(diagnostics.findings) & VERDICTS == {expected}, detail
    finding = next(f for f in diagnostics.findings if f.code == expected)
    assert finding.evidence["trigger"] == reason, detail
    if reason == "loss_spike":  # replayed from the weights saved before the burst
        assert probe.results[0].from_snapshot and "probed from the weights of step 0" in finding.message
        assert finding.evidence["loss_fraction@x1"] == "diverged" and finding.evidence["suggested_lr"] < 0.5
        spike = next(f for f in diagnostics.findings if f.code == "loss_diverging")
        assert spike.severity.value == "info" and spike.evidence["ratio_to_start"] > 3
    if reason == "probability_outputs":
        assert "softmax" in finding.advice.split("(2)")[0]
        assert len(probe.results) == 1  # asked once, after the warm-up
    if reason == "loss_stalled":
        assert "labels line up with inputs" in finding.advice.split("(2)")[0]


def test_misaligned_labels_wait_for_the_validation_loss(tmp_path):
    """One probe on shuffled labels sees what a learnable task on its initial plateau shows too: an info, no verdict."""
    probe, _ = scenario_result(tmp_path, "labels_shuffled")
    assert not codes(probe.findings, "info") & VERDICTS
    waiting = next(f for f in probe.findings if f.code == "probe_skipped")
    assert waiting.severity.value == "info" and "plateau" in waiting.message and "validation loss" in waiting.message
    assert waiting.evidence["awaiting_validation"] == 1 and "labels line up with inputs" in waiting.advice
    assert probe._labels_pending is not None and probe._labels_pending["step"] == 100


def test_a_second_probe_on_misaligned_labels_waits_too(tmp_path):
    """Two requests, two probes that both see the misaligned-labels evidence: neither is a verdict before the
    validation loss confirms it; the first sighting is the one that waits."""
    pl.seed_everything(0)
    model, loader = Classifier(mlp([64, 64, 10]), lr=1e-3), shuffled_digits()
    probe = LearningRateProbe(budget_fraction=None)
    askers = [Asker(100, "loss_stalled"), Asker(120, "loss_plateau")]
    for asker in askers:
        asker._attach(probe.context)
    fit(tmp_path, model, loader, None, [*askers, probe], max_epochs=6, logger=False)
    detail = "; ".join(f"{f.severity.value} {f.code}@{f.step}: {f.message}" for f in probe.findings)
    assert len(probe.results) == 2, detail
    assert not codes(probe.findings, "info") & VERDICTS, detail
    assert probe._labels_pending is not None and probe._labels_pending["step"] == 100


def xor_of_signs(n: int = 4000):
    """Learnable (two sign bits of 12 Gaussian features, XOR): a small tanh MLP under Adam at 1e-3 stays at chance for
    about 500 steps, then learns to 96% (measured over 5000 steps)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    return x, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()


def test_misaligned_labels_confirmed_by_the_validation_loss_not_on_a_plateau(tmp_path):
    """Shuffled digits: the model memorizes its training samples while the validation loss stays put, so the deferred
    verdict becomes a code bug. Its twin, a learnable task still on its plateau at the end of the fit (XOR with a
    tanh MLP, 500 steps), shows the same probe evidence at step 50 and gets no code bug at any severity."""
    x, y = digits_tensors()
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    diagnostics = Diagnostics(console=False, lr_probe=LearningRateProbe(budget_fraction=None))
    pl.seed_everything(0)
    fit(tmp_path / "shuffled", Classifier(mlp([64, 64, 10]), lr=1e-3), *loaders_from(x, y), [diagnostics],
        max_epochs=14, logger=False)
    detail = "; ".join(f"{f.severity.value} {f.code}@{f.step}: {f.message}" for f in diagnostics.findings)
    waiting = next(f for f in diagnostics.findings if f.code == "probe_skipped")
    bug = next(f for f in diagnostics.findings if f.code == "suspected_code_bug")
    assert bug.severity.value == "error" and bug.step > waiting.step, detail
    assert "memorizes its training samples" in bug.message and "freshly initialized copy fails the same way" in bug.message
    ev = bug.evidence
    assert ev["train_loss_now"] <= 0.9 * ev["val_loss_now"] and ev["val_loss_now"] >= 0.99 * ev["val_loss_then"]
    assert "labels line up with inputs" in bug.advice.split("(2)")[0] and "awaiting_validation" not in ev

    twin = Diagnostics(console=False, lr_probe=LearningRateProbe(budget_fraction=None))
    pl.seed_everything(0)
    fit(tmp_path / "xor", Classifier(mlp([12, 16, 2], nn.Tanh), lr=1e-3), *loaders_from(*xor_of_signs()), [twin],
        max_epochs=10, logger=False)
    detail = "; ".join(f"{f.severity.value} {f.code}@{f.step}: {f.message}" for f in twin.findings)
    assert not codes(twin.findings, "info") & VERDICTS, detail
    assert any(f.code == "probe_skipped" and "plateau" in f.message for f in twin.findings), detail


def test_confirm_labels_decides_as_documented():
    from diag.detectors.lr_probe import confirm_labels

    assert confirm_labels(2.30, 2.05, 2.32) is True  # memorized, the validation loss stayed put
    assert confirm_labels(2.30, 2.10, 2.32) is None  # not memorized enough yet (2.10 > 0.9 * 2.32)
    assert confirm_labels(2.30, 1.00, 2.05) is False  # the validation loss fell 11%: the run learns from its inputs
    assert confirm_labels(2.30, 1.90, 2.20) is None  # the validation loss fell 4%: neither
    assert confirm_labels(float("nan"), 1.0, 2.0) is None and confirm_labels(2.3, float("nan"), 2.0) is None


class Tagger(nn.Module):
    """Embedding, LSTM, a tag per position: (N, T) tokens -> (N, tags, T) logits (causal: position t sees 0..t)."""

    def __init__(self, vocab: int = 12, tags: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, tags)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0]).transpose(1, 2)


def tags_one_ahead(ahead: bool, n: int = 2000, length: int = 13):
    """tag[t] = token[t] mod 4 on i.i.d. tokens; ``ahead``: a language model's shift applied to a tagger (the inputs
    s[:, :-1] with the tags of s[:, 1:]), so each label belongs to the next, unseen token."""
    tokens = torch.randint(0, 12, (n, length), generator=torch.Generator().manual_seed(0))
    tags = tokens % 4
    return (tokens[:, :-1], tags[:, 1:]) if ahead else (tokens[:, :-1], tags[:, :-1])


def test_labels_one_position_ahead_are_named_at_once(tmp_path):
    """A causal tagger whose labels are one position ahead never memorizes them (the validation loss could not confirm
    it for thousands of steps); rolled back into place, a fresh copy learns them on the probe's batch: the verdict names
    the shift. Its healthy twin (labels aligned) gets no verdict."""
    runs, models = {}, {}
    for ahead in (True, False):
        diagnostics = Diagnostics(console=False, lr_probe=LearningRateProbe(budget_fraction=None))
        pl.seed_everything(0)
        models[ahead] = Classifier(Tagger(), lr=3e-3, loss_fn=F.cross_entropy)
        fit(tmp_path / str(ahead), models[ahead], *loaders_from(*tags_one_ahead(ahead)), [diagnostics], max_steps=120,
            logger=False)
        runs[ahead] = diagnostics.findings
    # the probe's sweeps, the fresh-copy control and the two shifted-label sweeps left training bitwise unchanged
    pl.seed_everything(0)
    unwatched = Classifier(Tagger(), lr=3e-3, loss_fn=F.cross_entropy)
    fit(tmp_path / "unwatched", unwatched, *loaders_from(*tags_one_ahead(True)), [], max_steps=120, logger=False)
    assert state_equal(unwatched, models[True])
    detail = "; ".join(f"{f.severity.value} {f.code}@{f.step}: {f.message}" for f in runs[True])
    bug = next((f for f in runs[True] if f.code == "suspected_code_bug"), None)
    assert bug is not None and bug.severity.value == "error", detail
    assert bug.evidence["labels_shift"] == 1 and "one position ahead of their inputs" in bug.message, detail
    assert "position by position" in bug.advice
    assert not codes(runs[False], "info") & VERDICTS


def test_carries_over_against_the_labels_as_they_are():
    """The shifted labels must carry over to the held-out half (to 0.9 of its start at most) and 10% better than the
    same fresh copy on the labels as they are; a rate that blows the held-out half up (3x) does not count."""
    from diag.detectors.lr_probe import carries_over, heldout_best
    from diag.probe import FactorResult, ProbeResult

    def result(*heldout):
        factors = [FactorResult(f, f, 1.4, 0.1, h, 30, False, 1.4, 1.4) for f, h in zip((0.1, 1.0, 10.0), heldout)]
        return ProbeResult(1.0, 30, 16, 16, 1.4, 1.4, factors, zero_input_start_loss=1.4)

    shifted, flat, learns, blown = result(1.3, 0.5, 5.0), result(1.4, 1.39, 1.5), result(1.4, 0.52, 2.0), \
        result(1.4, 1.35, 9.0)
    assert heldout_best(shifted) == pytest.approx(0.5 / 1.4)  # 5.0 is a blow-up (over 3x): left out
    assert carries_over(shifted) and carries_over(shifted, baseline=flat)
    assert not carries_over(shifted, baseline=learns)  # the labels as they are carry over almost as far (0.37x)
    assert not carries_over(blown) and not carries_over(flat)


def test_sequence_labels_leaves_next_token_targets_alone():
    from diag.detectors.lr_probe import sequence_labels

    s = torch.randint(0, 12, (8, 10), generator=torch.Generator().manual_seed(0))
    assert not sequence_labels(s[:, :-1], s[:, 1:])  # a language model: rolled back, its targets would be its inputs
    assert sequence_labels(s[:, :-1], (s % 4)[:, 1:])  # a tagger's labels
    assert sequence_labels(torch.randn(8, 9, 5), (s % 4)[:, 1:])  # per-position features
    assert not sequence_labels(torch.randn(8, 64), s[:, 0])  # one label per sample
    assert not sequence_labels(s[:, :3], (s % 4)[:, :3])  # too short to be a sequence
    assert not sequence_labels(torch.randn(8, 9, 5), torch.randn(8, 9))  # per-position regression


class WarmedUp(Classifier):
    """AdamW with a linear warm-up over ``steps`` optimizer steps from 1e-4 of ``lr`` to ``lr`` (stepped per batch)."""

    def __init__(self, lr: float, steps: int = 500) -> None:
        super().__init__(mlp([64, 128, 10]), lr, "adamw")
        self.steps = steps

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        warm = torch.optim.lr_scheduler.LinearLR(opt, 1e-4, 1.0, total_iters=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}


def test_a_warm_up_is_not_a_too_low_rate(tmp_path):
    """Probed at step 23 of a warm-up to 1e-3 (the gradient monitor's update_too_small asks), the current rate is too low
    by design: an info that says the schedule is raising it. The same warm-up to a peak of 1e-6, far below the rate the
    probe suggests, stays a warning."""
    found = {}
    for peak in (1e-3, 1e-6):
        diagnostics = Diagnostics(console=False, lr_probe=LearningRateProbe(budget_fraction=None))
        pl.seed_everything(0)
        fit(tmp_path / str(peak), WarmedUp(peak), *digits_loaders(), [diagnostics], max_steps=60, logger=False)
        found[peak] = [f for f in diagnostics.findings if f.code == "lr_too_low"]
    detail = {k: [(f.severity.value, f.step, f.message) for f in v] for k, v in found.items()}
    assert [f.severity.value for f in found[1e-3]] == ["info"], detail
    tempered = found[1e-3][0]
    assert "still warming up" in tempered.message and tempered.evidence["warmup_peak_lr"] == pytest.approx(1e-3)
    assert tempered.evidence["suggested_lr"] < 10 * 1e-3
    assert [f.severity.value for f in found[1e-6]] == ["warning"], detail


def test_scheduled_peak_lr_reads_every_torch_schedule():
    from diag.probe import scheduled_peak_lr

    def optimizer():
        return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)

    plain = optimizer()
    assert scheduled_peak_lr(plain) == pytest.approx(0.1)
    warm = optimizer()
    torch.optim.lr_scheduler.LinearLR(warm, 0.01, 1.0, total_iters=10)
    assert warm.param_groups[0]["lr"] == pytest.approx(0.001) and scheduled_peak_lr(warm) == pytest.approx(0.1)
    cycle = optimizer()
    torch.optim.lr_scheduler.OneCycleLR(cycle, max_lr=0.5, total_steps=100)
    assert scheduled_peak_lr(cycle) == pytest.approx(0.5)
    decayed = optimizer()
    step = torch.optim.lr_scheduler.StepLR(decayed, 1, gamma=0.1)
    decayed.step()
    step.step()
    assert scheduled_peak_lr(decayed) == pytest.approx(0.1)  # the base rate, which temper_warmup uses only while rising


def test_temper_warmup_only_while_rising_and_within_ten_times():
    from diag.detectors import Verdict
    from diag.detectors.lr_probe import temper_warmup

    low = Verdict("lr_too_low", "use about 0.0005.", "Raise it.", {"suggested_lr": 5e-4}, suggested_lr=5e-4)
    assert temper_warmup(low, 5e-5, 1e-7, 1e-3).severity == "info"  # warming up towards 1e-3
    assert temper_warmup(low, 5e-5, 1e-7, 1e-5).severity is None  # the peak 50x below the suggestion: still too low
    assert temper_warmup(low, 5e-5, 1e-3, 1e-3).severity is None  # the rate fell since the start: a decay, not a warm-up
    high = Verdict("lr_too_high", "m", "a", {}, suggested_lr=1e-4)
    assert temper_warmup(high, 5e-5, 1e-7, 1e-3) is high


def test_cross_entropy_floor_on_probabilities_matches_brute_force():
    from diag.detectors.lr_probe import cross_entropy_floor_on_probabilities

    for classes in (2, 3, 4, 10):
        floor = cross_entropy_floor_on_probabilities(classes)
        one_hot = torch.eye(classes)  # each row predicts its own class with probability 1
        assert F.cross_entropy(one_hot, torch.arange(classes)).item() == pytest.approx(floor, rel=1e-6)
        g = torch.Generator().manual_seed(classes)
        rows = torch.distributions.Dirichlet(torch.full((classes,), 0.3)).sample((5000,))
        targets = torch.randint(0, classes, (5000,), generator=g)
        per_sample = F.cross_entropy(rows, targets, reduction="none")
        assert per_sample.min().item() >= floor - 1e-6  # no probability row scores below it


def test_probability_outputs_with_the_log_in_the_loss_are_no_bug(tmp_path):
    """A model may output probabilities legitimately: the monitor asks the probe (once) and the probe clears it."""
    make = lambda: Classifier(nn.Sequential(mlp([20, 64, 64, 4]), nn.Softmax(1)), lr=1e-3,  # noqa: E731
                              loss_fn=softmax_then_nll)
    diagnostics, probe = run_end_to_end(tmp_path, make, four_classes, 2)
    assert not codes(diagnostics.findings), [f.message for f in diagnostics.findings]
    assert len(probe.results) <= 1


def test_a_request_wakes_the_sleeping_probe_inside_diagnostics(tmp_path):
    """Inside Diagnostics the probe is not called between snapshot refreshes; a request from another monitor wakes it
    for the batch under way, so it runs at the step it was asked at, as when it is called every step."""
    steps_run = {}
    for composed in (False, True):
        probe = LearningRateProbe(max_probes=1, budget_fraction=None)
        calls = count_calls(probe, "on_train_batch_end")
        callback = Diagnostics(console=False, lr_probe=probe, gradients=False, loss_curve=False, activations=False,
                               fit=False, data=False, setup_check=False) if composed else probe
        asker = Asker(at=5, reason="loss_diverging")
        asker._attach(callback.context)
        pl.seed_everything(0)
        model = Classifier(mlp([64, 64, 10]), lr=3.0, optimizer="adam")
        fit(tmp_path / str(composed), model, digits(), None, [asker, callback], max_epochs=1, logger=False)
        assert len(probe.results) == 1 and "lr_too_high" in codes(probe.findings)
        steps_run[composed] = [f.step for f in probe.findings if f.code == "lr_too_high"]
        if composed:
            assert 2 <= len(calls) < 10  # the first batch (start snapshot's loss), the asked one
        else:
            assert len(calls) >= 15
    assert steps_run[True] == steps_run[False] == [5]


def test_a_request_from_a_composed_monitor_wakes_the_probe_in_the_same_batch(tmp_path):
    """A monitor inside Diagnostics that asks for a probe in ``on_train_batch_end`` (as the loss monitor does) wakes
    the sleeping probe for the same batch: the probe runs at the step it was asked at."""
    from diag.callbacks import SetupCheck

    class AskingCheck(SetupCheck):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                self._context.request_probe("loss_diverging")

    probe = LearningRateProbe(max_probes=1, budget_fraction=None)
    diagnostics = Diagnostics(console=False, setup_check=AskingCheck(), lr_probe=probe, gradients=False,
                              loss_curve=False, activations=False, fit=False, data=False)
    pl.seed_everything(0)
    model = Classifier(mlp([64, 64, 10]), lr=3.0, optimizer="adam")
    fit(tmp_path, model, digits(), None, [diagnostics], max_epochs=1, logger=False)
    assert len(probe.results) == 1
    assert [f.step for f in probe.findings if f.code == "lr_too_high"] == [5]


class DecayedPerBatch(Classifier):
    """SGD with momentum at 0.05 under StepLR(step_size=1, gamma=0.8) returned with ``"interval": "step"``: a per-epoch
    decay stepped every batch (the rate is 1e-4 by step 28, 1e-10 by step 90); with ``"epoch"`` the same schedule is
    healthy."""

    def __init__(self, interval: str) -> None:
        super().__init__(mlp([64, 128, 10]), 0.05, "sgd")
        self.interval = interval

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        decay = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": self.interval}}


def _verdicts(tmp_path, make, seed=0, **kwargs):
    """``make()`` builds the module after the seed (its initialization is part of the run)."""
    diagnostics = Diagnostics(console=False, lr_probe=LearningRateProbe(budget_fraction=None))
    pl.seed_everything(seed)
    module = make()
    fit(tmp_path, module, *digits_loaders(), [diagnostics], logger=False, seed=seed, **kwargs)
    return [f for f in diagnostics.findings if f.code in VERDICTS], diagnostics


def test_a_rate_far_below_every_useful_one_is_too_low_not_a_code_bug(tmp_path):
    """At a rate so small that the whole sweep (up to 1e5x of it) only moves the loss in proportion to the rate, "no
    learning rate fits" and "the loss ignores the input" say nothing: both used to make a code bug (an error), and a
    schedule that decayed the rate made the re-probe from step 0's weights call it "wrecked, use 1.2e-11". Now:
    lr_too_low, naming the schedule when one lowered the rate. The same schedule stepped per epoch stays silent."""
    decayed, _ = _verdicts(tmp_path / "step", lambda: DecayedPerBatch("step"), max_epochs=6)
    detail = [(f.code, f.step, f.message) for f in decayed]
    assert [f.code for f in decayed] == ["lr_too_low"] and decayed[0].severity.value == "warning", detail
    assert "Every learning rate tried is too small" in decayed[0].message and "schedule has lowered it" in decayed[0].message
    assert decayed[0].evidence["schedule_start_lr"] == pytest.approx(0.05) and "interval" in decayed[0].advice
    assert decayed[0].evidence["suggested_lr"] > 1e3 * decayed[0].evidence["current_lr"]
    constant, _ = _verdicts(tmp_path / "tiny", lambda: Classifier(mlp([64, 128, 10]), 1e-9, "sgd"), max_epochs=3)
    assert [f.code for f in constant] == ["lr_too_low"], [(f.code, f.message) for f in constant]
    assert "schedule" not in constant[0].message
    healthy, diagnostics = _verdicts(tmp_path / "epoch", lambda: DecayedPerBatch("epoch"), max_epochs=6)
    assert not healthy and not codes(diagnostics.findings), [(f.code, f.message) for f in diagnostics.findings]


def test_below_useful_rates_only_where_every_rate_is_too_small():
    from diag.detectors.lr_probe import below_useful_rates
    from diag.probe import FactorResult, ProbeResult

    def result(progress, diverged=(), missing=()):
        factors = [FactorResult(f, 1e-9 * f, 2.3, 2.3 * (1 - p), 2.3, 30, f in diverged, 2.3, 2.3)
                   for f, p in progress.items()]
        return ProbeResult(1e-9, 30, 16, 16, 2.3, 2.3, factors, zero_input_start_loss=2.3,
                           params_without_gradient=list(missing))

    decades = [1e-2, 1e-1, 1.0, 1e1, 1e2]
    assert below_useful_rates(result({f: 2e-5 * f for f in decades}))  # in proportion to the rate
    assert below_useful_rates(result({f: 0.0 for f in decades}))  # not moved at all, every parameter with a gradient
    assert not below_useful_rates(result({f: 0.0 for f in decades}, missing=["net.0.weight"]))  # a cut graph
    assert not below_useful_rates(result(dict(zip(decades, [0.01, 0.05, 0.07, 0.08, 0.08]))))  # an ignored input: flat
    assert not below_useful_rates(result({f: 2e-3 * f for f in decades}, diverged={1e2}))  # the top rate diverges
    assert not below_useful_rates(result(dict(zip(decades, [0.001, 0.01, 0.1, 0.6, 0.9]))))  # the batch fits


def test_a_sweep_from_a_snapshot_runs_at_the_current_rate():
    """A schedule may have moved the rate since the snapshot; the sweep from its weights must use the rates of the sweep
    from the current ones (``load_state_dict`` would bring back the snapshot's), and keep the snapshot's momenta."""
    from diag.probe import clone_optimizer

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    old = copy.deepcopy(opt.state_dict())
    for group in opt.param_groups:
        group["lr"], group["momentum"] = 1e-6, 0.5
    clone = clone_optimizer(opt, old, 10.0)
    assert clone.param_groups[0]["lr"] == pytest.approx(1e-5) and clone.param_groups[0]["momentum"] == 0.5
    assert torch.equal(clone.state_dict()["state"][0]["momentum_buffer"], old["state"][0]["momentum_buffer"])
    assert opt.param_groups[0]["lr"] == 1e-6  # the user's optimizer untouched


class WarmUpTo(Classifier):
    """SGD with momentum and a linear warm-up from 1/100 of ``lr`` over 50 steps (stepped per batch)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        warm = torch.optim.lr_scheduler.LinearLR(opt, 0.01, 1.0, total_iters=50)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}


def test_a_warm_up_to_a_rate_too_high_is_probed_from_the_snapshot_at_the_current_rate(tmp_path):
    """A warm-up to SGD at 3.0 blows the digits MLP up by step 23; the probe goes back to step 0's weights. It used to
    sweep them at step 0's rate (0.03, restored with the snapshot's optimizer state) while reporting the current one,
    and gave no verdict; at the current rate 1/100 of it fits and 1x diverges: lr_too_high, about 0.01-0.03."""
    found, _ = _verdicts(tmp_path, lambda: WarmUpTo(mlp([64, 128, 128, 10]), 3.0, "sgd"), max_steps=60)
    assert [f.code for f in found] == ["lr_too_high"], [(f.code, f.message) for f in found]
    assert "probed from the weights of step 0" in found[0].message
    assert 3e-3 <= found[0].evidence["suggested_lr"] <= 0.1


class WithLBFGS(Classifier):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=self.lr, max_iter=5)


def test_an_optimizer_that_needs_a_closure_is_probed_and_training_unchanged(tmp_path):
    """LBFGS's step requires a closure (Lightning passes one): the probe's sweep used to call ``step()`` bare and the
    probe switched itself off with an internal error. It now passes a closure where the step requires one; the run
    is bitwise the one without the probe."""
    from diag.probe import step_needs_closure

    params = list(nn.Linear(2, 2).parameters())
    assert step_needs_closure(torch.optim.LBFGS(params)) and not step_needs_closure(torch.optim.SGD(params, lr=0.1))
    models = []
    for watched in (False, True):
        pl.seed_everything(0)
        model = WithLBFGS(mlp([64, 32, 10]), 0.5)
        probe = LearningRateProbe(budget_fraction=None)
        asker = Asker(at=6)
        asker._attach(probe.context)
        fit(tmp_path / str(watched), model, digits_loaders()[0], None, [asker, probe] if watched else [], max_steps=12,
            logger=False)
        models.append(model)
    assert len(probe.results) == 1, [(f.code, f.message) for f in probe.findings]
    assert "diag_internal_error" not in {f.code for f in probe.findings}
    assert state_equal(*models)


class Smoothed(Classifier):
    """Cross-entropy with label_smoothing=0.9: on 10 classes its loss cannot fall below 2.17 (from ln 10 = 2.30)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=0.9)
        self.log("train_loss", loss)
        return loss


def test_a_loss_with_a_high_floor_is_no_code_bug_when_the_input_decides_the_predictions(tmp_path):
    """Label smoothing 0.9: after its plateau the probe sees the loss fall 1% at every rate and the real inputs beat the
    zeroed ones by 1.5% only, which made a code bug. Fitted, the model predicts every label of the batch from its input
    (argmax) and almost none with the inputs zeroed: the loss has a floor; no verdict."""
    found, diagnostics = _verdicts(tmp_path, lambda: Smoothed(mlp([64, 128, 10]), 1e-3), max_epochs=4)
    probe = diagnostics.monitor(LearningRateProbe)
    assert probe.results, "the plateau did not ask for the probe"
    evidence = probe.results[0].evidence()
    assert evidence["real_input_accuracy_after_fit"] >= 0.9 and evidence["zero_input_accuracy_after_fit"] <= 0.5
    assert max(r.progress for r in probe.results[0].factors) < 0.1  # by the loss, nothing "fits"
    assert not found, [(f.code, f.message) for f in found]


def test_class_accuracy_matches_brute_force():
    from diag.probe import class_accuracy

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    brute = sum(int(max(range(5), key=lambda c: logits[i, c]) == labels[i]) for i in range(16)) / 16
    assert class_accuracy(logits, labels) == pytest.approx(brute)
    seq, tags = torch.randn(4, 7, 3, generator=g), torch.randint(0, 3, (4, 7), generator=g)
    brute = sum(int(max(range(3), key=lambda c: seq[i, t, c]) == tags[i, t]) for i in range(4) for t in range(7)) / 28
    assert class_accuracy(seq, tags) == pytest.approx(brute)  # classes last
    assert class_accuracy(seq.transpose(1, 2), tags) == pytest.approx(brute)  # classes at dim 1 (F.cross_entropy)
    assert math.isnan(class_accuracy(torch.randn(16, 1), torch.randn(16)))  # regression
    assert math.isnan(class_accuracy(logits, torch.softmax(logits, 1)))  # soft targets
    assert class_accuracy((logits, "aux"), labels) == class_accuracy(logits, labels)  # the main output of several
