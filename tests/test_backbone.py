"""The backbone: Finding, collector, sinks, both Lightning namespaces, outputs read back from disk."""

import json
import os

import pytest
import torch
from torch import nn

import lightning.pytorch as L
import pytorch_lightning as pl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diag import CATALOGUE, Finding, FindingsCollector, Severity
from diag.callbacks import Diagnostics, Monitor
from diag.sinks import JsonlSink, markdown_table, read_findings
from tests.helpers import Classifier, classifier_for, digits_loaders, mlp, trainer

SPEC_CODES = """nonfinite_loss loss_diverging loss_oscillating loss_plateau unexpected_initial_loss lr_too_high lr_too_low
suspected_code_bug high_gradient_noise exploding_gradients vanishing_gradients missing_gradients zigzag_updates
non_zero_centered_activation dead_units saturated_activations batchnorm_on_sequence batchnorm_small_batch
adam_coupled_weight_decay sgd_without_momentum underfitting overfitting early_stop_suggested inputs_not_normalized
class_imbalance train_val_overlap diag_internal_error""".split()


def test_catalogue_has_every_spec_code():
    assert set(SPEC_CODES) <= set(CATALOGUE)
    for info in CATALOGUE.values():
        assert info.meaning and info.advice


def test_finding_round_trips_and_cleans_evidence():
    f = Finding("lr_too_high", "warning", 3, 0, "m", "a", {"lr": torch.tensor(0.5), "nan": float("nan"), "ok": True})
    assert f.severity is Severity.WARNING and f.evidence == {"lr": 0.5, "nan": "nan", "ok": 1}
    assert Finding.from_dict(json.loads(json.dumps(f.to_dict()))) == f
    with pytest.raises(ValueError, match="severity must be one of"):
        Finding("x", "fatal", 0, 0, "m", "a")


def test_collector_dedupes_and_upgrades(tmp_path):
    path = tmp_path / "diag" / "findings.jsonl"
    c = FindingsCollector()
    c.open([JsonlSink(str(path))])
    assert c.report(Finding("dead_units", "info", 1, 0, "m", "a", {"n": 1}, layer="fc1"))
    assert c.report(Finding("dead_units", "info", 2, 0, "m", "a", {"n": 2}, layer="fc1")) is None
    assert c.findings[0].evidence["n"] == 2 and c.findings[0].step == 1
    assert c.report(Finding("dead_units", "warning", 3, 0, "m", "a", {"n": 3}, layer="fc1"))
    assert c.report(Finding("dead_units", "info", 4, 0, "m", "a", layer="fc2"))
    assert len(c.findings) == 2 and c.findings[0].severity is Severity.WARNING
    c.close()
    assert [json.loads(line)["severity"] for line in path.read_text().splitlines()] == ["info", "warning", "info"]
    assert {f.key: f.severity.value for f in read_findings(str(path))} == {("dead_units", "fc1"): "warning",
                                                                             ("dead_units", "fc2"): "info"}


class _Recorder:
    """A sink that records each log_scalars call and each end of a batch of them."""

    def __init__(self):
        self.calls = []

    def log_scalars(self, scalars, step):
        self.calls.append((step, dict(scalars)))

    def scalars_written(self, step):
        self.calls.append(("batch", step))

    def open(self, findings):
        pass

    def flush(self, findings, step):
        pass

    def close(self, findings):
        pass


