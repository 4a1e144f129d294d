"""``diag/`` never imports Lightning: the monitors run in a process where Lightning cannot be imported.

STYLE: "diag/ never imports Lightning: it works on tensors, numbers and nn.Modules, so a plain PyTorch loop or Fabric
can use it too". Since issue 15 the monitors themselves live in ``diag/monitors/``; ``diag.callbacks`` only mixes
Lightning's ``Callback`` into them. These tests hold the line: a static scan of every import in ``diag/``, and a real
plain-PyTorch loop driven through the monitors' hooks with the plain-loop host (``diag/monitors/host.py``) in a fresh
interpreter in which ``import lightning`` / ``import pytorch_lightning`` raise.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


# diag.watch is the entry point that drives Diagnostics in a plain or Fabric loop: it imports the session (and so
# Lightning) only when it is called, never when diag is imported.
LAZY = {"diag/watch.py"}


def test_no_module_in_diag_imports_lightning():
    offenders = []
    for path in sorted((ROOT / "diag").rglob("*.py")):
        if str(path.relative_to(ROOT)) in LAZY:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in LIGHTNING or name.startswith("diag.callbacks"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not offenders, f"diag/ must not import Lightning (or diag.callbacks): {offenders}"


SCRIPT = textwrap.dedent('''
    import sys
    for name in ("lightning", "pytorch_lightning", "lightning_fabric"):
        sys.modules[name] = None  # any import of it raises ImportError
    import torch
    from torch import nn
    from diag.monitors import GradientMonitor, LossCurveMonitor
    from diag.monitors.host import LoopTrainer, LoopPrecision, ModelView

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    loss_fn = lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1])
    module = ModelView(model, model, loss_fn, LoopPrecision(None))
    found = {}

    def call(monitor, hook, *args):  # a host calls a hook only while it is callable (Lightning's rule)
        fn = getattr(monitor, hook)
        if callable(fn):
            fn(*args)

    for monitor in (LossCurveMonitor(num_classes=3), GradientMonitor(interval=1, noise_scale_interval=0)):
        trainer = LoopTrainer(optimizer, module, None, torch.device("cpu"), None, [])
        call(monitor, "setup", trainer, module, "fit")
        call(monitor, "on_fit_start", trainer, module)
        call(monitor, "on_train_start", trainer, module)
        for step in range(40):
            batch = (x[step % 8 * 32:(step % 8 + 1) * 32], y[step % 8 * 32:(step % 8 + 1) * 32])
            call(monitor, "on_train_batch_start", trainer, module, batch, step)
            loss = loss_fn(model, batch)
            if step >= 30:
                loss = loss * float("nan")  # the fault: the loss becomes NaN
            optimizer.zero_grad()
            loss.backward()
            call(monitor, "on_before_optimizer_step", trainer, module, optimizer)
            optimizer.step()
            trainer.global_step += 1
            call(monitor, "on_train_batch_end", trainer, module, {"loss": loss.detach()}, batch, step)
        call(monitor, "on_train_end", trainer, module)
        call(monitor, "on_fit_end", trainer, module)
        call(monitor, "teardown", trainer, module, "fit")
        found[monitor.name] = sorted({f.code for f in monitor.findings})
        if isinstance(monitor, GradientMonitor):  # it measured every step (interval 1), read through its batched reads
            found["gradient_samples"] = [state.samples for state in monitor._states.values()]
    assert not any(m.startswith(("lightning", "pytorch_lightning")) for m in sys.modules if sys.modules[m] is not None)
    print(found)
''')


def test_the_monitors_run_in_a_process_without_lightning(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = eval(done.stdout.strip().splitlines()[-1])
    assert "nonfinite_loss" in found["LossCurveMonitor"]  # the NaN loss, raised by the monitor with no Lightning
    assert "diag_internal_error" not in found["LossCurveMonitor"] + found["GradientMonitor"], found
    assert found["gradient_samples"] == [20], found  # every step to 10, then every 2nd to 20, every 4th (the back-off)
