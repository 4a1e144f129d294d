"""FitMonitor: underfitting, overfitting and early stopping on real fits; the bounded history against brute force."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L
import pytorch_lightning as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diag.callbacks import FitMonitor
from diag.detectors import fit as rules
from diag.stats.fit import ClassCountEstimator, FitHistory, RunningMean
from tests.helpers import (Classifier, LClassifier, assert_silent, codes, digits_loaders, digits_tensors, fit,
                           loaders_from, mlp, spirals, state_equal, trainer)


# ---- runs ---------------------------------------------------------------------------------------------
def few_digits_loaders(n_train=40, batch_size=8):
    """A few dozen training digits (the rest of the 1797 for validation): a large MLP memorizes them."""
    x, y = digits_tensors()
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=256)
    return train, val


def few_spirals_loaders(n_train=40):
    x, y = spirals(1000, noise=0.2)
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=8, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(x[500:], y[500:]), batch_size=256)
    return train, val


def only(findings, code):
    found = [f for f in findings if f.code == code]
    assert len(found) == 1, findings
    return found[0]


class SlashNames(Classifier):
    """Logs ``train/loss`` and ``val/loss`` (the TensorBoard-style names) instead of ``train_loss``/``val_loss``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", self.loss_fn(self(x), y))


class OddNames(Classifier):
    """Logs the validation loss under a name no heuristic recognizes; the training loss is not logged at all."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("holdout_nll", self.loss_fn(self(x), y))


class RecordsLosses(Classifier):
    """Logs nothing in training; records every training loss to check the monitor's own mean against."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss


# ---- underfitting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[2, 2], [2, 3, 2]], ids=["linear", "mlp_2_3_2"])
def test_model_too_small_for_spirals_underfits(tmp_path, sizes):
    train, val = loaders_from(*spirals(1000), batch_size=64)
    monitor = FitMonitor()
    fit(tmp_path, Classifier(mlp(sizes), lr=1e-2), train, val, [monitor], max_epochs=14, logger=False)
    finding = only(monitor.findings, "underfitting")
    assert finding.severity.value == "warning"
    assert finding.evidence["reference"] == "chance_level"  # ln 2 from the targets, confirmed by the first loss
    assert finding.evidence["fraction_of_reference"] > 0.85
    assert abs(finding.evidence["relative_gap"]) < 0.05
    assert "wider" in finding.advice and "deeper" in finding.advice
    assert "overfitting" not in codes(monitor.findings, "info")


def test_wide_model_on_spirals_is_silent(tmp_path):
    train, val = loaders_from(*spirals(1000), batch_size=64)
    monitor = FitMonitor()
    fit(tmp_path, Classifier(mlp([2, 128, 128, 2]), lr=1e-2), train, val, [monitor], max_epochs=20, logger=False)
    assert_silent(monitor.findings)
    assert not {"underfitting", "overfitting"} & codes(monitor.findings, "info")


def test_noisy_labels_with_a_large_enough_model_are_only_a_hint(tmp_path):
    """Two moons with heavy label noise: the loss stalls high for lack of signal, not of capacity (healthy)."""
    from sklearn.datasets import make_moons

    x, y = make_moons(1000, noise=1.0, random_state=0)
    x = (x - x.mean(0)) / x.std(0)
    train, val = loaders_from(torch.tensor(x, dtype=torch.float32), torch.tensor(y), batch_size=64)
    monitor = FitMonitor()
    fit(tmp_path, Classifier(mlp([2, 64, 64, 2]), lr=1e-2), train, val, [monitor], max_epochs=14, logger=False)
    assert_silent(monitor.findings)
    hint = only(monitor.findings, "underfitting")
    assert hint.severity.value == "info" and hint.evidence["parameters_per_sample"] >= 2
    assert "memorize" in hint.advice


def test_no_validation_loop_says_so_once_and_judges_training_only(tmp_path):
    train, _ = loaders_from(*spirals(1000), batch_size=64)
    monitor = FitMonitor()
    fit(tmp_path, Classifier(mlp([2, 2]), lr=1e-2), train, None, [monitor], max_epochs=12, logger=False)
    assert_silent(monitor.findings)
    assert [f.code for f in monitor.findings].count("no_validation_metric") == 1
    # from the training loss alone an underfit is only a hint
    assert only(monitor.findings, "underfitting").severity.value == "info"
    assert monitor.history.count == 0 and monitor.train_history.count == 12


