"""Overhead of ``diag.watch`` in a plain PyTorch loop: the median ratio of the time per step, watched / unwatched.

Lockstep, as ``overhead.py``: the loops take turns one training step each (unwatched, watched, unwatched), in one
process and one thread, so that whatever slows the machine down hits all of them within milliseconds; the ratio is the
watched time over the mean of the two unwatched ones, and ``aa`` the ratio of the two unwatched loops (the noise floor).
``--plumbing`` switches every monitor off: what the session's own hooks cost.

Usage::

    python tests/benchmarks/watch_overhead.py [--width 256] [--steps 1000] [--repeats 5] [--plumbing]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import diag  # noqa: E402
from tests.helpers import digits_tensors, mlp  # noqa: E402

MONITORS_OFF = dict(loss_curve=False, lr_probe=False, gradients=False, activations=False, setup_check=False, data=False)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="hidden width of the 2-hidden-layer digits MLP")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plumbing", action="store_true", help="every monitor off: the session's own cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("diag").setLevel(logging.ERROR)
    x, y = digits_tensors()
    batches = list(DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0)))

    def make(watch: bool):
        torch.manual_seed(0)
        model = mlp([64, args.width, args.width, 10])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        options = dict(MONITORS_OFF) if args.plumbing else {}
        session = diag.watch(model, optimizer, loss_fn=loss_fn, console=False, total_steps=args.steps,
                             **options) if watch else None
        return model, optimizer, session

    def step(model, optimizer, session, batch) -> float:
        started = time.perf_counter()
        loss = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if session is not None:
            session.step(loss, batch)
        return time.perf_counter() - started

    ratios, floors = [], []
    for repeat in range(args.repeats):
        a, b, c = make(False), make(True), make(False)
        ta = tb = tc = 0.0
        for i in range(args.steps):
            batch = batches[i % len(batches)]
            ta += step(*a, batch)
            tb += step(*b, batch)
            tc += step(*c, batch)
        b[2].close()
        ratios.append(tb / ((ta + tc) / 2))
        floors.append(tc / ta)
        print(f"repeat {repeat}: ratio {ratios[-1]:.3f}  aa {floors[-1]:.3f}  unwatched {1e3 * ta / args.steps:.2f} ms/step"
              f"  watched {1e3 * tb / args.steps:.2f} ms/step", flush=True)
    print(f"median ratio {statistics.median(ratios):.3f} (aa {statistics.median(floors):.3f}) over {args.repeats} repeats, "
          f"width {args.width}, {args.steps} steps{', monitors off' if args.plumbing else ''}")


if __name__ == "__main__":
    main()
