"""LossCurveMonitor: each loss-curve fault in a real fit gets its code, healthy twins stay silent."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import lightning.pytorch as L
import pytorch_lightning as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diag import signals
from diag.callbacks import LossCurveMonitor
from diag.monitors.loss_curve import _classes_from
from diag.stats.loss import LossStatistics
from tests.helpers import (Classifier, assert_silent, classifier_for, codes, digits_loaders,
                           digits_tensors, fit, loaders_from, mlp, state_equal)


def run(tmp_path, net, lr=1e-3, optimizer="adam", momentum=0.0, epochs=3, batch_size=32, loss_fn=None, data=None,
        namespace=pl, monitor=None, **trainer_kwargs):
    train, _ = data if data is not None else digits_loaders(batch_size=batch_size)
    monitor = monitor or LossCurveMonitor()
    module = classifier_for(namespace)(net, lr=lr, optimizer=optimizer, momentum=momentum, loss_fn=loss_fn)
    trainer_kwargs.setdefault("logger", False)
    fit(tmp_path, module, train, None, [monitor], max_epochs=epochs, namespace=namespace, **trainer_kwargs)
    return monitor


def deep_sigmoid_tiny_init():
    """8 sigmoid layers with weights ~N(0, 0.01): the signal dies, the loss sits at ln 10 (a plateau)."""
    net = mlp([64] + [32] * 8 + [10], activation=nn.Sigmoid)
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
    return net


def last_layer_scaled(factor=100.0):
    torch.manual_seed(0)
    net = mlp([64, 64, 10])
    with torch.no_grad():
        net[-1].weight.mul_(factor)
    return net


class CNN(nn.Module):
    """Digits as 1x8x8 images, with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.f(x.view(-1, 1, 8, 8))


# ---- statistics against brute force -------------------------------------------------------------------
def test_statistics_match_brute_force():
    rng = np.random.RandomState(0)
    values = list(2.0 * np.exp(-np.arange(80) / 30.0) + 0.1 * rng.rand(80))
    stats = LossStatistics(ema_decay=0.9, window=20)
    for v in values:
        stats.update(v)
    n = len(values)
    weights = np.array([0.1 * 0.9 ** (n - 1 - i) for i in range(n)])
    assert stats.smoothed == pytest.approx(float((weights * values).sum() / weights.sum()), rel=1e-12)
    assert stats.initial == values[0] and stats.start == pytest.approx(float(np.median(values[:5])))
    window = np.array(values[-20:])
    assert stats.level() == pytest.approx(float(np.median(window)))
    older, newer = np.median(window[:10]), np.median(window[10:])
    assert stats.relative_progress() == pytest.approx(float((older - newer) / older))
    assert stats.swing() == pytest.approx(float(np.median(np.abs(np.diff(window)))))
    smoothed = [float((np.array([0.1 * 0.9 ** (k - i) for i in range(k + 1)]) * values[:k + 1]).sum()
                      / (1 - 0.9 ** (k + 1))) for k in range(n)]
    assert stats.best == pytest.approx(min(smoothed))
    assert not stats.update(float("nan")) and stats.nonfinite_count == 1 and stats.count == n
    copy = LossStatistics(ema_decay=0.9, window=20)
    copy.load_state_dict(stats.state_dict())
    assert copy.state_dict() == stats.state_dict() and len(stats.window) == 20  # O(window), not O(steps)


def test_class_count_inference():
    y = torch.tensor([0, 3, 9, 2])
    assert _classes_from((4, 10), (torch.randn(4, 64), y)) == 10
    assert _classes_from((4, 10, 8, 8), {"x": torch.zeros(4, 1, 8, 8), "mask": torch.zeros(4, 8, 8, dtype=torch.long)}) == 10
    assert _classes_from((4, 1), (torch.randn(4, 64), torch.randn(4, 1))) is None  # regression
    assert _classes_from((4, 5), (torch.randn(4, 64), y)) is None  # label 9 does not fit 5 classes: unsure
    assert _classes_from((4, 10), (torch.randn(4, 64), torch.randn(4))) is None  # float targets


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        LossCurveMonitor(num_classes=1)
    with pytest.raises(ValueError, match="ema_decay"):
        LossCurveMonitor(ema_decay=1.0)
    with pytest.raises(ValueError, match="window"):
        LossCurveMonitor(window=3)
    with pytest.raises(ValueError, match="diverge_factor"):
        LossCurveMonitor(diverge_factor=0.5)
    with pytest.raises(ValueError, match="sync_every"):
        LossCurveMonitor(sync_every=0)


# ---- faults -------------------------------------------------------------------------------------------
def test_nan_loss_is_an_error_and_asks_the_probe(tmp_path):
    monitor = run(tmp_path, mlp([64, 64, 10]), lr=1e4, optimizer="sgd", epochs=1)
    assert "nonfinite_loss" in codes(monitor.findings, "error")
    assert "nonfinite_loss" in monitor.context.probe_requests


