"""``LearningRateProbe``: when the loss misbehaves, tell a learning-rate problem from a code bug.

The monitor: which hook, when, and how to call the user's ``training_step`` quietly. The sweep itself is
:func:`diag.probe.run_probe`; the verdict rules are in :mod:`diag.detectors.lr_probe`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from diag import signals
from diag.batch import loss_of, split_batch, targets_of, with_targets, zero_inputs
from diag.detectors import Verdict
from diag.detectors.lr_probe import (DESIGN_EXPLAINS_SLOW, carries_over, collapsed_after_progress, confirm_labels,
                                     confirmed_labels, defer_labels, judge, judge_collapse, judge_control,
                                     judge_wrecked, labels_only, labels_shifted, nothing_fits_near_chance,
                                     note_decay, sequence_labels, temper_too_low, temper_warmup)
from diag.findings import Severity
from diag.probe import (DEFAULT_BATCH_SAMPLES, DEFAULT_FACTORS, DEFAULT_STEPS, ProbeOverBudget, ProbeResult,
                        ProbeUnavailable, WeightSnapshot, current_lr, fresh_optimizer_state,
                        optimizer_state_finite, quiet_logging, reinitialize, run_probe, scheduled_peak_lr,
                        weights_finite)

from .base import Monitor, check_positive_float, check_positive_int

log = logging.getLogger("diag")

# The reasons other monitors give when they ask for a probe (``context.request_probe(reason)``); any other string
# is accepted too.
KNOWN_REASONS = ("nonfinite_loss", "loss_diverging", "loss_spike", "loss_oscillating", "loss_stalled", "loss_plateau",
                 "probability_outputs", "update_too_small", "update_too_large")
# Requests that come from the loss itself misbehaving (as opposed to hints such as a small update-to-weight ratio):
# when one of them goes unprobed (budget, manual optimization, ...), the probe says why in an info finding.
LOSS_SYMPTOMS = ("nonfinite_loss", "loss_diverging", "loss_spike", "loss_oscillating", "loss_stalled", "loss_plateau",
                 "probability_outputs")
# A burst of huge losses that the run recovered from: the current weights no longer show what caused it (Adam at
# lr=0.5 on two moons, probed at step 10 from the current weights: lr_ok in 4 of 5 initializations, the current rate
# now fits the batch), so the probe replays from the last snapshot, saved before the burst (from there the current
# rate diverges on the batch and 1/10 of it fits it, in 5 of 5).
# Other symptoms are probed from the current weights first (Adam at lr=3 on the digits MLP, asked at step 5: from the
# current weights 1x blows the held-out half up and 1/10 fits; replayed from the start, 1x still fits the batch), and
# again from the last snapshot taken while training was healthy when the current weights show nothing fits (a digits
# MLP under SGD at lr 1.5 that learned to 0.07 and then blew up: from the wrecked weights no rate fits anything, which
# read as a code bug). Non-finite weights always start from the snapshot.
REPLAY_REASONS = ("loss_spike",)


# The last-finite snapshot is a device-side copy of the weights and optimizer state (about 3x the parameters with Adam):
# above this many parameters it is not kept (a NaN run then cannot be probed) so that big models pay nothing.
SNAPSHOT_MAX_PARAMETERS = 50_000_000
# A sweep projected to exceed its budget by at most this factor is tried once more on half the samples (not below
# MIN_SHRUNK_SAMPLES: 16 fitted, 16 held out). Measured: a 2-layer token Transformer's sweep on 32 samples is ~180
# training steps' worth; on 16, about 100.
SHRINK_OVER_BUDGET = 2.0
# A probe step (forward, backward and optimizer step on the probe's half batch, no Lightning around it) costs at least
# this share of a training step: a sweep whose cheapest cost exceeds the budget is not even timed. Measured: 0.2-0.3 on
# small MLPs (Lightning's per-step overhead dominates their training steps), 0.5-1 on compute-bound Transformers.
PROBE_STEP_FLOOR = 0.15
# The first figure of the sweep is expected to cost this much (matplotlib's import and first draw: 1.3-1.9 s measured).
FIRST_FIGURE_SECONDS = 1.5
MIN_SHRUNK_SAMPLES = 32


class LearningRateProbe(Monitor):
    """Sweeps the learning rate on a frozen batch when the loss misbehaves: LR too high, too low, or a code bug.

    When another monitor asks for it (the loss monitor on non-finite, diverging, oscillating or stalled loss, on a
    burst of huge losses, or on probability outputs stuck near chance, via ``context.request_probe``) or once at
    ``preflight_step``, it takes the batch Lightning just trained on,
    trains throw-away copies of the current state on half of it for ``steps`` steps at each learning-rate factor
    (1e-2 ... 1e2 of the current rate, extended when the best sits at an edge), fits the same batch with zeroed
    inputs, and then puts everything back (weights, buffers, grads, optimizer, schedulers, RNG states, modes).
    Verdicts: ``lr_too_high``, ``lr_too_low`` (with a suggested learning rate) or ``suspected_code_bug`` with a
    checklist; otherwise ``lr_ok``. Published as ``signals.PROBE_VERDICT`` / ``PROBE_SUGGESTED_LR``.

    Runs in ``on_train_batch_end`` (after the optimizer step) with automatic optimization (manual optimization: an
    ``info`` ``probe_skipped``). Under DDP each rank probes its own batch on the unwrapped module (no collective inside
    the sweep) and the ranks agree on the verdict in one all-reduce; only a unanimous verdict is reported. The
    ``training_step``'s ``self.log``/``self.log_dict`` are silenced during the probe (instance attributes shadow them,
    then are removed); direct writes to ``self.logger.experiment`` are not. While it runs, ``signals.PROBE_RUNNING``
    is True: monitors with forward or tensor hooks should ignore those passes. The probe does not apply the
    Trainer's precision (autocast) or gradient clipping, and uses the first optimizer only.

    Non-finite weights: the probe then starts from a snapshot, a copy of weights, buffers and optimizer state on their device
    (memory: about 1x the parameters for SGD, 3x for Adam; none above 50M parameters). It is taken when training
    starts and replaced every ``snapshot_interval`` steps only when the batch loss is finite and lower than at the
    snapshot, so it holds the best state seen, not one that training has since wrecked. When no learning rate fits
    the batch from the current weights, the probe asks again from the snapshot: if the batch fits from there, the
    training wrecked the weights (``lr_too_high``), it is not the code. A burst of huge losses that training recovered
    from (request ``loss_spike``) is probed from the snapshot too: it was saved before the burst, the current weights
    no longer show what caused it. Before any ``suspected_code_bug`` a freshly initialized copy gets the same sweep; a
    run whose loss fell to half its start and then collapsed is ``lr_too_high`` (see :mod:`diag.detectors.lr_probe`).
    Labels that may not line up with the inputs (the only evidence: after a stall, memorizing the batch does not carry
    over to its held-out half) are also what a learnable task on its initial plateau shows (XOR, parity): an ``info``
    until the fit monitor's evaluations confirm them (the training loss falls to 0.9 of a validation loss that stays
    put) or a sequence model's labels, rolled back by one position, are learned by a fresh copy.
    Module attributes a ``training_step`` rebinds (an RNN's hidden state) are put back; a batch the model cannot take
    in halves is fitted whole.

    Cost: each probe is ``len(factors) + 1`` short fits of ``steps`` steps on ``batch_samples / 2`` samples, about
    the time of 100 training steps at the default settings (measured: 0.66 s, 7.7% of a 660-step digits MLP fit).
    Every probe, the first included, stays within ``budget_fraction`` of the fit's projected time (its time per step
    so far times its planned steps): a sweep whose cheapest cost cannot fit is not started, one projected over budget
    after its first steps stops there (or is tried once on half the samples). At most ``max_probes``; each distinct
    request reason is probed once. Between probes the hook
    costs a few integer comparisons (plus one loss read every ``snapshot_interval`` steps).

    Args:
        preflight_step: run one probe at this global step even without a request (``None``: only on request).
        max_probes: at most this many probes per fit.
        budget_fraction: all probes (their figures included) take at most this share of the fit's projected time;
            ``None``: no limit (short test fits).
        steps: optimizer steps per learning-rate factor.
        factors: learning-rate factors to try; must include 1.0 and span at least four orders of magnitude.
        batch_samples: samples taken from the current batch (half fitted, half held out).
        snapshot_interval: steps between refreshes of the last-finite snapshot (0: no snapshot).
        input_zeroer: ``batch -> batch`` with the inputs zeroed; default zeroes all but the last element of a
            tuple batch, or the non-target keys of a dict.

    Example::

        from diag.callbacks import Diagnostics, LearningRateProbe
        trainer = pl.Trainer(callbacks=[Diagnostics(lr_probe=LearningRateProbe(preflight_step=20))])
        trainer.fit(model, train_loader)
    """

    STATE = ("_probes_run", "_probe_seconds", "_preflight_done", "_probed_reasons",
             "_labels_pending")  # checkpointed (see Monitor.STATE)

    def __init__(
        self,
        preflight_step: Optional[int] = None,
        max_probes: int = 3,
        budget_fraction: Optional[float] = 0.10,
        steps: int = DEFAULT_STEPS,
        factors: Sequence[float] = DEFAULT_FACTORS,
        batch_samples: int = DEFAULT_BATCH_SAMPLES,
        snapshot_interval: int = 200,
        input_zeroer: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        super().__init__()
        if preflight_step is not None:
            check_positive_int("preflight_step", preflight_step, minimum=0)
        self.preflight_step = preflight_step
        self.max_probes = check_positive_int("max_probes", max_probes, minimum=0)
        self.budget_fraction = None if budget_fraction is None else check_positive_float("budget_fraction",
                                                                                          budget_fraction)
        self.steps = check_positive_int("steps", steps, minimum=2)
        self.batch_samples = check_positive_int("batch_samples", batch_samples, minimum=4)
        self.snapshot_interval = check_positive_int("snapshot_interval", snapshot_interval, minimum=0)
        try:
            factor_list = [float(f) for f in factors]
        except (TypeError, ValueError):
            raise ValueError(f"`factors` must be a sequence of positive numbers, got {factors!r}.") from None
        if not factor_list or any(not (math.isfinite(f) and f > 0) for f in factor_list):
            raise ValueError(f"`factors` must be a sequence of positive numbers, got {factors!r}.")
        if not any(math.isclose(f, 1.0) for f in factor_list):
            raise ValueError(f"`factors` must include 1.0 (the current learning rate), got {factors!r}.")
        if max(factor_list) / min(factor_list) < 1e4 * (1 - 1e-9):
            raise ValueError(f"`factors` must span at least four orders of magnitude (max/min >= 1e4), got {factors!r}: "
                             "only a large change of the learning rate tells an LR problem from a code bug.")
        self.factors = tuple(sorted(set(factor_list)))
        if input_zeroer is not None and not callable(input_zeroer):
            raise TypeError(f"`input_zeroer` must be a callable batch -> batch, got {type(input_zeroer).__name__}.")
        self.input_zeroer = input_zeroer
        self.results: List[ProbeResult] = []  # one per probe run this fit (kept small: at most max_probes)
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        self._fit_started: Optional[float] = None
        self._probe_seconds = 0.0
        self._probes_run = 0
        self._preflight_done = False
        self._probed_reasons: set = set()
        self._fit_start_step = 0
        self._figure_seconds = FIRST_FIGURE_SECONDS  # what the next figure is expected to cost
        self._figure_skip_noted = False
        self._snapshot: Optional[WeightSnapshot] = None
        self._snapshot_loss = math.inf
        self._snapshot_tried = 0
        self._skip_noted = False
        self._lr_at_start = math.nan  # the first optimizer's rate when training started (a warm-up climbs from it)
        # a misaligned-labels verdict waiting for the validation loss (see diag.detectors.lr_probe.confirm_labels):
        # its message, advice and evidence, the step it was seen at, the validation loss then (None: the next one)
        self._labels_pending: Optional[Dict[str, Any]] = None

    def _state_key_args(self) -> dict:
        return {"preflight_step": self.preflight_step, "factors": self.factors}

    @property
    def probe_seconds(self) -> float:
        """Wall time spent probing in the current (or last) fit."""
        return self._probe_seconds

    # ---- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # a checkpoint's state (load_state_dict) arrives after this
            self._reset_fit_state()
            self.results = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_started = time.perf_counter()
        self._fit_start_step = int(trainer.global_step)
        optimizer = self._optimizer(trainer)
        self._lr_at_start = current_lr(optimizer) if optimizer is not None else math.nan
        if self.snapshot_interval and self.max_probes and optimizer is not None and \
                sum(p.numel() for p in pl_module.parameters()) <= SNAPSHOT_MAX_PARAMETERS:
            self._snapshot = WeightSnapshot.take(pl_module, optimizer, int(trainer.global_step))
            self._snapshot_loss, self._snapshot_tried = math.inf, int(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if self._snapshot is not None and (math.isinf(self._snapshot_loss) or
                                           step - self._snapshot_tried >= self.snapshot_interval):
            self._refresh_snapshot(trainer, pl_module, outputs, step)
        requests = self._context.probe_requests
        preflight = self.preflight_step is not None and not self._preflight_done and step >= self.preflight_step
        if not requests and not preflight:
            return
        reasons = [r for r in requests if r not in self._probed_reasons]
        requests.clear()
        if preflight:
            self._preflight_done = True
            reasons.append("preflight")
        if not reasons:
            return
        self._probed_reasons.update(reasons)
        verdict, result, snapshot_step = None, None, None
        if self._allowed(trainer, pl_module, reasons):
            verdict, result, snapshot_step = self._probe(trainer, pl_module, batch, batch_idx, reasons)
        # Every rank gets here at the same step (requests come from statistics reduced across ranks): one reduction.
        verdict = self._agree(verdict, pl_module, reasons)
        collapse = self._collapse(trainer, reasons, verdict, snapshot_step)  # the loss curve alone tells a collapse
        self._conclude(collapse or verdict, result, reasons)

    # Verdict codes the ranks vote on under DDP (one all-reduce of this many counts).
    _VOTES = ("none", "lr_ok", "lr_too_high", "lr_too_low", "suspected_code_bug", "dead_units", "saturated_activations",
              "bad_initialization", "probe_skipped")

    def _agree(self, verdict: Optional[Verdict], pl_module: Any, reasons: Sequence[str] = ()) -> Optional[Verdict]:
        """Under DDP each rank probed its own batch on its own copy of the state: keep the verdict only when every rank
        reached the same one (one reduction of vote counts); rank zero's message and figures are the ones reported."""
        world = self.world_size()
        if world <= 1:
            return verdict
        code = "none" if verdict is None else verdict.code
        votes = torch.zeros(len(self._VOTES), device=getattr(pl_module, "device", None))
        votes[self._VOTES.index(code) if code in self._VOTES else 0] = 1.0
        counts = self.reduce(votes, "sum")
        if code != "none" and int(round(float(counts[self._VOTES.index(code)]))) == world:
            if verdict is not None:
                verdict = dataclasses.replace(verdict, evidence={**verdict.evidence, "ranks_agreeing": world})
            return verdict
        if code != "none":
            self._note_skip("the processes' probes, each on its own batch, did not all reach the same verdict ("
                            + ", ".join(f"{c}: {int(round(float(n)))}" for c, n in zip(self._VOTES, counts) if n > 0)
                            + ")", reasons)
        return None

    def _conclude(self, verdict: Optional[Verdict], result: Optional[ProbeResult], reasons: Sequence[str]) -> None:
        if result is not None:
            self.results.append(result)
            self.log_scalars({f"diag/probe/loss_fraction@x{r.factor:g}": min(r.loss_fraction, 10.0)
                              for r in result.factors})
            self._draw(result, verdict)  # the sweep as a figure (diag/lr_probe/<n>)
        if verdict is None:
            return
        if labels_only(verdict):  # (a later probe that sees it again keeps the first sighting waiting)
            if self._labels_pending is None:
                last = self._context.get(signals.FIT_EVALUATION)
                seen = {**(result.evidence() if result is not None else {}), **verdict.evidence,
                        "trigger": ", ".join(reasons)}
                self._labels_pending = {"message": verdict.message, "advice": verdict.advice, "evidence": seen,
                                        "step": self.step(), "reference": last[2] if last is not None else None,
                                        "checked": last[0] if last is not None else -1}
            verdict = defer_labels(verdict)
        self._publish(verdict)
        if verdict.code != "lr_ok":
            evidence = {**(result.evidence() if result is not None else {}), **verdict.evidence,
                        "trigger": ", ".join(reasons), "probe_seconds_total": round(self._probe_seconds, 4)}
            self.report_verdict(dataclasses.replace(verdict, evidence=evidence))

    # ---- a misaligned-labels verdict waits for the validation loss -----------------------------------------------
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._check_labels()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._check_labels()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._check_labels()

    def _check_labels(self) -> None:
        """The fit monitor's last evaluation (published at the batched read after it, so seen here at the next epoch or
        validation end, or at the end of the fit), against the deferred verdict: confirmed, cleared, or still waiting."""
        pending = self._labels_pending
        last = self._context.get(signals.FIT_EVALUATION) if pending is not None else None
        if last is None or last[0] <= pending["checked"]:
            return
        step, train, val = last
        pending["checked"] = step
        if pending["reference"] is None:
            pending["reference"] = val
            return
        outcome = confirm_labels(pending["reference"], train, val)
        if outcome is None:
            return
        self._labels_pending = None
        if outcome:
            verdict = confirmed_labels(pending["message"], pending["advice"], pending["evidence"], pending["step"],
                                       pending["reference"], step, train, val)
            self._publish(verdict)
            self.report_verdict(verdict)

    # Woken by any probe request (for the batch under way when the request comes before it in the batch), and it
    # acts after the batched host read of a read step, where the other monitors' requests are made.
    WAKES_ON_PROBE_REQUEST = True
    ACTS_ON_REQUESTS = True

    def wants(self, step: int) -> Dict[str, float]:
        """The batch end of the next snapshot refresh or the preflight probe, or of the next batch while requests
        wait; the declared wake-up on a request does the rest. The batch end of the batch that starts at ``due - 1``
        sees global step ``due``."""
        due = math.inf
        if self._context.probe_requests:
            return {"on_train_batch_end": step}
        if self._snapshot is not None:
            # (the start snapshot's loss is read on the next batch again until one is finite)
            due = step + 1 if math.isinf(self._snapshot_loss) else self._snapshot_tried + self.snapshot_interval
        if self.preflight_step is not None and not self._preflight_done:
            due = min(due, self.preflight_step)
        return {"on_train_batch_end": due - 1}

    def _release(self) -> None:
        self._snapshot = None

    # ---- internals ----------------------------------------------------------------------------------------
    @staticmethod
    def _optimizer(trainer: Any) -> Optional[torch.optim.Optimizer]:
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if not optimizers:
            return None
        opt = optimizers[0]
        return getattr(opt, "optimizer", opt)  # LightningOptimizer wraps the user's

    def _refresh_snapshot(self, trainer: Any, pl_module: Any, outputs: Any, step: int) -> None:
        """Keep the snapshot at the lowest-loss finite state seen at the refresh steps.

        The first call only records the loss of the snapshot taken at the start. Later a snapshot is replaced only
        when the loss (the loss monitor's smoothed loss, else the batch's) is finite and lower than at the snapshot, so it never holds weights that training has
        since wrecked (diverged, or units died at a too-high learning rate) when earlier ones were better.
        """
        self._snapshot_tried = step
        # The loss monitor's smoothed loss is a number already read in the monitors' batched read: no host read here.
        # Alone (or before its first read), the batch loss is read.
        value = self._context.get(signals.LOSS_SMOOTHED)
        if not isinstance(value, float):
            loss = loss_of(outputs)
            if loss is None:
                return
            value = float(loss.detach().float().mean())
        if not math.isfinite(value):
            return
        if math.isinf(self._snapshot_loss):
            self._snapshot_loss = value  # the start snapshot: about the loss of the first batch
            return
        optimizer = self._optimizer(trainer)
        if optimizer is None or value >= self._snapshot_loss:
            return
        snapshot = WeightSnapshot.take(pl_module, optimizer, step)
        if snapshot.is_finite():  # parameters and optimizer state: one fused check
            self._snapshot, self._snapshot_loss = snapshot, value

    def _note_skip(self, why: str, reasons: Sequence[str] = ()) -> None:
        """Say once per fit, in the console and as an ``info`` finding, why a requested probe gave no verdict."""
        if self._skip_noted:
            return
        log.info("lightning-diag: LearningRateProbe did not run: %s", why)
        if not any(r in LOSS_SYMPTOMS for r in reasons):
            return  # a hint (a small update, a preflight) that went unprobed is no news for the findings table
        self._skip_noted = True
        trigger = f" (asked for by: {', '.join(reasons)})" if reasons else ""
        self.report("probe_skipped", f"The learning-rate probe gave no verdict at step {self.step()}{trigger}: {why}.",
                    evidence={"why": why, "trigger": ", ".join(reasons), "probe_seconds": round(self._probe_seconds, 4)})

    def _budget_left(self, trainer: Any) -> Optional[float]:
        """Seconds the probes may still take: ``budget_fraction`` of the fit's projected time (its time per step so far,
        probes excluded, times the steps it will run) minus what probes took already. ``None``: no limit."""
        if self.budget_fraction is None or self._fit_started is None:
            return None
        elapsed = max(time.perf_counter() - self._fit_started - self._probe_seconds, 0.0)
        done = max(int(trainer.global_step) - self._fit_start_step, 1)
        total = self._total_steps(trainer)
        projected = elapsed / done * total if total is not None and total >= done else elapsed
        return self.budget_fraction * max(projected, elapsed) - self._probe_seconds

    def _training_step_seconds(self, trainer: Any) -> float:
        """The fit's time per optimizer step so far, probes excluded (0 before the first step)."""
        if self._fit_started is None:
            return 0.0
        done = int(trainer.global_step) - self._fit_start_step
        if done <= 0:
            return 0.0
        return max(time.perf_counter() - self._fit_started - self._probe_seconds, 0.0) / done

    def _total_steps(self, trainer: Any) -> Optional[float]:
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:
            return None
        return total if math.isfinite(total) and total > 0 else None

    def _allowed(self, trainer: Any, pl_module: Any, reasons: Sequence[str] = ()) -> bool:
        """Whether a probe may run now (the time budget is checked inside the sweep, on its first factor's time)."""
        why = None
        if self._probes_run >= self.max_probes:
            why = f"max_probes={self.max_probes} reached"
        elif self.world_size() > 1 and any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules()):
            why = ("SyncBatchNorm synchronizes every forward pass across processes, and the probes of different "
                   "processes take different numbers of steps; no verdict under DDP with SyncBatchNorm")
        elif not getattr(pl_module, "automatic_optimization", True):
            why = ("manual optimization: the probe calls training_step on a copy of the state, which would step your "
                   "optimizers; no learning-rate verdict is possible")
        elif self._optimizer(trainer) is None:
            why = "no optimizer"
        elif (self._budget_left(trainer) if self.budget_fraction is not None else math.inf) <= 0:
            why = f"its time budget ({self.budget_fraction:g} of the fit's time) is used up"
        if why is not None:
            self._note_skip(why, reasons)
            return False
        return True

    def _probe(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, reasons: List[str]
               ) -> Tuple[Optional[Verdict], Optional[ProbeResult], Optional[int]]:
        """This rank's verdict: the sweep, the re-probe from the snapshot, the fresh-initialization control."""
        optimizer = self._optimizer(trainer)
        step = int(trainer.global_step)
        snapshot = None
        replay = False  # probing from the snapshot because the symptom lies in the past (REPLAY_REASONS)
        if not weights_finite(pl_module) or not optimizer_state_finite(optimizer.state_dict()):
            snapshot = self._snapshot
            if snapshot is None:
                self._note_skip("weights are non-finite and there is no finite snapshot to start from", reasons)
                return None, None, None
        elif any(r in REPLAY_REASONS for r in reasons) and self._snapshot is not None and self._snapshot.step < step:
            snapshot, replay = self._snapshot, True

        def loss_fn(b: Any) -> torch.Tensor:
            loss = loss_of(pl_module.training_step(b, batch_idx))
            if loss is None:
                raise ProbeUnavailable("training_step returned no loss tensor")
            return loss

        self._probes_run += 1
        result = self._run(trainer, pl_module, optimizer, loss_fn, batch, snapshot, reasons)
        if result is None:
            return None, None, snapshot.step if snapshot is not None else None
        trained = snapshot.step if snapshot is not None else step
        verdict = judge(result, trained_steps=trained, reasons=reasons)
        if replay and verdict.code != "lr_ok":
            verdict = dataclasses.replace(verdict, message=verdict.message.rstrip(".") + f" (probed from the weights of "
                                          f"step {snapshot.step}, saved before the loss misbehaved by step {step}).")
        if snapshot is None and self._snapshot is not None and self._snapshot.step < step \
                and nothing_fits_near_chance(result, verdict):
            # Nothing fits from the current weights: training may have wrecked them (units that died at a too-high
            # learning rate). Ask again from the last good snapshot: if the batch fits from there, it is not the code.
            again = self._run(trainer, pl_module, optimizer, loss_fn, batch, self._snapshot, reasons,
                              samples=None if result.whole_batch else result.samples_fit + result.samples_heldout)
            if again is not None:
                second = judge_wrecked(result, again, self._snapshot.step, trained_steps=self._snapshot.step,
                                       reasons=reasons, rate_only=verdict.code == "lr_ok")
                if second is not None:
                    result, verdict = again, second
        if verdict.code == "suspected_code_bug":
            # A code bug is what no rate fixes from any healthy initialization: the same sweep from a fresh one decides.
            kept: List[str] = []

            def fresh() -> None:
                kept.extend(reinitialize(pl_module))

            control = self._run(trainer, pl_module, optimizer, loss_fn, batch, None, reasons, prepare=fresh,
                                opt_state=fresh_optimizer_state(optimizer), quiet=True,
                                samples=None if result.whole_batch else result.samples_fit + result.samples_heldout)
            first = verdict
            verdict = judge_control(verdict, result, control, trained, kept, reasons)
            if labels_only(first) and control is not None and (labels_only(verdict) or verdict.code == "probe_skipped"):
                # a sequence model's labels one position off: rolled back into place, a fresh copy learns them (far
                # better than the same copy on the labels as they are, whether or not that control confirmed)
                parts = split_batch(batch)
                targets = targets_of(batch)
                if parts is not None and sequence_labels(parts.inputs, targets):
                    for shift in (1, -1):
                        moved = with_targets(batch, torch.roll(targets, shift, dims=1))
                        shifted = None if moved is None else self._run(
                            trainer, pl_module, optimizer, loss_fn, moved, None, reasons, prepare=fresh,
                            opt_state=fresh_optimizer_state(optimizer), quiet=True,
                            samples=None if result.whole_batch else result.samples_fit + result.samples_heldout)
                        if shifted is not None and carries_over(shifted, baseline=control):
                            verdict = labels_shifted(verdict if labels_only(verdict) else first, shift, shifted)
                            break
        collector = self._context.collector
        verdict = temper_too_low(verdict, [c for c in DESIGN_EXPLAINS_SLOW if collector.has(c, Severity.WARNING)])
        verdict = temper_warmup(verdict, current_lr(optimizer), self._lr_at_start, scheduled_peak_lr(optimizer))
        verdict = note_decay(verdict, current_lr(optimizer), scheduled_peak_lr(optimizer))
        return verdict, result, snapshot.step if snapshot is not None else None

    def _draw(self, result: ProbeResult, verdict: Optional[Verdict]) -> None:
        """The sweep's figure, within the probe's time budget: drawing it costs about as much as a sweep of a small
        model (measured 0.3-0.9 s, plus about 1 s for matplotlib's first import), so it counts as probe time, and
        is left out, with one log line, when the budget cannot pay for another like the last one."""
        left = self._budget_left(self._trainer) if self._trainer is not None else None
        if left is not None and left < self._figure_seconds:
            if not self._figure_skip_noted:
                self._figure_skip_noted = True
                log.info("lightning-diag: no figure of the learning-rate probe's sweep: drawing one takes about %.1fs, "
                         "more than the %.2fs left in the probe's time budget", self._figure_seconds, max(left, 0.0))
            return
        started = time.perf_counter()
        self._context.collector.log_probe(result, verdict, self.step())
        took = time.perf_counter() - started
        self._probe_seconds += took
        self._figure_seconds = max(took, 0.05)

    def _publish(self, verdict: Verdict) -> None:
        # an unconfirmed code bug (info) is no verdict other monitors may act on
        code = "lr_ok" if verdict.severity == "info" else verdict.code
        self._context.publish(signals.PROBE_VERDICT, code)
        self._context.publish(signals.PROBE_SUGGESTED_LR, verdict.suggested_lr)

    def _collapse(self, trainer: Any, reasons: Sequence[str], verdict: Optional[Verdict],
                  snapshot_step: Optional[int]) -> Optional[Verdict]:
        """A run that learned and then collapsed: ``lr_too_high`` whatever the probe saw (``None`` otherwise)."""
        initial, best = self._context.get(signals.LOSS_INITIAL), self._context.get(signals.LOSS_BEST)
        if not collapsed_after_progress(reasons, initial, best):
            return None
        optimizer = self._optimizer(trainer)
        if optimizer is None:
            return None
        return judge_collapse(verdict, current_lr(optimizer), float(initial), float(best), int(trainer.global_step),
                              snapshot_step)

    def _run(self, trainer: Any, pl_module: Any, optimizer: Any, loss_fn: Callable, batch: Any,
             snapshot: Optional[WeightSnapshot], reasons: Sequence[str], prepare: Optional[Callable[[], None]] = None,
             opt_state: Optional[dict] = None, quiet: bool = False,
             samples: Optional[int] = None) -> Optional[ProbeResult]:
        """One sweep. A sweep that would exceed the budget by at most SHRINK_OVER_BUDGET is tried once more on half the
        samples (a compute-bound model's steps then cost about half); ``samples`` fixes the count (the control sweeps
        use the first sweep's)."""
        left = self._budget_left(trainer)
        floor = (len(self.factors) + 1) * self.steps * PROBE_STEP_FLOOR * self._training_step_seconds(trainer)
        if left is not None and left < floor:
            # not even worth timing: the cheapest sweep this fit's steps allow would not fit the budget
            if not quiet:
                self._note_skip(f"a sweep takes at least {floor:.2f}s here ({PROBE_STEP_FLOOR:g} of a training step per "
                                f"probe step), more than the {max(left, 0.0):.2f}s its budget allows "
                                f"({self.budget_fraction:g} of this fit's projected time); a longer fit, or "
                                "LearningRateProbe(budget_fraction=...), lets it run", reasons)
            return None
        started = time.perf_counter()
        self._context.publish(signals.PROBE_RUNNING, True)
        samples = samples or self.batch_samples
        try:
            while True:
                try:
                    with quiet_logging(pl_module):
                        return run_probe(pl_module, optimizer, loss_fn, batch, factors=self.factors, steps=self.steps,
                                         batch_samples=samples, zero_fn=self.input_zeroer or zero_inputs,
                                         snapshot=snapshot, opt_state=opt_state, prepare=prepare,
                                         budget_seconds=self._budget_left(trainer))
                except ProbeOverBudget as exc:
                    self._probe_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    if exc.projected <= SHRINK_OVER_BUDGET * exc.allowed and samples // 2 >= MIN_SHRUNK_SAMPLES \
                            and prepare is None:
                        samples //= 2
                        continue
                    if not quiet:
                        self._note_skip(f"{exc} ({self.budget_fraction:g} of this fit's projected time, {samples} "
                                        "samples); a longer fit, or LearningRateProbe(budget_fraction=...), lets it "
                                        "run", reasons)
                    return None
        except ProbeUnavailable as exc:
            self._note_skip(str(exc), reasons)
            return None
        finally:
            self._context.publish(signals.PROBE_RUNNING, False)
            self._probe_seconds += time.perf_counter() - started
