"""``diag analyze``: a diagnosis of runs trained without lightning-diag, from the curves they logged.

Reads each run's TensorBoard event files or Lightning ``CSVLogger`` ``metrics.csv`` (:mod:`diag.curves`), finds the
training loss (``train_loss``, ``train_loss_step``, ``loss``, ``train/loss``, ...) and the validation loss
(``val_loss``, ``val/loss``, ...), and replays them through the rules the live monitors use, with the same
statistics and thresholds:

- the loss-curve rules of ``LossCurveMonitor`` (:mod:`diag.detectors.loss_curve` over
  :class:`diag.stats.loss.LossStatistics`): ``nonfinite_loss``, ``loss_diverging``, ``loss_oscillating``,
  ``loss_plateau``, ``unexpected_initial_loss`` (with ``num_classes``), an impossible loss;
- the fit rules of ``FitMonitor`` (:mod:`diag.detectors.fit` over :class:`diag.stats.fit.FitHistory`):
  ``underfitting``, ``overfitting``, ``early_stop_suggested``, ``no_validation_metric``.

Each logged training-loss point counts as one step of the live monitor (a run logged every 50 steps is judged over
windows of 50 logged points). What the curves cannot tell (a learning rate from a code bug: that takes the probe's
throw-away fits of the model; gradients, activations, data) is said once per run with a symptom, as the ``info``
``needs_live_run``, with the line to run live.

Example::

    from diag.analyze import analyze
    for run in analyze("old_runs/lightning_logs"):
        print(run.name, run.train_tag, [f.code for f in run.findings])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional

from diag.codes import code_info
from diag.collector import FindingsCollector
from diag.curves import (Curve, CurveError, Curves, describe, find_logged_runs, read_curves, training_epoch_loss_tag,
                         training_loss_tag, user_tags, validation_loss_tag)
from diag.detectors import Verdict
from diag.detectors import fit as fit_rules
from diag.detectors import loss_curve as loss_rules
from diag.findings import Finding, Severity
from diag.report import RunFindings, at_least
from diag.stats.fit import FitHistory
from diag.stats.loss import LossStatistics

# The live monitors' defaults (``LossCurveMonitor``: EMA decay, window, warm-up, steps between checks;
# ``FitMonitor``: patience), repeated here because ``diag`` does not import the Lightning callbacks;
# tests/test_analyze.py checks that they agree.
EMA_DECAY = 0.95
WINDOW = 50
WARMUP_STEPS = 40
CHECK_EVERY = 10
PATIENCE = 5

LIVE_RUN_CODE = "needs_live_run"
# The loss symptoms whose cause (learning rate, code, initialization) only a live run's probe can name.
SYMPTOMS = ("nonfinite_loss", "loss_diverging", "loss_oscillating", "loss_plateau", "underfitting")
LIVE_RUN_LINE = ("from diag.callbacks import Diagnostics; trainer = pl.Trainer(callbacks=[Diagnostics()]); "
                 "trainer.fit(model, train_loader, val_loader)")


class AnalyzeError(Exception):
    """Nothing to analyze below a directory (the message names it and says what was looked for)."""


@dataclasses.dataclass
class AnalyzedRun:
    """The diagnosis of one logged run.

    Attributes:
        name: the run's folder relative to the directory searched.
        log_dir: the folder holding the event files or ``metrics.csv``.
        source: ``"tensorboard"`` or ``"csv"``.
        train_tag / val_tag: the curves judged as the training and the validation loss (``None``: not found).
        findings: worst first; ``warnings``: what could not be judged, one line each.
    """

    name: str
    log_dir: str
    source: str
    train_tag: Optional[str]
    val_tag: Optional[str]
    findings: List[Finding]
    warnings: List[str] = dataclasses.field(default_factory=list)
    curves: Curves = dataclasses.field(default_factory=dict, repr=False)

    @property
    def path(self) -> str:
        return self.log_dir if self.source == "tensorboard" else f"{self.log_dir}/metrics.csv"

    def as_run_findings(self) -> RunFindings:
        """For the renderers and the gate of ``diag report``."""
        return RunFindings(name=self.name, log_dir=self.log_dir, path=self.path, findings=self.findings,
                           warnings=self.warnings)

    def to_dict(self, min_severity: Severity = Severity.INFO) -> Dict[str, Any]:
        return {"run": self.name, "log_dir": self.log_dir, "path": self.path, "source": self.source,
                "train_loss": self.train_tag, "val_loss": self.val_tag,
                "findings": [f.to_dict() for f in at_least(self.findings, min_severity)]}


class _Replay:
    """The live monitors' schedule over logged points: loss-curve checks every ``CHECK_EVERY`` points after the
    warm-up, fit judgements at each validation point; findings de-duplicated as a live run's collector does."""

    def __init__(self, chance_level: Optional[float], epochs: Optional[Curve]) -> None:
        self.collector = FindingsCollector()
        self.stats = LossStatistics(ema_decay=EMA_DECAY, window=WINDOW)
        self.chance = chance_level
        self.epochs = epochs
        self.oscillation_checks = 0
        self.flat_since: Optional[int] = None
        self.impossible_seen = False
        self.stalled: Optional[bool] = None  # what LossCurveMonitor publishes as signals.LOSS_STALLED
        self.since_check = 0
        self.step = 0

    def epoch_at(self, step: int) -> int:
        from diag.curves import value_at

        value = value_at(self.epochs, step, default=0.0)
        return int(value) if math.isfinite(value) else 0

    def raise_(self, verdict: Optional[Verdict], extra: Optional[Dict[str, Any]] = None) -> None:
        if verdict is None:
            return
        info = code_info(verdict.code)
        evidence = {**verdict.evidence, **(extra or {})}
        self.collector.report(Finding(code=verdict.code, severity=Severity(verdict.severity or info.severity),
                                      step=self.step, epoch=self.epoch_at(self.step), message=verdict.message,
                                      advice=verdict.advice or info.advice, evidence=evidence))

    # ---- the training loss: LossCurveMonitor's rules --------------------------------------------------------------
    def loss(self, step: int, value: float) -> None:
        self.step = step
        if not self.stats.update(value):
            self.raise_(loss_rules.nonfinite_loss(value, step, self.stats))
        self.since_check += 1
        if self.since_check >= CHECK_EVERY:
            self.since_check = 0
            self.check()

    def check(self) -> None:
        stats, chance = self.stats, self.chance
        if stats.count == 0:
            return
        progress = stats.relative_progress()
        past_warmup = stats.count >= WARMUP_STEPS
        self.stalled = bool(past_warmup and loss_rules.stalled_signal(progress))
        if not self.impossible_seen:
            impossible = loss_rules.impossible_loss(stats, chance)
            if impossible is not None:
                self.impossible_seen = True
                self.raise_(impossible)
        if not past_warmup:
            self.raise_(loss_rules.loss_spike(stats, chance_level=chance))
            return
        diverging = loss_rules.loss_diverging(stats, chance_level=chance)
        if diverging is not None:
            self.raise_(diverging)
            self.oscillation_checks = 0
        else:
            self.raise_(loss_rules.loss_spike(stats, chance_level=chance))
            evidence = loss_rules.oscillation_evidence(stats, chance_level=chance)
            self.oscillation_checks = self.oscillation_checks + 1 if evidence is not None else 0
            if evidence is not None:
                self.raise_(loss_rules.loss_oscillating(evidence, self.oscillation_checks))
        if stats.window_full and loss_rules.near_start(stats, chance) and loss_rules.flat(stats):
            if self.flat_since is None:
                self.flat_since = stats.count
            flat_steps = stats.count - self.flat_since + stats.window_size
            self.raise_(loss_rules.loss_plateau(stats, flat_steps, chance, None))
        else:
            self.flat_since = None

    # ---- the validation loss: FitMonitor's rules --------------------------------------------------------------------
    def explained_by(self) -> List[str]:
        return fit_rules.stall_explained_by(lambda code: self.collector.has(code, Severity.WARNING))

    def judge_fit(self, history: FitHistory, reference: Optional[fit_rules.Reference], metric: str,
                  has_validation: bool) -> None:
        under = fit_rules.underfitting(history, reference, comparable=has_validation, has_validation=has_validation,
                                       explained_by=self.explained_by(), loss_stalled=self.stalled, metric=metric)
        self.raise_(under)
        if not has_validation:
            return
        lines = fit_rules.early_stop_lines(metric, "min", PATIENCE)
        over = fit_rules.overfitting(history, reference, metric, f"{lines['early_stopping']} + {lines['checkpoint']}")
        self.raise_(over)
        # Whether the run had EarlyStopping or ModelCheckpoint is not in its curves: judged as if it had neither.
        self.raise_(fit_rules.early_stop_suggested(history, metric, "min", PATIENCE, None, False,
                                                   over is not None and over.severity is None))


