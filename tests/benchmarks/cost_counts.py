"""Deterministic cost counts of ``Diagnostics()`` on a benchmark workload: what a change saves, without timings.

Timings on a shared CPU drift by a few percent between runs of the same code (see ``overhead.py``); counts do not. For
one fit of a workload of ``overhead.py`` (same seed, same numbers every run) this prints, over the steps past the
benchmark's warm-up (the first 10) plus the epoch ends and validations:

* the Python and C calls made in frames of ``diag/`` and ``callbacks/`` per step (``sys.setprofile``), and the
  functions called most;
* the torch calls issued from those frames per step (``tests/host_reads.py``'s ``TorchFunctionMode``), split into
  kernels and metadata (attribute reads such as ``.grad``, ``.dim()``), and the busiest kernel sites;
* the TensorBoard events and bytes lightning-diag wrote (each event costs the training thread about 0.1 ms when its
  caches are cold, and TensorBoard's writer thread about 0.2 us per byte for its pure-Python checksum).

Each torch call right after a training step costs tens of microseconds on a CPU, a Python call a fraction of one:
compare before and after a change, e.g.::

    python tests/benchmarks/cost_counts.py                     # Diagnostics() on the small MLP
    python tests/benchmarks/cost_counts.py --only gradients    # one monitor switched on
    python tests/benchmarks/cost_counts.py --workload mlp5 --top 10
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(_ROOT, "tests"))
sys.path.insert(0, os.path.join(_ROOT, "tests", "benchmarks"))
sys.path.insert(0, _ROOT)

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

import overhead  # noqa: E402
from diag.callbacks import Diagnostics  # noqa: E402
from host_reads import PACKAGE_DIRS, HostReadCounter  # noqa: E402

WARMUP = 10  # the steps overhead.py leaves out of its timings
# torch calls that read metadata and launch no kernel
METADATA = frozenset({"__get__", "__set__", "dim", "numel", "detach", "is_floating_point", "size", "data_ptr",
                      "is_complex", "element_size", "_set_grad_enabled", "__len__", "__hash__", "__eq__"})


class _Where(pl.Callback):
    """Which phase of the fit the calls belong to: a training step (with its global step), an epoch end, a validation."""

    def __init__(self) -> None:
        self.phase, self.step = "start", -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.phase, self.step = "step", int(trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        self.phase = "epoch_end"

    def on_validation_start(self, trainer, pl_module):
        self.phase = "validation"

    def counted(self) -> bool:
        return self.phase != "start" and not (self.phase == "step" and self.step < WARMUP)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="mlp", choices=["cnn", "transformer", "mlp", "mlp5", "stuck"])
    parser.add_argument("--only", help="comma-separated monitors to switch on (the others off), e.g. gradients,fit")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (0: the workload's default)")
    parser.add_argument("--top", type=int, default=15, help="how many functions and kernel sites to list")
    args = parser.parse_args(argv)
    factory, train, val, default_steps = overhead.make_workload(args.workload)
    steps = args.steps or default_steps
    chosen = {} if not args.only else {m: m in args.only.split(",") for m in overhead.MONITOR_ARGS}

    where = _Where()
    calls: collections.Counter = collections.Counter()
    functions: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event in ("call", "c_call") and where.counted() and frame.f_code.co_filename.startswith(PACKAGE_DIRS):
            calls[where.phase] += 1
            if event == "call":
                functions[f"{os.path.relpath(frame.f_code.co_filename, _ROOT)}:{frame.f_code.co_name}"] += 1

    pl.seed_everything(0, verbose=False)
    root = tempfile.mkdtemp(prefix="diag-cost-")
    counter = HostReadCounter()
    counter.op_log = []
    trainer = pl.Trainer(default_root_dir=root, logger=TensorBoardLogger(root, name="cost"), max_steps=steps,
                         max_epochs=-1, accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=1, limit_val_batches=2,
                         callbacks=[counter.callback(pl), where, Diagnostics(console=False, **chosen)])
    with counter:
        sys.setprofile(profile)
        try:
            trainer.fit(factory(), train, val)
        finally:
            sys.setprofile(None)

    n = max(1, steps - WARMUP)
    kernels: collections.Counter = collections.Counter()
    metadata = 0
    for (phase, step), file, line, name in counter.op_log:
        if phase == "start" or (phase == "step" and step < WARMUP):
            continue
        if name in METADATA:
            metadata += 1
        else:
            kernels[(file, line, name)] += 1
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = size = 0
    for path in glob.glob(os.path.join(root, "cost", "*", "events*")):
        for event in EventFileLoader(path).Load():
            if event.HasField("summary") and any(v.tag.startswith("diag/") or v.tag == "custom_scalars__config__"
                                                 for v in event.summary.value):
                events += 1
                size += len(event.SerializeToString())
    print(f"{args.workload}, {steps} steps, monitors: {args.only or 'all'} (counts over steps >= {WARMUP}, epoch ends "
          f"and validations, per step)")
    print(f"  Python and C calls in diag/ and callbacks/ frames: {sum(calls.values()) / n:.1f}  "
          + ", ".join(f"{phase} {count / n:.1f}" for phase, count in sorted(calls.items())))
    print(f"  torch calls: {sum(kernels.values()) / n:.2f} kernels, {metadata / n:.2f} metadata "
          "(forward passes of the noise estimate and the probe not included)")
    print(f"  TensorBoard: {events} events, {size} bytes written by lightning-diag")
    if args.top:
        print("  functions called most (calls over the fit):")
        for name, count in functions.most_common(args.top):
            print(f"    {count:7d}  {name}")
        print("  kernel sites (calls over the fit):")
        for (file, line, name), count in kernels.most_common(args.top):
            print(f"    {count:7d}  {file}:{line} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
