"""The one definition of a batch (diag.batch): sizes, samples, targets, zeroed inputs and the loss of a step."""

import collections
import dataclasses

import torch

from diag.batch import (batch_size, halves, loss_of, map_tensors, take_samples, targets_of, tensors_in,
                        zero_inputs)

Pair = collections.namedtuple("Pair", ["pixels", "digit"])


@dataclasses.dataclass
class Named:
    image: torch.Tensor
    label: torch.Tensor


@dataclasses.dataclass
class Unnamed:
    pixels: torch.Tensor
    digit: torch.Tensor


def test_size_and_samples_keep_the_batch_type():
    x, y = torch.randn(8, 3), torch.arange(8)
    for batch in [(x, y), [x, y], {"x": x, "y": y}, Pair(x, y), Unnamed(x, y), {"a": [x, {"b": y}]}]:
        assert batch_size(batch) == 8
        part = take_samples(batch, 2, 5)
        assert type(part) is type(batch) and batch_size(part) == 3
        assert torch.equal(tensors_in(part)[0], x[2:5]) and tensors_in(part)[0]._base is x  # a view
    meta = {"x": x, "n": torch.tensor(3), "name": "digits"}
    assert take_samples(meta, 0, 2)["n"] is meta["n"] and take_samples(meta, 0, 2)["name"] == "digits"
    assert batch_size("text") == 0 and batch_size(torch.tensor(1.0)) == 0 and batch_size(None) == 0


def test_halves_are_copies_and_need_four_samples():
    x, y = torch.randn(10, 3), torch.arange(10)
    a, b = halves((x, y), samples=6)
    assert torch.equal(a[0], x[:3]) and torch.equal(b[1], y[3:6])
    a[0].zero_()
    assert x[:3].abs().sum() > 0  # the batch Lightning handed over is never touched
    assert halves((x[:3], y[:3]), samples=6) is None
    assert batch_size(halves(Unnamed(x, y), samples=8)[1]) == 4


def test_targets_and_zeroed_inputs_agree():
    x, y, w = torch.randn(4, 3), torch.arange(4), torch.ones(4)
    assert targets_of((x, y)) is y and targets_of((x, y, w)) is w and targets_of({"image": x, "labels": y}) is y
    assert targets_of(x) is None
    for batch, target in [((x, y), y), (Pair(x, y), y), (Named(x, y), y), (Unnamed(x, y), y)]:
        zeroed = zero_inputs(batch)
        assert type(zeroed) is type(batch)
        parts = list(zeroed) if isinstance(zeroed, tuple) else list(dataclasses.asdict(zeroed).values())
        assert parts[-1] is target or torch.equal(parts[-1], target)
        assert parts[0].abs().sum() == 0
    out = zero_inputs({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3),
                       "Weights": torch.ones(2)})
    assert out["input_ids"].sum() == 0 and out["attention_mask"].sum() == 6 and out["Weights"].sum() == 2


def test_loss_of_a_step_output():
    loss = torch.tensor(0.5)
    assert loss_of(loss) is loss and loss_of({"loss": loss, "out": 1}) is loss
    assert loss_of(collections.OrderedDict(loss=loss)) is loss
    assert loss_of({"loss": 0.5}) is None and loss_of(None) is None and loss_of([loss]) is None


def test_map_tensors_and_depth():
    x = torch.ones(2)
    assert map_tensors({"a": (x, [x])}, lambda t: t * 2)["a"][1][0].sum() == 4
    assert len(tensors_in({"a": {"b": {"c": x}}}, max_depth=2)) == 0 and len(tensors_in({"a": {"b": x}}, max_depth=2)) == 1
