"""The noise scale's extra pass (diag.stats.noise_pass) on a plain module: its figures against autograd on the
same samples, and nothing it ran left behind (RNG, BatchNorm statistics, rebound attributes, ``self.log``)."""

import pytest
import torch
from torch import nn

from diag.batch import take_samples
from diag.stats.noise_pass import PartBatchRefused, part_batch_figures, part_size, rest_sq_norm


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
        self.calls, self.logged = 0, []

    def log(self, name, value):  # what a LightningModule's self.log would record
        self.logged.append(name)

    def training_step(self, batch, batch_idx=0):
        x, y = batch
        self.calls += 1  # rebinds an attribute, as a stateful model does
        loss = nn.functional.cross_entropy(self.body(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}


def _grad(model, batch):
    torch.manual_seed(0)
    loss = model.training_step(batch)["loss"]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]).double()


def test_figures_match_autograd_and_nothing_is_left_behind():
    torch.manual_seed(1)
    model = Net().eval()  # eval: dropout and BatchNorm deterministic, so that two gradients compare exactly
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    params = list(model.parameters())
    big = _grad(model, (x, y))
    big_per_param = list(torch.split(big.float(), [p.numel() for p in params]))
    big_per_param = [g.view_as(p) for g, p in zip(big_per_param, params)]
    part = part_size(32)
    assert part == 8 and part_size(8) == 4
    small = _grad(model, (x[:part], y[:part]))
    rest = _grad(model, (x[part:], y[part:]))

    buffers = [b.clone() for b in model.buffers()]
    calls, logged = model.calls, list(model.logged)
    torch.manual_seed(0)
    figures = part_batch_figures(model, model.training_step, take_samples((x, y), 0, part), params, big_per_param)
    assert figures.dtype == torch.float64
    assert figures[0].item() == pytest.approx(float(small @ small), rel=1e-5)
    assert figures[1].item() == pytest.approx(float(big @ big), rel=1e-5)
    assert figures[2].item() == pytest.approx(float(small @ big), rel=1e-5)
    assert rest_sq_norm(*figures.tolist(), 32, part) == pytest.approx(float(rest @ rest), rel=1e-4)
    assert model.calls == calls and model.logged == logged and "log" not in model.__dict__
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None for p in params)


def test_training_mode_state_is_restored_and_a_refusal_says_so():
    torch.manual_seed(2)
    model = Net().train()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    params = list(model.parameters())
    rng, buffers = torch.get_rng_state(), [b.clone() for b in model.buffers()]
    figures = part_batch_figures(model, model.training_step, take_samples((x, y), 0, 4), params,
                                 [torch.ones_like(p) for p in params])
    assert figures is not None and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # BatchNorm statistics and its count
    with pytest.raises(PartBatchRefused, match="ValueError"):  # BatchNorm refuses one sample per channel in training
        part_batch_figures(model, model.training_step, take_samples((x, y), 0, 1), params, params)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
