"""DataMonitor: input normalization, class imbalance, train/validation overlap; the batch parsing and the statistics.

Rules on real fits (fault and healthy twin); statistics against brute force; training and batches unchanged.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L
import pytorch_lightning as pl

from diag import Severity
from diag.batch import batch_parts, split_batch
from diag.callbacks import DataMonitor
from diag.detectors import data as rules
from diag.stats.data import (KEPT_TARGET_BATCHES, DigestSet, FeatureMoments, LabelCounts, feature_axis,
                             sample_digests, summarize)
from tests.helpers import Classifier, LClassifier, codes, digits_loaders, digits_tensors, fit, mlp, state_equal


def _one(findings, code):
    found = [f for f in findings if f.code == code]
    assert len(found) == 1, findings
    return found[0]


def _fit(tmp_path, module, train, val=None, monitor=None, **kwargs):
    monitor = monitor or DataMonitor()
    kwargs.setdefault("max_epochs", 1)
    fit(tmp_path, module, train, val, callbacks=[monitor], logger=False, **kwargs)
    return monitor


def _loaders(x, y, n_train, batch_size=64, val_x=None, val_y=None):
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=True, generator=g)
    vx = x[n_train:] if val_x is None else val_x
    vy = y[n_train:] if val_y is None else val_y
    return train, DataLoader(TensorDataset(vx, vy), batch_size=256)


# ---- inputs_not_normalized -------------------------------------------------------------------------------
def test_raw_digits_warn_and_standardized_digits_are_silent(tmp_path):
    train, val = digits_loaders(standardize=False)
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), train, val)
    finding = _one(monitor.findings, "inputs_not_normalized")
    assert finding.severity is Severity.WARNING and "raw integer intensities" in finding.message
    assert "divide by 16" in finding.advice and finding.evidence["median_feature_rms"] > rules.LARGE_SCALE
    train, val = digits_loaders(standardize=True)
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), train, val)
    assert not monitor.findings, monitor.findings


def test_images_0_255_warn_with_per_channel_advice_and_unit_range_is_info(tmp_path):
    x, y = digits_tensors(standardize=False)
    pixels = (x * 255 / 16).round().view(-1, 1, 8, 8)
    cnn = lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                nn.Linear(32, 10))
    monitor = _fit(tmp_path, Classifier(cnn()), *_loaders(pixels, y, 1400))
    finding = _one(monitor.findings, "inputs_not_normalized")
    assert finding.severity is Severity.WARNING and "divide by 255" in finding.advice
    assert "transforms.Normalize(mean=[" in finding.advice and finding.evidence["max_value"] == 255
    monitor = _fit(tmp_path, Classifier(cnn()), *_loaders(1 - pixels / 255, y, 1400))  # bright images in [0, 1]
    finding = _one(monitor.findings, "inputs_not_normalized")
    assert finding.severity is Severity.INFO and "[0, 1] but not centered" in finding.message


class NormalizesInside(nn.Module):
    """Takes raw digits and standardizes them in forward (statistics held as buffers): a healthy model."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = mlp([64, 32, 10])

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def test_normalization_inside_the_model_is_only_an_info(tmp_path):
    x, y = digits_tensors(standardize=False)
    module = Classifier(NormalizesInside(x[:1400].mean(0), x[:1400].std(0) + 1e-3))
    monitor = _fit(tmp_path, module, *_loaders(x, y, 1400))
    finding = _one(monitor.findings, "inputs_not_normalized")
    assert finding.severity is Severity.INFO and finding.evidence["normalized_inside_at"] == "net.net.0"
    assert "normalize them in forward" in finding.message


def _breast_cancer(standardize):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    if standardize:
        x = (x - x[:450].mean(0)) / x[:450].std(0)
    return torch.from_numpy(x), torch.from_numpy(y)


