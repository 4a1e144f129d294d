"""GradientMonitor on real fits: each fault gets its code, healthy twins stay silent, training is unchanged."""

import math

import pytest
import torch
from torch import nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning.pytorch as L
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from diag import signals
from diag.callbacks import Diagnostics, GradientMonitor
from diag.stats.gradients import LayerGrouping, UpdateTracker, squared_norms
from tests.helpers import (Classifier, assert_silent, classifier_for, codes, count_calls, digits_loaders, fit,
                           loaders_from, mlp, state_equal)


def _scaled(net, factor):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(factor)
    return net


def _find(monitor, code):
    return [f for f in monitor.findings if f.code == code]


# ---- statistics -------------------------------------------------------------------------------------------
def test_layer_norms_and_update_tracker_match_brute_force():
    torch.manual_seed(0)
    net = mlp([5, 4, 3])
    grouping = LayerGrouping(net.named_parameters())
    assert grouping.layers == ["0", "2"]
    sq = squared_norms([p.detach() for p in grouping.params])
    assert torch.allclose(grouping.layer_sum_rows(sq[None])[0], torch.stack([
        net[0].weight.pow(2).sum() + net[0].bias.pow(2).sum(), net[2].weight.pow(2).sum() + net[2].bias.pow(2).sum()]))
    tracker = UpdateTracker(grouping)
    theta0 = [p.detach().clone() for p in net.parameters()]
    assert tracker.observe(start_pair=True) is None
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    first = tracker.observe(start_pair=False)
    theta1 = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.sub_(0.05)
    second = tracker.observe(start_pair=False)
    assert not tracker.pending
    d0 = torch.cat([(b - a).flatten() for a, b in zip(theta0, theta1)])
    d1 = torch.cat([(b - a).flatten() for a, b in zip(theta1, [p.detach() for p in net.parameters()])])
    assert float(first["update_sq"].sum()) == pytest.approx(float(d0 @ d0), rel=1e-5)
    cos = float(second["dot"].sum()) / math.sqrt(float(second["update_sq"].sum() * second["previous_update_sq"].sum()))
    assert cos == pytest.approx(float(d0 @ d1 / (d0.norm() * d1.norm())), rel=1e-5)
    assert cos == pytest.approx(-1.0, abs=1e-5)


def test_update_tracker_norms_are_those_of_the_plain_differences_bit_for_bit():
    """The tracker snapshots -θ and adds θ in place (cheap kernels); its norms equal, to the bit, those of θ_{t+1} - θ_t
    taken directly, and the second update's sum is that of Δθ_t + Δθ_{t+1}."""
    torch.manual_seed(0)
    net = mlp([5, 4, 3])
    tracker = UpdateTracker(LayerGrouping(net.named_parameters()))
    thetas = [[p.detach().clone() for p in net.parameters()]]
    assert tracker.observe_norms(True, 3) is None and tracker.pending
    found = []
    for scale in (0.1, -0.03):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(scale * torch.randn_like(p))
        thetas.append([p.detach().clone() for p in net.parameters()])
        found.append(tracker.observe_norms(False, 9))
    assert tracker.update_step == 3 and not tracker.pending
    d0 = [b - a for a, b in zip(thetas[0], thetas[1])]
    d1 = [b - a for a, b in zip(thetas[1], thetas[2])]
    norms = lambda tensors: torch.stack(torch._foreach_norm(tensors))  # noqa: E731
    assert found[0][0] is False and torch.equal(found[0][1], torch.cat([norms(d0), norms(thetas[0])]))
    assert found[1][0] is True and torch.equal(found[1][1], torch.cat([
        norms(d1), norms(thetas[1]), norms([b + a for a, b in zip(d0, d1)]), norms(d0)]))


def _steps_called(monitor, hook):
    """The global steps at which ``monitor.<hook>`` is called (routed like the original hook, see count_calls)."""
    steps = []
    original = getattr(monitor, hook).__func__

    def recording(self, trainer, *args, **kwargs):
        steps.append(trainer.global_step)
        return original(self, trainer, *args, **kwargs)

    setattr(monitor, hook, recording.__get__(monitor))
    return steps