def _reference(first_loss: float, num_classes: Optional[int]) -> Optional[fit_rules.Reference]:
    if num_classes:
        return fit_rules.Reference(math.log(num_classes), "chance_level")
    return fit_rules.Reference(first_loss, "initial_loss") if math.isfinite(first_loss) and first_loss > 0 else None


def analyze_curves(curves: Curves, train_tag: Optional[str] = None, val_tag: Optional[str] = None,
                   num_classes: Optional[int] = None) -> List[Finding]:
    """The findings of one run's curves (``train_tag`` / ``val_tag``: the curves to judge, found when ``None``).

    Raises:
        AnalyzeError: no training loss among the curves.
    """
    train = training_loss_tag(curves, train_tag)
    if train is None:
        raise AnalyzeError(f"no training loss among the logged scalars ({describe(user_tags(curves))}); name it "
                           "with --train-tag")
    val = validation_loss_tag(curves, val_tag)
    if val == train:
        val = None
    train_curve, val_curve = curves[train], curves.get(val) if val else None
    epoch_curve = curves.get("epoch")
    chance = math.log(num_classes) if num_classes and num_classes >= 2 else None
    replay = _Replay(chance, epoch_curve)
    first = next((v for v in train_curve.values if math.isfinite(v)), math.nan)
    if num_classes and train_curve.steps and train_curve.steps[0] == 0 and math.isfinite(train_curve.values[0]):
        replay.step = 0
        replay.raise_(loss_rules.unexpected_initial_loss(train_curve.values[0], num_classes, None, inferred=False))
    reference = _reference(first, num_classes)
    train_epoch_tag = training_epoch_loss_tag(curves, train)
    train_epoch = curves.get(train_epoch_tag) if train_epoch_tag else None
    history = FitHistory("min")
    evaluations = list(zip(val_curve.steps, val_curve.values)) if val_curve is not None else []
    points = list(zip(train_curve.steps, train_curve.values))
    i, since, previous = 0, [], -1
    for eval_step, val_value in evaluations:
        while i < len(points) and points[i][0] <= eval_step:
            replay.loss(*points[i])
            since.append(points[i][1])
            i += 1
        replay.step = eval_step
        train_value = _train_at(train_epoch, eval_step, previous, since)
        history.update(replay.epoch_at(eval_step), eval_step, val=val_value, train=train_value)
        replay.judge_fit(history, reference, val, has_validation=True)
        since, previous = [], eval_step
    for step, value in points[i:]:
        replay.loss(step, value)
    if replay.since_check:
        replay.check()  # the live monitor reads its buffer at fit end too
    if val_curve is None:
        _training_only(replay, curves, train_curve, train_epoch, reference)
    findings = replay.collector.findings
    if any(f.code in SYMPTOMS and f.severity.rank >= Severity.WARNING.rank for f in findings):
        replay.step = findings[-1].step
        replay.collector.report(Finding(
            code=LIVE_RUN_CODE, severity=code_info(LIVE_RUN_CODE).severity, step=replay.step,
            epoch=replay.epoch_at(replay.step),
            message=("These findings come from the logged curves alone: whether the learning rate, the code (labels, "
                     "inputs, loss) or the initialization causes them takes the model, as do the gradient, "
                     "activation and data checks."),
            advice=(f"Train it again with lightning-diag attached: {LIVE_RUN_LINE}. Its learning-rate probe then "
                    "says lr_too_high / lr_too_low (with the rate to use) or suspected_code_bug."),
            evidence={"train_loss": train, "val_loss": val or "none", "points": len(train_curve)}))
    return sorted(replay.collector.findings, key=lambda f: (-f.severity.rank, f.step, f.code))