def test_tabular_features_of_different_scales_warn_and_standardized_are_silent(tmp_path):
    x, y = _breast_cancer(standardize=False)
    monitor = _fit(tmp_path, Classifier(mlp([30, 32, 2])), *_loaders(x, y, 450, batch_size=32))
    finding = _one(monitor.findings, "inputs_not_normalized")
    assert finding.severity is Severity.WARNING and "differ by a factor" in finding.message
    assert finding.evidence["std_spread_ratio"] > rules.SPREAD_RATIO and "StandardScaler" in finding.advice
    x, y = _breast_cancer(standardize=True)
    monitor = _fit(tmp_path, Classifier(mlp([30, 32, 2])), *_loaders(x, y, 450, batch_size=32))
    assert not monitor.findings, monitor.findings


def test_offset_features_warn(tmp_path):
    """Iris-like measurements: positive lengths whose means sit far from zero relative to their spread."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (900,), generator=g)
    x = torch.tensor([5.8, 3.1, 3.8, 1.2]) + torch.tensor([0.8, 0.4, 1.8, 0.8]) * (torch.randn(900, 4, generator=g) + y[:, None] * 0.5) / 2
    monitor = _fit(tmp_path, Classifier(mlp([4, 16, 3])), *_loaders(x, y, 700))
    finding = _one(monitor.findings, "inputs_not_normalized")
    assert finding.severity is Severity.WARNING and "standard deviations from zero" in finding.message


def test_binary_and_one_hot_features_and_token_ids_are_silent(tmp_path):
    g = torch.Generator().manual_seed(0)
    flags = (torch.rand(1000, 12, generator=g) < torch.linspace(0.05, 0.95, 12)).float()  # flags, some mostly on
    one_hot = nn.functional.one_hot(torch.randint(0, 6, (1000,), generator=g), 6).float()
    x = torch.cat([flags, one_hot], 1)
    y = (flags[:, 0] + one_hot[:, 0] > 0).long()
    monitor = _fit(tmp_path, Classifier(mlp([18, 16, 2])), *_loaders(x, y, 800))
    assert not codes(monitor.findings, "info") & {"inputs_not_normalized"}, monitor.findings

    tokens = torch.randint(0, 50, (600, 10), generator=g)
    labels = (tokens[:, 0] < 25).long()
    net = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(80, 2))
    monitor = _fit(tmp_path, Classifier(net), *_loaders(tokens, labels, 500))
    assert not monitor.findings, monitor.findings


# ---- class_imbalance --------------------------------------------------------------------------------------
def _imbalanced_digits(keep_zero=0.05):
    x, y = digits_tensors()
    keep = (y != 0) | (torch.arange(len(y)) % int(1 / keep_zero) == 0)
    return x[keep], y[keep]


def test_class_imbalance_warns_and_balanced_labels_are_silent(tmp_path):
    x, y = _imbalanced_digits()
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), *_loaders(x, y, 1300))
    finding = _one(monitor.findings, "class_imbalance")
    counts = torch.bincount(y[:1300])
    assert finding.severity is Severity.WARNING and finding.evidence["rarest_class"] == 0
    assert finding.evidence["rarest_count"] == counts[0] and finding.evidence["max_min_ratio"] == pytest.approx(
        counts.max().item() / counts[0].item(), rel=1e-3)
    assert "CrossEntropyLoss(weight=" in finding.advice
    train, val = digits_loaders()
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), train, val)
    assert not monitor.findings


def test_label_ordered_batches_are_an_info_and_shuffled_ones_are_silent(tmp_path):
    """The digits sorted by label and loaded with shuffle=False: 1.4 distinct labels per batch where random batches of
    64 would hold 9.99. The same data shuffled: nothing."""
    x, y = digits_tensors()
    order = torch.argsort(y[:1400], stable=True)
    ordered = DataLoader(TensorDataset(x[:1400][order], y[:1400][order]), batch_size=64, shuffle=False)
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), ordered)
    finding = _one(monitor.findings, "batches_not_shuffled")
    assert finding.severity is Severity.INFO and "shuffle=True" in finding.advice
    assert finding.evidence["mean_distinct_labels_per_batch"] < 2 and finding.evidence["expected_if_shuffled"] > 9.9
    train, val = digits_loaders()
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), train, val)
    assert not monitor.findings


def test_expected_distinct_labels_match_brute_force():
    """Exact: every batch of 3 drawn from 10 samples of labels (4, 3, 2, 1) enumerated."""
    import itertools

    labels = [0] * 4 + [1] * 3 + [2] * 2 + [3]
    combos = list(itertools.combinations(range(len(labels)), 3))
    brute = sum(len({labels[i] for i in c}) for c in combos) / len(combos)
    assert rules.expected_distinct([4, 3, 2, 1], 3) == pytest.approx(brute, rel=1e-12)
    assert rules.expected_distinct([5, 5], 10) == pytest.approx(2.0)
    assert rules.expected_distinct([7], 3) == pytest.approx(1.0)
    # too few batches, too few labels to expect, or batches as mixed as random ones: no finding
    assert rules.batches_not_shuffled([100] * 10, 1.2, 7, 64) is None
    assert rules.batches_not_shuffled([100, 100, 100], 1.0, 20, 64) is None  # 3 labels expected: below 4
    assert rules.batches_not_shuffled([100] * 10, 9.5, 20, 64) is None
    assert rules.batches_not_shuffled([100] * 10, 1.2, 20, 64).code == "batches_not_shuffled"


def test_label_counts_distinct_labels_per_batch_match_brute_force():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 9, (n,), generator=g) for n in (5, 64, 17, 1)] + [torch.tensor([-100, 3, 3])]
    batches += [torch.full((32,), 4)] * (KEPT_TARGET_BATCHES + 3)  # across a fold of the kept copies
    counts = LabelCounts()
    for y in batches:
        assert counts.update(y)
    out = counts.compute()
    distinct = [len({int(v) for v in y.tolist() if v >= 0}) for y in batches]
    assert out["batches"] == len(batches) and out["mean_distinct"] == pytest.approx(sum(distinct) / len(batches))
    assert out["mean_batch_size"] == pytest.approx(sum(len(y) for y in batches) / len(batches))


def _bce(weight=None):
    return lambda logits, target: nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), target,
                                                                                  pos_weight=weight)


def test_binary_float_targets_and_weighted_loss(tmp_path):
    x, y = digits_tensors()
    target = (y == 0).float()  # digit zero versus the rest: about 10% positives
    keep = (target == 0) | (torch.arange(len(y)) % 3 == 0)  # one third of the positives: about 3.5%
    x, target = x[keep], target[keep]
    monitor = _fit(tmp_path, Classifier(mlp([64, 16, 1]), loss_fn=_bce()), *_loaders(x, target, 1300))
    finding = _one(monitor.findings, "class_imbalance")
    assert finding.severity is Severity.WARNING and "pos_weight=torch.tensor(" in finding.advice
    assert finding.evidence["target_kind"] == "binary_float"

    class Weighted(Classifier):
        def __init__(self):
            super().__init__(mlp([64, 16, 1]))
            self.criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(25.0))
            self.loss_fn = lambda logits, t: self.criterion(logits.squeeze(-1), t)

    monitor = _fit(tmp_path, Weighted(), *_loaders(x, target, 1300))
    assert _one(monitor.findings, "class_imbalance").severity is Severity.INFO


def test_regression_targets_are_not_counted(tmp_path):
    x, y = digits_tensors()
    target = y.float() ** 2  # skewed, but a regression target
    mse = lambda out, t: nn.functional.mse_loss(out.squeeze(-1), t)
    monitor = _fit(tmp_path, Classifier(mlp([64, 16, 1]), loss_fn=mse), *_loaders(x, target, 1400))
    assert not monitor.findings, monitor.findings


# ---- train_val_overlap -----------------------------------------------------------------------------------
def test_validation_drawn_from_training_data_warns(tmp_path):
    x, y = digits_tensors()
    train, _ = _loaders(x, y, 1400)
    leaked = DataLoader(TensorDataset(x[1000:1400], y[1000:1400]), batch_size=256)  # all of it in training
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), train, leaked)
    finding = _one(monitor.findings, "train_val_overlap")
    assert finding.severity is Severity.WARNING
    # 16 of 22 training batches hashed: 73% of the training set; every validation sample is a training sample
    assert finding.evidence["overlap_share"] > 0.8 and finding.evidence["validation_samples_hashed"] == 400
    assert "Deduplicate" in finding.advice


def test_partly_overlapping_split_is_measured(tmp_path):
    x, y = digits_tensors()
    train, _ = _loaders(x, y, 1400)
    half = DataLoader(TensorDataset(x[1200:1600], y[1200:1600]), batch_size=256)  # 200 of 400 in training
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), train, half, monitor=DataMonitor(max_batches=100))
    finding = _one(monitor.findings, "train_val_overlap")
    assert finding.evidence["overlap_share"] == pytest.approx(0.5) and finding.evidence["train_fraction_hashed"] == 1.0


def test_disjoint_splits_are_silent_and_the_sanity_check_is_skipped(tmp_path):
    train, val = digits_loaders()
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), train, val, num_sanity_val_steps=2, max_epochs=2)
    assert not monitor.findings, monitor.findings


def test_same_loader_for_training_and_validation(tmp_path):
    x, y = digits_tensors(n=640)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), loader, loader, monitor=DataMonitor(max_batches=4))
    finding = _one(monitor.findings, "train_val_overlap")
    assert finding.severity is Severity.WARNING and finding.evidence["overlap_share"] == 1.0
    assert finding.evidence["train_fraction_hashed"] == pytest.approx(0.4)


def test_overlap_rule_on_low_cardinality_inputs_is_an_info():
    train = {bytes([i]): 50 for i in range(8)}  # 8 distinct inputs, each seen 50 times
    val = {bytes([i]): 10 for i in range(8)}
    verdict = rules.train_val_overlap(train, 400, val, 400)
    assert verdict.severity == "info" and verdict.evidence["overlap_share"] == 1.0
    assert rules.train_val_overlap({b"a": 1, b"b": 1}, 2, {b"c": 1}, 2) is None


# ---- dict batches (Hugging Face style) ----------------------------------------------------------------------
class TokenDictModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(30, 8), nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        h = (self.embed(batch["input_ids"]) * batch["attention_mask"][..., None]).sum(1)
        return nn.functional.cross_entropy(self.head(h), batch["labels"])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _token_dicts(n, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        label = 0 if skew and torch.rand(1, generator=g) < 0.97 else int(torch.randint(0, 3, (1,), generator=g))
        out.append({"ids": torch.randint(1, 30, (length,), generator=g), "label": label})
    return out


def _pad(samples, width=None):
    width = width or max(len(s["ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : len(s["ids"])], mask[i, : len(s["ids"])] = s["ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([s["label"] for s in samples])}


def test_dict_batches_with_padding(tmp_path):
    """Validation reuses training sentences padded to another length: still found; skewed labels counted."""
    samples = _token_dicts(600, seed=0, skew=True)
    train = DataLoader(samples, batch_size=32, collate_fn=_pad)
    val = DataLoader(samples[:100], batch_size=50, collate_fn=lambda s: _pad(s, width=12))
    monitor = _fit(tmp_path, TokenDictModule(), train, val, monitor=DataMonitor(max_batches=100))
    assert codes(monitor.findings) == {"train_val_overlap", "class_imbalance"}
    assert _one(monitor.findings, "train_val_overlap").evidence["overlap_share"] == 1.0


# ---- properties: unchanged training, both namespaces --------------------------------------------------------
class RecordsBatches(Classifier):
    def __init__(self, net):
        super().__init__(net, lr=0.05, optimizer="sgd", momentum=0.9)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.double().sum().item(), int(y.sum())))
        return super().training_step(batch, batch_idx)


def test_training_and_batches_are_bitwise_unchanged(tmp_path):
    def run(callbacks, sub):
        train, val = digits_loaders(batch_size=32, n_train=480)
        pl.seed_everything(0, workers=True)
        module = RecordsBatches(mlp([64, 32, 10]))
        fit(tmp_path / sub, module, train, val, callbacks=callbacks, logger=False, max_epochs=2)
        return module

    monitor = DataMonitor(max_batches=4)
    with_monitor, without = run([monitor], "a"), run([], "b")
    assert state_equal(with_monitor, without) and with_monitor.seen == without.seen
    assert not monitor.findings


def test_lightning_pytorch_namespace(tmp_path):
    train, val = digits_loaders(standardize=False, n_train=640)
    monitor = DataMonitor()
    L.seed_everything(0)
    t = L.Trainer(default_root_dir=str(tmp_path), max_epochs=1, enable_progress_bar=False, logger=False,
                  enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                  callbacks=[monitor])
    t.fit(LClassifier(mlp([64, 32, 10])), train, val)
    assert codes(monitor.findings) == {"inputs_not_normalized"}


def test_arguments_and_state(tmp_path):
    with pytest.raises(ValueError, match="max_batches"):
        DataMonitor(max_batches=0)
    with pytest.raises(ValueError, match="max_hashes"):
        DataMonitor(max_hashes="many")
    with pytest.raises(TypeError, match="input_key"):
        DataMonitor(input_key=1.5)
    with pytest.raises(TypeError, match="select"):
        DataMonitor(select="x")
    train, val = digits_loaders(standardize=False, n_train=640)
    monitor = _fit(tmp_path, Classifier(mlp([64, 32, 10])), train, val)
    fresh = DataMonitor()
    fresh.load_state_dict(monitor.state_dict())
    assert [f.code for f in fresh.findings] == ["inputs_not_normalized"] and fresh._inputs_done
    assert DataMonitor().state_key != DataMonitor(input_key="pixels").state_key


def test_input_and_target_keys_for_unusual_batches(tmp_path):
    class KeyedModule(Classifier):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["pixels"], batch["cls"]), batch_idx)

        def validation_step(self, batch, batch_idx):
            pass

    x, y = digits_tensors(standardize=False, n=640)
    loader = DataLoader([{"pixels": a, "cls": b} for a, b in zip(x, y)], batch_size=64)
    assert not _fit(tmp_path, KeyedModule(mlp([64, 32, 10])), loader).findings  # not recognized: silent
    monitor = _fit(tmp_path, KeyedModule(mlp([64, 32, 10])), loader,
                   monitor=DataMonitor(input_key="pixels", target_key="cls"))
    assert codes(monitor.findings) == {"inputs_not_normalized"}
    monitor = _fit(tmp_path, KeyedModule(mlp([64, 32, 10])), loader,
                   monitor=DataMonitor(select=lambda b: (b["pixels"], b["cls"])))
    assert codes(monitor.findings) == {"inputs_not_normalized"}


# ---- batch parsing ----------------------------------------------------------------------------------------
def test_split_batch_shapes():
    x, y = torch.randn(4, 3), torch.arange(4)
    assert split_batch((x, y)).inputs is x and split_batch([x, y]).targets is y
    assert split_batch(x).inputs is x and split_batch(x).targets is None
    assert split_batch((x, y, torch.ones(4))).targets is None  # (x, y, w): only the inputs are sure
    assert split_batch(((x, x), y)) is None
    assert split_batch((x, torch.arange(5))).targets is None  # not one target per sample
    ids, mask = torch.ones(4, 6, dtype=torch.long), torch.ones(4, 6)
    hf = split_batch({"input_ids": ids, "attention_mask": mask, "labels": y})
    assert hf.inputs is ids and hf.mask is mask and hf.targets is y and hf.batch_size == 4
    assert split_batch({"image": x, "label": y}).targets is y
    assert split_batch({"foo": x}) is None and split_batch("text") is None and split_batch(torch.tensor(1.0)) is None
    assert batch_parts({"a": x, "b": y}, input_key="a", target_key="b").targets is y
    assert batch_parts((y, x), input_key=1, target_key=0).inputs is x


# ---- statistics against brute force --------------------------------------------------------------------------
def test_feature_moments_match_brute_force():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 10, 1e-3, 100, 1])
    batches = [torch.randn(n, 5, generator=g) * scales + 1e4 for n in (7, 64, 1, 33)]  # far from zero: shift matters
    batches[0][:, 4] = 3.0  # integer-valued column in the first batch
    moments = FeatureMoments()
    for b in batches:
        assert moments.update(b, axis=1)
    full = torch.cat(batches).double()
    s = moments.compute()
    assert s["count"] == len(full)
    torch.testing.assert_close(s["mean"], full.mean(0), rtol=1e-6, atol=1e-6)  # float32 sums per batch
    torch.testing.assert_close(s["std"], full.std(0, unbiased=False), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s["min"], full.amin(0))
    torch.testing.assert_close(s["max"], full.amax(0))
    assert s["non_integer"].tolist() == (full != full.round()).sum(0).double().tolist()
    assert not moments.update(torch.randn(3, 4), axis=1)  # another feature count is refused
    assert not FeatureMoments().update(torch.ones(3, 4, dtype=torch.long), axis=1)  # token ids are not features


def test_feature_moments_per_channel_and_value_cap():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(n, 3, 5, 5, generator=g) * torch.tensor([1.0, 255, 0.01])[:, None, None] for n in (4, 9)]
    moments = FeatureMoments()
    for b in images:
        assert moments.update(b, axis=feature_axis(b.shape))
    per_channel = torch.cat(images).double().transpose(0, 1).reshape(3, -1)
    s = moments.compute()
    torch.testing.assert_close(s["mean"], per_channel.mean(1))
    torch.testing.assert_close(s["std"], per_channel.std(1, unbiased=False), rtol=1e-4, atol=1e-7)
    assert s["count"] == 13 * 25
    capped = FeatureMoments(max_values=3 * 25 * 2)  # two images per batch
    capped.update(images[1], axis=1)
    torch.testing.assert_close(capped.compute()["mean"], images[1][:2].double().mean((0, 2, 3)))
    last = torch.rand(6, 5, 5, 3, generator=g)  # channels last
    torch.testing.assert_close(summarize(last, feature_axis(last.shape))["mean"], last.double().mean((0, 1, 2)))


def test_feature_axes():
    assert feature_axis(torch.Size([8, 3, 5, 5])) == 1  # channels
    assert feature_axis(torch.Size([8, 5, 5, 3])) == 3  # channels last
    assert feature_axis(torch.Size([8, 2, 100])) == 1  # signal (N, C, L)
    assert feature_axis(torch.Size([8, 100, 6])) == 2  # sequence (N, T, F)
    assert feature_axis(torch.Size([8, 64])) == 1 and feature_axis(torch.Size([8])) is None
    assert summarize(torch.randn(8))["mean"].shape == (1,)


def test_label_counts_match_bincount():
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 7, (n,), generator=g) for n in (5, 64, 17)]
    counts = LabelCounts()
    for y in labels:
        assert counts.update(y)
    assert counts.update(torch.tensor([-100, 3]))  # ignore_index is not counted as a class
    out = counts.compute()
    expected = torch.bincount(torch.cat(labels + [torch.tensor([3])]), minlength=7).tolist()
    assert out["kind"] == "integer" and out["counts"] == expected and out["other"] == 1
    soft = LabelCounts()
    assert soft.update(torch.tensor([0.0, 1.0, 0.3])) and soft.compute()["other"] == 1
    seq = LabelCounts()
    assert not seq.update(torch.zeros(4, 6, dtype=torch.long)) and seq.compute() is None


def test_label_counts_count_the_labels_as_they_were_in_bounded_groups():
    """Labels are counted from a copy, in groups of KEPT_TARGET_BATCHES batches (bounded memory, no kernel per batch
    but a copy): a loader that refills one buffer and a training step that shifts the labels in place afterwards change
    nothing; the counts equal bincount over every batch as it was handed over."""
    g = torch.Generator().manual_seed(0)
    counts, binary = LabelCounts(), LabelCounts()
    buffer, flags = torch.empty(32, dtype=torch.long), torch.empty(32, 1)
    seen, seen_flags = [], []
    for _ in range(2 * KEPT_TARGET_BATCHES + 5):
        buffer.copy_(torch.randint(0, 5, (32,), generator=g))  # one buffer, refilled for every batch
        flags.copy_((torch.rand(32, 1, generator=g) > 0.8).float())
        seen.append(buffer.clone())
        seen_flags.append(flags.clone())
        assert counts.update(buffer) and binary.update(flags)
        buffer.add_(1)  # e.g. 1-based labels shifted in place by the training step
        flags.mul_(3)
        assert len(counts._kept) <= KEPT_TARGET_BATCHES
    out = counts.compute()
    assert out["kind"] == "integer" and out["counts"] == torch.bincount(torch.cat(seen), minlength=5).tolist()
    flags_out = binary.compute()
    positives = int(torch.cat(seen_flags).sum())
    assert flags_out["kind"] == "binary_float" and flags_out["other"] == 0
    assert flags_out["counts"] == [len(seen_flags) * 32 - positives, positives]


def test_digests_ignore_padding_and_tell_samples_apart():
    a = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 8, 0, 0]])
    mask = (a != 0).long()
    b = torch.tensor([[5, 6, 7, 0, 0, 0, 0]])
    da, db = sample_digests(a, mask), sample_digests(b, (b != 0).long())
    assert da[0] == db[0] and da[0] != da[1]
    x = torch.randn(3, 4)
    assert sample_digests(x) == sample_digests(x.clone()) and len(set(sample_digests(x))) == 3
    assert sample_digests(x.to(torch.bfloat16))[0] != sample_digests(x)[0]
    capped = DigestSet(2)
    capped.add(sample_digests(x))
    assert len(capped) == 2 and capped.samples == 2 and capped.full


def test_through_diagnostics(tmp_path):
    """Composed in Diagnostics (hooks forwarded, one shared context): both checks report on a leaky, raw setup."""
    from diag.callbacks import Diagnostics

    x, y = digits_tensors(standardize=False)
    train, _ = _loaders(x, y, 1400)
    leaked = DataLoader(TensorDataset(x[:300], y[:300]), batch_size=256)
    diagnostics = Diagnostics(loss_curve=False, lr_probe=False, gradients=False, activations=False, fit=False)
    fit(tmp_path, Classifier(mlp([64, 32, 10]), optimizer="adam", weight_decay=1e-4), train, leaked,
        callbacks=[diagnostics], max_epochs=1)
    assert codes(diagnostics.findings) == {"inputs_not_normalized", "train_val_overlap", "adam_coupled_weight_decay"}
    assert diagnostics.context.get("data/batch_size") == 64


def test_regression_targets_far_from_unit_scale_are_an_info_and_unit_ones_are_silent(tmp_path):
    """Targets around 5000 (std 2000): the info, with what standardizing means. The same targets standardized, a
    2-D target, class labels and [0, 1] soft targets: nothing. The figures against brute force over the batches seen."""
    from tests.test_healthy_suite import Regressor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 8, generator=g)
    y = 5000 + 2000 * (x[:, 0] - 0.5 * x[:, 1] ** 2) + 100 * torch.randn(1200, generator=g)
    in_order = DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=64)  # (the first 8 batches: y[:512])
    monitor = _fit(tmp_path, Regressor(), in_order)
    finding = _one(monitor.findings, "targets_not_normalized")
    assert finding.severity is Severity.INFO and "Standardize the targets" in finding.advice
    seen = y[:8 * 64]
    assert finding.evidence["values_per_feature"] == 8 * 64
    assert finding.evidence["median_feature_rms"] == pytest.approx(float(seen.double().square().mean().sqrt()), rel=1e-3)
    standardized = (y - y[:1000].mean()) / y[:1000].std()
    monitor = _fit(tmp_path, Regressor(), *_loaders(x, standardized, 1000))
    assert "targets_not_normalized" not in {f.code for f in monitor.findings}
    assert rules.targets_not_normalized(summarize(torch.rand(256, 3), 1)) is None  # in [0, 1]: probabilities, masks
    assert rules.targets_not_normalized(summarize(300 * torch.randn(256, 2, generator=g), 1)).code == "targets_not_normalized"