def test_composed_monitor_is_called_only_for_its_work(tmp_path):
    """Inside Diagnostics the optimizer-step hook runs on sampled and noise steps and on the two steps of each update
    pair; the batch start (it keeps the batch for the noise pass) on noise steps alone."""
    monitor = GradientMonitor(interval=7, warmup_steps=2, noise_scale_interval=5)
    starts = _steps_called(monitor, "on_train_batch_start")
    optimizer_steps = _steps_called(monitor, "on_before_optimizer_step")
    callback = Diagnostics(console=False, gradients=monitor, loss_curve=False, activations=False, fit=False, data=False,
                           setup_check=False, lr_probe=False)
    pl.seed_everything(0)
    train, _ = digits_loaders(batch_size=32, n_train=640)  # 32 samples: the noise pass 4 times rarer, every 20 steps
    pl.Trainer(default_root_dir=str(tmp_path), max_steps=60, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, callbacks=[callback]).fit(
        Classifier(mlp([64, 32, 10]), lr=1e-3), train)
    sampled = [0, 1] + list(range(7, 60, 7))
    noise = [0, 20, 40]
    pairs = [0, 1, 2] + [s + k for s in sampled[2:] for k in (1, 2)]  # (the pair of step 0 takes in step 1's sample)
    assert optimizer_steps == sorted({s for s in sampled + noise + pairs if s < 60})
    assert starts == noise
    assert next(iter(monitor._states.values())).cosine.count == len(sampled) - 1


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="interval"):
        GradientMonitor(interval=0)
    with pytest.raises(ValueError, match="noise_scale_interval"):
        GradientMonitor(noise_scale_interval=-1)


# ---- healthy ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("namespace", [pl, L], ids=["pytorch_lightning", "lightning.pytorch"])
def test_healthy_runs_are_silent_and_scalars_reach_tensorboard(tmp_path, namespace):
    train, val = digits_loaders(batch_size=64)
    monitor = GradientMonitor()
    logger = (TensorBoardLogger if namespace is pl else L.loggers.TensorBoardLogger)(str(tmp_path), name="tb")
    fit(tmp_path, classifier_for(namespace)(mlp([64, 64, 32, 10]), lr=0.05, optimizer="sgd", momentum=0.9),
        train, val, [monitor], max_epochs=3, namespace=namespace, logger=logger)
    assert_silent(monitor.findings)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("diag/grad_norm", "diag/grad_norm/net.0", "diag/update_to_weight_ratio",
                "diag/update_to_weight_ratio/net.4", "diag/update_cosine", "diag/grad_noise_scale", "diag/batch_size"):
        assert tag in tags, (tag, sorted(tags))
    assert {e.value for e in acc.Scalars("diag/batch_size")} == {64.0}
    # log10 of |dW|/|W| for SGD(lr=0.05, momentum) on digits: within TheDeepChecker's [-4, -1]
    assert all(-4 < e.value < -1 for e in acc.Scalars("diag/update_to_weight_ratio"))
    ratio = monitor.context.get(signals.GRAD_UPDATE_TO_WEIGHT_RATIO)
    assert 1e-4 < ratio < 1e-1
    assert monitor.context.get(signals.GRAD_ZIGZAG) is False and monitor.context.get(signals.GRAD_TINY) is False


def test_healthy_deep_relu_and_frozen_part_are_silent(tmp_path):
    train, val = digits_loaders(batch_size=64)
    monitor = GradientMonitor()
    fit(tmp_path, Classifier(mlp([64] + [64] * 8 + [10]), lr=1e-3), train, val, [monitor], max_epochs=3)
    assert_silent(monitor.findings)

    net = mlp([64, 64, 32, 10])
    net[0].requires_grad_(False)  # frozen on purpose: not missing
    monitor = GradientMonitor()
    fit(tmp_path, Classifier(net, lr=1e-3), train, val, [monitor], max_epochs=2)
    assert_silent(monitor.findings)
    assert not _find(monitor, "missing_gradients")


# ---- faults -----------------------------------------------------------------------------------------------
def test_exploding_gradients_deep_net_with_scaled_init(tmp_path):
    train, val = digits_loaders(batch_size=64)
    monitor = GradientMonitor()
    net = _scaled(mlp([64] + [64] * 8 + [10]), 5.0)
    fit(tmp_path, Classifier(net, lr=0.01, optimizer="sgd"), train, val, [monitor], max_epochs=1)
    found = _find(monitor, "exploding_gradients")
    assert found and found[0].severity.value == "warning"
    assert "clip" in found[0].advice.lower()