def test_log_of_zero_gives_nonfinite_loss(tmp_path):
    def nll_of_hard_probabilities(logits, y):  # log(0) once a probability underflows: -inf -> inf loss
        probs = (logits * 1e4).softmax(1)
        return -torch.log(probs[torch.arange(len(y)), y]).mean()

    monitor = run(tmp_path, mlp([64, 64, 10]), loss_fn=nll_of_hard_probabilities, epochs=1)
    assert "nonfinite_loss" in codes(monitor.findings, "error")


@pytest.mark.parametrize("optimizer,lr,epochs", [("sgd", 3.0, 1), ("adam", 1.0, 2)])
def test_diverging_loss_without_nan(tmp_path, optimizer, lr, epochs):
    monitor = run(tmp_path, mlp([64, 64, 10]), lr=lr, optimizer=optimizer, epochs=epochs)
    found = codes(monitor.findings)
    assert "loss_diverging" in found and "nonfinite_loss" not in found
    finding = next(f for f in monitor.findings if f.code == "loss_diverging")
    assert finding.evidence["ratio_to_start"] > 3
    assert "loss_diverging" in monitor.context.probe_requests


def test_oscillating_loss(tmp_path):
    monitor = run(tmp_path, mlp([64, 64, 10]), lr=0.1, optimizer="adam", epochs=3)
    found = codes(monitor.findings)
    assert "loss_oscillating" in found and "loss_diverging" not in found
    assert "loss_oscillating" in monitor.context.probe_requests


def moons_data():
    from sklearn.datasets import make_moons

    x, y = make_moons(2000, noise=0.2, random_state=0)
    x = (x - x.mean(0)) / x.std(0)
    return loaders_from(torch.tensor(x, dtype=torch.float32), torch.tensor(y))


def test_early_burst_is_an_info_and_asks_the_probe(tmp_path):
    """Adam at lr=0.5: the loss jumps ~10-100x within 3 steps and recovers before the warm-up ends."""
    torch.manual_seed(1000)
    monitor = run(tmp_path, mlp([2, 32, 32, 2]), lr=0.5, epochs=1, data=moons_data())
    spike = next(f for f in monitor.findings if f.code == "loss_diverging")
    assert spike.severity.value == "info" and spike.evidence["transient"] == 1
    assert spike.evidence["ratio_to_start"] > 3 and spike.step <= 10  # the first check, inside the warm-up
    assert monitor.context.probe_requests == ["loss_spike"]  # the probe replays the start and decides
    assert not codes(monitor.findings)
    torch.manual_seed(1000)
    healthy = run(tmp_path, mlp([2, 32, 32, 2]), lr=1e-2, epochs=1, data=moons_data())
    assert not healthy.findings and healthy.context.probe_requests == []


def four_class_data():
    from sklearn.datasets import make_classification

    x, y = make_classification(3000, n_features=20, n_informative=10, n_classes=4, random_state=0)
    x = (x - x.mean(0)) / x.std(0)
    return loaders_from(torch.tensor(x, dtype=torch.float32), torch.tensor(y))


