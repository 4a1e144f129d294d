"""A DDP fit with ``Diagnostics()`` (2 CPU processes, gloo), for ``tests/test_ddp.py``.

Lightning's ``strategy="ddp"`` starts rank 1 by re-running this script (``sys.argv``) with ``LOCAL_RANK=1``; both
ranks then run every scenario in order. Each rank writes ``<out>/<scenario>/rank<r>.json``: the status of its fit,
its ``.findings``, what the ``diag`` logger printed on it, the collectives it called (through the strategy), and
the monitors' state, so that the test can compare the ranks.

Usage::

    python tests/ddp_script.py --out /tmp/ddp --scenarios healthy faulty
"""

from __future__ import annotations

import argparse
import hashlib
import datetime
import json
import logging
import math
import os
import sys
import traceback

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.strategies import DDPStrategy  # noqa: E402

from diag.callbacks import Diagnostics, LearningRateProbe  # noqa: E402
from tests.helpers import digits_tensors  # noqa: E402

torch.set_num_threads(1)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append([record.levelname, record.getMessage()])


class CollectiveLog(pl.Callback):
    """Records every collective the strategy runs (what, at which step, on which shape), in order."""

    NAMES = ("reduce", "all_gather", "broadcast", "barrier", "reduce_boolean_decision")

    def __init__(self) -> None:
        self.calls: list = []

    def setup(self, trainer, pl_module, stage):
        strategy = trainer.strategy
        for name in self.NAMES:
            original = getattr(strategy, name)

            def wrapped(*args, _name=name, _original=original, **kwargs):
                first = args[0] if args else None
                shape = list(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
                self.calls.append([_name, int(trainer.global_step), shape])
                return _original(*args, **kwargs)

            setattr(strategy, name, wrapped)


class Net(pl.LightningModule):
    def __init__(self, activation: str = "relu", optimizer: str = "adam", lr: float = 1e-3, norm: bool = False,
                 nan_rank: int = -1, nan_step: int = -1) -> None:
        super().__init__()
        self.nan_rank, self.nan_step = nan_rank, nan_step
        act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
        layers = [nn.Linear(64, 32)] + ([nn.BatchNorm1d(32)] if norm else []) + [act(), nn.Linear(32, 32), act(),
                                                                                 nn.Linear(32, 10)]
        self.net = nn.Sequential(*layers)
        self.optimizer_name, self.lr = optimizer, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.global_rank == self.nan_rank and self.global_step >= self.nan_step:
            loss = loss * float("nan")
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# scenario -> (module kwargs, standardize inputs, epochs)
SCENARIOS = {
    # a healthy recipe with BatchNorm (its batch statistics differ per rank): silent on every rank
    "healthy": (dict(norm=True), True, 2),
    # raw 0..16 pixel values, sigmoid, plain SGD at a learning rate far too high: many monitors fire
    "faulty": (dict(activation="sigmoid", optimizer="sgd", lr=5.0), False, 2),
    # the loss of rank 1 alone turns NaN at step 10 (a corrupt shard): the all-reduce spreads it to every rank
    "nan_on_one_rank": (dict(nan_rank=1, nan_step=10), True, 1),
    # SGD at 10x a working rate (0.8): each rank probes its own batch on its own copy, the ranks agree in one reduction,
    # rank zero writes lr_too_high once. (The time budget is lifted: 2 x 16 steps is far too short a fit to afford it.)
    "lr_too_high": (dict(optimizer="sgd", lr=8.0), True, 4),
    # the same fit without Diagnostics: the final weights must be bitwise those of the watched fit (probe included)
    "lr_too_high_unwatched": (dict(optimizer="sgd", lr=8.0), True, 4),
}
# scenario -> Diagnostics arguments beyond the defaults
DIAGNOSTICS_KWARGS = {"lr_too_high": lambda: dict(lr_probe=LearningRateProbe(budget_fraction=None))}


def _plain(value):
    """Monitor state as JSON (tensors to lists, non-finite floats to strings)."""
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def run(scenario: str, out: str) -> None:
    module_kwargs, standardize, epochs = SCENARIOS[scenario]
    root = os.path.join(out, scenario)
    recorder = Recorder()
    logging.getLogger("diag").addHandler(recorder)
    collectives = CollectiveLog()
    watched = not scenario.endswith("_unwatched")
    callback = Diagnostics(**DIAGNOSTICS_KWARGS.get(scenario, dict)()) if watched else None
    result = {"scenario": scenario}
    trainer = None
    try:
        pl.seed_everything(0, workers=True)
        x, y = digits_tensors(standardize=standardize)
        train = DataLoader(TensorDataset(x[:1024], y[:1024]), batch_size=32, shuffle=True)
        val = DataLoader(TensorDataset(x[1024:1280], y[1024:1280]), batch_size=64)
        strategy = DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=60))
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, default_root_dir=root,
                             max_epochs=epochs, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, log_every_n_steps=1, num_sanity_val_steps=0,
                             callbacks=[collectives] + ([callback] if watched else []))
        model = Net(**module_kwargs)
        trainer.fit(model, train, val)
        result["status"] = str(trainer.state.status.value)
        result["weights_sha256"] = hashlib.sha256(b"".join(
            t.detach().cpu().contiguous().numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    except BaseException as exc:  # recorded for the test, then re-raised
        result["status"] = "exception"
        result["exception"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]
    finally:
        logging.getLogger("diag").removeHandler(recorder)
    rank = int(trainer.global_rank) if trainer is not None else int(os.environ.get("LOCAL_RANK", 0))
    result.update(
        rank=rank,
        world_size=int(trainer.world_size) if trainer is not None else -1,
        global_step=int(trainer.global_step) if trainer is not None else -1,
        log_dir=(trainer.loggers[0].log_dir if trainer is not None and trainer.loggers else None),
        findings=[f.to_dict() for f in callback.findings] if callback is not None else [],
        log=recorder.lines,
        collectives=collectives.calls,
        monitors={type(m).__name__: _plain(m._monitor_state()) for m in callback.monitors} if callback is not None else {},
    )
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    if result["status"] == "exception":
        raise SystemExit(f"rank {rank}: {scenario} failed:\n{result['exception']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args(argv)
    for scenario in args.scenarios:
        run(scenario, args.out)


if __name__ == "__main__":
    main()