def test_exploding_gradients_regression_past_its_stability_limit(tmp_path):
    # plain SGD at 1.2x the stability limit 2/lambda_max: the steep direction grows 1.4x per step, and so do gradients
    x, y = _regression(normalize=True)
    lr = 1.2 * 2 / (2 * torch.linalg.eigvalsh(x.T @ x / len(x)).max().item())
    train, val = loaders_from(x, y, batch_size=64)
    monitor = GradientMonitor()
    module = Classifier(nn.Linear(10, 1), lr=lr, optimizer="sgd", loss_fn=nn.functional.mse_loss)
    fit(tmp_path, module, train, val, [monitor], max_epochs=5)
    found = _find(monitor, "exploding_gradients")
    assert found and found[0].evidence["early_grad_norm"] > 0


def test_vanishing_gradients_deep_sigmoid_tiny_init(tmp_path):
    train, val = digits_loaders(batch_size=64)
    net = mlp([64] + [64] * 8 + [10], activation=nn.Sigmoid)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
    monitor = GradientMonitor()
    fit(tmp_path, Classifier(net, lr=0.01, optimizer="sgd"), train, val, [monitor], max_epochs=3)
    found = _find(monitor, "vanishing_gradients")
    assert found and found[0].evidence["first_to_last_grad_norm_ratio"] < 1e-3
    assert found[0].evidence["first_layer"] == "net.0" and found[0].evidence["last_layer"] == "net.16"


class _DetachedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(64, 32)
        self.side = nn.Linear(64, 32)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.trunk(x)), torch.relu(self.side(x)).detach()], 1))


def test_missing_gradients_detached_branch_names_the_layer(tmp_path):
    train, val = digits_loaders(batch_size=64)
    monitor = GradientMonitor()
    fit(tmp_path, Classifier(_DetachedBranch(), lr=1e-3), train, val, [monitor], max_epochs=3)
    found = _find(monitor, "missing_gradients")
    assert [f.layer for f in found] == ["net.side"]
    assert found[0].severity.value == "error" and "weight" in found[0].message


def test_high_gradient_noise_batch_two_plain_sgd(tmp_path):
    train, val = digits_loaders(batch_size=2, n_train=640)
    monitor = GradientMonitor()
    fit(tmp_path, Classifier(mlp([64, 64, 32, 10]), lr=0.05, optimizer="sgd"), train, val, [monitor], max_epochs=1)
    found = _find(monitor, "high_gradient_noise")
    assert found and found[0].severity.value == "warning", monitor.findings
    ev = found[0].evidence
    assert ev["batch_size"] == 2 and (ev["noise_scale"] == "inf" or ev["noise_scale"] > 20)
    assert "accumulate_grad_batches" in found[0].advice
    # the twin at batch 64 stays silent
    train, val = digits_loaders(batch_size=64)
    monitor = GradientMonitor()
    fit(tmp_path, Classifier(mlp([64, 64, 32, 10]), lr=0.1, optimizer="sgd"), train, val, [monitor], max_epochs=3)
    assert_silent(monitor.findings)


def _regression(normalize, n=1200, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1.5, d)  # feature scales 1 ... 31.6: condition number 1000
    x = torch.randn(n, d, generator=g) * scales
    y = (x / scales) @ torch.randn(d, generator=g) + 0.1 * torch.randn(n, generator=g)
    if normalize:
        x = x / scales
    return x, y[:, None]


@pytest.mark.parametrize("normalize", [False, True], ids=["ill_conditioned_plain_sgd", "normalized_momentum"])
def test_zigzag_updates_ill_conditioned_regression(tmp_path, normalize):
    x, y = _regression(normalize)
    if normalize:
        lr, momentum = 0.05, 0.9
    else:  # plain SGD at 0.98x its stability limit 2/lambda_max (lambda_max of the MSE Hessian 2 X^T X / n)
        lr, momentum = 0.98 * 2 / (2 * torch.linalg.eigvalsh(x.T @ x / len(x)).max().item()), 0.0
    train, val = loaders_from(x, y, batch_size=64)
    monitor = GradientMonitor()
    module = Classifier(nn.Linear(10, 1), lr=lr, optimizer="sgd", momentum=momentum, loss_fn=nn.functional.mse_loss)
    fit(tmp_path, module, train, val, [monitor], max_epochs=20)
    if normalize:
        assert_silent(monitor.findings)
        assert monitor.context.get(signals.GRAD_ZIGZAG) is False
    else:
        found = _find(monitor, "zigzag_updates")
        assert found and found[0].evidence["update_cosine"] < -0.5
        assert monitor.context.get(signals.GRAD_ZIGZAG) is True
        assert "momentum" in found[0].advice


