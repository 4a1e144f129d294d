"""The learning-rate-or-code verdict where it used to go wrong: impossible losses, a weight state that a fresh
initialization fixes, a collapse after progress, stateful models and Lightning's demo modules.

Every scenario is a real ``Trainer.fit`` on CPU with its healthy twin. The probe's time budget is lifted
(``budget_fraction=None``) where a short test fit would otherwise (rightly) skip it: these tests are about the verdict;
``test_lr_probe.py`` tests the budget.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.demos import LightningLSTM
from pytorch_lightning.demos.boring_classes import BoringModel, DemoModel, ManualOptimBoringModel
from pytorch_lightning.demos.lstm import SimpleLSTM
from pytorch_lightning.demos.transformer import LightningTransformer, Transformer

from diag import signals
from diag.callbacks import Diagnostics, LearningRateProbe
from diag.detectors import loss_curve as rules
from diag.probe import RestorePoint, reinitialize, run_probe
from diag.stats.loss import LossStatistics
from tests.helpers import Classifier, assert_silent, codes, digits_loaders, fit, loaders_from, mlp, state_equal

VERDICTS = {"lr_too_high", "lr_too_low", "suspected_code_bug"}


def unbudgeted(**kwargs) -> Diagnostics:
    return Diagnostics(lr_probe=LearningRateProbe(budget_fraction=None), console=False, **kwargs)


def describe(findings) -> str:
    return "; ".join(f"{f.severity.value} {f.code} [{f.layer}] @{f.step}: {f.message}" for f in findings)


# ---- impossible losses ---------------------------------------------------------------------------------------
class TokenLM(nn.Module):
    """A next-token model: embedding, GRU, a linear head over the vocabulary: [B, T] -> [B, T, V]."""

    def __init__(self, vocab: int = 12, width: int = 24) -> None:
        super().__init__()
        self.emb, self.gru, self.head = nn.Embedding(vocab, width), nn.GRU(width, width, batch_first=True), nn.Linear(width, vocab)

    def forward(self, x):
        return self.head(self.gru(self.emb(x))[0])


def token_sequences(n: int = 1024, length: int = 10, vocab: int = 12, seed: int = 0):
    """Sequences that count up modulo the vocabulary from a random start: the next token is predictable."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    seq = (start + torch.arange(length + 1)) % vocab
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def lm_loss(sign: float):
    return lambda out, y: sign * F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