def test_collector_holds_scalars_and_writes_each_step_once_oldest_first():
    from diag.collector import SCALARS_HOLD, SCALARS_WRITE_EVERY

    sink = _Recorder()
    c = FindingsCollector()
    c.open([sink])
    c.flush(0)  # the first flush sets the next write SCALARS_WRITE_EVERY steps on
    c.log_scalars({"diag/loss": 1.0}, 20)  # a read at step 20 logs the loss there...
    c.log_scalars({"diag/grad_norm": 2.0}, 10)  # ...and a gradient sample of step 10, read at the same read
    c.log_scalars({"diag/grad_norm": 3.0}, 20)  # the sample of step 20 comes at a later read: same step, same write
    c.log_scalars({"diag/loss": 1.5}, 20)  # a tag logged twice at one step: the later value stays
    for step in range(1, SCALARS_WRITE_EVERY):
        c.flush(step)
    assert sink.calls == []  # nothing written before SCALARS_WRITE_EVERY steps
    late = SCALARS_WRITE_EVERY + 20 - SCALARS_HOLD  # step 20 is written once it is SCALARS_HOLD steps old
    c.log_scalars({"diag/loss": 0.5}, late)
    c.flush(SCALARS_WRITE_EVERY)
    assert sink.calls == [(10, {"diag/grad_norm": 2.0}), (20, {"diag/loss": 1.5, "diag/grad_norm": 3.0}), ("batch", 20)]
    c.close()  # the fit's end writes what is held
    assert sink.calls[-2:] == [(late, {"diag/loss": 0.5}), ("batch", late)]


def test_markdown_table_escapes_pipes():
    table = markdown_table([Finding("loss_plateau", "warning", 1, 0, "a|b", "c\nd")])
    assert "a\\|b" in table and "c d" in table and table.count("\n") == 2


