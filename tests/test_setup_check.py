"""SetupCheck: optimizer weight decay / momentum / learning rate, BatchNorm on sequences and on small batches.

Every rule on a real fit where the fault is present, and on a healthy twin that must stay silent.
"""

import math

import pytest
import torch
from torch import nn

import lightning.pytorch as L
import pytorch_lightning as pl

from diag import Severity
from diag.callbacks import Monitor, SetupCheck
from diag.detectors import setup as rules
from tests.helpers import Classifier, LClassifier, codes, digits_loaders, fit, loaders_from, mlp


def _one(findings, code):
    found = [f for f in findings if f.code == code]
    assert len(found) == 1, findings
    return found[0]


def _fit(tmp_path, module, train, val=None, check=None, **kwargs):
    check = check or SetupCheck()
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("limit_train_batches", 4)
    kwargs.setdefault("limit_val_batches", 1)
    fit(tmp_path, module, train, val, callbacks=[check], logger=False, **kwargs)
    return check


# ---- optimizers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4),
    lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=1e-4),
    lambda p: torch.optim.NAdam(p, lr=1e-3, weight_decay=1e-4),
    lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=1e-4),
], ids=["Adam", "RMSprop", "NAdam", "Adagrad"])
def test_coupled_weight_decay_is_flagged(tmp_path, make):
    train, val = digits_loaders()
    check = _fit(tmp_path, Classifier(mlp([64, 32, 10]), optimizer=make), train, val)
    finding = _one(check.findings, "adam_coupled_weight_decay")
    assert finding.severity is Severity.WARNING and finding.step == 0
    assert "AdamW" in finding.advice and "weight_decay=" in finding.advice
    assert finding.evidence["weight_decay"] > 0


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
    lambda p: torch.optim.RAdam(p, lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
    lambda p: torch.optim.Adam(p, lr=1e-3),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
], ids=["AdamW", "Adam-decoupled", "RAdam-decoupled", "Adam-no-decay", "SGD-momentum-decay"])
def test_decoupled_or_no_decay_is_silent(tmp_path, make):
    train, val = digits_loaders()
    check = _fit(tmp_path, Classifier(mlp([64, 32, 10]), optimizer=make), train, val)
    assert not check.findings, check.findings


def test_decay_only_in_one_param_group_and_frozen_groups(tmp_path):
    """Decay on a group of frozen parameters does nothing: silent; decay on the trainable group: flagged."""
    net = mlp([64, 32, 10])
    for p in net[0].parameters():
        p.requires_grad_(False)

    def frozen_decayed(params):
        return torch.optim.Adam([{"params": net[0].parameters(), "weight_decay": 1e-3},
                                 {"params": net[2].parameters()}], lr=1e-3)

    train, val = digits_loaders()
    assert not _fit(tmp_path, Classifier(net, optimizer=frozen_decayed), train, val).findings

    net2 = mlp([64, 32, 10])

    def second_group_decayed(params):
        return torch.optim.Adam([{"params": net2[0].parameters()},
                                 {"params": net2[2].parameters(), "weight_decay": 1e-3}], lr=1e-3)

    finding = _one(_fit(tmp_path, Classifier(net2, optimizer=second_group_decayed), train, val).findings,
                   "adam_coupled_weight_decay")
    assert finding.evidence["groups_with_coupled_decay"] == 1 and "1 of 2 parameter groups" in finding.message


class _TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers (GAN style): only the second decays with an L2 term."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(64, 10), nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt, net in zip(self.optimizers(), (self.a, self.b)):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.a.parameters(), lr=1e-3), torch.optim.Adam(self.b.parameters(), lr=1e-3,
                                                                                 weight_decay=1e-4)


def test_several_optimizers_are_checked_each(tmp_path):
    train, _ = digits_loaders()
    check = _fit(tmp_path, _TwoOptimizers(), train)
    finding = _one(check.findings, "adam_coupled_weight_decay")
    assert finding.layer == "optimizer_1"


def test_unusual_learning_rate_is_an_info(tmp_path):
    train, val = digits_loaders()
    check = _fit(tmp_path, Classifier(mlp([64, 32, 10]), lr=0.1, optimizer="adam"), train, val)
    finding = _one(check.findings, "unusual_learning_rate")
    assert finding.severity is Severity.INFO and finding.evidence["lr"] == 0.1
    assert "above" in finding.message
    # a warm-up schedule starting from 0 is judged by its target, not its first value
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 100))
    assert opt.param_groups[0]["lr"] == 0 and rules.unusual_learning_rate(opt) is None
    assert rules.unusual_learning_rate(torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=1e-7)).severity == "info"
    assert rules.unusual_learning_rate(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)) is None