# ---- same story under AMP, accumulation and clipping ------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 2])
def test_bf16_accumulation_and_clipping_tell_the_same_story(tmp_path, accumulate):
    train, val = digits_loaders(batch_size=32 if accumulate == 2 else 64)
    monitor = GradientMonitor(interval=5)
    fit(tmp_path, Classifier(_DetachedBranch(), lr=1e-3), train, val, [monitor], max_epochs=2,
        precision="bf16-mixed", accumulate_grad_batches=accumulate, gradient_clip_val=0.5)
    assert [f.layer for f in _find(monitor, "missing_gradients")] == ["net.side"]
    assert not [f for f in monitor.findings if f.code != "missing_gradients" and f.severity.value != "info"]
    # noise-scale estimates from the micro-batch (32 vs accumulated 64) or from the batch split (16 + 48 of 64)
    assert monitor._noise.count > 0 and monitor._noise.last_b_big == 64
    assert monitor._noise.last_b_small == (32 if accumulate == 2 else 48)
    assert 0 < monitor._noise.compute()["trace_cov"]
    state = next(iter(monitor._states.values()))
    assert state.clip_checks > 0 and 0 <= state.clipped <= state.clip_checks


# ---- observing does not change training -------------------------------------------------------------------
class _DropoutBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def test_training_is_bitwise_unchanged(tmp_path):
    def run(callbacks):
        torch.manual_seed(0)
        train, val = digits_loaders(batch_size=32, n_train=640)
        module = Classifier(_DropoutBatchNorm(), lr=1e-3)
        fit(tmp_path, module, train, val, callbacks, max_epochs=2)
        return module

    # every step sampled and a batch split (extra forward/backward with dropout and BatchNorm) every 8th step
    # (noise_scale_interval=2, 4x rarer at batch 32): 5 splits of 40 steps, 2 estimates each
    monitor = GradientMonitor(interval=1, noise_scale_interval=2, max_backoff=1)
    with_monitor = run([monitor])
    without = run([])
    assert state_equal(with_monitor, without)
    assert monitor._noise.count >= 10 and not [f for f in monitor.findings if f.code == "diag_internal_error"]


def test_checkpoint_state_round_trips(tmp_path):
    train, val = digits_loaders(batch_size=64, n_train=640)
    monitor = GradientMonitor()
    fit(tmp_path, Classifier(_DetachedBranch(), lr=1e-3), train, val, [monitor], max_epochs=1)
    state = monitor.state_dict()
    fresh = GradientMonitor()
    fresh.load_state_dict(state)
    assert fresh._pending_load and fresh._noise.state_dict() == monitor._noise.state_dict()
    assert [f.key for f in fresh.findings] == [f.key for f in monitor.findings]


def test_sampling_backs_off_deterministically():
    from diag.monitors.gradients import backed_off_interval

    assert [backed_off_interval(20, s, 8) for s in (0, 199, 200, 399, 400, 799, 800, 10 ** 6)] == \
        [20, 20, 40, 40, 80, 80, 160, 160]
    assert backed_off_interval(20, 10 ** 6, 1) == 20
    monitor = GradientMonitor(interval=20, warmup_steps=5)
    sampled = [s for s in range(2000) if monitor._is_sampled(s)]
    # the dense start, then the first BACKOFF_AFTER samples at the interval (to step 200), then 5 per doubling
    assert sampled[:7] == [0, 1, 2, 3, 4, 20, 40] and len([s for s in sampled if 5 <= s <= 200]) == 10
    assert 220 not in sampled and 240 in sampled and [s for s in sampled if 200 <= s < 400] == [200, 240, 280, 320, 360]
    assert [s for s in sampled if 400 <= s < 800] == [400, 480, 560, 640, 720]
    assert len(sampled) < 5 + 2000 // 20 / 3  # under a third of the fixed-interval samples over 2,000 steps


def test_noise_estimates_are_rarer_where_they_can_only_be_information():
    from types import SimpleNamespace

    def noise_steps(batch_size, world_size=1, accumulate=1):
        monitor = GradientMonitor(noise_scale_interval=25)
        trainer = SimpleNamespace(world_size=world_size, accumulate_grad_batches=accumulate)
        monitor._accumulating = accumulate > 1
        monitor._set_noise_rarity(trainer, (torch.zeros(batch_size, 3), torch.zeros(batch_size)))
        return [s for s in range(200) if monitor._is_noise_step(s)]

    assert noise_steps(8) == list(range(0, 200, 25))  # small batch: noise may be the problem, every 25 steps
    assert noise_steps(64) == [0, 100]  # 4x rarer: the finding can only be info
    assert noise_steps(64, world_size=2) == list(range(0, 200, 25))  # ranks must agree: as configured


