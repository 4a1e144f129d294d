"""ActivationMonitor: statistics against brute force, rules on real fits (fault and healthy twin), no side effects."""

import math

import pytest
import torch
from torch import nn

import lightning.pytorch as L
import pytorch_lightning as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diag import signals
from diag.callbacks import ActivationMonitor, Monitor
from diag.stats.activations import FeatureMoments, summarize_all
from tests.helpers import (Classifier, assert_silent, classifier_for, codes, count_calls, digits_loaders, fit,
                           loaders_from, mlp, state_equal, trainer)

H = 100  # hidden width of the BatchNorm paper's MNIST MLP (3 x 100 sigmoid units)


def _monitor(**kwargs):
    kwargs.setdefault("interval", 2)
    kwargs.setdefault("window", 4)
    return ActivationMonitor(**kwargs)


def _moons(n=1500):
    from sklearn.datasets import make_moons

    x, y = make_moons(n, noise=0.2, random_state=0)
    return loaders_from(torch.tensor(x, dtype=torch.float32), torch.tensor(y))


def _sigmoid_bn_after(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.Sigmoid(), nn.BatchNorm1d(b)]
    return nn.Sequential(*layers)


class _Image(nn.Module):
    """A small CNN on the 8x8 digits: another shape of model (Conv2d, channel features, pooling, flatten)."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), act(), nn.Conv2d(16, 32, 3, padding=1), act(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), act(), nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x.view(-1, 1, 8, 8))


class _GapCNN(nn.Module):
    """Conv-ReLU blocks, global average pooling, linear head: pooled ReLU maps are strictly positive, yet healthy."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)))


class _SqueezeExcite(nn.Module):
    """A CNN with a squeeze-and-excitation gate: a sigmoid feeds a product, not a weight layer; 4-unit bottleneck."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16),
                                  nn.Sigmoid())
        self.conv2, self.relu2, self.head = nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Linear(16 * 64, 10)

    def forward(self, x):
        h = self.relu1(self.conv1(x.view(-1, 1, 8, 8)))
        h = h * self.gate(h)[:, :, None, None]
        return self.head(self.relu2(self.conv2(h)).flatten(1))


class _Recurrent(nn.Module):
    """The digits' 8 rows as a sequence: LSTM inputs (B, T, F), a tanh head."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x):
        out, _ = self.rnn(x.view(-1, 8, 8))
        return self.head(out[:, -1])


def _run(tmp_path, net, optimizer="sgd", lr=0.1, data="digits", epochs=3, monitor=None, extra=(), namespace=pl, **kw):
    train, val = digits_loaders() if data == "digits" else _moons()
    monitor = monitor or _monitor()
    module = classifier_for(namespace)(net, lr=lr, optimizer=optimizer)
    fit(tmp_path, module, train, val, callbacks=[monitor, *extra], max_epochs=epochs, logger=False,
        namespace=namespace, **kw)
    return monitor, module


def _layers_with(findings, code, severity="warning"):
    return {f.layer for f in findings if f.code == code and f.severity.value == severity}


