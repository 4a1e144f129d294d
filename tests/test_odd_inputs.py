"""Odd batches and steps, and bounded messages: real fits where each used to go wrong.

- a dataclass batch skipped every data check (a tuple of the same raw inputs gets ``inputs_not_normalized``);
- a ``training_step`` returning ``None`` every third batch gave a false ``exploding_gradients`` ("grew to non-finite
  values ... now nan"): the skipped steps have no gradient at all;
- ``nn.Embedding(sparse=True)`` made the gradient monitor fail with a 14,049-character internal-error message.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from diag.callbacks import Diagnostics, GradientMonitor, Monitor

from .helpers import Classifier, assert_silent, codes, digits_loaders, digits_tensors, fit, mlp


# ---- dataclass and namedtuple batches -----------------------------------------------------------------------------
@dataclasses.dataclass
class DigitsBatch:
    pixels: torch.Tensor  # not an obvious input name: read by position, like a tuple
    digit: torch.Tensor


PairBatch = collections.namedtuple("PairBatch", ["pixels", "digit"])


class Samples(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def loader_of(kind: str, n: int = 512, batch_size: int = 64) -> DataLoader:
    """Raw 0..16 digits pixels (not normalized) as batches of ``kind``: tuple, dataclass or namedtuple."""
    x, y = digits_tensors(standardize=False, n=n)
    make = {"tuple": tuple, "dataclass": lambda parts: DigitsBatch(*parts),
            "namedtuple": lambda parts: PairBatch(*parts)}[kind]

    def collate(items):
        return make((torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])))

    return DataLoader(Samples(x, y), batch_size=batch_size, shuffle=False, collate_fn=collate)


class AnyBatch(Classifier):
    """Reads ``(x, y)`` from a tuple, a namedtuple or the dataclass."""

    def training_step(self, batch, batch_idx):
        if dataclasses.is_dataclass(batch):
            batch = (batch.pixels, batch.digit)
        return super().training_step(tuple(batch), batch_idx)


@pytest.mark.parametrize("kind", ["tuple", "dataclass", "namedtuple"])
def test_dataclass_and_namedtuple_batches_are_read_like_tuples(tmp_path, kind):
    callback = Diagnostics(console=False, gradients=GradientMonitor(noise_scale_interval=2))
    t = fit(tmp_path, AnyBatch(mlp([64, 32, 10])), loader_of(kind), None, [callback], max_epochs=1)
    assert "inputs_not_normalized" in codes(callback.findings)
    assert "diag_internal_error" not in {f.code for f in callback.findings}
    # the gradient noise scale re-runs training_step on part of the batch: sliced in its own type
    acc = EventAccumulator(t.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("diag/batch_size")] == [64.0]  # one estimate in 8 steps, against 64 samples


# ---- steps whose training_step returns None ------------------------------------------------------------------------
class SkipsEveryThird(Classifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 3 == 0 else loss


def test_steps_without_a_loss_are_skipped_by_the_statistics(tmp_path):
    # 20 batches per epoch: every sampled step (multiples of 20 after the warm-up) is a skipped one (batch_idx 0)
    train, val = digits_loaders(n_train=1280)
    callback = Diagnostics(console=False)
    fit(tmp_path, SkipsEveryThird(mlp([64, 32, 10])), train, val, [callback], max_epochs=4, logger=False)
    assert "diag_internal_error" not in {f.code for f in callback.findings}
    assert_silent(callback.findings)  # was: exploding_gradients "grew to non-finite values ... (now nan)"
    gradients = callback.monitor(GradientMonitor)
    (state,) = gradients._states.values()
    assert state.recent_log10_norms and all(math.isfinite(v) for v in state.recent_log10_norms)


# ---- sparse gradients ----------------------------------------------------------------------------------------------
class SparseEmbedding(Classifier):
    """Digits pixels (0..16) as 64 tokens of a 17-word vocabulary, through ``nn.Embedding(sparse=True)``."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Embedding(17, 8, sparse=True), nn.Flatten(), nn.Linear(64 * 8, 10)),
                         lr=0.05, optimizer="sgd", momentum=0.9)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x.long(), y), batch_idx)


def test_sparse_gradients_are_measured_never_an_internal_error(tmp_path, caplog):
    x, y = digits_tensors(standardize=False, n=640)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    callback = Diagnostics(console=False, gradients=GradientMonitor(interval=2))
    with caplog.at_level(logging.INFO, logger="diag"):
        t = fit(tmp_path, SparseEmbedding(), train, None, [callback], max_epochs=2)
    assert "diag_internal_error" not in {f.code for f in callback.findings}
    acc = EventAccumulator(t.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    embedding = [e.value for e in acc.Scalars("diag/grad_norm/net.0")]
    assert embedding and all(math.isfinite(v) and v > 0 for v in embedding)
    # the noise scale compares two gradients entry by entry: skipped for sparse ones, said once
    said = [r.getMessage() for r in caplog.records if "sparse gradients" in r.getMessage()]
    assert len(said) == 1 and "diag/grad_noise_scale" not in acc.Tags()["scalars"]


def test_sparse_gradient_norm_is_the_dense_norm():
    from diag.monitors.gradients import _norm_view  # the glue's helper, checked against the dense norm

    emb = nn.Embedding(17, 8, sparse=True)
    emb(torch.tensor([[1, 2, 2, 16], [2, 3, 1, 1]])).pow(2).sum().backward()
    assert emb.weight.grad.is_sparse and not emb.weight.grad.is_coalesced()  # duplicates, as the embedding leaves them
    assert torch.allclose(_norm_view(emb.weight.grad).norm(), emb.weight.grad.to_dense().norm())


# ---- bounded messages ----------------------------------------------------------------------------------------------
class Verbose(Monitor):
    """Fails with an exception whose text is 20,000 characters on several lines (as a dispatcher error is)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise NotImplementedError("Could not run 'aten::op' with arguments from the 'SparseCPU' backend.\n" +
                                  "registered at some/kernel.cpp:42 [backend fallback]\n" * 400)


def test_internal_error_message_is_bounded_and_the_traceback_goes_to_debug(tmp_path, caplog):
    monitor = Verbose()
    train, _ = digits_loaders(n_train=128)
    with caplog.at_level(logging.DEBUG, logger="diag"):
        fit(tmp_path, Classifier(mlp([64, 10])), train, None, [monitor], max_epochs=1, logger=False)
    (error,) = [f for f in monitor.findings if f.code == "diag_internal_error"]
    assert len(error.message) <= 500 and "\n" not in error.message
    assert "NotImplementedError" in error.message and "SparseCPU" in error.message
    assert all(len(str(v)) <= 500 for v in error.evidence.values())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "diag"]
    assert warnings and all(len(r.getMessage()) <= 800 for r in warnings)
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert len(debug) == 1 and "kernel.cpp:42" in str(debug[0].exc_info[1])
