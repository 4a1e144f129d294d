"""One result type for every rule: ``diag.detectors.Verdict``, reported by ``Monitor.report_verdict``, which also asks
for the learning-rate probe when a verdict says so (once per reason and fit)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import pkgutil
import typing

import pytest

import diag.detectors
from diag.codes import CATALOGUE
from diag.detectors import Verdict
from diag.detectors import gradients as gradient_rules
from diag.detectors import loss_curve as loss_rules
from diag.findings import Severity
from diag.monitors.base import Monitor
from diag.stats.loss import LossStatistics

RULE_MODULES = [importlib.import_module(f"diag.detectors.{m.name}") for m in pkgutil.iter_modules(diag.detectors.__path__)]


def _functions(module):
    return [fn for _, fn in inspect.getmembers(module, inspect.isfunction) if fn.__module__ == module.__name__]


def _returns_verdict(fn) -> bool:
    """Whether ``fn``'s resolved return annotation is ``diag.detectors.Verdict`` or ``Optional`` of it (the class
    itself, not another one of the same name)."""
    hint = typing.get_type_hints(fn).get("return")
    return hint is Verdict or (typing.get_origin(hint) is typing.Union and set(typing.get_args(hint)) == {Verdict, type(None)})


def test_every_rule_returns_the_one_verdict_type():
    rules = [fn for module in RULE_MODULES for fn in _functions(module)
             if "Verdict" in str(inspect.signature(fn).return_annotation) or fn.__name__ in CATALOGUE]
    names = {fn.__name__ for fn in rules}
    # the rules of every monitor are among them (a rule named after its code, and the probe's judge)
    assert {"exploding_gradients", "loss_diverging", "underfitting", "dead_units", "adam_coupled_weight_decay",
            "class_imbalance", "judge", "loss_spike", "impossible_loss"} <= names
    wrong = [f"{fn.__module__}.{fn.__name__}" for fn in rules if not _returns_verdict(fn)]
    assert not wrong, f"rules that do not return diag.detectors.Verdict: {wrong}"


def test_no_second_result_type_in_the_rules():
    # a dataclass with a message is a verdict type: only diag.detectors.Verdict may be one
    others = [f"{module.__name__}.{name}" for module in RULE_MODULES
              for name, cls in inspect.getmembers(module, inspect.isclass)
              if cls.__module__ == module.__name__ and dataclasses.is_dataclass(cls)
              and ("message" in {f.name for f in dataclasses.fields(cls)} or name.endswith(("Verdict", "Diagnosis")))]
    assert not others


def _stats(values):
    stats = LossStatistics(ema_decay=0.95, window=50)
    for v in values:
        stats.update(v)
    return stats


def test_rules_say_when_they_want_the_probe():
    risen = _stats([1.0] * 5 + [10.0] * 60)  # sits at 10x its start: rising no more
    warning = loss_rules.loss_diverging(risen, chance_level=math.log(10))
    assert warning.severity is None and warning.probe == "loss_diverging"
    hint = loss_rules.loss_diverging(risen)  # no chance level and no longer rising: an info, which spends no probe
    assert hint.severity == "info" and hint.probe is None
    assert loss_rules.nonfinite_loss(math.nan, 3, risen).probe == "nonfinite_loss"
    assert loss_rules.loss_spike(risen, chance_level=math.log(10)).probe == "loss_spike"
    assert loss_rules.loss_spike(risen).probe is None
    swing = {"median_step_swing": 0.5, "window_median_loss": 2.0, "window": 50, "start_loss": 2.3, "best_loss": 1.9}
    assert loss_rules.loss_oscillating({**swing, "chance_level": 2.3}, consecutive_checks=1) is None
    assert loss_rules.loss_oscillating({**swing, "chance_level": 2.3}, consecutive_checks=2).probe == "loss_oscillating"
    assert loss_rules.loss_oscillating(swing, consecutive_checks=2).probe is None  # info without a chance level
    assert [loss_rules.stall_probe(n) for n in (0, 1, 2, 3)] == [None, None, "loss_stalled", "loss_stalled"]
    assert gradient_rules.update_ratio_probe(math.log10(1e-5)) == "update_too_small"
    assert gradient_rules.update_ratio_probe(math.log10(1e-3)) is None
    assert gradient_rules.update_ratio_probe(math.log10(0.5)) == "update_too_large"


class _Watcher(Monitor):
    pass


def test_report_verdict_reports_and_asks_the_probe_once_per_reason():
    monitor = _Watcher()
    assert monitor.report_verdict(None) is None
    verdict = Verdict("loss_diverging", "The loss rose.", evidence={"ratio_to_start": 4.0}, probe="loss_diverging")
    finding = monitor.report_verdict(verdict, extra={"source": "test"})
    # severity and advice left to the catalogue
    assert finding.severity == CATALOGUE["loss_diverging"].severity == Severity.WARNING
    assert finding.advice == CATALOGUE["loss_diverging"].advice
    assert finding.evidence == {"ratio_to_start": 4.0, "source": "test"} and verdict.evidence == {"ratio_to_start": 4.0}
    monitor.report_verdict(dataclasses.replace(verdict, severity="error"))
    monitor.report_verdict(Verdict("loss_plateau", "Flat.", severity="info"))
    assert monitor.context.probe_requests == ["loss_diverging"]
    assert [f.code for f in monitor.findings] == ["loss_diverging", "loss_plateau"]
    assert monitor.findings[0].severity == Severity.ERROR  # the more severe report replaced the first
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.message = "changed"  # type: ignore[misc]