def test_healthy_run_without_validation_only_says_there_is_none(tmp_path):
    train, _ = digits_loaders(n_train=1400)
    monitor = FitMonitor()
    fit(tmp_path, Classifier(mlp([64, 32, 10]), lr=1e-3), train, None, [monitor], max_epochs=2, logger=False)
    assert [(f.code, f.severity.value) for f in monitor.findings] == [("no_validation_metric", "info")]


# ---- overfitting and early stopping -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["digits", "spirals"])
def test_large_mlp_on_few_samples_overfits(tmp_path, case):
    if case == "digits":
        (train, val), module = few_digits_loaders(), LClassifier(mlp([64, 256, 256, 10]), lr=1e-2)
    else:
        (train, val), module = few_spirals_loaders(), LClassifier(mlp([2, 256, 256, 2]), lr=1e-2)
    monitor = FitMonitor()
    logger = L.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    fit(tmp_path, module, train, val, [monitor], max_epochs=14, namespace=L, logger=logger)
    over = only(monitor.findings, "overfitting")
    assert over.severity.value == "warning"
    ev = over.evidence
    assert ev["generalization_loss_percent"] >= rules.OVERFIT_GL_WARNING
    assert ev["current_train"] < ev["train_at_best"] and ev["generalization_gap"] > 0
    assert ev["best_epoch"] == monitor.history.best.epoch
    stop = only(monitor.findings, "early_stop_suggested")
    assert stop.severity.value == "warning"
    assert 'EarlyStopping(monitor="val_loss", mode="min", patience=5)' in stop.advice
    assert 'ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1)' in stop.advice
    assert "second descent" in stop.advice
    assert "underfitting" not in codes(monitor.findings, "info")
    assert "val_never_below_chance" not in ev and "validation data" not in over.advice  # it generalized first
    # the scalars, read back from the event files
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"diag/generalization_gap", "diag/train_loss", "diag/val_loss", "diag/best_val_epoch"} <= tags
    gaps = [e.value for e in acc.Scalars("diag/generalization_gap")]
    assert len(gaps) == 14
    last = monitor.history.last
    assert gaps[-1] == pytest.approx(last.val - last.train, rel=1e-5)
    assert acc.Scalars("diag/best_val_epoch")[-1].value == monitor.history.best.epoch


def test_validation_labels_that_do_not_line_up_are_named_with_the_overfitting(tmp_path):
    """Validation labels permuted: the training loss falls, the validation loss never gets below ln C and then rises.
    The overfitting rule fires (it is true), and says that nothing carries over, which overfitting alone does not
    explain: check the validation data first."""
    train, val = digits_loaders()
    x, y = val.dataset.tensors
    permuted = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    val = DataLoader(TensorDataset(x, permuted), batch_size=64)
    monitor = FitMonitor()
    fit(tmp_path, Classifier(mlp([64, 128, 10]), lr=1e-3), train, val, [monitor], max_epochs=10, logger=False)
    over = only(monitor.findings, "overfitting")
    assert over.severity.value == "warning"
    assert all(e.val >= math.log(10) for e in monitor.history.recent)  # (brute force over the history)
    assert over.evidence["val_never_below_chance"] == pytest.approx(math.log(10), rel=1e-3)
    assert "never below the chance level" in over.message and over.advice.startswith("First check the validation data")


def test_large_mlp_with_enough_data_is_silent(tmp_path):
    train, val = digits_loaders(n_train=1400, batch_size=128)
    monitor = FitMonitor()
    fit(tmp_path, Classifier(mlp([64, 256, 256, 10]), lr=1e-3), train, val, [monitor], max_epochs=20, logger=False)
    assert_silent(monitor.findings)  # early_stop_suggested / a GL5 overfitting hint may appear as info


def test_one_epoch_still_improving_is_silent(tmp_path):
    train, val = digits_loaders(batch_size=32)
    monitor = FitMonitor()
    fit(tmp_path, Classifier(mlp([64, 32, 10]), lr=3e-4), train, val, [monitor], max_epochs=1, logger=False)
    assert monitor.findings == [] and monitor.history.count == 1


def test_dropout_model_with_val_below_train_is_silent(tmp_path):
    train, val = digits_loaders(n_train=1400)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 128), nn.ReLU(),
                        nn.Dropout(0.5), nn.Linear(128, 10))
    monitor = FitMonitor()
    fit(tmp_path, Classifier(net, lr=1e-3), train, val, [monitor], max_epochs=10, logger=False)
    assert monitor.history.last.val < monitor.history.last.train  # the twin really has val below train
    assert not {"underfitting", "overfitting"} & codes(monitor.findings, "info")
    assert_silent(monitor.findings)


