"""Overhead of ``Diagnostics()`` at its defaults: times ``Trainer.fit`` with and without it, alternating the two
in one process, and prints the median ratios.

Four workloads (SPEC targets), and the stalled run of issue 13:
  cnn          a small CNN on 3x32x32 inputs, batch 64               target <= 1.03
  transformer  a 2-layer Transformer encoder on token sequences      target <= 1.03
  mlp          a small MLP whose step is mostly Lightning's overhead target <= 1.05 (1.8-3 ms/step on a 2-core CPU)
  mlp5         the SPEC's "5 ms/step MLP": 128-384-384-10, batch 128  target <= 1.05
  stuck        the MLP at chance for 150 steps: the probe runs        target <= 1.15 (its time budget included)

Two methods (``--method``):

``lockstep`` (the default): the fit with ``Diagnostics()`` and the fit without it run at the same time in two threads
  of this process and take turns, one training step each (a condition variable passes the turn; the waiting fit holds
  no GIL). Each fit's time is the sum of its own turns after the warm-up steps, validation and epoch ends included.
  Whatever slows the machine down (other tenants, frequency changes) hits both fits within milliseconds of each other,
  so it cancels in the ratio: on a shared 2-core machine whose speed drifts by tens of percent within a minute, an
  A/A run (``--aa``: no callback in either thread) gives 1.00 +- 0.02, where whole fits run one after the other gave
  0.94-1.06. Each repeat swaps which fit moves first; the figure is the median over repeats. The price: each step
  runs after the other fit's step, with colder caches than in a fit alone, for both fits alike.
``alternate``: whole fits one after the other, in alternating order. Two figures per workload: ``fit`` (the whole
  ``Trainer.fit`` wall time, setup included) and ``step`` (time from the end of the warm-up steps to the end of
  training, divided by the steps), the latter also as process CPU time. Each ratio is the median over repeats of
  (with / without); "fastest runs" is the ratio of the fastest run of each.

``--per-monitor`` also times ``Diagnostics`` with only one monitor switched on, to show where the cost is.

Host reads: after the timed fits, one more fit with ``Diagnostics()`` runs under ``tests/host_reads.py``'s counter (a
``TorchFunctionMode``) and the figures are printed next to the ratios: the share of steps past the dense start that
read from the device, the most reads on one such step, the worst step overall, the reads between steps, and the
learning-rate probe's own (``--no-reads`` skips it). On a GPU each of them stalls the launch queue; on a CPU no timing
shows them, the count does.

The data are learnable (labels from a fixed random teacher), so that the runs are healthy: the learning-rate
probe, which runs only when the loss misbehaves, should not run (the output says so when it does).

Threads: by default ``torch.set_num_threads(1)``. On a shared machine, several intra-op threads make timings
swing with other people's load far more than any monitor costs; one thread keeps the baseline stable, and
the monitors' work (Python, small reductions) does not use intra-op threads much anyway. ``--threads N`` to
change it. Data are random tensors made before timing; ``num_workers=0``.

Not collected by pytest (no ``test_`` prefix). Run::

    python tests/benchmarks/overhead.py                       # all three, 5 repeats, lockstep
    python tests/benchmarks/overhead.py --models mlp --aa     # with the A/A noise floor
    python tests/benchmarks/overhead.py --models mlp --repeats 9 --per-monitor
    python tests/benchmarks/overhead.py --device cuda --precision 16-mixed --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from diag.callbacks import Diagnostics, LearningRateProbe  # noqa: E402

MONITOR_ARGS = ("loss_curve", "lr_probe", "gradients", "activations", "fit", "setup_check", "data")
TARGETS = {"cnn": 1.03, "transformer": 1.03, "mlp": 1.05, "mlp5": 1.05, "stuck": 1.15}  # issue 16 (mlp); stuck: issue 13, probe included


# ---- workloads ------------------------------------------------------------------------------------------
class Workload(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: Callable, lr: float = 1e-3) -> None:
        super().__init__()
        self.net, self.loss_fn, self.lr = net, loss, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TokenEncoder(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 128, heads: int = 4, layers: int = 2, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def make_workload(name: str, seed: int = 0):
    """(module factory, train loader, val loader, steps per fit default)"""
    g = torch.Generator().manual_seed(seed)
    ce = nn.functional.cross_entropy
    if name == "cnn":
        x = torch.randn(64 * 16, 3, 32, 32, generator=g)
        y = (x.mean((2, 3)) @ torch.randn(3, 10, generator=g)).argmax(1)  # learnable: a healthy run
        batch = 64

        def factory():
            return Workload(nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10)), ce)
        steps = 40
    elif name == "transformer":
        x = torch.randint(0, 1000, (32 * 16, 64), generator=g)
        y = ((x.float().mean(1) - 500) / 15 + 5).long().clamp(0, 9)  # learnable from the mean-pooled tokens
        batch = 32

        def factory():
            return Workload(TokenEncoder(), ce, lr=3e-4)
        steps = 40
    elif name == "mlp":
        x = torch.randn(64 * 32, 32, generator=g)
        y = (x @ torch.randn(32, 10, generator=g)).argmax(1)  # a linear teacher: learnable, a healthy run
        batch = 64

        def factory():
            return Workload(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), ce)
        steps = 300
    elif name == "mlp5":
        # The SPEC's "5 ms/step MLP": the same kind of model, wide enough that a step takes about 5 ms on one CPU thread
        # (5.5 ms on this 2-core machine; the `mlp` above takes 1.8-3 ms, most of it Lightning's own per-step work).
        x = torch.randn(128 * 24, 128, generator=g)
        y = (x @ torch.randn(128, 10, generator=g)).argmax(1)  # a linear teacher: learnable, a healthy run
        batch = 128

        def factory():
            return Workload(nn.Sequential(nn.Linear(128, 384), nn.ReLU(), nn.Linear(384, 384), nn.ReLU(),
                                          nn.Linear(384, 10)), ce)
        steps = 300
    elif name == "stuck":
        # issue 13: a 150-step fit whose loss stays at chance (labels drawn at random: nothing to learn). The loss
        # monitor asks for the probe; every probe, the first included, must stay within the probe's time budget.
        x = torch.randn(64 * 32, 32, generator=g)
        y = torch.randint(0, 10, (64 * 32,), generator=g)
        batch = 64

        def factory():
            return Workload(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), ce)
        steps = 150
    else:
        raise ValueError(f"unknown workload {name!r}; choose from cnn, transformer, mlp, stuck")
    n_val = batch * 2
    train = DataLoader(TensorDataset(x[n_val:], y[n_val:]), batch_size=batch, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(x[:n_val], y[:n_val]), batch_size=batch)
    return factory, train, val, steps


# ---- timing ---------------------------------------------------------------------------------------------
class StepClock(pl.Callback):
    """Wall time from the start of step ``warmup`` to the end of training (CUDA synchronized)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: Optional[float] = None
        self.start_step = 0
        self.end: Optional[float] = None
        self.end_step = 0

    def _now(self) -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None and trainer.global_step >= self.warmup:
            self.start, self.start_step = self._now(), trainer.global_step
            self.cpu_start = time.process_time()

    def on_train_end(self, trainer, pl_module):
        self.end, self.end_step = self._now(), trainer.global_step
        self.cpu_end = time.process_time()

    def per_step(self) -> float:
        if self.start is None or self.end is None or self.end_step <= self.start_step:
            return float("nan")
        return (self.end - self.start) / (self.end_step - self.start_step)

    def cpu_per_step(self) -> float:
        """Process CPU time per step (all threads): steadier than wall time on a shared machine, where other
        people's load preempts this process; on CUDA it misses GPU time, so use ``per_step`` there."""
        if self.start is None or self.end is None or self.end_step <= self.start_step:
            return float("nan")
        return (self.cpu_end - self.cpu_start) / (self.end_step - self.start_step)