def test_schedule_matches_the_backed_off_interval_in_any_step_order():
    import random

    from diag.monitors.base import Schedule
    from diag.monitors.gradients import backed_off_interval

    rng = random.Random(0)
    for interval, max_backoff, offset, dense in [(20, 8, 0, 5), (10, 8, 3, 0), (25, 1, 0, 0), (7, 4, 0, 2)]:
        def brute(s):
            since = s - offset
            return s < dense or (since >= 0 and since % backed_off_interval(interval, since, max_backoff) == 0)

        in_order = Schedule(interval, max_backoff, offset, dense)
        assert [in_order.due(s) for s in range(4000)] == [brute(s) for s in range(4000)]
        shuffled = Schedule(interval, max_backoff, offset, dense)  # resumed or restarted fits can step backwards
        steps = [rng.randrange(4000) for _ in range(2000)]
        assert [shuffled.due(s) for s in steps] == [brute(s) for s in steps]


def test_schedule_next_due_is_the_first_due_step_and_calls_at_it_alone_agree():
    """A sleeping monitor asks its schedule for the next due step and is called only then: the answer must be the
    first step at or after the given one that is due (brute force), and calling ``due`` only at those steps must
    find the same events as calling it at every step."""
    import random

    from diag.monitors.base import Schedule
    from diag.monitors.gradients import backed_off_interval

    rng = random.Random(1)
    for interval, max_backoff, offset, dense in [(20, 8, 0, 5), (10, 8, 3, 0), (25, 1, 0, 0), (7, 4, 0, 2), (5, 8, 40, 10)]:
        def brute(s):
            since = s - offset
            return s < dense or (since >= 0 and since % backed_off_interval(interval, since, max_backoff) == 0)

        due_steps = [s for s in range(6000) if brute(s)]
        schedule = Schedule(interval, max_backoff, offset, dense)
        for s in sorted(rng.randrange(5000) for _ in range(300)):
            assert schedule.next_due(s) == next(t for t in due_steps if t >= s)
        hopping, seen, s = Schedule(interval, max_backoff, offset, dense), [], 0
        while True:
            s = hopping.next_due(s)
            if s >= 5000:
                break
            assert hopping.due(s)
            seen.append(s)
            s += 1
        assert seen == [t for t in due_steps if t < 5000]


def _scalar_series(log_dir, prefix):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith(prefix)}


@pytest.mark.parametrize("accumulate", [1, 3])
def test_sleeping_between_samples_measures_exactly_what_every_step_calls_measure(tmp_path, accumulate):
    """Inside Diagnostics the gradient monitor is not called between its sampled steps (its hooks sleep); used alone it
    is called every step. Both must log the same scalars at the same steps, with and without accumulation."""
    series, calls = {}, {}
    for composed in (False, True):
        monitor = GradientMonitor(interval=7, warmup_steps=2, noise_scale_interval=5)
        count = count_calls(monitor, "on_before_optimizer_step")
        callback = Diagnostics(console=False, gradients=monitor, loss_curve=False, activations=False, fit=False,
                               data=False, setup_check=False, lr_probe=False) if composed else monitor
        pl.seed_everything(0)
        model = Classifier(mlp([64, 32, 10]), lr=1e-3)
        train, _ = digits_loaders(batch_size=32, n_train=640)
        root = tmp_path / str(composed)
        logger = pl.loggers.TensorBoardLogger(str(root), name="tb")
        pl.Trainer(default_root_dir=str(root), max_steps=60, accumulate_grad_batches=accumulate, logger=logger,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   callbacks=[callback]).fit(model, train)
        series[composed] = _scalar_series(logger.log_dir, "diag/")
        calls[composed] = len(count)
    assert series[True] and series[True] == series[False]
    assert any(k.startswith("diag/grad_noise_scale") for k in series[True])
    assert any(k.startswith("diag/update_cosine") for k in series[True])
    assert calls[False] == 60  # alone: every optimizer step
    # composed: sampled steps (0, 1, then every 7), the two steps of each update pair and noise steps only
    assert 10 <= calls[True] <= 40