def _train_at(train_epoch: Optional[Curve], step: int, previous: int, since: List[float]) -> float:
    """The training loss of the evaluation at ``step``: the logged epoch mean at that step (what FitMonitor reads
    when one validation runs per epoch), else the mean of the training points since the previous evaluation."""
    if train_epoch is not None:
        for s, v in zip(train_epoch.steps, train_epoch.values):
            if previous < s <= step:
                return v
    good = [v for v in since if math.isfinite(v)]
    return sum(good) / len(good) if good else math.nan


def _training_only(replay: _Replay, curves: Curves, train: Curve, train_epoch: Optional[Curve],
                   reference: Optional[fit_rules.Reference]) -> None:
    """No validation loss: ``no_validation_metric`` (info) and underfitting judged per epoch from the training loss."""
    keys = describe(user_tags(curves))
    replay.collector.report(Finding(
        code="no_validation_metric", severity=code_info("no_validation_metric").severity, step=replay.step,
        epoch=replay.epoch_at(replay.step),
        message=(f"No validation loss among the logged scalars ({keys}): underfitting is judged from the training "
                 "loss alone; overfitting and early stopping need a validation loss."),
        advice=('Name it with --val-tag, or log it in validation_step (self.log("val_loss", loss)) in the next '
                "training."),
        evidence={"logged": keys[:500]}))
    if replay.epochs is None and train_epoch is None:
        return
    history = FitHistory("min")
    if train_epoch is not None:
        for step, value in zip(train_epoch.steps, train_epoch.values):
            replay.step = step
            history.update(replay.epoch_at(step), step, train=value)
            replay.judge_fit(history, reference, "train loss", has_validation=False)
        return
    per_epoch: Dict[int, List[float]] = {}
    last_step: Dict[int, int] = {}
    for step, value in zip(train.steps, train.values):
        epoch = replay.epoch_at(step)
        per_epoch.setdefault(epoch, []).append(value)
        last_step[epoch] = step
    for epoch in sorted(per_epoch)[:-1]:  # the last epoch may be unfinished
        good = [v for v in per_epoch[epoch] if math.isfinite(v)]
        replay.step = last_step[epoch]
        history.update(epoch, last_step[epoch], train=sum(good) / len(good) if good else math.nan)
        replay.judge_fit(history, reference, "train loss", has_validation=False)