class SubmoduleClassifier(Classifier):
    """``training_step`` calls the network directly (the LightningModule's own forward never runs)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.net(x), y)


@pytest.mark.parametrize("direct", [False, True], ids=["through_forward", "submodule_softmax"])
def test_probability_outputs_ask_the_probe_once(tmp_path, direct):
    """Softmax fed to cross-entropy: seen on the first batch (the output, or an nn.Softmax after the last Linear)."""
    torch.manual_seed(1000)
    net = nn.Sequential(mlp([20, 64, 64, 4]), nn.Softmax(1))
    monitor = LossCurveMonitor()
    module = (SubmoduleClassifier if direct else Classifier)(net, lr=1e-3)
    fit(tmp_path, module, four_class_data()[0], None, [monitor], max_epochs=2, logger=False)
    assert monitor._outputs_probabilities is True
    assert monitor.context.probe_requests == ["probability_outputs"]
    assert not codes(monitor.findings)  # the probe, when attached, decides (see tests/test_lr_probe.py)
    torch.manual_seed(1000)
    logits = LossCurveMonitor()
    fit(tmp_path, (SubmoduleClassifier if direct else Classifier)(mlp([20, 64, 64, 4]), lr=1e-3), four_class_data()[0],
        None, [logits], max_epochs=2, logger=False)
    assert logits._outputs_probabilities is False and logits.context.probe_requests == []


def test_plateau_of_a_deep_sigmoid_net(tmp_path):
    monitor = run(tmp_path, deep_sigmoid_tiny_init(), lr=0.01, optimizer="sgd", batch_size=16, epochs=2)
    plateau = [f for f in monitor.findings if f.code == "loss_plateau"]
    assert plateau and plateau[0].severity.value == "warning" and plateau[0].evidence["flat_steps"] >= 100
    assert "loss_stalled" in monitor.context.probe_requests
    assert monitor.context.get(signals.LOSS_STALLED) is True
    assert monitor.context.get(signals.LOSS_CHANCE_LEVEL) == pytest.approx(math.log(10))
    assert codes(monitor.findings) == {"loss_plateau"}


@pytest.mark.parametrize("gradients_tiny", [True, False])
def test_plateau_uses_the_gradient_signal(tmp_path, gradients_tiny):
    monitor = LossCurveMonitor()
    monitor.context.publish(signals.GRAD_TINY, gradients_tiny)  # as a GradientMonitor would
    run(tmp_path, deep_sigmoid_tiny_init(), lr=0.01, optimizer="sgd", batch_size=16, epochs=2, monitor=monitor)
    plateau = next(f for f in monitor.findings if f.code == "loss_plateau")
    if gradients_tiny:  # tiny gradients confirm it: one flat window is enough
        assert plateau.severity.value == "warning" and plateau.step < 100
    else:  # gradients not tiny: a flat loss for another reason (LR too low?): a hint, the probe decides
        assert plateau.severity.value == "info" and not codes(monitor.findings, "warning")


def test_unexpected_initial_loss_from_a_badly_scaled_last_layer(tmp_path):
    monitor = run(tmp_path, last_layer_scaled(100.0), epochs=1, namespace=L)
    finding = next(f for f in monitor.findings if f.code == "unexpected_initial_loss")
    assert finding.evidence["num_classes"] == 10 and finding.evidence["num_classes_source"] == "inferred"
    assert finding.evidence["first_loss"] > 5 * math.log(10)
    assert codes(monitor.findings) == {"unexpected_initial_loss"}


def test_initial_loss_uses_given_num_classes_and_undoes_gradient_accumulation(tmp_path):
    net = last_layer_scaled(100.0)
    x, y = digits_tensors()
    expected = nn.functional.cross_entropy(net(x[:32]), y[:32]).item()
    train, _ = digits_loaders(batch_size=32, shuffle=False)
    monitor = run(tmp_path, net, epochs=1, data=(train, None), monitor=LossCurveMonitor(num_classes=10),
                  accumulate_grad_batches=4)
    finding = next(f for f in monitor.findings if f.code == "unexpected_initial_loss")
    assert finding.evidence["num_classes_source"] == "given"
    assert finding.evidence["first_loss"] == pytest.approx(expected, rel=1e-5)
    assert monitor.stats.count == math.ceil(44 / 4)  # one value per optimizer step


# ---- healthy twins ------------------------------------------------------------------------------------
HEALTHY = {
    "relu_mlp_adam": dict(net=lambda: mlp([64, 64, 10]), epochs=4),
    "relu_mlp_adam_batch8": dict(net=lambda: mlp([64, 64, 10]), epochs=1, batch_size=8),
    "cnn_batchnorm": dict(net=CNN, epochs=3, namespace=L),
    "sgd_momentum": dict(net=lambda: mlp([64, 64, 10]), lr=0.01, optimizer="sgd", momentum=0.9, epochs=4),
    "short_run_still_improving": dict(net=lambda: mlp([64, 64, 10]), epochs=1),
    "deep_tanh_layernorm": dict(net=lambda: mlp([64, 64, 64, 64, 10], nn.Tanh, nn.LayerNorm), epochs=2, batch_size=16),
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_runs_are_silent(tmp_path, name):
    spec = dict(HEALTHY[name])
    spec["net"] = spec["net"]()
    monitor = run(tmp_path, **spec)
    assert_silent(monitor.findings)
    assert monitor.context.probe_requests == []
    assert monitor.context.get(signals.LOSS_NUM_CLASSES) == 10


def test_healthy_regression_is_silent(tmp_path):
    x, _ = digits_tensors()
    target = x[:, :32].sum(1, keepdim=True) / 8
    train, _ = loaders_from(x, target, batch_size=16)
    monitor = run(tmp_path, mlp([64, 32, 1]), epochs=3, data=(train, None), loss_fn=nn.functional.mse_loss)
    assert_silent(monitor.findings)
    assert monitor.context.probe_requests == []
    assert monitor.context.get(signals.LOSS_NUM_CLASSES) is None  # not a classifier: no ln C check
    assert monitor.context.get(signals.LOSS_BEST) < 0.5 * monitor.context.get(signals.LOSS_INITIAL)


# ---- outputs, manual optimization, checkpoints ------------------------------------------------------
def test_scalars_reach_tensorboard(tmp_path):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    monitor = run(tmp_path, mlp([64, 64, 10]), epochs=1, logger=logger)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "diag/loss" in tags and "diag/loss_smoothed" in tags
    smoothed = acc.Scalars("diag/loss_smoothed")
    assert len(smoothed) == math.ceil(44 / 10)  # logged on sampled steps only
    assert smoothed[-1].value == pytest.approx(monitor.stats.smoothed, rel=1e-5)


class ManualClassifier(Classifier):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = self.loss_fn(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return None


def test_manual_optimization_reads_the_logged_loss(tmp_path):
    train, _ = digits_loaders(batch_size=32)
    monitor = LossCurveMonitor()
    fit(tmp_path, ManualClassifier(mlp([64, 64, 10]), lr=1e4, optimizer="sgd"), train, None, [monitor],
        max_epochs=1, logger=False)
    assert monitor.stats.count + monitor.stats.nonfinite_count == 44
    assert "nonfinite_loss" in codes(monitor.findings, "error")


def test_state_round_trip_and_resume_does_not_repeat(tmp_path):
    monitor = run(tmp_path, last_layer_scaled(100.0), epochs=1)
    state = monitor.state_dict()
    fresh = LossCurveMonitor()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert [f.code for f in fresh.findings] == ["unexpected_initial_loss"]
    assert fresh.stats.smoothed == monitor.stats.smoothed and fresh._initial_checked


# ---- runs that look unusual but are healthy ---------------------------------------------------------
def test_second_fit_from_trained_weights_is_silent(tmp_path):
    """Fine-tuning / a second fit: the loss starts low and noisy; no divergence, oscillation or plateau."""
    net = mlp([64, 64, 10])
    run(tmp_path, net, epochs=3, batch_size=32)
    monitor = run(tmp_path, net, lr=3e-3, epochs=1, batch_size=8)
    assert_silent(monitor.findings)
    assert monitor.context.probe_requests == []
    x, _ = digits_tensors()
    train, _ = loaders_from(x, x[:, :32].sum(1, keepdim=True) / 8, batch_size=16)
    regression = mlp([64, 32, 1])
    run(tmp_path, regression, epochs=2, data=(train, None), loss_fn=nn.functional.mse_loss)
    monitor = run(tmp_path, regression, lr=3e-3, epochs=1, data=(train, None), loss_fn=nn.functional.mse_loss)
    assert_silent(monitor.findings)
    assert monitor.context.probe_requests == []


class WarmupClassifier(Classifier):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 200))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def test_learning_rate_warmup_is_not_a_plateau(tmp_path):
    train, _ = digits_loaders(batch_size=32)
    monitor = LossCurveMonitor()
    fit(tmp_path, WarmupClassifier(mlp([64, 64, 10])), train, None, [monitor], max_epochs=5, logger=False)
    assert_silent(monitor.findings)
    assert monitor.context.probe_requests == []


class TokenTagger(nn.Module):
    """A small sequence model with LayerNorm: logits [B, T, C] against integer targets [B, T]."""

    def __init__(self, vocab=20):
        super().__init__()
        self.emb, self.norm = nn.Embedding(vocab, 32), nn.LayerNorm(32)
        self.rnn, self.out = nn.GRU(32, 32, batch_first=True), nn.Linear(32, vocab)

    def forward(self, x):
        return self.out(self.rnn(self.norm(self.emb(x)))[0])


def test_sequence_model_infers_vocabulary_and_is_silent(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (1200, 12), generator=g)
    train, _ = loaders_from(tokens, torch.roll(tokens, 1, 1), batch_size=32)

    def token_loss(logits, y):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    monitor = run(tmp_path, TokenTagger(), lr=3e-3, epochs=3, data=(train, None), loss_fn=token_loss, namespace=L)
    assert_silent(monitor.findings)
    assert monitor.context.get(signals.LOSS_NUM_CLASSES) == 20


def test_inside_diagnostics_the_requests_reach_the_shared_context(tmp_path):
    from diag.callbacks import Diagnostics

    diagnostics = Diagnostics(lr_probe=False, gradients=False, activations=False, fit=False, setup_check=False,
                              data=False)
    train, _ = digits_loaders(batch_size=32)
    fit(tmp_path, Classifier(mlp([64, 64, 10]), lr=1e4, optimizer="sgd"), train, None, [diagnostics],
        max_epochs=1, logger=False)
    assert "nonfinite_loss" in codes(diagnostics.findings, "error")
    assert "nonfinite_loss" in diagnostics.context.probe_requests


def test_observing_does_not_change_training(tmp_path):
    nets = []
    for monitor in (None, LossCurveMonitor()):
        torch.manual_seed(1)
        net = mlp([64, 64, 10])
        run(tmp_path, net, epochs=1, monitor=monitor) if monitor else fit(
            tmp_path, Classifier(net), digits_loaders(batch_size=32)[0], None, [], max_epochs=1, logger=False)
        nets.append(net)
    assert state_equal(*nets)