def test_metric_named_val_slash_loss_is_found(tmp_path):
    train, val = few_digits_loaders()
    monitor = FitMonitor()
    fit(tmp_path, SlashNames(mlp([64, 256, 256, 10]), lr=1e-2), train, val, [monitor], max_epochs=12, logger=False,
        num_sanity_val_steps=2)
    assert monitor._val_key == "val/loss"
    assert monitor.history.count == 12  # the sanity check is not an evaluation
    assert monitor.history.last.train == pytest.approx(
        float(monitor._trainer.callback_metrics["train/loss_epoch"]), rel=1e-5)
    assert only(monitor.findings, "overfitting").severity.value == "warning"
    assert 'EarlyStopping(monitor="val/loss", mode="min"' in only(monitor.findings, "early_stop_suggested").advice


def test_monitor_override_and_missing_metric(tmp_path):
    train, val = few_digits_loaders()
    auto = FitMonitor()
    fit(tmp_path, OddNames(mlp([64, 256, 256, 10]), lr=1e-2), train, val, [auto], max_epochs=3, logger=False)
    assert [f.code for f in auto.findings] == ["no_validation_metric"]
    assert "holdout_nll" in auto.findings[0].message

    named = FitMonitor(monitor="holdout_nll", patience=3)
    fit(tmp_path, OddNames(mlp([64, 256, 256, 10]), lr=1e-2), train, val, [named], max_epochs=12, logger=False)
    assert only(named.findings, "overfitting").severity.value == "warning"
    assert only(named.findings, "overfitting").evidence["train_source"] == "training_step loss"
    assert 'EarlyStopping(monitor="holdout_nll", mode="min", patience=3)' in only(named.findings, "early_stop_suggested").advice


def test_existing_early_stopping_changes_the_advice(tmp_path):
    train, val = few_digits_loaders()
    monitor = FitMonitor()
    stopper = pl.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=50)
    fit(tmp_path, Classifier(mlp([64, 256, 256, 10]), lr=1e-2), train, val, [monitor, stopper], max_epochs=12,
        logger=False)
    stop = only(monitor.findings, "early_stop_suggested")
    assert "Add EarlyStopping" not in stop.advice and "Your EarlyStopping (patience=50)" in stop.advice
    assert "ModelCheckpoint(monitor=\"val_loss\"" in stop.advice  # theirs keeps the last weights, not the best
    assert stop.severity.value == "info"  # the user's callback will stop the run


def test_validation_several_times_per_epoch_counts_evaluations(tmp_path):
    train, val = digits_loaders(n_train=1400, batch_size=64)
    model = RecordsLosses(mlp([64, 64, 10]), lr=1e-3)
    monitor = FitMonitor()
    fit(tmp_path, model, train, val, [monitor], max_epochs=3, val_check_interval=0.5, accumulate_grad_batches=2,
        logger=False)
    assert monitor.history.count == 6
    records = list(monitor.history.recent)
    assert [r.epoch for r in records] == [0, 0, 1, 1, 2, 2]
    assert all(b.step > a.step for a, b in zip(records, records[1:]))
    # the training loss of each evaluation is the mean of the returned losses since the previous one (unscaled
    # by accumulate_grad_batches): brute force from the recorded losses
    bounds = [0, 11, 22, 33, 44, 55, 66]  # 22 batches per epoch, validation after 11 and 22
    for record, lo, hi in zip(records, bounds[:-1], bounds[1:]):
        assert record.train == pytest.approx(np.mean(model.losses[lo:hi]), rel=1e-5)
    assert_silent(monitor.findings)


# ---- checkpoints, arguments, side effects ---------------------------------------------------------------
def test_resume_keeps_history_and_reports_nothing_twice(tmp_path):
    train, val = few_digits_loaders()
    first = FitMonitor()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    t = trainer(tmp_path, [first, ckpt], max_epochs=9, enable_checkpointing=True, logger=False)
    pl.seed_everything(0)
    t.fit(Classifier(mlp([64, 256, 256, 10]), lr=1e-2), train, val)
    assert "overfitting" in codes(first.findings)

    second = FitMonitor()
    t2 = trainer(tmp_path, [second], max_epochs=12, enable_checkpointing=True, logger=False)
    t2.fit(Classifier(mlp([64, 256, 256, 10]), lr=1e-2), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.history.count == 12 and second.history.best.epoch == first.history.best.epoch
    assert [f.code for f in second.findings].count("overfitting") == 1
    lines = [json.loads(line) for line in open(second.findings_file)]  # the resumed fit's own folder
    assert [d["code"] for d in lines].count("overfitting") == 1


def test_state_round_trip():
    monitor = FitMonitor(monitor="val_loss")
    for i, v in enumerate([1.0, 0.8, 0.7, 0.75, 0.9]):
        monitor.history.update(i, 10 * i, val=v, train=1.0 - 0.1 * i, accuracy=0.5)
    monitor._first_loss = 2.3
    clone = FitMonitor(monitor="val_loss")
    clone.load_state_dict(monitor.state_dict())
    assert clone.history.state_dict() == monitor.history.state_dict()
    assert clone._first_loss == 2.3 and clone.history.best.val == 0.7


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="maximize"), "`mode` must be 'min'"),
    (dict(patience=0), "`patience` must be an integer >= 1"),
    (dict(monitor=""), "`monitor` must be None or the name"),
    (dict(train_monitor=3), "`train_monitor` must be None"),
])
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FitMonitor(**kwargs)


