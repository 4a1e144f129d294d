"""Every example of examples/ in fast mode: the broken variant gets its diagnosis, the fixed one stays silent.

The examples are imported and their ``main(argv)`` called in-process (one Python, one Lightning import): each
returns ``{variant: findings}`` and declares what it expects in ``EXPECTED`` ({variant: [codes]}; [] = healthy).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from diag import Severity

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
NUMBERED = sorted(f[:-3] for f in os.listdir(EXAMPLES_DIR) if f[:2].isdigit() and f.endswith(".py"))


def load(name: str):
    if EXAMPLES_DIR not in sys.path:
        sys.path.insert(0, EXAMPLES_DIR)  # the examples import their shared helpers as `_common`
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alarms(findings):
    return {f.code for f in findings if f.severity.rank >= Severity.WARNING.rank}


def describe(findings):
    return "; ".join(f"{f.severity.value} {f.code}[{f.layer}]: {f.message}" for f in findings) or "nothing"


def test_at_least_eight_numbered_examples():
    assert len(NUMBERED) >= 8, NUMBERED


@pytest.mark.slow
@pytest.mark.parametrize("name", NUMBERED)
def test_example_diagnoses_broken_and_spares_fixed(tmp_path, name, capsys):
    example = load(name)
    results = example.main(["--fast", "--logdir", str(tmp_path)])
    assert set(results) == set(example.EXPECTED), (set(results), set(example.EXPECTED))
    assert "broken" in results and "fixed" in results
    for variant, expected in example.EXPECTED.items():
        findings = results[variant]
        found = alarms(findings)
        if expected:
            missing = set(expected) - found
            assert not missing, f"{name}/{variant}: {sorted(missing)} not diagnosed; found {describe(findings)}"
        else:
            assert not found, f"{name}/{variant} is healthy but raised {sorted(found)}: {describe(findings)}"
        # each run wrote its findings where the README says: <logdir>/<example>/<variant>/diag/findings.jsonl
        jsonl = tmp_path / example.EXAMPLE / variant / "diag" / "findings.jsonl"
        assert jsonl.exists() or not findings, jsonl
    out = capsys.readouterr().out
    assert "what lightning-diag found" in out
    for variant, expected in example.EXPECTED.items():  # the printout reports what was measured, not a script
        for code in expected:
            assert f"{code}: diagnosed" in out
    # the broken run's TensorBoard holds the charts the header points at and the findings table (Text tab)
    scalars, table = read_tensorboard(tmp_path / example.EXAMPLE / "broken")
    for prefix in example.CHARTS:
        assert any(tag.startswith(prefix) for tag in scalars), (prefix, sorted(scalars))
    for code in example.EXPECTED["broken"]:
        assert code in table, table[:2000]


def read_tensorboard(run_dir):
    """Scalar tags and the last findings table written to ``run_dir``'s event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    text_tags = [t for t in acc.Tags().get("tensors", []) if t.startswith("diag/findings")]
    table = ""
    if text_tags:
        table = acc.Tensors(text_tags[0])[-1].tensor_proto.string_val[0].decode("utf-8")
    return acc.Tags()["scalars"], table


@pytest.mark.slow
def test_quickstart_fast_runs_and_fixed_is_silent(tmp_path, capsys):
    quickstart = load("quickstart")
    assert quickstart.main(["--fast", "--logdir", str(tmp_path)]) == 0
    from diag.report import load_run
    from diag.sinks import findings_path

    fixed_dir = tmp_path / quickstart.EXPERIMENT / "fixed"
    path = findings_path(str(fixed_dir))
    findings = load_run(path).findings if os.path.exists(path) else []
    assert not alarms(findings), describe(findings)
    flawed = load_run(findings_path(str(tmp_path / quickstart.EXPERIMENT / "flawed"))).findings
    mistakes = {code for _, code in quickstart.VARIANTS["flawed"]["mistakes"]}
    assert mistakes <= alarms(flawed), (sorted(mistakes - alarms(flawed)), describe(flawed))
    out = capsys.readouterr().out
    assert "no warning or error, as it should be." in out
