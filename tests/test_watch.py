"""``diag.watch``: lightning-diag in a plain PyTorch loop and a Fabric loop.

Every test trains a small model on the digits in a real loop on CPU (66 optimizer steps, a fraction of a second) and
checks what the session reports, writes and leaves untouched. ``test_same_findings_as_the_trainer`` runs the same
models through ``Trainer.fit`` with ``Diagnostics()``: the session drives the same monitors, so the same codes come out.
The 2-process Fabric loop (gloo) runs ``tests/watch_ddp_script.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any, Callable, Dict, Optional

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import diag
from diag.callbacks import Diagnostics, LearningRateProbe
from diag.sinks import read_findings

from .helpers import Classifier, assert_silent, codes, digits_tensors, fit, mlp, state_equal

EPOCHS = 3  # 22 batches of 64 digits each: 66 optimizer steps
STEPS = 66
GOOD_LR = 0.3  # plain SGD on the standardized digits MLP (examples/07_lr_vs_code_bug.py)


def probe_in_budget() -> Dict[str, Any]:
    """A 66-step loop is too short for the probe's default time budget (a tenth of the run, the same in a Trainer), and
    on this shared machine step and probe times swing tenfold: these tests lift the budget (or, where the probe takes
    no ``None``, make it the whole run)."""
    try:
        probe = LearningRateProbe(budget_fraction=None)
    except (TypeError, ValueError):
        probe = LearningRateProbe(budget_fraction=1.0)
    return dict(total_steps=STEPS, lr_probe=probe)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def digits_loader(standardize: bool = True, batch_size: int = 64) -> DataLoader:
    x, y = digits_tensors(standardize=standardize)
    return DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def sgd(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr)


def train(make_model: Callable[[], nn.Module] = lambda: mlp([64, 64, 10]), make_optimizer=sgd(GOOD_LR),
          watch: Optional[Dict[str, Any]] = None, nan_from: Optional[int] = None, fabric: Any = None,
          loader: Optional[DataLoader] = None, epochs: int = EPOCHS):
    """The loop of the README: forward, zero_grad, backward, step, ``session.step``. ``watch=None``: unwatched.
    ``nan_from``: the loss turns NaN from that iteration on. Returns ``(model, optimizer, session)``."""
    torch.manual_seed(0)
    loader = loader if loader is not None else digits_loader()
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    if fabric is not None:
        model, optimizer = fabric.setup(model, optimizer)
    session = diag.watch(model, optimizer, fabric=fabric, **watch) if watch is not None else None
    i = 0
    for _ in range(epochs):
        for batch in loader:
            loss = loss_fn(model, batch)
            if nan_from is not None and i >= nan_from:
                loss = loss * float("nan")
            optimizer.zero_grad()
            if fabric is not None:
                fabric.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            if session is not None:
                session.step(loss, batch)
            i += 1
    if session is not None:
        session.close()
    return model, optimizer, session


def no_internal_error(findings) -> None:
    errors = [f.message for f in findings if f.code == "diag_internal_error"]
    assert not errors, "\n".join(errors)


def by_code(findings, code: str):
    return next(f for f in findings if f.code == code)


# ---- a plain PyTorch loop ----------------------------------------------------------------------------------
def test_nan_loss_gives_nonfinite_loss(tmp_path):
    _, _, session = train(watch=dict(loss_fn=loss_fn, log_dir=str(tmp_path)), nan_from=30)
    no_internal_error(session.findings)
    finding = by_code(session.findings, "nonfinite_loss")
    assert finding.severity == "error" and "NaN at step 31" in finding.message  # the step after the 31st batch, as in a Trainer
    assert "nonfinite_loss" in {f.code for f in read_findings(os.path.join(tmp_path, "diag", "findings.jsonl"))}


def test_learning_rate_ten_times_too_high(tmp_path):
    """SGD at 3.0 on the digits MLP, ten times the rate that trains it well: the loss monitor sees the loss diverge
    and the gradients explode, and the probe, trained with ``loss_fn``, says the rate is too high and by how much."""
    _, _, session = train(make_optimizer=sgd(10 * GOOD_LR),
                          watch=dict(loss_fn=loss_fn, log_dir=str(tmp_path), **probe_in_budget()))
    no_internal_error(session.findings)
    found = codes(session.findings)
    assert {"loss_diverging", "lr_too_high"} <= found, found
    verdict = by_code(session.findings, "lr_too_high")
    assert float(verdict.evidence["suggested_lr"]) < 10 * GOOD_LR
    # the files of a Trainer run, in log_dir itself
    written = {f.code for f in read_findings(os.path.join(tmp_path, "diag", "findings.jsonl"))}
    assert {f.code for f in session.findings} == written
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"diag/loss", "diag/loss_smoothed", "diag/grad_norm", "diag/findings/warning"} <= scalars, scalars
    assert any(tag.startswith("diag/probe/loss_fraction@") for tag in scalars), scalars
    assert any(tag.startswith("diag/activation_mean/") for tag in scalars), scalars
    steps = [e.step for e in events.Scalars("diag/loss")]
    assert steps == sorted(steps) and steps[-1] == session.global_step == 66
    table = events.Tensors("diag/findings/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "lr_too_high" in table and "loss_diverging" in table


def test_shuffled_labels_stay_an_info_without_a_validation_loss(tmp_path):
    """Labels shuffled apart from the digits: the probe sees what a task still on its plateau shows too, and a plain
    loop has no validation loss to confirm it (the fit monitor is off): an info, in the findings file, never a code
    bug (README, "A plateau is not a bug")."""
    x, y = digits_tensors()
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    loader = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    _, _, session = train(make_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), loader=loader, epochs=14,
                          watch=dict(loss_fn=loss_fn, log_dir=str(tmp_path), total_steps=14 * 22,
                                     lr_probe=LearningRateProbe(budget_fraction=None)))
    no_internal_error(session.findings)
    written = read_findings(os.path.join(tmp_path, "diag", "findings.jsonl"))
    assert not {f.code for f in written} & {"suspected_code_bug", "lr_too_high", "lr_too_low"}, written
    waiting = [f for f in written if f.code == "probe_skipped"]
    assert waiting and "validation loss" in waiting[0].message, written


def test_healthy_loops_raise_no_warning(tmp_path):
    healthy = {
        "sgd": (lambda: mlp([64, 64, 10]), sgd(GOOD_LR)),
        "adamw_tanh_layernorm": (lambda: mlp([64, 64, 64, 10], nn.Tanh, norm=nn.LayerNorm),
                                 lambda p: torch.optim.AdamW(p, lr=1e-3)),
        "sgd_momentum_batchnorm": (lambda: mlp([64, 64, 10], norm=nn.BatchNorm1d),
                                   lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    }
    for name, (make_model, make_optimizer) in healthy.items():
        _, _, session = train(make_model, make_optimizer, watch=dict(loss_fn=loss_fn, log_dir=str(tmp_path / name)))
        assert_silent(session.findings)
        no_internal_error(session.findings)
        assert session.global_step == 66


@pytest.mark.parametrize("case", ["healthy", "probe_ran", "dropout_batchnorm"])
def test_training_is_bitwise_unchanged(tmp_path, case):
    """Same seed, with and without the session: the same weights and optimizer state, bit for bit (also when the
    learning-rate probe trained the model in place and restored it, and with dropout and BatchNorm)."""
    make_model, make_optimizer = lambda: mlp([64, 64, 10]), sgd(GOOD_LR)
    if case == "probe_ran":
        make_optimizer = sgd(10 * GOOD_LR)
    elif case == "dropout_batchnorm":
        make_model = lambda: nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3),
                                           nn.Linear(64, 10))
        make_optimizer = lambda p: torch.optim.Adam(p, lr=1e-3)
    watched, watched_opt, session = train(make_model, make_optimizer,
                                          watch=dict(loss_fn=loss_fn, log_dir=str(tmp_path), **probe_in_budget()))
    plain, plain_opt, _ = train(make_model, make_optimizer)
    assert state_equal(watched, plain)
    assert _optimizer_states_equal(watched_opt, plain_opt)
    if case == "probe_ran":
        assert session.diagnostics.monitors[-1].results, "the probe did not run"


def _optimizer_states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    return sa.keys() == sb.keys() and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for k in sa for x, y in zip(sa[k].values(), sb[k].values()))


def test_same_findings_as_the_trainer(tmp_path):
    """The session and the callback share one core: the same models give the same codes (the fit monitor, which needs
    validation losses, is off in both)."""
    cases = {
        "lr_too_high": (lambda: mlp([64, 64, 10]), "sgd", 10 * GOOD_LR, True),
        # the quickstart's flawed run: raw pixels, sigmoid hidden layers, Adam with L2 weight decay
        "flawed": (lambda: mlp([64, 64, 64, 10], nn.Sigmoid), "adam_l2", 1e-3, False),
    }
    for name, (make_model, optimizer, lr, standardize) in cases.items():
        make_optimizer = (sgd(lr) if optimizer == "sgd" else
                          lambda p, lr=lr: torch.optim.Adam(p, lr=lr, weight_decay=1e-2))
        _, _, session = train(make_model, make_optimizer, watch=dict(loss_fn=loss_fn, **probe_in_budget()),
                              loader=digits_loader(standardize))
        torch.manual_seed(0)
        callback = Diagnostics(fit=False, console=False, lr_probe=probe_in_budget()["lr_probe"])
        fit(tmp_path / name, Classifier(make_model(), optimizer=make_optimizer), digits_loader(standardize),
            callbacks=[callback], max_epochs=EPOCHS, logger=False)
        no_internal_error(session.findings)
        assert codes(session.findings, "info") == codes(callback.findings, "info"), name
        if name == "flawed":
            assert {"inputs_not_normalized", "non_zero_centered_activation", "adam_coupled_weight_decay"} <= \
                codes(session.findings)


def test_without_loss_fn_the_probe_says_once_why_it_cannot_run(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="diag"):
        _, _, session = train(make_optimizer=sgd(10 * GOOD_LR), watch=dict(log_dir=str(tmp_path), **probe_in_budget()))
    no_internal_error(session.findings)
    assert "loss_diverging" in codes(session.findings)
    assert not codes(session.findings) & {"lr_too_high", "lr_too_low", "suspected_code_bug"}
    said = [r.getMessage() for r in caplog.records if "LearningRateProbe did not run" in r.getMessage()]
    assert len(said) == 1 and "loss_fn" in said[0], said


def test_context_manager_and_hooks_removed(tmp_path):
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    optimizer = torch.optim.SGD(model.parameters(), lr=GOOD_LR)
    loader = digits_loader()
    with diag.watch(model, optimizer, loss_fn=loss_fn, log_dir=str(tmp_path), console=False) as session:
        for batch in loader:
            loss = loss_fn(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.step(loss, batch)
    assert session.global_step == len(loader)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    session.step(loss, batch)  # after close: ignored, with one warning
    session.close()  # idempotent
    assert session.global_step == len(loader)
    assert os.path.exists(os.path.join(tmp_path, "diag", "findings.jsonl"))


UNCLOSED_LOOP = """
import sys, torch
from torch import nn
import diag
torch.manual_seed(0)
x, y = torch.randn(64 * 75, 16), torch.randint(0, 4, (64 * 75,))
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
session = diag.watch(model, optimizer, loss_fn=loss_fn, log_dir=sys.argv[1], console=False)
for i in range(75):
    batch = (x[64 * i:64 * (i + 1)], y[64 * i:64 * (i + 1)])
    loss = loss_fn(model, batch)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    session.step(loss, batch)
