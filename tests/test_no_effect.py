"""Observing does not change training, and watching costs bounded memory.

* Same seed, with and without ``Diagnostics()``: bitwise-equal final weights and BatchNorm buffers, the same RNG
  states after the fit, the same samples read from the dataset, the same forward calls in the same train/eval
  modes (a healthy run with dropout and BatchNorm, in both namespaces; and a run where the learning-rate probe
  runs, since the probe must put back everything it touches).
* Memory: what the monitors hold (tensors, containers; a ``deque`` counted at its ``maxlen``) is the same after
  2,000 steps as after 200, and the callback's ``state_dict`` no larger after 2,000 steps than after 1,500 (once
  the longest fixed window, 64 epochs, is full).
"""

from __future__ import annotations

import collections
import io
import random
from typing import Any, Dict, Optional

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning.pytorch as L
import pytorch_lightning as pl

from diag.callbacks import Diagnostics, LearningRateProbe
from tests.helpers import digits_tensors
from tests.test_configurations import assert_no_internal_error

NAMESPACES = {"pytorch_lightning": pl, "lightning.pytorch": L}


class CountingDataset(Dataset):
    """Counts every sample read: a monitor must not pull extra data."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


class _Net:
    """Dropout and BatchNorm; records the mode of every forward call the model sees."""

    def __init__(self, optimizer: str = "adam", lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
        self.optimizer_name, self.lr = optimizer, lr
        self.forward_modes: list = []

    def forward(self, x):
        self.forward_modes.append((self.training, self.net[3].training, len(x)))
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
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=15, gamma=0.8)}


def _run(tmp_path, namespace, with_diag: bool, epochs: int = 3, diagnostics_kwargs: Optional[Dict[str, Any]] = None,
         **module_kwargs) -> Dict[str, Any]:
    x, y = digits_tensors()
    train_set, val_set = CountingDataset(x[:640], y[:640]), CountingDataset(x[640:896], y[640:896])
    pl.seed_everything(0)
    module = type("Net", (_Net, namespace.LightningModule), {})(**module_kwargs)
    callbacks = [Diagnostics(**(diagnostics_kwargs or {}))] if with_diag else []
    trainer = namespace.Trainer(default_root_dir=str(tmp_path / ("diag" if with_diag else "plain")), max_epochs=epochs,
                                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                accelerator="cpu", devices=1, log_every_n_steps=1, num_sanity_val_steps=0,
                                callbacks=callbacks)
    trainer.fit(module, DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(val_set, batch_size=128))
    if with_diag:
        assert_no_internal_error(callbacks[0].findings)
    return {
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
        "reads": (train_set.reads, val_set.reads),
        "forward_modes": module.forward_modes,
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "diagnostics": callbacks[0] if with_diag else None,
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor (so that NaN equals NaN and -0.0 differs from 0.0)."""
    t = t.detach().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_same_training(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    differ = [k for k in a["weights"] if not torch.equal(_bits(a["weights"][k]), _bits(b["weights"][k]))]
    assert not differ, f"observing changed the final weights/buffers: {differ}"
    for pid, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(_bits(v), _bits(b["optimizer"]["state"][pid][k])), f"optimizer state {pid}.{k}"
    assert a["lr"] == b["lr"], "the learning-rate schedule moved"
    assert torch.equal(a["torch_rng"], b["torch_rng"]), "the torch RNG was drawn from"
    assert np.array_equal(a["numpy_rng"], b["numpy_rng"]), "the numpy RNG was drawn from"
    assert a["python_rng"] == b["python_rng"], "the python RNG was drawn from"
    assert a["reads"] == b["reads"], f"samples read (train, val): {a['reads']} without vs {b['reads']} with Diagnostics"


@pytest.mark.parametrize("ns", ["pytorch_lightning", "lightning.pytorch"])
def test_observing_does_not_change_a_healthy_run(tmp_path, ns):
    plain = _run(tmp_path, NAMESPACES[ns], with_diag=False)
    watched = _run(tmp_path, NAMESPACES[ns], with_diag=True)
    _assert_same_training(plain, watched)
    # no train/eval flip the model can see: every forward call of the plain run happens, in the same mode, in the
    # watched one (which may add quiet extra passes, e.g. the gradient noise scale's half batch), and no extra
    # call is in a mode the plain run never used
    plain_calls, watched_calls = plain["forward_modes"], iter(watched["forward_modes"])
    assert all(any(call == other for other in watched_calls) for call in plain_calls), "a forward call changed mode"
    assert {c[:2] for c in watched["forward_modes"]} == {c[:2] for c in plain_calls}


@pytest.mark.slow
def test_the_probe_puts_everything_back(tmp_path):
    """A run that stalls (SGD at a learning rate far too low) makes the loss monitor call the probe; the probe's
    throw-away fits must leave weights, optimizer, scheduler, BatchNorm buffers and RNG states as they were."""
    plain = _run(tmp_path, pl, with_diag=False, epochs=4, optimizer="sgd", lr=1e-5)
    # (the time budget lifted: a sweep costs more than 10% of this 80-step fit, and the default would skip it)
    watched = _run(tmp_path, pl, with_diag=True, epochs=4, optimizer="sgd", lr=1e-5,
                   diagnostics_kwargs={"lr_probe": LearningRateProbe(budget_fraction=None)})
    probe = watched["diagnostics"].monitor(LearningRateProbe)
    if probe is None or not probe.results:
        codes = sorted({(f.code, f.severity.value) for f in watched["diagnostics"].findings})
        pytest.fail(f"the probe did not run on a stalled run (findings: {codes}): nothing was tested")
    _assert_same_training(plain, watched)


# ---- bounded memory -------------------------------------------------------------------------------------
_SKIP_TYPES = (nn.Module, torch.optim.Optimizer, type, type(len), type(lambda: 0))


def footprint(obj: Any, _path=None, _depth: int = 0) -> int:
    """How many numbers an object holds: tensor elements, container items (a deque at its maxlen), recursively
    through plain objects' attributes. Models, optimizers, trainers and functions are references, not holdings.
    An object reached twice is counted twice (so that the count does not depend on which reference is seen first);
    only cycles are cut."""
    path = _path if _path is not None else set()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, complex, np.generic)):
        return 1
    if id(obj) in path or _depth > 25 or isinstance(obj, _SKIP_TYPES) or callable(obj) and not hasattr(obj, "__dict__"):
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, np.ndarray):
        return obj.size
    if type(obj).__module__.split(".")[0] in ("pytorch_lightning", "lightning", "torch", "threading", "logging"):
        return 0  # the Trainer, the strategy, hook handles, locks...
    path.add(id(obj))
    try:
        if isinstance(obj, collections.deque) and obj.maxlen is not None:
            per_item = max((footprint(v, path, _depth + 1) for v in obj), default=1)
            return obj.maxlen * max(per_item, 1)
        if isinstance(obj, dict):
            return sum(1 + footprint(v, path, _depth + 1) for k, v in obj.items())
        if isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            return sum(footprint(v, path, _depth + 1) for v in obj) + len(obj)
        attrs = getattr(obj, "__dict__", None)
        if attrs is None and hasattr(obj, "__slots__"):
            attrs = {s: getattr(obj, s, None) for s in obj.__slots__}
        return footprint(attrs, path, _depth + 1) if attrs else 0
    finally:
        path.discard(id(obj))