# ---- statistics against brute force -------------------------------------------------------------------
@pytest.mark.parametrize("shape,feature_dim", [((16, 5, 12), -1), ((8, 6, 4, 3), 1), ((32, 7), -1)])
def test_moments_match_exact_moments(shape, feature_dim):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(*shape, generator=g) * 0.8 + 0.3 for _ in range(3)]
    for b in batches:  # feature 0 dead (always 0), feature 1 never negative, feature 2 saturated
        idx = [slice(None)] * b.dim()
        idx[feature_dim] = 0
        b[tuple(idx)] = 0.0
        idx[feature_dim] = 1
        b[tuple(idx)] = b[tuple(idx)].abs()
        idx[feature_dim] = 2
        b[tuple(idx)] = 5.0
    moments = FeatureMoments(saturation=(-0.99, 0.99), unit_share=0.5)
    for b in batches:
        assert moments.update(torch.tanh(b), feature_dim)
    other = FeatureMoments()  # a second layer in the same vectorized summary must not disturb the first
    other.update(torch.randn(4, 3))
    s, _ = summarize_all([moments, other])

    x = torch.tanh(torch.cat(batches)).double()  # brute force: features last, everything else samples
    x = x.movedim(feature_dim, -1).reshape(-1, x.shape[feature_dim])
    mean_f, var_f = x.mean(0), x.var(0, unbiased=False)
    live = (x != 0).any(0)
    assert s["samples"] == x.shape[0] and s["features"] == x.shape[1]
    assert math.isclose(s["mean"], x.mean().item(), abs_tol=1e-6)
    assert math.isclose(s["std"], x.std(unbiased=False).item(), rel_tol=1e-5)
    assert math.isclose(s["offset_ratio"], (mean_f.pow(2).mean().sqrt() / var_f.mean().sqrt()).item(), rel_tol=1e-5)
    assert math.isclose(s["fraction_positive"], ((x >= 0).all(0) & live).sum().item() / live.sum().item())
    assert math.isclose(s["fraction_strictly_positive"], (x > 0).all(0).sum().item() / live.sum().item())
    assert math.isclose(s["dead_fraction"], (~live).double().mean().item())
    assert math.isclose(s["saturated_fraction"], ((x.abs() > 0.99).double().mean(0) >= 0.5).double().mean().item())
    assert s["dead_fraction"] > 0 and s["saturated_fraction"] > 0  # the planted features are seen


def test_moments_bfloat16_and_width_mismatch():
    x = torch.rand(64, 10) + 0.5
    moments = FeatureMoments()
    assert moments.update(x.to(torch.bfloat16))
    assert not moments.update(torch.rand(64, 11))  # another width (shared module): ignored
    (s,) = summarize_all([moments])
    assert math.isclose(s["mean"], x.to(torch.bfloat16).float().mean().item(), rel_tol=1e-5)
    assert s["fraction_strictly_positive"] == 1.0 and s["fraction_bounded"] == 0.0


def test_state_round_trip():
    moments = FeatureMoments(saturation=(0.01, 0.99))
    moments.update(torch.sigmoid(torch.randn(32, 8)))
    other = FeatureMoments(saturation=(0.01, 0.99))
    other.load_state_dict(moments.state_dict())
    assert summarize_all([other]) == summarize_all([moments])
    other.load_flat(moments.flat() * 2)  # as after a sum over two identical ranks
    a, b = summarize_all([other])[0], summarize_all([moments])[0]
    assert a["samples"] == 2 * b["samples"]
    assert all(math.isclose(a[k], b[k], rel_tol=1e-6) for k in a if k not in ("samples",))