def analyze(root: str, train_tag: Optional[str] = None, val_tag: Optional[str] = None,
            num_classes: Optional[int] = None) -> List[AnalyzedRun]:
    """Every logged run below ``root``, diagnosed; a run without a training loss is listed with a warning and no
    findings.

    Raises:
        AnalyzeError: ``root`` is missing, or holds no event file and no metrics.csv.
    """
    import os

    try:
        found = find_logged_runs(root)
    except CurveError as exc:
        raise AnalyzeError(str(exc)) from None
    if not found:
        raise AnalyzeError(f"{root}: no TensorBoard event files (events.out.tfevents.*) and no metrics.csv below this "
                           "directory.")
    runs = []
    for log_dir, source in found:
        name = os.path.relpath(log_dir, root) if os.path.isdir(root) else log_dir
        name = os.path.normpath(log_dir) if name == "." else name
        warnings: List[str] = []
        try:
            curves = read_curves(log_dir, source)
        except CurveError as exc:
            runs.append(AnalyzedRun(name, log_dir, source, None, None, [], [str(exc)]))
            continue
        train = training_loss_tag(curves, train_tag)
        val = validation_loss_tag(curves, val_tag)
        findings: List[Finding] = []
        if train is None:
            warnings.append(f"{log_dir}: no training loss among the logged scalars ({describe(user_tags(curves))}); "
                            "name it with --train-tag. Not analyzed.")
        else:
            if val_tag is not None and val is None:
                warnings.append(f"{log_dir}: no scalar named {val_tag!r} (--val-tag); judged without validation.")
            findings = analyze_curves(curves, train_tag, val_tag, num_classes)
        runs.append(AnalyzedRun(name, log_dir, source, train, val if val != train else None, findings, warnings,
                                curves))
    return runs