def timed_fit(factory, train, val, steps: int, callback: Optional[pl.Callback], args, root: str) -> Dict[str, float]:
    pl.seed_everything(0, verbose=False)
    module = factory()
    clock = StepClock(warmup=min(args.warmup, steps // 4))
    callbacks: List[Any] = [clock] + ([callback] if callback is not None else [])
    trainer = pl.Trainer(default_root_dir=root, logger=TensorBoardLogger(root, name="bench"), max_steps=steps,
                         max_epochs=-1, accelerator=args.device, devices=1, precision=args.precision,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, val_check_interval=args.val_every if args.val_every else None,
                         check_val_every_n_epoch=None if args.val_every else 1, limit_val_batches=2,
                         callbacks=callbacks)
    if torch.cuda.is_available() and args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.fit(module, train, val)
    if torch.cuda.is_available() and args.device == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - start
    return {"fit": fit_s, "step": clock.per_step(), "cpu_step": clock.cpu_per_step(), **_diag_outcome(callback)}


class _Turns:
    """Fits that take turns: one training step each, in thread order; a fit that ends leaves the rotation."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.turn = 0
        self.active = [True] * n

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def pass_on(self, i: int, leaving: bool = False) -> None:
        with self.cond:
            if leaving:
                self.active[i] = False
            n = len(self.active)
            j = (i + 1) % n
            while not self.active[j] and j != i:
                j = (j + 1) % n
            self.turn = j
            self.cond.notify_all()


class _Baton(pl.Callback):
    """Times this fit's turns (from getting the turn to passing it on at the next batch start), after ``warmup``, with
    ``clock`` (wall time, or the thread's CPU time)."""

    def __init__(self, turns: _Turns, index: int, warmup: int, cuda: bool, clock: Callable[[], float] = time.perf_counter) -> None:
        self.turns, self.index, self.warmup, self.cuda, self.clock = turns, index, warmup, cuda, clock
        self.turn_start: Optional[float] = None
        self.total, self.steps = 0.0, 0

    def _end_turn(self, counted: bool) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # this fit's GPU work belongs to its own turn
        if self.turn_start is not None and counted:
            self.total += self.clock() - self.turn_start
            self.steps += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.turn_start is not None:
            self._end_turn(trainer.global_step > self.warmup)
            self.turns.pass_on(self.index)
        self.turns.wait(self.index)
        self.turn_start = self.clock()

    def on_train_end(self, trainer, pl_module):
        self._end_turn(True)
        self.turn_start = None
        self.turns.pass_on(self.index, leaving=True)

    def on_exception(self, trainer, pl_module, exception):
        self.turns.pass_on(self.index, leaving=True)


def lockstep_fits(factory, train, val, steps: int, callbacks: List[Optional[pl.Callback]], args,
                  root: str) -> List[Dict[str, Any]]:
    """Fits with ``callbacks[i]`` (``None``: no callback) in lockstep; per fit: seconds per step after the warm-up."""
    turns = _Turns(len(callbacks))
    cuda = args.device == "cuda" and torch.cuda.is_available()
    clock = time.thread_time if getattr(args, "clock", "wall") == "thread" else time.perf_counter
    batons = [_Baton(turns, i, min(args.warmup, steps // 4), cuda, clock) for i in range(len(callbacks))]
    errors: List[BaseException] = []

    def run(i: int) -> None:
        try:
            module = factory()
            trainer = pl.Trainer(default_root_dir=os.path.join(root, f"lockstep{i}"),
                                 logger=TensorBoardLogger(os.path.join(root, f"lockstep{i}"), name="bench"),
                                 max_steps=steps, max_epochs=-1, accelerator=args.device, devices=1,
                                 precision=args.precision, enable_progress_bar=False, enable_model_summary=False,
                                 enable_checkpointing=False, num_sanity_val_steps=0,
                                 val_check_interval=args.val_every if args.val_every else None,
                                 check_val_every_n_epoch=None if args.val_every else 1, limit_val_batches=2,
                                 callbacks=[batons[i]] + ([callbacks[i]] if callbacks[i] is not None else []))
            trainer.fit(module, train, val)
        except BaseException as exc:  # noqa: BLE001 - reported below, after the other fit finished
            errors.append(exc)
            turns.pass_on(i, leaving=True)

    pl.seed_everything(0, verbose=False)  # (the threads share torch's global generator: timing only, not results)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(callbacks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    out = []
    for baton, callback in zip(batons, callbacks):
        out.append({"step": baton.total / baton.steps if baton.steps else float("nan"), **_diag_outcome(callback)})
    return out


def _diag_outcome(callback: Optional[pl.Callback]) -> Dict[str, Any]:
    internal, probes, loud = [], 0, []
    if isinstance(callback, Diagnostics):
        internal = [f.message for f in callback.findings if f.code == "diag_internal_error"]
        probe = callback.monitor(LearningRateProbe)
        probes = len(probe.results) if probe is not None else 0
        loud = [f.code for f in callback.findings if f.severity.value != "info"]
    return {"internal_errors": internal, "probes": probes, "warnings": loud}


def _outcome_suffix(name: str, variant: str, probes: int, loud: set, errors: List[str]) -> str:
    """The end of a result line: the target, and whatever the watched runs did besides training."""
    return ((f"   (target <= {TARGETS[name]})" if variant == "diagnostics" else "")
            + (f"   probe ran {probes}x" if probes else "")
            + (f"   warnings: {sorted(loud)}" if loud else "")
            + (f"   INTERNAL ERRORS: {errors}" if errors else ""))


def bench_lockstep(name: str, args) -> Dict[str, Any]:
    factory, train, val, default_steps = make_workload(name)
    steps = args.steps or default_steps
    result: Dict[str, Any] = {"workload": name, "steps": steps, "repeats": args.repeats, "method": "lockstep",
                              "variants": {}}
    makers = dict(variants(args.per_monitor))
    if args.aa:
        makers = {"A/A (no callback in either)": lambda: None, **makers}
    with tempfile.TemporaryDirectory() as root:
        lockstep_fits(factory, train, val, max(4, steps // 4), [None, Diagnostics(console=False)], args, root)  # warm-up
        for variant, make in makers.items():
            ratios, base_ms, watched_ms, errors, probes, loud = [], [], [], [], 0, set()
            for r in range(args.repeats):
                watched_first = r % 2 == 1  # which fit moves first alternates: the order's own bias cancels
                pair = [make(), None] if watched_first else [None, make()]
                t = lockstep_fits(factory, train, val, steps, pair, args, root)
                w, b = (t[0], t[1]) if watched_first else (t[1], t[0])
                ratios.append(w["step"] / b["step"])
                base_ms.append(1e3 * b["step"])
                watched_ms.append(1e3 * w["step"])
                errors += w["internal_errors"]
                probes += w["probes"]
                loud.update(w["warnings"])
            v = result["variants"][variant] = {
                "step_ratio": statistics.median(ratios), "step_ratios": ratios,
                "geometric_mean_ratio": statistics.geometric_mean(ratios),
                "baseline_step_ms": statistics.median(base_ms), "watched_step_ms": statistics.median(watched_ms),
                "internal_errors": sorted(set(errors)), "probe_runs": probes, "warnings_raised": sorted(loud),
            }
            print(f"{name:12s} {variant:28s} step {v['baseline_step_ms']:8.2f} -> {v['watched_step_ms']:8.2f} ms   "
                  f"step ratio {v['step_ratio']:.3f} (repeats: {' '.join(f'{x:.3f}' for x in ratios)})"
                  + _outcome_suffix(name, variant, probes, loud, errors), flush=True)
        if args.reads:
            result["host_reads"] = count_host_reads(factory, train, val, steps, args, root)
            print(f"{name:12s} {'host reads':28s} " + _reads_line(result["host_reads"]), flush=True)
    return result


PROBE_FILES = ("diag/monitors/lr_probe.py", "diag/probe.py")


def count_host_reads(factory, train, val, steps: int, args, root: str) -> Dict[str, Any]:
    """One more fit with ``Diagnostics()``, under the host-read counter (``tests/host_reads.py``): the reads issued from
    the package's frames, per step and between steps; the learning-rate probe's counted apart."""
    from diag.monitors.base import READ_EVERY
    from tests.host_reads import HostReadCounter

    counter = HostReadCounter()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(default_root_dir=os.path.join(root, "reads"), logger=TensorBoardLogger(root, name="reads"),
                         max_steps=steps, max_epochs=-1, accelerator=args.device, devices=1, precision=args.precision,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, val_check_interval=args.val_every if args.val_every else None,
                         check_val_every_n_epoch=None if args.val_every else 1, limit_val_batches=2,
                         callbacks=[counter.callback(pl), Diagnostics(console=False)])
    with counter:
        trainer.fit(factory(), train, val)
    per_step: Dict[int, int] = {}
    probe_reads = between = 0
    for where, (path, _, _) in counter.read_log:
        if path in PROBE_FILES:
            probe_reads += 1
        elif where[0] != "step":
            between += 1
        else:
            per_step[where[1]] = per_step.get(where[1], 0) + 1
    steps_seen = sorted(set(counter.steps_seen))
    late = [s for s in steps_seen if s >= READ_EVERY]
    late_reads = [per_step[s] for s in late if s in per_step]
    worst = max(per_step.items(), key=lambda kv: kv[1], default=(None, 0))
    return {"dense_until": READ_EVERY, "steps": len(steps_seen), "late_steps": len(late),
            "late_steps_with_read": len(late_reads), "late_share_with_read": len(late_reads) / max(1, len(late)),
            "late_max_reads_per_step": max(late_reads, default=0),
            "late_reads_per_read_step": sum(late_reads) / max(1, len(late_reads)),
            "worst_step": worst[0], "worst_step_reads": worst[1], "between_steps_reads": between,
            "probe_reads": probe_reads}


def _reads_line(r: Dict[str, Any]) -> str:
    return (f"{100 * r['late_share_with_read']:.1f}% of steps past the first {r['dense_until']} read "
            f"({r['late_steps_with_read']} of {r['late_steps']}), {r['late_reads_per_read_step']:.1f} read per such "
            f"step, at most {r['late_max_reads_per_step']}; worst step {r['worst_step']} ({r['worst_step_reads']} "
            f"reads); {r['between_steps_reads']} reads between steps; probe {r['probe_reads']}")


def variants(per_monitor: bool) -> Dict[str, Callable[[], Optional[pl.Callback]]]:
    out: Dict[str, Callable[[], Optional[pl.Callback]]] = {"diagnostics": lambda: Diagnostics(console=False)}
    if per_monitor:
        for name in MONITOR_ARGS:
            out[f"only_{name}"] = (lambda n=name: Diagnostics(console=False,
                                                               **{a: a == n for a in MONITOR_ARGS}))
    return out


def bench(name: str, args) -> Dict[str, Any]:
    factory, train, val, default_steps = make_workload(name)
    steps = args.steps or default_steps
    result: Dict[str, Any] = {"workload": name, "steps": steps, "repeats": args.repeats, "variants": {}}
    with tempfile.TemporaryDirectory() as root:
        timed_fit(factory, train, val, max(4, steps // 4), None, args, root)  # warm-up: allocator, kernels, imports
        for variant, make in variants(args.per_monitor).items():
            timed_fit(factory, train, val, max(4, steps // 4), make(), args, root)
            base, watched, errors, probes, loud = [], [], [], 0, set()
            for r in range(args.repeats):
                order = [False, True] if r % 2 == 0 else [True, False]
                for with_diag in order:
                    t = timed_fit(factory, train, val, steps, make() if with_diag else None, args, root)
                    (watched if with_diag else base).append(t)
                    errors += t["internal_errors"]
                    probes += t["probes"]
                    loud.update(t["warnings"])
            fit_ratios = [w["fit"] / b["fit"] for b, w in zip(base, watched)]
            step_ratios = [w["step"] / b["step"] for b, w in zip(base, watched)]
            cpu_ratios = [w["cpu_step"] / b["cpu_step"] for b, w in zip(base, watched)]
            result["variants"][variant] = {
                "fit_ratio": statistics.median(fit_ratios),
                "step_ratio": statistics.median(step_ratios),
                "cpu_step_ratio": statistics.median(cpu_ratios),
                # noise on a shared machine only ever adds time: the ratio of the fastest runs is a robust second view
                "min_step_ratio": min(w["step"] for w in watched) / min(b["step"] for b in base),
                "base_step_ms_runs": [1e3 * b["step"] for b in base], "watched_step_ms_runs": [1e3 * w["step"] for w in watched],
                "baseline_fit_s": statistics.median(b["fit"] for b in base),
                "baseline_step_ms": 1e3 * statistics.median(b["step"] for b in base),
                "watched_step_ms": 1e3 * statistics.median(w["step"] for w in watched),
                "fit_ratios": fit_ratios, "step_ratios": step_ratios, "cpu_step_ratios": cpu_ratios, "internal_errors": sorted(set(errors)),
                "probe_runs": probes, "warnings_raised": sorted(loud),
            }
            v = result["variants"][variant]
            print(f"{name:12s} {variant:22s} step {v['baseline_step_ms']:8.2f} -> {v['watched_step_ms']:8.2f} ms   "
                  f"step ratio {v['step_ratio']:.3f} (cpu {v['cpu_step_ratio']:.3f}, fastest runs {v['min_step_ratio']:.3f})"
                  f"   fit ratio {v['fit_ratio']:.3f}"
                  + _outcome_suffix(name, variant, probes, loud, errors), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "transformer", "mlp", "mlp5"],
                        choices=["cnn", "transformer", "mlp", "mlp5", "stuck"])
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per variant (median taken)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per fit (0: per-workload default)")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from the per-step time")
    parser.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: once per epoch)")
    parser.add_argument("--per-monitor", action="store_true", help="also time each monitor alone")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--method", default="lockstep", choices=["lockstep", "alternate"],
                        help="lockstep: both fits at once, one step each in turn (default); alternate: whole fits")
    parser.add_argument("--aa", action="store_true", help="lockstep: also time two fits without any callback (noise)")
    parser.add_argument("--clock", default="wall", choices=["wall", "thread"],
                        help="lockstep: time each turn by the wall clock (default) or by the CPU time of the fit's own "
                             "thread (CPU only: steadier when other processes take the cores; misses the TensorBoard "
                             "writer thread's work)")
    parser.add_argument("--no-reads", dest="reads", action="store_false",
                        help="lockstep: skip the extra fit that counts host reads")
    parser.add_argument("--json", help="write all figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    for noisy in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, Lightning {pl.__version__}, device {args.device}, precision {args.precision}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}, method {args.method}"
          + (f", clock {args.clock}" if args.method == "lockstep" else ""), flush=True)
    lockstep = args.method == "lockstep"
    results = [(bench_lockstep if lockstep else bench)(name, args) for name in args.models]
    print("\nsummary (Diagnostics() at defaults; median over repeats of with/without):")
    for r in results:
        v = r["variants"]["diagnostics"]
        ok = v["step_ratio"] <= TARGETS[r["workload"]]
        if lockstep:
            aa = r["variants"].get("A/A (no callback in either)")
            print(f"  {r['workload']:12s} step ratio {v['step_ratio']:.3f} (lockstep; geometric mean "
                  f"{v['geometric_mean_ratio']:.3f}" + (f", A/A {aa['step_ratio']:.3f}" if aa else "") + ")  "
                  f"baseline {v['baseline_step_ms']:.2f} ms/step  target <= {TARGETS[r['workload']]}  "
                  f"{'ok' if ok else 'OVER'}")
            if "host_reads" in r:
                print(f"  {'':12s} host reads: " + _reads_line(r["host_reads"]))
            continue
        print(f"  {r['workload']:12s} step ratio {v['step_ratio']:.3f} (cpu time {v['cpu_step_ratio']:.3f}, "
              f"fastest runs {v['min_step_ratio']:.3f})  "
              f"fit ratio {v['fit_ratio']:.3f}  "
              f"baseline {v['baseline_step_ms']:.2f} ms/step  target <= {TARGETS[r['workload']]}  "
              f"{'ok' if ok else 'OVER'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "torch": torch.__version__, "lightning": pl.__version__,
                       "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