def _same_summaries(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(x[k] == y[k] or (x[k] != x[k] and y[k] != y[k])
                                                                 for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
@pytest.mark.parametrize("mixed_dtypes", [False, True])
def test_kept_batches_fold_bit_for_bit_as_batches_folded_at_once(steps, mixed_dtypes):
    """The batches a layer keeps are folded for every layer at once when the window is summarized: the summaries and
    the checkpoint equal, bit for bit, those of each batch folded into its layer as it came; a checkpoint taken in the
    middle of the window changes nothing (a float64 layer among float32 ones takes the layer-by-layer path)."""
    g = torch.Generator().manual_seed(steps)
    settings = [{}, {"saturation": (0.01, 0.99)}, {}, {"saturation": (-0.99, 0.99)}]
    activations = [torch.relu, torch.sigmoid, lambda t: t - 0.3, torch.tanh]
    kept, at_once, checkpointed = ([FeatureMoments(**s) for s in settings] for _ in range(3))
    for step in range(steps):
        for i, activation in enumerate(activations):
            x = activation(torch.randn(16, 3 + 5 * i, generator=g) * 3)
            x = x.double() if mixed_dtypes and i == 2 else x
            for m in (kept[i], at_once[i], checkpointed[i]):
                assert m.update(x)
            at_once[i].fold()
            checkpointed[i].state_dict()
    assert all(len(m._kept) == steps for m in kept + checkpointed) and not any(m._kept for m in at_once)
    expected = summarize_all(at_once)
    assert _same_summaries(summarize_all(kept), expected) and _same_summaries(summarize_all(checkpointed), expected)
    for m, reference in zip(kept, at_once):
        a, b = m.state_dict(), reference.state_dict()
        assert a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_hooked_fit_logs_exact_first_batch_moments(tmp_path):
    """Only step 0 is sampled (window 1): the logged input mean/std of each layer equal the batch's exact moments."""
    seen = {}

    class Grab(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                seen["x"] = batch[0].clone()
                with torch.no_grad():
                    seen["h"] = pl_module.net[1](pl_module.net[0](batch[0]))

    train, val = digits_loaders(n_train=256)
    monitor = ActivationMonitor(interval=1000, window=1)
    t = trainer(tmp_path, [Grab(), monitor], max_epochs=1)
    t.fit(Classifier(mlp([64, 32, 10], nn.ReLU)), train, val)
    ea = EventAccumulator(t.logger.log_dir)
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ["diag/activation_mean/net.0", "diag/activation_std/net.0", "diag/fraction_positive_inputs/net.2",
                "diag/dead_fraction/net.1", "diag/activation_mean/net.2"]:
        assert tag in tags, tag

    def value(tag):
        (event,) = ea.Scalars(tag)
        return event.value

    x, h = seen["x"].double(), seen["h"].double()
    assert math.isclose(value("diag/activation_mean/net.0"), x.mean().item(), abs_tol=1e-5)
    assert math.isclose(value("diag/activation_std/net.0"), x.std(unbiased=False).item(), rel_tol=1e-4)
    assert math.isclose(value("diag/activation_mean/net.2"), h.mean().item(), rel_tol=1e-4)
    assert math.isclose(value("diag/dead_fraction/net.1"), (h == 0).all(0).double().mean().item())
    assert value("diag/fraction_positive_inputs/net.2") == 1.0


# ---- non_zero_centered_activation ----------------------------------------------------------------------
@pytest.mark.parametrize("namespace", [pl, L], ids=["pytorch_lightning", "lightning.pytorch"])
def test_sigmoid_mlp_with_plain_sgd_warns(tmp_path, namespace):
    """The BatchNorm paper's setting: 3 x 100 sigmoid units, plain SGD (the loss stays near ln 10)."""
    monitor, _ = _run(tmp_path, mlp([64, H, H, H, 10], nn.Sigmoid), "sgd", 0.1, namespace=namespace)
    assert _layers_with(monitor.findings, "non_zero_centered_activation") == {"net.2", "net.4", "net.6"}
    f = next(f for f in monitor.findings if f.code == "non_zero_centered_activation")
    assert "tanh" in f.advice and "BatchNorm" in f.advice and f.layer in f.advice
    assert f.evidence["fraction_positive_inputs"] == 1.0 and f.evidence["offset_ratio"] > 2
    assert codes(monitor.findings) == {"non_zero_centered_activation"}


def test_sigmoid_on_moons_warns(tmp_path):
    monitor, _ = _run(tmp_path, mlp([2, 32, 32, 2], nn.Sigmoid), "sgd", 0.1, data="moons")
    assert _layers_with(monitor.findings, "non_zero_centered_activation") == {"net.2", "net.4"}


def test_sigmoid_cnn_warns(tmp_path):
    monitor, _ = _run(tmp_path, _Image(nn.Sigmoid), "sgd", 0.05, epochs=1)
    assert {"net.body.2", "net.body.6"} <= _layers_with(monitor.findings, "non_zero_centered_activation")


@pytest.mark.parametrize("case", ["batchnorm_after_sigmoid", "tanh_sgd", "relu_adam", "relu_cnn_adam", "relu_cnn_sgd",
                                  "tanh_moons", "relu_moons", "pooled_cnn", "squeeze_excite", "lstm"])
def test_healthy_runs_stay_silent(tmp_path, case):
    net, opt, lr, data, epochs = {
        "batchnorm_after_sigmoid": (_sigmoid_bn_after([64, H, H, H, 10]), "sgd", 0.1, "digits", 3),
        "tanh_sgd": (mlp([64, H, H, H, 10], nn.Tanh), "sgd", 0.1, "digits", 3),
        "relu_adam": (mlp([64, H, H, H, 10], nn.ReLU), "adam", 1e-3, "digits", 3),
        "relu_cnn_adam": (_Image(), "adam", 1e-3, "digits", 1),
        "relu_cnn_sgd": (_Image(), "sgd", 0.05, "digits", 1),
        "tanh_moons": (mlp([2, 32, 32, 2], nn.Tanh), "sgd", 0.1, "moons", 3),
        "relu_moons": (mlp([2, 32, 32, 2], nn.ReLU), "adam", 1e-2, "moons", 3),
        "pooled_cnn": (_GapCNN(), "adam", 3e-3, "digits", 2),
        "squeeze_excite": (_SqueezeExcite(), "adam", 1e-3, "digits", 1),
        "lstm": (_Recurrent(), "adam", 3e-3, "digits", 2),
    }[case]
    monitor, _ = _run(tmp_path, net, opt, lr, data=data, epochs=epochs)
    assert_silent(monitor.findings)
    assert not [f for f in monitor.findings if f.code == "non_zero_centered_activation"
                and case in ("batchnorm_after_sigmoid", "tanh_sgd", "tanh_moons")]


class _Published(Monitor):
    """Stands in for the loss monitor: publishes a stalled loss at chance level."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._context.publish(signals.LOSS_STALLED, True)
        self._context.publish(signals.LOSS_SMOOTHED, math.log(10))
        self._context.publish(signals.LOSS_CHANCE_LEVEL, math.log(10))


def test_batchnorm_before_sigmoid_is_info_unless_progress_stalls(tmp_path):
    """BatchNorm in front of the sigmoid (the BatchNorm paper's placement) trains: info only; with a stalled loss
    published by the loss monitor the same inputs become a warning."""
    net = lambda: mlp([64, H, H, 10], nn.Sigmoid, nn.BatchNorm1d)  # noqa: E731
    monitor, _ = _run(tmp_path / "a", net(), "sgd", 0.1)
    assert_silent(monitor.findings)
    assert _layers_with(monitor.findings, "non_zero_centered_activation", "info") == {"net.3", "net.6"}

    monitor = _monitor()
    stand_in = _Published()
    stand_in._attach(monitor.context)
    monitor, _ = _run(tmp_path / "b", net(), "sgd", 0.1, monitor=monitor, extra=[stand_in])
    assert _layers_with(monitor.findings, "non_zero_centered_activation") == {"net.3", "net.6"}


def test_relu_with_stalled_loss_is_info_only(tmp_path):
    monitor = _monitor()
    stand_in = _Published()
    stand_in._attach(monitor.context)
    monitor, _ = _run(tmp_path, mlp([64, H, H, 10], nn.ReLU), "sgd", 0.01, monitor=monitor, extra=[stand_in], epochs=1)
    assert_silent(monitor.findings)
    assert _layers_with(monitor.findings, "non_zero_centered_activation", "info") == {"net.2", "net.4"}


# ---- dead_units ----------------------------------------------------------------------------------------
def _negative_bias(net, value=-5.0):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear) and m.out_features != 10:
                m.bias.fill_(value)
    return net


def test_negative_bias_kills_relu_units(tmp_path):
    monitor, _ = _run(tmp_path, _negative_bias(mlp([64, H, H, 10], nn.ReLU)), "adam", 1e-3, epochs=1)
    assert _layers_with(monitor.findings, "dead_units") == {"net.1", "net.3"}
    f = next(f for f in monitor.findings if f.code == "dead_units")
    assert f.evidence["dead_fraction"] > 0.9 and "bias" in f.advice


class _FunctionalRelu(nn.Module):
    """ReLU through torch.relu (no module to hook): dead units are judged at the next weight layer's input."""

    def __init__(self, bias=None):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, H), nn.Linear(H, H), nn.Linear(H, 10)
        if bias is not None:
            with torch.no_grad():
                self.fc1.bias.fill_(bias)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_functional_relu_dead_units_and_healthy_twin(tmp_path):
    monitor, _ = _run(tmp_path / "dead", _FunctionalRelu(bias=-5.0), "adam", 1e-3, epochs=1)
    assert "net.fc2" in _layers_with(monitor.findings, "dead_units")
    monitor, _ = _run(tmp_path / "ok", _FunctionalRelu(), "adam", 1e-3, epochs=1)
    assert_silent(monitor.findings)


# ---- saturated_activations -------------------------------------------------------------------------------
def _scaled(net, factor=10.0):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(factor)
    return net


def test_scaled_tanh_init_saturates_and_healthy_twin_does_not(tmp_path):
    monitor, _ = _run(tmp_path / "bad", _scaled(mlp([64, H, H, 10], nn.Tanh)), "sgd", 0.05, epochs=1)
    assert _layers_with(monitor.findings, "saturated_activations") == {"net.1", "net.3"}
    f = next(f for f in monitor.findings if f.code == "saturated_activations")
    assert f.evidence["saturated_fraction"] > 0.5 and "Xavier" in f.advice
    monitor, _ = _run(tmp_path / "ok", mlp([64, H, H, 10], nn.Tanh), "sgd", 0.05, epochs=1)
    assert_silent(monitor.findings)


# ---- observing does not change training -----------------------------------------------------------------
def _dropout_net():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 64), nn.Sigmoid(),
                         nn.Dropout(0.2), nn.Linear(64, 10))


def test_outputs_rng_and_weights_unchanged(tmp_path):
    results = []
    for with_monitor in (False, True):
        torch.manual_seed(0)
        module = Classifier(_dropout_net(), lr=0.1, optimizer="sgd")
        train, val = digits_loaders(n_train=512)
        cbs = [ActivationMonitor(interval=1, window=3)] if with_monitor else []
        fit(tmp_path / str(with_monitor), module, train, val, callbacks=cbs, max_epochs=2, logger=False)
        module.train()
        x = digits_loaders(n_train=64)[0].dataset.tensors[0]
        results.append((module, torch.get_rng_state(), module(x).detach()))
        if with_monitor:
            assert cbs[0]._windows >= 3  # it did measure
    (m0, rng0, out0), (m1, rng1, out1) = results
    assert state_equal(m0, m1)
    assert torch.equal(rng0, rng1)
    assert torch.equal(out0, out1)


def test_hooks_only_on_sampled_training_steps_and_gone_after_fit(tmp_path):
    model = mlp([64, 32, 32, 10], nn.ReLU)
    record = {"sampled_steps": [], "validation_hooks": 0, "after_batch_hooks": 0}

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    class Check(pl.Callback):  # runs after the monitor in every hook
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if n_hooks():
                record["sampled_steps"].append(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record["after_batch_hooks"] += n_hooks()

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            record["validation_hooks"] += n_hooks()

    _run(tmp_path, model, "adam", 1e-3, epochs=2, monitor=ActivationMonitor(interval=3, window=2),
         extra=[Check()], num_sanity_val_steps=2)
    # 22 steps per epoch, 2 epochs: every 3rd step for the first 10 samples (to step 30), then every 6th (the back-off)
    assert record["sampled_steps"] == list(range(0, 31, 3)) + [36, 42]
    assert record["validation_hooks"] == 0 and record["after_batch_hooks"] == 0
    assert n_hooks() == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_failure_removes_hooks(tmp_path):
    model = mlp([64, 32, 10], nn.ReLU)

    class Broken(ActivationMonitor):
        def _close_window(self):
            raise RuntimeError("boom")

    monitor = Broken(interval=1, window=1)
    _run(tmp_path, model, "adam", 1e-3, epochs=1, monitor=monitor)
    assert [f.code for f in monitor.findings] == ["diag_internal_error"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_arguments_are_validated_and_state_round_trips(tmp_path):
    with pytest.raises(ValueError, match="interval"):
        ActivationMonitor(interval=0)
    with pytest.raises(ValueError, match="window"):
        ActivationMonitor(window=1.5)
    monitor = ActivationMonitor(interval=2, window=100)  # the window stays open at the end: state is mid-window
    _run(tmp_path, mlp([64, 32, 10], nn.ReLU), "adam", 1e-3, epochs=1, monitor=monitor, max_steps=7)
    state = monitor.state_dict()
    restored = ActivationMonitor(interval=2, window=100)
    restored.load_state_dict(state)
    assert restored._windows == monitor._windows and set(restored._layers) == set(monitor._layers)
    assert ActivationMonitor(interval=2).state_key != ActivationMonitor(interval=3).state_key


def test_defaults_inside_diagnostics_write_tensorboard(tmp_path):
    """At the default interval/window, composed in Diagnostics with TensorBoard: the fault is found on a 66-step
    run and the per-layer charts are written."""
    from diag.callbacks import Diagnostics

    diagnostics = Diagnostics(loss_curve=False, lr_probe=False, gradients=False, fit=False, setup_check=False,
                              data=False)
    train, val = digits_loaders()
    t = trainer(tmp_path, [diagnostics], max_epochs=3, namespace=L)
    t.fit(classifier_for(L)(mlp([64, H, H, H, 10], nn.Sigmoid), lr=0.1, optimizer="sgd"), train, val)
    assert _layers_with(diagnostics.findings, "non_zero_centered_activation") == {"net.2", "net.4", "net.6"}
    ea = EventAccumulator(t.logger.log_dir)
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"diag/activation_mean/net.2", "diag/fraction_positive_inputs/net.2",
            "diag/saturated_fraction/net.1"} <= tags
    assert len(ea.Scalars("diag/activation_mean/net.2")) == 2  # a full window (steps 0-30) and the rest (40-60)


def test_failure_inside_a_forward_hook_never_reaches_the_forward(tmp_path):
    model = mlp([64, 32, 10], nn.ReLU)
    monitor = ActivationMonitor(interval=1, window=2)
    monitor._layer("net.2", "weight", "Linear").moments.add = lambda batch: 1 / 0  # fails inside the forward
    _run(tmp_path, model, "adam", 1e-3, epochs=1, monitor=monitor)
    assert [f.code for f in monitor.findings] == ["diag_internal_error"]
    assert "forward" in monitor.findings[0].message
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sleeping_between_samples_measures_exactly_what_every_step_calls_measure(tmp_path, accumulate):
    """Inside Diagnostics the activation monitor is not called between its sampled steps; alone it is called every
    batch. Both must log the same activation statistics at the same steps."""
    from diag.callbacks import Diagnostics

    series, calls = {}, {}
    for composed in (False, True):
        monitor = ActivationMonitor(interval=3, window=2, warmup=2)
        count = count_calls(monitor, "on_train_batch_start")
        callback = Diagnostics(console=False, activations=monitor, gradients=False, loss_curve=False, fit=False,
                               data=False, setup_check=False, lr_probe=False) if composed else monitor
        pl.seed_everything(0)
        model = Classifier(mlp([64, 32, 32, 10], activation=nn.Tanh), lr=1e-3)
        train, _ = digits_loaders(batch_size=32, n_train=640)
        root = tmp_path / str(composed)
        logger = pl.loggers.TensorBoardLogger(str(root), name="tb")
        pl.Trainer(default_root_dir=str(root), max_steps=40, accumulate_grad_batches=accumulate, logger=logger,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   callbacks=[callback]).fit(model, train)
        acc = EventAccumulator(logger.log_dir)
        acc.Reload()
        series[composed] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
                            for tag in acc.Tags()["scalars"] if tag.startswith("diag/activation")}
        calls[composed] = len(count)
    assert series[True] and series[True] == series[False]
    assert calls[False] == 40 * accumulate  # alone: every batch
    assert 40 // 3 <= calls[True] <= 2 * (40 // 3 + 2) * accumulate  # composed: sampled steps and the batch that goes to sleep
