"""Checkpoints: a run stopped mid-way and resumed with ``ckpt_path=`` and a *new* ``Diagnostics()`` gets its
findings and its monitors' state back, and reports nothing twice (JSONL, console).

The run has faults that are found in its first epoch (raw 0..16 pixel inputs, Adam with coupled weight decay,
sigmoid layers), so that there is something to restore. Lightning keeps a callback's state in the checkpoint
under ``callback.state_key`` and loads it with ``torch.load(weights_only=...)``: the state must be plain data.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import lightning.pytorch as L
import pytorch_lightning as pl

from diag.callbacks import Diagnostics
from diag.sinks import read_findings
from tests.helpers import digits_loaders
from tests.test_configurations import DiagLogRecords, assert_no_internal_error, diag_log  # noqa: F401 (fixture)

NAMESPACES = {"pytorch_lightning": pl, "lightning.pytorch": L}


class _Faulty:
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, weight_decay=1e-2)


def _module(namespace):
    return type("Faulty", (_Faulty, namespace.LightningModule), {})()


class _StateAtTrainStart:
    """Placed after Diagnostics: what it holds once the checkpoint is loaded and every fit-start hook has run."""

    def __init__(self, diagnostics: Diagnostics) -> None:
        self.diagnostics = diagnostics
        self.findings = None
        self.state = None

    def on_train_start(self, trainer, pl_module):
        self.findings = {f.key: f.severity.value for f in self.diagnostics.findings}
        self.state = self.diagnostics.state_dict()


def _probe(namespace, diagnostics):
    return type("StateAtTrainStart", (_StateAtTrainStart, namespace.Callback), {})(diagnostics)


def _same(a, b, path="state") -> None:
    """Deep equality of checkpoint states (tensors compared exactly, NaN equal to NaN)."""
    assert type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))), f"{path}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num()), path
    elif isinstance(a, float) and a != a:
        assert b != b, f"{path}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _trainer(namespace, root, callbacks, **kwargs):
    defaults = dict(default_root_dir=str(root), max_epochs=2, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1, log_every_n_steps=1, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return namespace.Trainer(callbacks=callbacks, **defaults)


def _console_findings(log: DiagLogRecords) -> list:
    return [m for m in log.messages() if m.startswith(("lightning-diag WARNING", "lightning-diag ERROR"))]


@pytest.mark.parametrize("where", ["epoch_end", "mid_epoch"])
@pytest.mark.parametrize("ns", ["pytorch_lightning", "lightning.pytorch"])
def test_resume_restores_findings_and_state_without_repeats(tmp_path, ns, where, diag_log):
    namespace = NAMESPACES[ns]
    train, val = digits_loaders(batch_size=32, n_train=640, standardize=False)  # 20 steps per epoch
    ckpt_dir = tmp_path / "ckpts"
    if where == "epoch_end":
        checkpoint = namespace.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, every_n_epochs=1)
    else:
        checkpoint = namespace.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, every_n_train_steps=30)

    # run 1: two epochs, a checkpoint after the first (or at step 30, mid-way through the second epoch)
    first = Diagnostics()
    pl.seed_everything(0)
    t1 = _trainer(namespace, tmp_path / "run1", [first, checkpoint])
    t1.fit(_module(namespace), train, val)
    assert_no_internal_error(first.findings)
    ckpt_path = str(ckpt_dir / ("epoch=0-step=20.ckpt" if where == "epoch_end" else "epoch=1-step=30.ckpt"))
    assert os.path.exists(ckpt_path), sorted(os.listdir(ckpt_dir))

    # the checkpoint holds the callback's state under its state_key, as plain data (Lightning may load it with
    # weights_only=True)
    try:
        ckpt = torch.load(ckpt_path, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError names the type that is not plain data
        pytest.fail(f"the Diagnostics state in the checkpoint is not plain data (torch.load(weights_only=True)): {exc}")
    saved = ckpt["callbacks"][first.state_key]
    saved_findings = {(d["code"], d["layer"]): d["severity"] for d in saved["collector"]["findings"]}
    assert saved_findings, "no finding was raised before the checkpoint: the test model lost its faults"
    assert set(saved["monitors"]) == {type(m).__name__ for m in first.monitors}

    # run 2: a new Diagnostics, resumed from the checkpoint, into a new log directory
    diag_log.records.clear()
    second = Diagnostics()
    at_start = _probe(namespace, second)
    pl.seed_everything(0)
    t2 = _trainer(namespace, tmp_path / "run2", [second, at_start])
    t2.fit(_module(namespace), train, val, ckpt_path=ckpt_path)
    assert t2.state.finished and t2.current_epoch == 2
    assert_no_internal_error(second.findings)

    # findings and monitor state came back before training went on
    assert at_start.findings is not None and saved_findings.items() <= at_start.findings.items()
    _same(saved["monitors"], at_start.state["monitors"], "monitors")
    final = {f.key: f.severity.value for f in second.findings}
    assert saved_findings.keys() <= final.keys()
    for key, severity in saved_findings.items():  # a severity may rise, never fall
        assert ["info", "warning", "error"].index(final[key]) >= ["info", "warning", "error"].index(severity)

    # nothing reported twice: the JSONL holds each (code, layer) once per severity, the restored ones included
    path = os.path.join(t2.log_dir, "diag", "findings.jsonl")
    with open(path, encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    keys = [(d["code"], d["layer"], d["severity"]) for d in lines]
    assert len(keys) == len(set(keys)), keys
    assert {f.key: f.severity.value for f in read_findings(path)} == final
    # ... and the console prints only what is new in run 2 (or rose in severity), each once
    printed = _console_findings(diag_log)
    assert len(printed) == len(set(printed)), printed
    for (code, layer), severity in saved_findings.items():
        if final[(code, layer)] == severity:
            head = f"lightning-diag {severity.upper()} {code}" + (f" [{layer}]" if layer else " at step")
            again = [m for m in printed if m.startswith(head)]
            assert not again, f"restored finding printed again: {again}"


def test_state_round_trips_through_load_state_dict(tmp_path):
    """``load_state_dict(state_dict())`` on a new instance gives the same state back, for every monitor."""
    train, val = digits_loaders(batch_size=32, n_train=320, standardize=False)
    first = Diagnostics()
    pl.seed_everything(0)
    _trainer(pl, tmp_path, [first], enable_checkpointing=False).fit(_module(pl), train, val)
    state = first.state_dict()
    assert state["collector"]["findings"]
    second = Diagnostics()
    second.load_state_dict(state)
    _same(state, second.state_dict())
    assert [f.to_dict() for f in second.findings] == [f.to_dict() for f in first.findings]
    assert_no_internal_error(second.findings)


def test_state_keys_are_stable_and_distinct():
    """Lightning matches checkpoint entries by ``state_key``: a new instance with the same arguments has the same."""
    from diag.callbacks import GradientMonitor

    assert Diagnostics().state_key == Diagnostics().state_key
    a, b = GradientMonitor(), GradientMonitor(interval=3)
    assert a.state_key != b.state_key
    assert len({m.state_key for m in Diagnostics().monitors}) == len(Diagnostics().monitors)


def _assert_plain(value, path="state") -> None:
    """Checkpoint data: dicts with string keys, lists, strings, numbers, booleans, None; tensors only on the CPU (the
    activation moments' vectors, which ``torch.load(weights_only=True)`` reads)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"{path}: key {k!r} is a {type(k).__name__}"
            _assert_plain(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _assert_plain(v, f"{path}[{i}]")
    elif isinstance(value, torch.Tensor):
        assert value.device.type == "cpu", f"{path}: a tensor on {value.device}"
    else:
        assert value is None or type(value) in (bool, int, float, str), f"{path}: a {type(value).__name__}"


class _Snapshot:
    """Placed after Diagnostics: its state_dict mid-way through the second epoch (a checkpoint's moment)."""

    def __init__(self, diagnostics: Diagnostics, at_step: int) -> None:
        self.diagnostics, self.at_step, self.state = diagnostics, at_step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            self.state = self.diagnostics.state_dict()


def test_each_monitor_state_round_trips_as_plain_data(tmp_path):
    """For every monitor: the declared state (``STATE``) after a real fit, mid-epoch and at the end, loaded into a new
    monitor gives the same state back, holds only plain data, and survives ``torch.save``/``torch.load(weights_only)``."""
    import io

    from diag.monitors.state import state_key

    train, val = digits_loaders(batch_size=32, n_train=640, standardize=False)  # 20 steps per epoch
    diagnostics = Diagnostics()
    snapshot = type("Snapshot", (_Snapshot, pl.Callback), {})(diagnostics, at_step=27)
    pl.seed_everything(0)
    _trainer(pl, tmp_path, [diagnostics, snapshot], enable_checkpointing=False).fit(_module(pl), train, val)
    assert_no_internal_error(diagnostics.findings)
    assert snapshot.state is not None
    as_new = set()
    for when, states in (("mid_epoch", snapshot.state["monitors"]), ("end", diagnostics.state_dict()["monitors"])):
        for monitor in diagnostics.monitors:
            name = f"{when}.{type(monitor).__name__}"
            state = states[type(monitor).__name__]["monitor"]
            assert {state_key(n) for n in type(monitor).STATE} <= set(state), name
            _assert_plain(state, name)
            fresh = type(monitor)()
            if state == fresh.state_dict()["monitor"]:
                as_new.add(name)
            fresh.load_state_dict({"monitor": state})
            _same(state, fresh.state_dict()["monitor"], name)
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            _same(state, torch.load(buffer, weights_only=True), name)
    # the fit changed every monitor's state (the probe is never asked for on this model: it has nothing to keep)
    assert as_new == {"mid_epoch.LearningRateProbe", "end.LearningRateProbe"}, as_new


def test_declared_state_saves_and_loads_each_kind_of_value():
    """A deque keeps its maxlen, a set stays a set, a tuple a tuple, an object with state_dict is loaded in place; a
    key the checkpoint lacks keeps the constructor's value; what is not plain data is refused."""
    import collections

    from diag.monitors.state import load_state, save_state
    from diag.stats.gradients import EMA

    class Holder:
        STATE = ("_recent", "_reasons", "_pair", "_count", "_level", "_done", "_last", "ema")

        def __init__(self) -> None:
            self._recent = collections.deque(maxlen=3)
            self._reasons: set = set()
            self._pair = ("", "")
            self._count, self._level, self._done, self._last = 0, 0.0, False, None
            self.ema = EMA(0.5)

    a = Holder()
    a._recent.extend([1.0, 2.0, 3.0, 4.0])
    a._reasons.update({"b", "a"})
    a._pair, a._count, a._level, a._done, a._last = ("x", "y"), 7, 0.25, True, 3
    a.ema.update(2.0)
    state = save_state(a, Holder.STATE)
    assert state == {"recent": [2.0, 3.0, 4.0], "reasons": ["a", "b"], "pair": ["x", "y"], "count": 7, "level": 0.25,
                     "done": True, "last": 3, "ema": a.ema.state_dict()}
    b = Holder()
    ema = b.ema
    load_state(b, Holder.STATE, state)
    assert b._recent == collections.deque([2.0, 3.0, 4.0]) and b._recent.maxlen == 3
    assert b._reasons == {"a", "b"} and b._pair == ("x", "y") and (b._count, b._level, b._done, b._last) == (7, 0.25, True, 3)
    assert b.ema is ema and b.ema.compute() == a.ema.compute()
    c = Holder()
    load_state(c, Holder.STATE, {"count": 2})  # an older checkpoint without the other keys
    assert c._count == 2 and c._recent.maxlen == 3 and not c._recent and c._reasons == set() and c._pair == ("", "")
    c._last = torch.zeros(2)
    with pytest.raises(TypeError):
        save_state(c, Holder.STATE)


def test_a_checkpoint_of_the_release_before_declared_state_still_loads_its_renamed_keys():
    """Keys written by the hand-made state of the previous release (``probe_requests``; per optimizer ``early`` and
    ``recent``) load into the attributes that now carry other names."""
    from diag.callbacks import LossCurveMonitor
    from diag.monitors.gradients import _OptimizerState

    loss = LossCurveMonitor()
    loss._load_monitor_state({"probe_requests": ["loss_stalled"]})
    assert loss._requested == {"loss_stalled"}
    state = _OptimizerState(["w"], [torch.nn.Parameter(torch.zeros(2))])
    state.load_state_dict({"names": ["w"], "early": [1.0, 2.0], "recent": [3.0]})
    assert state.early_log10_norms == [1.0, 2.0] and list(state.recent_log10_norms) == [3.0]
    from diag.stats.fit import RunningMean

    mean = RunningMean()
    mean.load_state_dict([0.5, 4])  # the fit monitor's since_evaluation as [mean, count]
    assert mean.state_dict() == {"total": 2.0, "count": 4}
    from diag.callbacks import FitMonitor

    fit = FitMonitor()  # "none yet" written as 0, "" and [] by the previous release
    fit._load_monitor_state({"num_classes": 0, "pending": [], "val_key": "", "accuracy_key": "",
                             "since_evaluation": [0.5, 4], "first_loss": 2.3})
    assert fit._num_classes is None and fit._pending is None and fit._val_key is None and fit._accuracy_key is None
    assert fit._since_evaluation.count == 4 and fit._first_loss == 2.3
    fit._load_monitor_state({"pending": [0.7, 0.5, 2, 90], "val_key": "val_loss", "num_classes": 10})
    assert fit._pending == (0.7, 0.5, 2, 90) and fit._val_key == "val_loss" and fit._num_classes == 10