def _holdings(diagnostics: Diagnostics) -> Dict[str, int]:
    """Per monitor: its attributes minus what it shares with the others (the context, the trainer and the composing
    Diagnostics; the findings are counted on their own)."""
    out = {}
    for monitor in diagnostics.monitors:
        attrs = {k: v for k, v in vars(monitor).items() if k not in ("_context", "_trainer", "_owner")}
        out[type(monitor).__name__] = footprint(attrs)
    out["signals"] = footprint(diagnostics.context.signals) + footprint(diagnostics.context.probe_requests)
    return out


def _state_size(diagnostics: Diagnostics, with_bytes: bool = True) -> Dict[str, int]:
    state = diagnostics.state_dict()
    sizes = {name: footprint(sub) for name, sub in state["monitors"].items()}
    sizes["findings"] = len(state["collector"]["findings"])
    if with_bytes:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        sizes["bytes"] = buffer.getbuffer().nbytes
    return sizes


# Holdings and states fluctuate within a sampling cycle (e.g. activation moments exist only inside a window of
# sampled steps), so each is taken as its maximum over a span of 80 steps (several cycles of every monitor).
SPANS = {"early": (200, 280), "mid": (1420, 1500), "late": (1920, 2000)}


class _Measure:
    def __init__(self, diagnostics: Diagnostics) -> None:
        self.diagnostics = diagnostics
        self.holdings: Dict[str, Dict[str, int]] = {name: {} for name in SPANS}
        self.state: Dict[str, Dict[str, int]] = {name: {} for name in SPANS}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        for name, (start, end) in SPANS.items():
            if start <= step <= end:
                for key, value in _holdings(self.diagnostics).items():
                    self.holdings[name][key] = max(value, self.holdings[name].get(key, 0))
                for key, value in _state_size(self.diagnostics, with_bytes=step == end).items():
                    self.state[name][key] = max(value, self.state[name].get(key, 0))


class _Tiny:
    """A 2-layer regression MLP learning a fixed linear teacher: healthy, and fast enough for 2,000 steps."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.mark.slow
def test_memory_does_not_grow_with_steps(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(400, 1, generator=g)
    train = DataLoader(list(zip(x[:320], y[:320])), batch_size=16, shuffle=True)  # 20 steps per epoch
    val = DataLoader(list(zip(x[320:], y[320:])), batch_size=80)
    diagnostics = Diagnostics(console=False)
    measure = type("Measure", (_Measure, pl.Callback), {})(diagnostics)
    pl.seed_everything(0)
    trainer = pl.Trainer(default_root_dir=str(tmp_path), max_steps=2000, max_epochs=-1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", log_every_n_steps=50,
                         num_sanity_val_steps=0, callbacks=[diagnostics, measure])
    trainer.fit(type("Tiny", (_Tiny, pl.LightningModule), {})(), train, val)
    assert trainer.global_step == 2000 and trainer.current_epoch >= 99  # 100 epochs: per-epoch lists would grow too
    assert_no_internal_error(diagnostics.findings)
    h, s = measure.holdings, measure.state
    grew = {name: (h["early"][name], h["mid"][name], h["late"][name]) for name in h["early"]
            if h["late"][name] != h["early"][name]}
    assert not grew, f"what monitors hold (numbers, around steps 200 / 1500 / 2000) grew with steps: {grew}"
    # The state_dict lists what fixed windows hold; FitMonitor's window of evaluations (one per epoch, 64 kept) is
    # full after epoch 64 (step 1280), so the state is compared from step 1500 on.
    grew = {name: (s["early"][name], s["mid"][name], s["late"][name]) for name in s["late"]
            if name not in ("findings", "bytes") and s["late"][name] != s["mid"][name]}
    assert not grew, f"state_dict sizes (numbers, around steps 200 / 1500 / 2000) grew: {grew}"
    assert s["late"]["bytes"] <= s["mid"]["bytes"] * 1.02 + 512, f"state_dict bytes grew: {s}"
    # findings are O(codes x layers), not O(steps): the same few at step 2000 as at step 1500
    assert s["late"]["findings"] <= s["mid"]["findings"] + 2