class _Raises(Monitor):
    """A monitor that reports once, then fails: the fit must go on."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.report("loss_plateau", "test finding", evidence={"batch_idx": batch_idx})
            self.log_scalars({"diag/test_scalar": 1.5})
        else:
            raise RuntimeError("boom")


@pytest.mark.parametrize("namespace", [pl, L], ids=["pytorch_lightning", "lightning.pytorch"])
def test_monitor_outputs_in_both_namespaces(tmp_path, namespace):
    train, val = digits_loaders(n_train=256)
    monitor = _Raises()
    t = trainer(tmp_path, [monitor], max_epochs=1, namespace=namespace)
    t.fit(classifier_for(namespace)(mlp([64, 32, 10])), train, val)
    codes = [f.code for f in monitor.findings]
    assert codes == ["loss_plateau", "diag_internal_error"]
    assert "boom" in monitor.findings[1].message
    # JSONL in the logger's directory
    jsonl = os.path.join(t.log_dir, "diag", "findings.jsonl")
    assert [f.code for f in read_findings(jsonl)] == codes
    # TensorBoard: scalar, text table and custom-scalars layout read back from the event files
    acc = EventAccumulator(t.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("diag/test_scalar")] == [1.5]
    text = acc.Tensors("diag/findings/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "loss_plateau" in text and "diag_internal_error" in text
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_logger_false_still_collects_and_writes_jsonl(tmp_path):
    train, _ = digits_loaders(n_train=128)
    monitor = _Raises()
    t = trainer(tmp_path, [monitor], max_epochs=1, logger=False)
    t.fit(Classifier(mlp([64, 10])), train)
    assert [f.code for f in monitor.findings] == ["loss_plateau", "diag_internal_error"]
    # no logger: a new folder per fit, where Lightning's default logger would have put the run
    assert monitor.findings_file == os.path.join(str(tmp_path), "lightning_logs", "version_0", "diag", "findings.jsonl")
    assert os.path.exists(monitor.findings_file)


def test_diagnostics_rejects_bad_arguments():
    with pytest.raises(TypeError, match="`gradients` must be True, False or a GradientMonitor"):
        Diagnostics(gradients="yes")
    with pytest.raises(TypeError, match="`console` must be True or False"):
        Diagnostics(console=1)


def test_readme_explains_every_code():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    missing = [code for code in CATALOGUE if f"`{code}`" not in readme]
    assert not missing, f"README's code table lacks {missing}"


def test_idle_per_step_hooks_are_hidden_from_lightning_but_not_from_subclasses(tmp_path):
    calls = []

    class Counting(Diagnostics):
        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            calls.append(trainer.global_step)

    plain, counting = Diagnostics(console=False), Counting(console=False)
    # no monitor uses on_before_zero_grad: Lightning's dispatch skips a non-callable hook attribute
    assert plain.on_before_zero_grad is None and callable(plain.on_train_batch_end)
    assert callable(counting.on_before_zero_grad)  # a subclass's own hook is never hidden
    model = Classifier(mlp([64, 16, 10]), lr=1e-3)
    train, val = digits_loaders(batch_size=64, n_train=256)
    pl.Trainer(default_root_dir=str(tmp_path), max_steps=6, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, logger=False, callbacks=[plain, counting]).fit(model, train, val)
    assert calls == list(range(6))
    # without gradient accumulation GradientMonitor retires from on_after_backward: hidden too
    assert plain.on_after_backward is None


def test_the_router_routes_from_declarations_and_asks_again_only_when_due():
    """A monitor declares when it next needs a hook; the router routes the hook off until then and does not ask the
    monitor again in between (no per-step cost), then routes it back on for exactly the due batch."""
    from diag.monitors.router import NEVER, Router

    class Declaring:
        def __init__(self):
            self.asked, self.called = [], []

        def on_train_batch_start(self, step):
            self.called.append(step)

        def on_train_batch_end(self, step):
            pass

        def wants(self, step):
            self.asked.append(step)
            return {"on_train_batch_start": 20 if step < 20 else (step if step < 25 else NEVER)}

    shown = []
    monitor = Declaring()
    router = Router([monitor], ["on_train_batch_start", "on_train_batch_end"], lambda m, h: True,
                    lambda hook, on: shown.append((hook, on)))
    for step in range(40):
        router.call("on_train_batch_start", step)
        router.call("on_train_batch_end", step)
        router.plan(step + 1)
    assert monitor.called == [0] + list(range(20, 25))
    assert monitor.asked == [1, 20, 21, 22, 23, 24, 25]  # never between its due steps, never after NEVER
    assert shown[-1] == ("on_train_batch_start", False) and router.receives(monitor, "on_train_batch_end")
    router.wake(monitor)  # the declared event (a probe request) gives every hook back at once
    assert router.receives(monitor, "on_train_batch_start")


def test_a_monitor_alone_skips_the_hooks_its_declaration_routes_off(tmp_path):
    """Used alone (no Diagnostics), a monitor is routed from its declaration too: Lightning stops calling a per-step
    hook it does not need now, and the monitor's findings are the same as composed."""
    from diag.callbacks import ActivationMonitor

    alone = ActivationMonitor(interval=10, window=2)
    starts = []

    class Counting(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append(callable(alone.on_train_batch_start))

    model = Classifier(mlp([64, 16, 10]), lr=1e-3)
    train, _ = digits_loaders(batch_size=32, n_train=640)
    pl.Trainer(default_root_dir=str(tmp_path), max_steps=30, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, logger=False, callbacks=[Counting(), alone]).fit(model, train)
    assert starts[:2] == [True, False] and sum(starts) == 3  # the first batch, then steps 10 and 20 only



def test_a_declaration_that_raises_switches_its_monitor_off_and_the_fit_goes_on(tmp_path):
    """``wants`` is monitor code too: when it raises, its monitor is switched off with one bounded internal-error
    finding (as for a hook), receives no per-step call afterwards, and the other monitors keep watching."""
    from diag.callbacks import ActivationMonitor, LossCurveMonitor

    class Broken(ActivationMonitor):
        calls = 0

        def wants(self, step):
            raise RuntimeError("a bug in a schedule")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            Broken.calls += 1
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    diagnostics = Diagnostics(console=False, activations=Broken())
    model = Classifier(mlp([64, 16, 10]), lr=1e-3)
    train, val = digits_loaders(batch_size=64, n_train=640)
    pl.Trainer(default_root_dir=str(tmp_path), max_steps=30, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, logger=False, callbacks=[diagnostics]).fit(model, train, val)
    errors = [f for f in diagnostics.findings if f.code == "diag_internal_error"]
    assert len(errors) == 1 and errors[0].evidence["hook"] == "wants" and len(errors[0].message) <= 500
    assert Broken.calls == 1  # the first batch (every hook is on until the first plan), then never again
    assert diagnostics.monitor(ActivationMonitor)._disabled
    assert diagnostics.monitor(LossCurveMonitor).stats.count >= 20  # the loss monitor still watched every step