def test_sgd_without_momentum_is_an_info_and_momentum_is_silent(tmp_path):
    train, val = digits_loaders()
    check = _fit(tmp_path, Classifier(mlp([64, 32, 10]), lr=0.05, optimizer="sgd"), train, val)
    finding = _one(check.findings, "sgd_without_momentum")
    assert finding.severity is Severity.INFO and "momentum=0.9" in finding.advice
    check = _fit(tmp_path, Classifier(mlp([64, 32, 10]), lr=0.05, optimizer="sgd", momentum=0.9), train, val)
    assert not check.findings


class _ZigzagStandIn(Monitor):
    """Stands in for the gradient monitor: reports zig-zag updates at step 3 into the shared context."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 3:
            self.report("zigzag_updates", "stand-in: consecutive updates point in opposite directions")


def test_sgd_without_momentum_becomes_a_warning_with_zigzag(tmp_path):
    check, stand_in = SetupCheck(), _ZigzagStandIn()
    stand_in._attach(check.context)  # share the findings, as Diagnostics does
    train, val = digits_loaders()
    fit(tmp_path, Classifier(mlp([64, 32, 10]), lr=0.05, optimizer="sgd"), train, val, callbacks=[stand_in, check],
        logger=False, max_epochs=1, limit_train_batches=8)
    finding = _one(check.findings, "sgd_without_momentum")
    assert finding.severity is Severity.WARNING and finding.step == 4
    assert "zigzag_updates" in finding.message and finding.evidence["symptom"]
    # SGD with momentum is never escalated, whatever the other monitors see
    check, stand_in = SetupCheck(), _ZigzagStandIn()
    stand_in._attach(check.context)
    fit(tmp_path, Classifier(mlp([64, 32, 10]), lr=0.05, optimizer="sgd", momentum=0.9), train, val,
        callbacks=[stand_in, check], logger=False, max_epochs=1, limit_train_batches=8)
    assert not check.findings


# ---- BatchNorm on sequences -------------------------------------------------------------------------------
def token_data(n=640, length=12, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    labels = ((tokens < vocab // 2).sum(1) > length // 2).long()
    return tokens, labels


class EmbedBatchNormGRU(nn.Module):
    """The fault: Embedding -> BatchNorm1d over (batch, features, time) -> GRU."""

    def __init__(self, vocab=20, dim=16):
        super().__init__()
        self.embed, self.norm = nn.Embedding(vocab, dim), nn.BatchNorm1d(dim)
        self.rnn, self.head = nn.GRU(dim, dim, batch_first=True), nn.Linear(dim, 2)

    def forward(self, tokens):
        h = self.norm(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        out, _ = self.rnn(h)
        return self.head(out[:, -1])


class EmbedFlatBatchNorm(nn.Module):
    """The fault without recurrence: per-token features flattened to (batch * time, features) for BatchNorm1d."""

    def __init__(self, vocab=20, dim=16):
        super().__init__()
        self.embed, self.proj, self.norm, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.Linear(dim, 2)

    def forward(self, tokens):
        b, t = tokens.shape
        h = self.proj(self.embed(tokens)).reshape(b * t, -1)
        h = torch.relu(self.norm(h)).reshape(b, t, -1)
        return self.head(h.mean(1))


class EmbedLayerNormGRU(nn.Module):
    """The healthy twin: LayerNorm over the feature axis."""

    def __init__(self, vocab=20, dim=16):
        super().__init__()
        self.embed, self.norm = nn.Embedding(vocab, dim), nn.LayerNorm(dim)
        self.rnn, self.head = nn.GRU(dim, dim, batch_first=True), nn.Linear(dim, 2)

    def forward(self, tokens):
        out, _ = self.rnn(self.norm(self.embed(tokens)))
        return self.head(out[:, -1])


class EmbedLayerNormTransformer(nn.Module):
    def __init__(self, vocab=20, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


@pytest.mark.parametrize("net", [EmbedBatchNormGRU, EmbedFlatBatchNorm])
def test_batchnorm_on_token_sequences_is_flagged(tmp_path, net):
    train, val = loaders_from(*token_data(), batch_size=32)
    check = _fit(tmp_path, Classifier(net(), lr=3e-3), train, val)
    finding = _one(check.findings, "batchnorm_on_sequence")
    assert finding.severity is Severity.WARNING and finding.layer == "net.norm"
    assert "LayerNorm" in finding.advice and "embedding net.embed" in finding.message
    assert "batchnorm_small_batch" not in codes(check.findings)


@pytest.mark.parametrize("net", [EmbedLayerNormGRU, EmbedLayerNormTransformer])
def test_layernorm_sequence_models_are_silent(tmp_path, net):
    train, val = loaders_from(*token_data(), batch_size=32)
    check = _fit(tmp_path, Classifier(net(), lr=3e-3, optimizer="adamw", weight_decay=1e-2), train, val)
    assert not check.findings, check.findings


def signal_data(n=640, length=64, seed=0):
    """Two classes of noisy sine waves, (N, 1, L) floats."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    t = torch.linspace(0, 1, length)
    freq = torch.where(labels == 0, 3.0, 7.0)[:, None]
    x = torch.sin(2 * math.pi * freq * t + torch.rand(n, 1, generator=g) * 6.28) + 0.3 * torch.randn(n, length, generator=g)
    return x[:, None, :], labels


class SignalConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.Conv1d(8, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool1d(1))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class SignalConvBNAttention(SignalConvBN):
    """Conformer-like: float sequences, BatchNorm over time in a conv block, then self-attention."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.features[:-1](x).transpose(1, 2)
        h, _ = self.attention(h, h, h)
        return self.head(h.mean(1))


def test_conv1d_batchnorm_signal_model_is_silent(tmp_path):
    train, val = loaders_from(*signal_data(), batch_size=32)
    check = _fit(tmp_path, Classifier(SignalConvBN(), lr=3e-3), train, val)
    assert not check.findings, check.findings


def test_batchnorm_over_time_in_float_sequence_attention_model_is_only_an_info(tmp_path):
    train, val = loaders_from(*signal_data(), batch_size=32)
    check = _fit(tmp_path, Classifier(SignalConvBNAttention(), lr=3e-3), train, val)
    finding = _one(check.findings, "batchnorm_on_sequence")
    assert finding.severity is Severity.INFO and "MultiheadAttention" in finding.message


# ---- BatchNorm with small batches -------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


@pytest.mark.parametrize("batch_size,severity", [(4, "warning"), (12, "info"), (64, None)])
def test_batchnorm_small_batch(tmp_path, batch_size, severity):
    train, val = digits_loaders(batch_size=batch_size)
    check = _fit(tmp_path, Classifier(DigitsCNN(), lr=3e-3), train, val)
    if severity is None:
        assert not check.findings, check.findings
        return
    finding = _one(check.findings, "batchnorm_small_batch")
    assert finding.severity.value == severity and finding.evidence["samples_per_batch"] == batch_size
    assert finding.evidence["layers"] == 2 and "GroupNorm" in finding.advice


def test_batchnorm_in_eval_mode_is_not_judged(tmp_path):
    """Frozen BatchNorm (eval mode, as in fine-tuning) uses running statistics: small batches are fine."""

    class FrozenBN(Classifier):
        def on_train_epoch_start(self):
            self.net.features.eval()

    train, val = digits_loaders(batch_size=4)
    check = _fit(tmp_path, FrozenBN(DigitsCNN(), lr=3e-3), train, val)
    assert not check.findings, check.findings


def test_hooks_are_removed_after_the_first_batch(tmp_path):
    net = EmbedBatchNormGRU()
    train, val = loaders_from(*token_data(), batch_size=32)
    _fit(tmp_path, Classifier(net), train, val)
    assert not any(m._forward_pre_hooks for m in net.modules())


# ---- both namespaces, unchanged training ------------------------------------------------------------------
def _weights_after(tmp_path, namespace, callbacks):
    cls = LClassifier if namespace is L else Classifier
    train, val = digits_loaders(batch_size=16, n_train=320)
    namespace.seed_everything(0, workers=True)
    module = cls(nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)), lr=0.05,
                 optimizer="sgd", weight_decay=1e-4)
    namespace.seed_everything(0, workers=True)
    t = namespace.Trainer(default_root_dir=str(tmp_path), max_epochs=2, enable_progress_bar=False, logger=False,
                          enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                          callbacks=callbacks)
    t.fit(module, train, val)
    return module


@pytest.mark.parametrize("namespace", [pl, L], ids=["pytorch_lightning", "lightning.pytorch"])
def test_training_is_bitwise_unchanged(tmp_path, namespace):
    from tests.helpers import state_equal

    check = SetupCheck()
    with_check = _weights_after(tmp_path / "a", namespace, [check])
    without = _weights_after(tmp_path / "b", namespace, [])
    assert state_equal(with_check, without)
    assert codes(check.findings, "info") == {"sgd_without_momentum"}


# ---- arguments, checkpoints ----------------------------------------------------------------------------
def test_arguments_are_validated():
    with pytest.raises(TypeError, match="`optimizer` must be True or False"):
        SetupCheck(optimizer="yes")
    with pytest.raises(TypeError, match="`normalization`"):
        SetupCheck(normalization=1)


def test_state_round_trip_keeps_findings_and_flags(tmp_path):
    train, val = loaders_from(*token_data(), batch_size=32)
    check = _fit(tmp_path, Classifier(EmbedBatchNormGRU(), optimizer="adam", weight_decay=1e-4), train, val)
    state = check.state_dict()
    fresh = SetupCheck()
    fresh.load_state_dict(state)
    assert [f.code for f in fresh.findings] == [f.code for f in check.findings]
    assert fresh._normalization_done
    assert SetupCheck().state_key != SetupCheck(normalization=False).state_key


def test_unwrap_lightning_optimizer():
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(2))], weight_decay=1e-3)

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert rules.unwrap_optimizer(Wrapper(opt)) is opt
    assert rules.unwrap_optimizer(pl.core.optimizer.LightningOptimizer(opt)) is opt