def test_observing_does_not_change_training(tmp_path):
    weights = []
    for callbacks in ([], [FitMonitor()]):
        train, val = digits_loaders(n_train=512)
        pl.seed_everything(1)
        model = Classifier(mlp([64, 32, 10]), lr=1e-3)
        fit(tmp_path, model, train, val, callbacks, max_epochs=2, logger=False)
        weights.append(model)
    assert state_equal(*weights)


# ---- statistics against brute force --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["min", "max"])
def test_history_matches_brute_force(mode):
    rng = random.Random(0)
    history = FitHistory(mode, maxlen=7)
    vals, trains, epochs = [], [], []
    sign = 1 if mode == "min" else -1
    for i in range(40):
        v, t, e = rng.uniform(0, 2), rng.uniform(0, 2), i // 3
        history.update(e, i, val=v, train=t)
        vals.append(v), trains.append(t), epochs.append(e)
        best = min(range(len(vals)), key=lambda k: (sign * vals[k], k))
        assert history.best.index == best and history.evaluations_since_best == i - best
        for start in range(max(0, i - 6), i + 1):
            if start:
                assert history.best_train_before(start) == min(trains[:start])
                assert history.best_val_before(start) == min(sign * v for v in vals[:start])
            else:
                assert math.isnan(history.best_train_before(0))
        start = history.window_start(3, 2, 6)
        expected = None
        for back in range(3, min(7, i + 1) + 1):
            if epochs[i] - epochs[i + 1 - back] >= 2 or back >= 6:
                expected = i + 1 - back if i + 1 - back > 0 else None
                break
        assert start == expected
        window = [sign * v for v in vals[-16:]][-7:]
        diffs = np.diff(window)
        if len(diffs) >= 4:
            assert history.difference_spread(16) == pytest.approx(np.median(np.abs(diffs - np.median(diffs))))


def test_running_mean_and_class_count_match_brute_force():
    values = torch.randn(50)
    mean = RunningMean()
    for v in values:
        mean.update(v)
    assert mean.compute() == pytest.approx(values.mean().item(), rel=1e-6)
    classes = ClassCountEstimator()
    classes.update(torch.tensor([0.5, 2.0]))  # floats are not class targets
    assert classes.compute() is None
    batches = torch.randint(0, 7, (5, 16), generator=torch.Generator().manual_seed(0))
    classes = ClassCountEstimator()
    for batch in batches:
        classes.update(batch)
    assert classes.compute() == int(batches.max()) + 1


def test_metric_names_are_found():
    assert rules.find_validation_loss(["train_loss", "val/loss", "val_acc"]) == "val/loss"
    assert rules.find_validation_loss(["loss/valid", "train_loss"]) == "loss/valid"
    assert rules.find_validation_loss(["val_loss_step", "val_loss_epoch"]) == "val_loss_epoch"
    assert rules.find_validation_loss(["hp/val_loss_total"]) == "hp/val_loss_total"
    assert rules.find_validation_loss(["train_loss", "val_acc"]) is None
    assert rules.find_validation_accuracy(["val_loss", "val/accuracy"]) == "val/accuracy"
    assert rules.find_training_loss_epoch(["train_loss", "train_loss_step", "train_loss_epoch"]) == "train_loss_epoch"
    assert rules.find_training_loss_epoch(["train_loss"]) is None  # may be the last step's value
    assert rules.find_training_loss_epoch(["val_loss_epoch"]) is None
    assert rules.inferred_chance_level(10, 2.31) == pytest.approx(math.log(10))
    assert rules.inferred_chance_level(10, 0.2) is None  # a pretrained start: ln C is not confirmed
