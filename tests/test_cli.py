"""`diag report`: real fits write findings.jsonl; the command finds, prints, exports and gates on them.

The runs come from real `Trainer.fit`s with a small monitor that checks the optimizer the way the setup check
does (Adam with `weight_decay` is L2, not decoupled decay: a real warning; plain SGD: an info hint), so the
files are the ones lightning-diag writes, not hand-made JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning.pytorch as L
import pytorch_lightning as pl

from diag import Finding, Severity
from diag.callbacks import Monitor
from diag.cli import main
from diag.report import find_findings_files, load_runs
from tests.helpers import classifier_for, digits_loaders, mlp, trainer

REPO = Path(__file__).resolve().parents[1]


class OptimizerCheck(Monitor):
    """A test-only monitor with a real rule: Adam with coupled weight decay (warning), plain SGD (info).

    It also logs the total gradient norm as ``diag/grad_norm`` so the dashboard has a real chart to show.
    """

    def on_train_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                wd = float(group.get("weight_decay", 0.0))
                if isinstance(opt, torch.optim.Adam) and wd > 0 and not group.get("decoupled_weight_decay", False):
                    self.report("adam_coupled_weight_decay",
                                f"{type(opt).__name__} with weight_decay={wd:g} adds an L2 term that Adam rescales per "
                                f"parameter, so the decay is not the one asked for.",
                                advice=f"Use torch.optim.AdamW(params, lr={group['lr']:g}, weight_decay={wd:g}).",
                                evidence={"weight_decay": wd, "lr": float(group["lr"])})
                if isinstance(opt, torch.optim.SGD) and float(group.get("momentum", 0.0)) == 0.0:
                    self.report("sgd_without_momentum", f"SGD at lr={group['lr']:g} without momentum.",
                                evidence={"lr": float(group["lr"])})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
        self.log_scalars({"diag/grad_norm": total})


def fit_run(root: Path, optimizer: str, weight_decay: float = 0.0, namespace=pl) -> str:
    """A one-epoch fit on 256 digits with :class:`OptimizerCheck`; returns the run's log_dir."""
    train, val = digits_loaders(n_train=256)
    namespace.seed_everything(0)
    t = trainer(root, [OptimizerCheck()], max_epochs=1, namespace=namespace)
    t.fit(classifier_for(namespace)(mlp([64, 32, 10]), optimizer=optimizer, lr=1e-3, weight_decay=weight_decay), train, val)
    return t.log_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real runs: faulty (Adam + L2: a warning), healthy (AdamW: nothing), hint (plain SGD: info only)."""
    root = tmp_path_factory.mktemp("report")
    return {
        "faulty": fit_run(root / "faulty", "adam", weight_decay=1e-2),
        "healthy": fit_run(root / "healthy", "adamw", weight_decay=1e-2, namespace=L),
        "hint": fit_run(root / "hint", "sgd"),
    }


def run_cli(*args: str, console_script: bool = False) -> subprocess.CompletedProcess:
    if console_script:
        script = shutil.which("diag", path=os.path.dirname(sys.executable))
        if script is None:
            pytest.skip(f"the `diag` console script is not installed next to {sys.executable} (pip install -e .)")
        cmd = [script, *args]
    else:
        cmd = [sys.executable, "-m", "diag", *args]
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(REPO), env=env)


def test_runs_wrote_the_expected_files(runs):
    parent = Path(runs["faulty"]).parents[2]  # holds faulty/, healthy/, hint/ (and nothing of other tests)
    assert find_findings_files(str(parent)) == sorted(
        os.path.join(runs[k], "diag", "findings.jsonl") for k in ("faulty", "healthy", "hint"))
    by_name = {k: [f.code for f in load_runs(v)[0].findings] for k, v in runs.items()}
    assert by_name == {"faulty": ["adam_coupled_weight_decay"], "healthy": [], "hint": ["sgd_without_momentum"]}


def test_report_prints_a_table_per_run_worst_first(runs, capsys, tmp_path):
    parent = Path(runs["faulty"]).parents[2]  # holds faulty/, healthy/, hint/
    assert main(["report", str(parent)]) == 0
    out = capsys.readouterr().out
    for name in ("faulty", "healthy", "hint"):
        assert os.path.join(name, "lightning_logs", "version_0") in out
    assert "adam_coupled_weight_decay" in out and "sgd_without_momentum" in out and "AdamW" in out
    assert "No findings" in out  # the healthy run says so instead of printing an empty table
    for header in ("severity", "step", "code", "layer", "message", "advice"):
        assert header in out
    # Worst first: one run holding an info (written first) and a warning.
    run = tmp_path / "run"
    shutil.copytree(runs["hint"], run)
    with open(run / "diag" / "findings.jsonl", "a", encoding="utf-8") as fh:
        fh.write((Path(runs["faulty"]) / "diag" / "findings.jsonl").read_text(encoding="utf-8"))
    for style in ([], ["--plain"]):
        assert main(["report", str(run), *style]) == 0
        out = capsys.readouterr().out
        assert out.index("adam_coupled_weight_decay") < out.index("sgd_without_momentum")
        assert "0 errors, 1 warning, 1 info" in out


def test_plain_text_without_rich_and_min_severity(runs, capsys):
    assert main(["report", runs["hint"], "--plain"]) == 0
    out = capsys.readouterr().out
    assert "sgd_without_momentum" in out and "1 info" in out
    assert main(["report", runs["hint"], "--plain", "--min-severity", "warning"]) == 0
    out = capsys.readouterr().out
    assert "sgd_without_momentum" not in out and "1 below it hidden" in out


def test_json_output_round_trips(runs):
    result = run_cli("report", str(Path(runs["faulty"]).parents[2]), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [os.path.normpath(r["log_dir"]) for r in data] == sorted(os.path.normpath(v) for v in runs.values())
    by_dir = {os.path.normpath(r["log_dir"]): r for r in data}
    faulty = by_dir[os.path.normpath(runs["faulty"])]
    assert faulty["path"].endswith(os.path.join("diag", "findings.jsonl"))
    (finding,) = [Finding.from_dict(d) for d in faulty["findings"]]
    assert finding.code == "adam_coupled_weight_decay" and finding.severity is Severity.WARNING
    assert finding.evidence == {"weight_decay": 0.01, "lr": 0.001}
    assert by_dir[os.path.normpath(runs["healthy"])]["findings"] == []


@pytest.mark.parametrize("console_script", [False, True], ids=["python-m-diag", "diag-script"])
def test_fail_on_is_a_ci_gate(runs, console_script):
    faulty = run_cli("report", runs["faulty"], "--fail-on", "warning", console_script=console_script)
    assert faulty.returncode == 1, faulty.stderr
    assert "FAILED --fail-on warning" in faulty.stderr and "adam_coupled_weight_decay" in faulty.stderr
    assert "adam_coupled_weight_decay" in faulty.stdout  # the table is still printed
    for healthy in (runs["healthy"], runs["hint"]):  # no findings, or info only
        result = run_cli("report", healthy, "--fail-on", "warning", console_script=console_script)
        assert result.returncode == 0, result.stderr
        assert "passed --fail-on warning" in result.stderr
    assert run_cli("report", runs["faulty"], "--fail-on", "error", console_script=console_script).returncode == 0
    # Several runs at once: one faulty run fails the whole directory.
    assert run_cli("report", str(Path(runs["faulty"]).parents[2]), "--fail-on", "warning",
                   console_script=console_script).returncode == 1


def test_fail_on_looks_at_hidden_findings_too(runs, capsys):
    assert main(["report", runs["faulty"], "--min-severity", "error", "--fail-on", "warning"]) == 1


def test_corrupt_file_names_file_and_line(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["faulty"], run)
    path = run / "diag" / "findings.jsonl"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"code": "loss_plateau", "severity": "warn\n')  # a truncated write
    result = run_cli("report", str(tmp_path), "--fail-on", "warning")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert str(path) in result.stderr and "line 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # A line that is JSON but not a finding, and bytes that are not UTF-8.
    path.write_text('{"code": "loss_plateau"}\n', encoding="utf-8")
    result = run_cli("report", str(run))
    assert result.returncode == 2 and "line 1" in result.stderr and "Traceback" not in result.stderr
    path.write_bytes(b"\xff\xfe\x00garbage\n")
    result = run_cli("report", str(run))
    assert result.returncode == 2 and str(path) in result.stderr and "Traceback" not in result.stderr


def test_missing_or_empty_directory_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and str(tmp_path / "nope") in err
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no diag/findings.jsonl below" in result.stderr and "Diagnostics()" in result.stderr


def test_a_single_findings_file_or_run_dir(runs, capsys):
    path = os.path.join(runs["faulty"], "diag", "findings.jsonl")
    assert main(["report", path, "--fail-on", "warning"]) == 1
    assert "adam_coupled_weight_decay" in capsys.readouterr().out


def test_help_and_usage_errors(capsys):
    for argv in (["--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "report" in out and "--fail-on" in out and "--json" in out and "exit status" in out
    assert main([]) == 2 and "usage: diag" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["report", "x", "--fail-on", "info"])
    assert exc.value.code == 2
    result = run_cli("--version")
    assert result.returncode == 0 and "lightning-diag" in result.stdout