# no session.close(): the interpreter exits with the session open
"""


def test_a_loop_that_never_closes_still_gets_every_scalar(tmp_path):
    """The collector holds scalars and writes them every 50 steps; a plain loop that exits without ``close()`` gets
    the held ones (and TensorBoard's queue) written at interpreter exit."""
    script = tmp_path / "loop.py"
    script.write_text(UNCLOSED_LOOP)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    steps = [e.step for e in events.Scalars("diag/loss")]
    assert steps and max(steps) >= 70, steps  # the loss is read every 10 steps: the last read is at step 70


def test_an_error_in_the_loop_propagates_and_the_session_closes(tmp_path):
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    optimizer = torch.optim.SGD(model.parameters(), lr=GOOD_LR)
    with pytest.raises(KeyError, match="user"):
        with diag.watch(model, optimizer, loss_fn=loss_fn, log_dir=str(tmp_path), console=False) as session:
            for i, batch in enumerate(digits_loader()):
                loss = loss_fn(model, batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                session.step(loss, batch)
                if i == 5:
                    raise KeyError("user")
    assert not model._forward_pre_hooks and not optimizer._optimizer_step_pre_hooks


def test_never_breaks_the_loop(tmp_path, caplog):
    """A monitor that fails becomes a ``diag_internal_error`` info and the others keep watching; odd arguments to
    ``session.step`` (a float loss, no loss, no batch) and a failure of the session itself never reach the loop."""
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    optimizer = torch.optim.SGD(model.parameters(), lr=GOOD_LR)
    session = diag.watch(model, optimizer, loss_fn=loss_fn, log_dir=str(tmp_path), console=False)
    gradients = next(m for m in session.diagnostics.monitors if type(m).__name__ == "GradientMonitor")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    gradients._measure = broken
    for i, batch in enumerate(digits_loader()):
        loss = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        session.step(float(loss) if i % 3 == 0 else (None if i % 3 == 1 else loss), batch if i % 2 else None)
    internal = [f for f in session.findings if f.code == "diag_internal_error"]
    assert [f.layer for f in internal] == ["GradientMonitor"] and internal[0].severity == "info"
    # a failure of the session itself: it stops watching with one warning, the loop goes on
    session.trainer.optimizers = None  # (the probe and the setup check read it)
    session.view.training_step = broken
    with caplog.at_level(logging.WARNING, logger="diag"):
        session._call = broken
        for batch in digits_loader():
            loss = loss_fn(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.step(loss, batch)
    stopped = [r.getMessage() for r in caplog.records if "stopped watching" in r.getMessage()]
    assert len(stopped) == 1 and len(stopped[0]) < 700
    assert not model._forward_pre_hooks and not optimizer._optimizer_step_pre_hooks
    session.close()


def test_arguments_are_checked(tmp_path):
    model = mlp([64, 10])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.nn.Module, got str"):
        diag.watch("model", optimizer)
    with pytest.raises(TypeError, match="Optimizer.*got list"):
        diag.watch(model, [optimizer])
    with pytest.raises(TypeError, match="loss_fn"):
        diag.watch(model, optimizer, loss_fn="cross_entropy")
    with pytest.raises(ValueError, match="unknown option.*'gradient'.*gradients"):
        diag.watch(model, optimizer, gradient=False)
    with pytest.raises(ValueError, match="total_steps.*got 0"):
        diag.watch(model, optimizer, total_steps=0)
    with pytest.raises(TypeError, match="Fabric"):
        diag.watch(model, optimizer, fabric=object())
    assert not model._forward_pre_hooks and not optimizer._optimizer_step_pre_hooks
    session = diag.watch(model, optimizer, gradients=False, activations=False, console=False)
    assert [type(m).__name__ for m in session.diagnostics.monitors] == ["SetupCheck", "DataMonitor", "LossCurveMonitor",
                                                                         "LearningRateProbe"]
    session.close()
    assert not os.listdir(tmp_path)  # no log_dir: nothing written


# ---- Fabric, one process -----------------------------------------------------------------------------------
def _fabric():
    from lightning.fabric import Fabric

    return Fabric(accelerator="cpu", devices=1)


def test_fabric_loop(tmp_path):
    fabric = _fabric()
    _, _, session = train(make_optimizer=sgd(10 * GOOD_LR), fabric=fabric,
                          watch=dict(loss_fn=loss_fn, log_dir=str(tmp_path / "high"), **probe_in_budget()))
    no_internal_error(session.findings)
    assert {"loss_diverging", "lr_too_high"} <= codes(session.findings)
    assert "lr_too_high" in {f.code for f in read_findings(str(tmp_path / "high" / "diag" / "findings.jsonl"))}
    _, _, session = train(fabric=fabric, nan_from=30, watch=dict(loss_fn=loss_fn))
    assert "nonfinite_loss" in codes(session.findings, "error")
    watched, _, session = train(fabric=fabric, watch=dict(loss_fn=loss_fn, log_dir=str(tmp_path / "healthy")))
    assert_silent(session.findings)
    plain, _, _ = train(fabric=fabric)
    assert state_equal(watched.module, plain.module)
    events = EventAccumulator(str(tmp_path / "healthy"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"diag/loss", "diag/grad_norm"} <= set(events.Tags()["scalars"])


def test_fabric_callbacks_fail_once_and_point_to_watch(caplog):
    """``Fabric(callbacks=[Diagnostics()])`` cannot drive the monitors (``fabric.call`` passes no Trainer): one warning
    that names ``diag.watch``, no internal errors, the loop unaffected."""
    from lightning.fabric import Fabric

    callback = Diagnostics()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with caplog.at_level(logging.INFO, logger="diag"):
        fabric.call("on_train_start")
        for i, batch in enumerate(digits_loader()):
            loss = loss_fn(model, batch)
            fabric.call("on_train_batch_end", fabric, model, loss, batch, i)
        fabric.call("on_train_end", fabric, model)
    lines = [r.getMessage() for r in caplog.records if r.name == "diag"]
    assert len(lines) == 1 and "diag.watch(model, optimizer" in lines[0] and len(lines[0]) < 600, lines
    assert callback.findings == []


# ---- Fabric, two processes (gloo) ---------------------------------------------------------------------------
DDP_SCRIPT = os.path.join(os.path.dirname(__file__), "watch_ddp_script.py")
DDP_SCENARIOS = ["healthy", "nan", "lr_too_high", "plain_ddp_nan"]
DDP_TIMEOUT_S = 240  # imports take ~10-30 s per process on a loaded 2-core machine; a deadlock takes forever


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("watch_ddp")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    try:
        proc = subprocess.run([sys.executable, DDP_SCRIPT, "--out", str(out), "--scenarios", *DDP_SCENARIOS],
                              capture_output=True, text=True, timeout=DDP_TIMEOUT_S, env=env,
                              cwd=os.path.dirname(os.path.dirname(DDP_SCRIPT)))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the 2-process Fabric loop did not end within {DDP_TIMEOUT_S} s (deadlock?):\n"
                    f"{(exc.stdout or '')[-3000:]}\n{(exc.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"the 2-process script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = {}
    for scenario in DDP_SCENARIOS:
        ranks = []
        for rank in (0, 1):
            path = out / scenario / f"rank{rank}.json"
            assert path.exists(), f"rank {rank} wrote no result for {scenario}:\n{proc.stderr[-3000:]}"
            ranks.append(json.loads(path.read_text()))
        results[scenario] = ranks
    return results


@pytest.mark.ddp
@pytest.mark.parametrize("scenario", DDP_SCENARIOS)
def test_two_processes_reduce_and_write_once(ddp_results, scenario):
    r0, r1 = ddp_results[scenario]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] > 0
    for r in (r0, r1):
        assert not [f for f in r["findings"] if f["code"] == "diag_internal_error"], r["findings"]
    # decisions on reduced statistics: both ranks reach the same findings; only rank zero writes
    assert sorted((f["code"], f["layer"] or "") for f in r0["findings"]) == \
        sorted((f["code"], f["layer"] or "") for f in r1["findings"])
    assert r0["collectives"] == r1["collectives"] and r0["collectives"], "statistics were not reduced the same way"
    assert r0["jsonl"] is not None and r1["jsonl"] is None and r0["event_files"] == 1
    assert r0["jsonl"] == sorted({f["code"] for f in r0["findings"]})
    assert not r1["printed"], r1["printed"]
    found = {f["code"] for f in r0["findings"] if f["severity"] in ("warning", "error")}
    if scenario == "healthy":
        assert not found, r0["findings"]
        assert r0["weights_equal_unwatched"] and r1["weights_equal_unwatched"]
    elif scenario in ("nan", "plain_ddp_nan"):
        assert "nonfinite_loss" in found
    elif scenario == "lr_too_high":
        assert "loss_diverging" in found
        reasons = [line for line in r0["printed"] + r0["info"] if "LearningRateProbe did not run" in line]
        assert "lr_too_high" in found, reasons  # each rank probes its own batch; one reduction; rank zero writes


def test_resume_keeps_findings_and_does_not_repeat_them(tmp_path, caplog):
    """``session.state_dict()`` saved halfway, ``diag.watch(..., resume=state)`` after: the findings of the first half
    are kept (in ``.findings`` and the new run's JSONL), not printed again, and the step count goes on."""
    torch.manual_seed(0)
    model = mlp([64, 64, 10])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-2)  # adam_coupled_weight_decay at once
    batches = list(digits_loader())
    with caplog.at_level(logging.WARNING, logger="diag"):
        for half, part in enumerate((batches[:11], batches[11:])):
            settings = dict(loss_fn=loss_fn, log_dir=str(tmp_path / f"half{half}"))
            if half:
                settings["resume"] = state
            with diag.watch(model, optimizer, **settings) as session:
                for batch in part:
                    loss = loss_fn(model, batch)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    session.step(loss, batch)
                state = session.state_dict()
    assert session.global_step == len(batches)
    kept = by_code(session.findings, "adam_coupled_weight_decay")
    assert kept.step == 0 and [f.code for f in session.findings].count("adam_coupled_weight_decay") == 1
    assert "adam_coupled_weight_decay" in {f.code for f in read_findings(str(tmp_path / "half1" / "diag" / "findings.jsonl"))}
    printed = [r.getMessage() for r in caplog.records if "adam_coupled_weight_decay" in r.getMessage()
               and r.levelno == logging.WARNING]
    assert len(printed) == 1, printed


def test_first_batch_checks_see_the_batch(tmp_path):
    """The setup check arms its BatchNorm hooks before the first forward, when the session does not know the batch yet:
    it judges with the batch ``session.step`` hands over (the batch size tells tokens flattened into the batch axis)."""
    from .helpers import loaders_from
    from .test_setup_check import EmbedFlatBatchNorm, token_data

    torch.manual_seed(0)
    train_loader, _ = loaders_from(*token_data(), batch_size=32)
    model = EmbedFlatBatchNorm()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with diag.watch(model, optimizer, loss_fn=loss_fn, console=False) as session:
        for batch in train_loader:
            loss = loss_fn(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.step(loss, batch)
    finding = by_code(session.findings, "batchnorm_on_sequence")
    assert finding.layer == "norm" and "embedding embed" in finding.message


def test_a_watched_model_can_be_copied_and_saved(tmp_path):
    """``copy.deepcopy(model)`` (an EMA or best-model copy) and ``torch.save(model)`` in the loop: they work, and the
    copy carries an inert hook instead of a copy of the session."""
    import copy
    import io

    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    optimizer = torch.optim.SGD(model.parameters(), lr=GOOD_LR)
    copies = []
    with diag.watch(model, optimizer, loss_fn=loss_fn, log_dir=str(tmp_path), console=False) as session:
        for i, batch in enumerate(digits_loader()):
            loss = loss_fn(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.step(loss, batch)
            if i % 5 == 0:
                copies.append(copy.deepcopy(model))
                torch.save(model, io.BytesIO())
                copies[-1](batch[0]).sum().backward()  # a forward and backward of the copy: not the loop's
    assert session.global_step == len(digits_loader())
    no_internal_error(session.findings)
    restored = io.BytesIO()
    torch.save(copies[-1], restored)
    restored.seek(0)
    torch.load(restored, weights_only=False)(batch[0])
