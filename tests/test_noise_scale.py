"""The gradient-noise-scale estimator against brute force: per-sample gradients with torch.func (vmap + grad)."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from diag.stats.noise_scale import GradientNoiseScale, two_batch_estimates
from tests.helpers import digits_tensors, mlp


def _per_sample_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([v.reshape(len(x), -1) for v in g.values()], 1).double()  # [N, P]


def test_two_batch_estimates_are_exact_on_expectations():
    # E|G_B|² = |G|² + tr Σ / B exactly: the formulas must invert it.
    g2, tr = 0.3, 12.0
    est = two_batch_estimates(g2 + tr / 8, g2 + tr / 64, 8, 64)
    assert est["gradient_sq"] == pytest.approx(g2) and est["trace_cov"] == pytest.approx(tr)
    with pytest.raises(ValueError):
        two_batch_estimates(1.0, 1.0, 64, 8)


def test_noise_scale_matches_per_sample_gradients():
    torch.manual_seed(0)
    x, y = digits_tensors(n=256)
    model = mlp([64, 32, 10])
    per_sample = _per_sample_grads(model, x, y)
    mean = per_sample.mean(0)
    true_g2 = float(mean @ mean)  # the batch is the population
    true_tr = float(((per_sample - mean) ** 2).sum(1).mean())
    true_scale = true_tr / true_g2

    # Feed the estimator with gradient norms of random mini-batches (drawn with replacement: i.i.d. samples).
    gen = torch.Generator().manual_seed(1)
    gns = GradientNoiseScale(beta=None)
    b_small, b_big = 8, 64
    for _ in range(4000):
        small = per_sample[torch.randint(0, len(x), (b_small,), generator=gen)].mean(0)
        big = per_sample[torch.randint(0, len(x), (b_big,), generator=gen)].mean(0)
        gns.update(float(small @ small), float(big @ big), b_small, b_big)
    est = gns.compute()
    assert est["trace_cov"] == pytest.approx(true_tr, rel=0.10)
    assert est["gradient_sq"] == pytest.approx(true_g2, rel=0.10)
    assert est["noise_scale"] == pytest.approx(true_scale, rel=0.10)
    assert est["noise_scale_lower"] < est["noise_scale"]


def test_ema_mode_and_state_round_trip():
    gns = GradientNoiseScale(beta=0.9)
    assert math.isnan(gns.compute()["noise_scale"])
    gns.update(2.0, 1.0, 16, 64)
    gns.update(float("inf"), 1.0, 16, 64)  # ignored: an overflowed step
    assert gns.count == 1
    copy = GradientNoiseScale(beta=0.9)
    copy.load_state_dict(gns.state_dict())
    assert copy.compute() == gns.compute()
    with pytest.raises(ValueError, match="beta"):
        GradientNoiseScale(beta=1.5)