SHAPES = {
    "mlp_digits": (lambda loss: Classifier(mlp([64, 64, 10]), lr=1e-3, loss_fn=loss),
                   lambda sign: (lambda o, y: sign * F.cross_entropy(o, y)), lambda: digits_loaders(batch_size=32)[0]),
    "gru_language_model": (lambda loss: Classifier(TokenLM(), lr=3e-3, loss_fn=loss), lm_loss,
                           lambda: loaders_from(*token_sequences(), batch_size=32, val_fraction=0)[0]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_negated_loss_is_a_code_bug_within_50_steps(tmp_path, shape):
    make_model, make_loss, make_loader = SHAPES[shape]
    diagnostics = unbudgeted()
    pl.seed_everything(0)
    fit(tmp_path, make_model(make_loss(-1.0)), make_loader(), None, [diagnostics], max_steps=60, logger=False)
    bugs = [f for f in diagnostics.findings if f.code == "suspected_code_bug"]
    assert bugs and bugs[0].step <= 50 and bugs[0].severity.value == "error", describe(diagnostics.findings)
    assert "sign" in bugs[0].advice and bugs[0].evidence["first_loss"] < 0
    assert not codes(diagnostics.findings) & {"lr_too_high", "lr_too_low"}
    # the healthy twin: the same model and data with the loss the right way round
    twin = unbudgeted()
    pl.seed_everything(0)
    fit(tmp_path / "twin", make_model(make_loss(1.0)), make_loader(), None, [twin], max_steps=60, logger=False)
    assert not codes(twin.findings) & VERDICTS, describe(twin.findings)


class GaussianRegressor(pl.LightningModule):
    """Predicts a mean and a variance: its Gaussian NLL is legitimately negative once the fit is good."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp([8, 32, 2])

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        return F.gaussian_nll_loss(out[:, 0], y, F.softplus(out[:, 1]) + 1e-4)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_a_legitimately_negative_loss_is_no_bug(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g)
    y = x @ torch.randn(8, generator=g) * 0.3 + 0.05 * torch.randn(2048, generator=g)
    diagnostics = unbudgeted()
    pl.seed_everything(0)
    fit(tmp_path, GaussianRegressor(), loaders_from(x, y, val_fraction=0)[0], None, [diagnostics], max_steps=400,
        logger=False)
    loss = diagnostics.context.get(signals.LOSS_SMOOTHED)
    assert loss is not None and loss < -1.0  # it did go well below zero
    assert not codes(diagnostics.findings) & VERDICTS, describe(diagnostics.findings)


def _stats(values):
    stats = LossStatistics(window=50)
    for v in values:
        stats.update(v)
    return stats


def test_impossible_loss_rule_on_known_curves():
    ln10 = math.log(10)
    negated = [-ln10 - 0.02 * i for i in range(30)]  # starts at -ln C and falls
    assert rules.impossible_loss(_stats(negated), ln10).code == "suspected_code_bug"
    assert rules.impossible_loss(_stats(negated), None) is None  # without C: not yet 10x its start, no proof
    linear = [-0.5 - 0.4 * i for i in range(60)]  # no class count: falls linearly to 47x its first value
    assert rules.impossible_loss(_stats(linear), None) is not None
    decelerating = [1.0 - 3.0 * math.log1p(i) for i in range(200)]  # falls like a log (a shrinking variance)
    assert rules.impossible_loss(_stats(decelerating), None) is None
    dice = [-0.1 - 0.85 * (1 - math.exp(-i / 20)) for i in range(200)]  # a negated Dice score: bounded by -1
    assert rules.impossible_loss(_stats(dice), math.log(2)) is None
    assert rules.impossible_loss(_stats(dice), None) is None
    healthy = [ln10 * math.exp(-i / 50) for i in range(200)]
    assert rules.impossible_loss(_stats(healthy), ln10) is None
    far_below = [-3.0 * max(1.0, ln10) - 0.01 * i for i in range(20)]
    assert rules.impossible_loss(_stats(far_below), ln10) is not None


# ---- a weight state that a fresh initialization fixes: never a code bug --------------------------------------
class DeadCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                               nn.Flatten(), nn.Linear(512, 10))

    def forward(self, x):
        return self.f(x.view(-1, 1, 8, 8))


def dead_by_bias(model: nn.Module) -> nn.Module:
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for m in layers[:-1]:  # every hidden layer: a bias of -10 puts every ReLU unit at zero for every input
        nn.init.constant_(m.bias, -10.0)
    return model


@pytest.mark.parametrize("make_net", [lambda: mlp([64, 64, 64, 10]), DeadCNN], ids=["mlp", "cnn"])
def test_units_dead_from_the_init_are_dead_units_not_a_code_bug(tmp_path, make_net):
    diagnostics = unbudgeted()
    pl.seed_everything(0)
    fit(tmp_path, Classifier(dead_by_bias(make_net()), lr=1e-3), digits_loaders(batch_size=64)[0], None, [diagnostics],
        max_steps=90, logger=False)
    probe = diagnostics.monitor(LearningRateProbe)
    assert probe.results, "the stall was not probed: " + describe(diagnostics.findings)
    assert "suspected_code_bug" not in codes(diagnostics.findings, "info"), describe(diagnostics.findings)
    assert diagnostics.context.get(signals.PROBE_VERDICT) == "dead_units", describe(diagnostics.findings)
    assert "dead_units" in codes(diagnostics.findings)
    # the healthy twin (the layers' own init) stays silent
    twin = unbudgeted()
    pl.seed_everything(0)
    fit(tmp_path / "twin", Classifier(make_net(), lr=1e-3), digits_loaders(batch_size=64)[0], None, [twin],
        max_steps=90, logger=False)
    assert_silent(twin.findings)


def test_fresh_init_control_confirms_a_real_bug(tmp_path):
    """Shuffled labels: a freshly initialized copy cannot learn them either; the finding says so (once the validation
    loss has confirmed the probe: see test_lr_probe's misaligned-labels tests)."""
    from tests.helpers import digits_tensors
    x, y = digits_tensors()
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    diagnostics = unbudgeted()
    pl.seed_everything(0)
    fit(tmp_path, Classifier(mlp([64, 64, 10]), lr=1e-3), *loaders_from(x, y), [diagnostics], max_epochs=14,
        logger=False)
    bug = [f for f in diagnostics.findings if f.code == "suspected_code_bug"]
    assert bug and bug[0].severity.value == "error", describe(diagnostics.findings)
    assert "freshly initialized copy fails the same way" in bug[0].message
    assert "fresh_init_best_progress" in bug[0].evidence and "fresh_init_loss_fraction@x1" in bug[0].evidence


def test_reinitialize_names_modules_without_reset_parameters():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.full((4,), 7.0))

        def forward(self, x):
            return x * self.gain

    model = nn.Sequential(nn.Linear(4, 4), Scale())
    before = model[0].weight.detach().clone()
    rng = torch.get_rng_state()
    point = RestorePoint(model)
    kept = reinitialize(model)
    assert kept == ["1"] and not torch.equal(model[0].weight, before) and torch.equal(model[1].gain, torch.full((4,), 7.0))
    point.restore()
    assert torch.equal(model[0].weight, before) and torch.equal(torch.get_rng_state(), rng)


# ---- a collapse after progress -------------------------------------------------------------------------------
def test_a_collapse_after_progress_is_lr_too_high_not_a_code_bug(tmp_path):
    """SGD at lr 1.5 on the digits MLP (batch 32): the loss falls to ~0.8, then swings and blows up."""
    diagnostics = unbudgeted()
    pl.seed_everything(1)
    fit(tmp_path, Classifier(mlp([64, 64, 10]), lr=1.5, optimizer="sgd"),
        digits_loaders(batch_size=32, n_train=1400, seed=1)[0], None, [diagnostics], max_epochs=5, logger=False, seed=1)
    found = codes(diagnostics.findings, "info")
    assert "lr_too_high" in found and "suspected_code_bug" not in found, describe(diagnostics.findings)
    high = next(f for f in diagnostics.findings if f.code == "lr_too_high")
    assert high.evidence["suggested_lr"] < 1.5
    # healthy twin: SGD at 0.05 learns without collapsing
    twin = unbudgeted()
    pl.seed_everything(1)
    fit(tmp_path / "twin", Classifier(mlp([64, 64, 10]), lr=0.05, optimizer="sgd", momentum=0.9),
        digits_loaders(batch_size=32, n_train=1400, seed=1)[0], None, [twin], max_epochs=5, logger=False, seed=1)
    assert not codes(twin.findings) & VERDICTS, describe(twin.findings)


# ---- stateful models and Lightning's demo modules ---------------------------------------------------------------
class TinyLSTM(LightningLSTM):
    """Lightning's demo LSTM language model (hidden state of the full batch carried across batches), made small."""

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__(vocab_size=16)
        self.model = SimpleLSTM(vocab_size=16, ninp=16, nhid=16, nlayers=2, dropout=0.2)
        self.lr = lr

    def prepare_data(self) -> None:  # the demo downloads WikiText-2
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def lstm_loader():
    inputs, targets = token_sequences(n=640, length=12, vocab=16)
    return DataLoader(TensorDataset(inputs, targets), batch_size=16, drop_last=True)


def watched_and_unwatched(tmp_path, make_model, make_loader, steps: int, preflight_step: int):
    """The same fit without and with Diagnostics (a preflight probe, no budget): (unwatched, watched, diagnostics)."""
    pl.seed_everything(0)
    base = make_model()
    fit(tmp_path / "base", base, make_loader(), None, [], max_steps=steps, logger=False)
    diagnostics = Diagnostics(lr_probe=LearningRateProbe(preflight_step=preflight_step, budget_fraction=None),
                              console=False)
    pl.seed_everything(0)
    model = make_model()
    fit(tmp_path / "watched", model, make_loader(), None, [diagnostics], max_steps=steps, logger=False)
    return base, model, diagnostics


def test_stateful_lstm_is_probed_whole_and_training_is_unchanged(tmp_path):
    base, model, diagnostics = watched_and_unwatched(tmp_path, TinyLSTM, lstm_loader, steps=30, preflight_step=10)
    assert "diag_internal_error" not in codes(diagnostics.findings, "info"), describe(diagnostics.findings)
    probe = diagnostics.monitor(LearningRateProbe)
    assert len(probe.results) == 1 and probe.results[0].whole_batch  # half a batch does not fit the hidden state
    assert state_equal(base, model)  # the carried hidden state was put back: training bitwise unchanged


class SmallTransformer(LightningTransformer):
    def __init__(self) -> None:
        super().__init__(vocab_size=16)
        self.model = Transformer(vocab_size=16, ninp=16, nhead=2, nhid=16, nlayers=1)

    def prepare_data(self) -> None:
        pass


def demo_cases():
    def random_loader(dim=32, n=64, batch=8):
        return DataLoader(torch.randn(n, dim), batch_size=batch)

    return {
        "BoringModel": (BoringModel, lambda: random_loader()),
        "ManualOptimBoringModel": (ManualOptimBoringModel, lambda: random_loader()),
        "DemoModel": (DemoModel, lambda: random_loader()),
        "LightningTransformer": (SmallTransformer,
                                 lambda: DataLoader(TensorDataset(*token_sequences(n=64, length=8, vocab=16)), batch_size=8)),
        "LightningLSTM": (TinyLSTM, lstm_loader),
    }


@pytest.mark.parametrize("name", list(demo_cases()))
def test_lightning_demo_modules_never_raise_an_internal_error(tmp_path, name):
    make_model, make_loader = demo_cases()[name]
    diagnostics = Diagnostics(lr_probe=LearningRateProbe(preflight_step=3, budget_fraction=None), console=False)
    pl.seed_everything(0)
    fit(tmp_path, make_model(), make_loader(), None, [diagnostics], max_steps=12, logger=False)
    assert "diag_internal_error" not in codes(diagnostics.findings, "info"), describe(diagnostics.findings)
    if name in ("BoringModel", "LightningTransformer", "LightningLSTM"):  # (manual optimization is not probed; the
        assert diagnostics.monitor(LearningRateProbe).results, describe(diagnostics.findings)  # DemoModel's loss is 0)


def test_restore_point_puts_back_rebound_attributes():
    class Carry(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.hidden = None

        def forward(self, x):
            self.hidden = self.lin(x if self.hidden is None else x + self.hidden.detach())
            self.scratch = 1
            return self.hidden

    model = Carry()
    model(torch.randn(8, 3))
    hidden = model.hidden
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_probe(model, opt, lambda b: F.mse_loss(model(b[0]), b[1]), (torch.randn(8, 3), torch.randn(8, 3)), steps=3)
    assert model.hidden is hidden


class RunningInputMean(pl.LightningModule):
    """Carries state across batches in a plain attribute: a running mean of the inputs that the loss uses."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp([64, 32, 10])
        self.running = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        mean = x.mean(0).detach()
        self.running = mean if self.running is None else 0.9 * self.running + 0.1 * mean
        return F.cross_entropy(self.net(x - self.running), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_extra_passes_put_back_state_carried_in_attributes(tmp_path):
    """The gradient noise scale's extra pass (every 25 steps at 8 samples per batch) and the probe call training_step
    again: the attribute it rebinds is put back, so training is bitwise the same as without Diagnostics."""
    base, watched, diagnostics = watched_and_unwatched(
        tmp_path, RunningInputMean, lambda: digits_loaders(batch_size=8, n_train=512)[0], steps=120, preflight_step=30)
    assert diagnostics.monitor(LearningRateProbe).results
    assert state_equal(base, watched) and torch.equal(base.running, watched.running)


def test_fresh_init_that_replaces_parameters_is_undone():
    """A reset_parameters() that assigns new nn.Parameter objects: after the probe the module holds its own again."""
    class Rebinding(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(10, 4))

        def reset_parameters(self):
            self.weight = nn.Parameter(torch.zeros(10, 4))

        def forward(self, x):
            return x @ self.weight.t()

    model = Rebinding()
    weight = model.weight
    before = weight.detach().clone()
    point = RestorePoint(model)
    reinitialize(model)
    assert model.weight is weight and torch.equal(weight, torch.zeros(10, 4))  # refilled in place: the optimizer's
    model.weight = nn.Parameter(torch.ones(10, 4))  # a step that rebinds anyway is undone by the restore point
    point.restore()
    assert model.weight is weight and torch.equal(weight, before)
