"""A Fabric loop on 2 CPU processes (gloo) watched by ``diag.watch(..., fabric=fabric)``, for ``tests/test_watch.py``.

Fabric's ``strategy="ddp"`` starts rank 1 by re-running this script with ``LOCAL_RANK=1``; both ranks then run every
scenario in order and write ``<out>/<scenario>/rank<r>.json``: world size, global step, ``session.findings``, the
collectives the session's monitors called (at which step, on which shape), what the ``diag`` logger said on that rank,
the number of sinks (only rank zero writes) and, on rank zero, the codes in ``findings.jsonl``.

Scenarios: ``healthy`` (also trained unwatched: the weights must be bitwise equal), ``nan`` (the loss turns NaN on rank 1
only: the reduced loss is NaN on both), ``lr_too_high`` (SGD at 10x the good rate), and ``plain_ddp_nan`` (no Fabric in
the session: a ``torch.nn.parallel.DistributedDataParallel`` model in the process group Fabric started, reduced through
``torch.distributed``).

Usage::

    python tests/watch_ddp_script.py --out /tmp/watch_ddp --scenarios healthy nan
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import traceback

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from lightning.fabric import Fabric  # noqa: E402
from lightning.fabric.strategies import DDPStrategy  # noqa: E402

import diag  # noqa: E402
from diag.callbacks import LearningRateProbe  # noqa: E402
from diag.monitors import host as session_module  # noqa: E402 (the loop's stand-ins for a Trainer)
from tests.helpers import digits_tensors, mlp  # noqa: E402

torch.set_num_threads(1)
GOOD_LR = 0.3
EPOCHS = 3


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append([record.levelname, record.getMessage()])


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def record_collectives(calls: list, trainer_of: dict) -> None:
    """Wrap the session's reduce: every collective of the monitors goes through ``LoopStrategy.reduce``."""
    original = session_module.LoopStrategy.reduce

    def reduce(self, tensor, reduce_op="mean"):
        trainer = trainer_of.get("trainer")
        calls.append(["reduce", int(trainer.global_step) if trainer is not None else -1, list(tensor.shape), reduce_op])
        return original(self, tensor, reduce_op)

    session_module.LoopStrategy.reduce = reduce


def loop(fabric: Fabric, scenario: str, out: str, watch: bool, trainer_of: dict):
    rank = fabric.global_rank
    fabric.seed_everything(0)
    x, y = digits_tensors()
    x, y = x[:1400], y[:1400]
    lr = 10 * GOOD_LR if scenario == "lr_too_high" else GOOD_LR
    model = mlp([64, 64, 10])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    plain = scenario.startswith("plain_ddp")
    if plain:  # no Fabric in the session: torch's own DDP in the process group Fabric started
        model = nn.parallel.DistributedDataParallel(model)
        loader = DataLoader(TensorDataset(x[rank::2], y[rank::2]), batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
    else:
        model, optimizer = fabric.setup(model, optimizer)
        loader = fabric.setup_dataloaders(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                                                     generator=torch.Generator().manual_seed(0)))
    session = None
    if watch:
        settings = dict(loss_fn=loss_fn, log_dir=os.path.join(out, scenario, "logs"), total_steps=EPOCHS * len(loader))
        if scenario == "lr_too_high":  # a sweep costs more than 10% of this short loop: the verdict, not the budget
            settings["lr_probe"] = LearningRateProbe(budget_fraction=None)
        session = diag.watch(model, optimizer, fabric=None if plain else fabric, **settings)
        trainer_of["trainer"] = session.trainer
    i = 0
    for _ in range(EPOCHS):
        for batch in loader:
            loss = loss_fn(model, batch)
            if scenario in ("nan", "plain_ddp_nan") and i >= 30 and (rank == 1 or plain):
                loss = loss * float("nan")
            optimizer.zero_grad()
            if plain:
                loss.backward()
            else:
                fabric.backward(loss)
            optimizer.step()
            if session is not None:
                session.step(loss, batch)
            i += 1
    if session is not None:
        session.close()
    module = model.module if hasattr(model, "module") else model
    return module, session


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", nargs="+", required=True)
    args = parser.parse_args()

    fabric = Fabric(accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=datetime.timedelta(seconds=60)))
    fabric.launch()
    rank = fabric.global_rank
    recorder = Recorder()
    logging.getLogger("diag").addHandler(recorder)
    calls: list = []
    trainer_of: dict = {}
    record_collectives(calls, trainer_of)
    for scenario in args.scenarios:
        calls.clear()
        recorder.lines.clear()
        trainer_of.clear()
        result: dict = {"rank": rank, "world_size": fabric.world_size}
        try:
            module, session = loop(fabric, scenario, args.out, True, trainer_of)
            result.update(status="finished", global_step=session.global_step,
                          findings=[f.to_dict() for f in session.findings])
            if scenario == "healthy":
                trainer_of.clear()
                unwatched, _ = loop(fabric, scenario, args.out, False, trainer_of)
                sa, sb = module.state_dict(), unwatched.state_dict()
                result["weights_equal_unwatched"] = all(torch.equal(sa[k], sb[k]) for k in sa)
        except Exception:
            result.update(status="failed", error=traceback.format_exc(), global_step=-1, findings=[])
        fabric.barrier()
        log_dir = os.path.join(args.out, scenario, "logs")
        path = os.path.join(log_dir, "diag", "findings.jsonl")
        if rank == 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                result["jsonl"] = sorted({json.loads(line)["code"] for line in fh if line.strip()})
            result["event_files"] = len([n for n in os.listdir(log_dir) if n.startswith("events.out.tfevents")])
        else:
            result["jsonl"] = None
        result["collectives"] = list(calls)
        result["printed"] = [m for level, m in recorder.lines if level in ("WARNING", "ERROR")]
        result["info"] = [m for level, m in recorder.lines if level == "INFO"]
        os.makedirs(os.path.join(args.out, scenario), exist_ok=True)
        with open(os.path.join(args.out, scenario, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        fabric.barrier()


if __name__ == "__main__":
    main()
