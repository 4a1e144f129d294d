"""DDP (Lightning's ``strategy="ddp"``, 2 CPU processes, gloo) with ``Diagnostics()`` at its defaults.

``tests/ddp_script.py`` runs the fits in a subprocess (Lightning re-launches that script for rank 1), once for
the whole module; each rank writes what it saw. Checked here: no deadlock (the run ends within its timeout and
the process group times out after 60 s), the same collectives in the same order on both ranks (no collective
from one rank only), findings written once (rank zero's JSONL and console, nothing printed on rank 1),
decisions taken on statistics reduced across ranks (both ranks reach the same findings), the batch size of the
gradient noise scale is the global one, and no monitor fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diag.sinks import read_findings

pytestmark = pytest.mark.ddp

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_script.py")
SCENARIOS = ["healthy", "faulty", "nan_on_one_rank", "lr_too_high"]
UNWATCHED = ["lr_too_high_unwatched"]  # the same fit without Diagnostics, for the bitwise comparison
TIMEOUT_S = 420  # imports alone take ~30 s per process on a loaded 2-core machine; a deadlock takes forever


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    try:
        proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--scenarios", *SCENARIOS, *UNWATCHED],
                              capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                              cwd=os.path.dirname(os.path.dirname(SCRIPT)))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the DDP fit did not end within {TIMEOUT_S} s (deadlock?):\n{(exc.stdout or '')[-3000:]}"
                    f"\n{(exc.stderr or '')[-3000:]}")
    assert proc.returncode == 0, f"the DDP script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = {}
    for scenario in SCENARIOS + UNWATCHED:
        ranks = []
        for rank in (0, 1):
            path = out / scenario / f"rank{rank}.json"
            assert path.exists(), f"rank {rank} wrote no result for {scenario}:\n{proc.stderr[-3000:]}"
            ranks.append(json.loads(path.read_text()))
        results[scenario] = ranks
    return results


def _keys(findings, min_severity=("info", "warning", "error")):
    return sorted((f["code"], f["layer"] or "", f["severity"]) for f in findings if f["severity"] in min_severity)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rank_finishes_without_internal_error(ddp_results, scenario):
    r0, r1 = ddp_results[scenario]
    assert (r0["status"], r1["status"]) == ("finished", "finished")
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] > 0
    for r in (r0, r1):
        errors = [f["message"] for f in r["findings"] if f["code"] == "diag_internal_error"]
        assert not errors, f"rank {r['rank']}: " + "\n".join(errors)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_collectives_on_every_rank(ddp_results, scenario):
    """Each collective (reduce, gather, broadcast, barrier) at the same step with the same shape on both ranks."""
    r0, r1 = ddp_results[scenario]
    assert r0["collectives"] == r1["collectives"]
    assert any(c[0] == "reduce" and c[1] > 0 for c in r0["collectives"]), "no statistics were reduced during training"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_findings_emitted_once_on_rank_zero(ddp_results, scenario):
    r0, r1 = ddp_results[scenario]
    path = os.path.join(r0["log_dir"], "diag", "findings.jsonl")
    assert os.path.exists(path)
    with open(path, encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    keys = [(d["code"], d["layer"], d["severity"]) for d in lines]
    assert len(keys) == len(set(keys)), f"a finding was written twice: {keys}"
    assert {f.key: f.severity.value for f in read_findings(path)} == {
        (f["code"], f["layer"]): f["severity"] for f in r0["findings"]}
    # the console: findings and the summary on rank zero only
    printed_on_1 = [msg for _, msg in r1["log"] if "lightning-diag" in msg]
    assert not printed_on_1, printed_on_1
    for f in r0["findings"]:
        if f["severity"] in ("warning", "error"):
            head = f"lightning-diag {f['severity'].upper()} {f['code']}" + (f" [{f['layer']}]" if f["layer"] else " at step")
            lines_for = [m for _, m in r0["log"] if m.startswith(head)]
            assert len(lines_for) == 1, (f["code"], lines_for)
    assert sum("lightning-diag summary" in m for _, m in r0["log"]) == 1


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ranks_reach_the_same_findings(ddp_results, scenario):
    """Verdicts come from statistics reduced across ranks, so every rank judges alike (rank 1 just does not write)."""
    r0, r1 = ddp_results[scenario]
    assert _keys(r0["findings"]) == _keys(r1["findings"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_reduced_state_is_identical_across_ranks(ddp_results, scenario):
    """The loss statistics are reduced before they are stored; closed activation windows are counted alike."""
    r0, r1 = ddp_results[scenario]
    m0, m1 = r0["monitors"], r1["monitors"]
    if "LossCurveMonitor" in m0:
        assert m0["LossCurveMonitor"] == m1["LossCurveMonitor"]
    if "ActivationMonitor" in m0:
        for key in ("windows", "sampled_in_window"):
            if key in m0["ActivationMonitor"]:
                assert m0["ActivationMonitor"][key] == m1["ActivationMonitor"][key]


def test_healthy_ddp_run_is_silent(ddp_results):
    r0, _ = ddp_results["healthy"]
    loud = [(f["code"], f["layer"], f["message"]) for f in r0["findings"] if f["severity"] in ("warning", "error")]
    assert not loud, loud


def test_faulty_ddp_run_is_diagnosed(ddp_results):
    r0, _ = ddp_results["faulty"]
    found = {f["code"] for f in r0["findings"] if f["severity"] in ("warning", "error")}
    assert "inputs_not_normalized" in found, found


def test_nan_on_one_rank_is_reported_once(ddp_results):
    r0, r1 = ddp_results["nan_on_one_rank"]
    errors = [f for f in r0["findings"] if f["code"] == "nonfinite_loss"]
    assert len(errors) == 1 and errors[0]["severity"] == "error", r0["findings"]
    # the loss monitor reads its on-device buffer every 10 steps (LossCurveMonitor's sync_every): by step 20
    assert errors[0]["step"] <= 20, "the NaN of rank 1 at step 10 was noticed late"


def test_noise_scale_uses_the_global_batch(ddp_results):
    """32 samples per rank, 2 ranks: the noise scale compares against a batch of 64."""
    r0, _ = ddp_results["healthy"]
    acc = EventAccumulator(r0["log_dir"], size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if "diag/batch_size" not in tags:
        pytest.skip("GradientMonitor logged no diag/batch_size in this run")
    assert {e.value for e in acc.Scalars("diag/batch_size")} == {64.0}
    if "diag/grad_noise_scale" in tags:
        assert all(e.value == e.value and e.value > 0 for e in acc.Scalars("diag/grad_noise_scale"))


def test_probe_verdict_under_ddp(ddp_results):
    """Each rank probes its own batch on its own copy of the state; one reduction; rank zero writes the verdict once."""
    r0, r1 = ddp_results["lr_too_high"]
    for r in (r0, r1):
        verdicts = [f for f in r["findings"] if f["code"] in ("lr_too_high", "lr_too_low", "suspected_code_bug")]
        assert [f["code"] for f in verdicts] == ["lr_too_high"], r["findings"]
        assert verdicts[0]["evidence"]["ranks_agreeing"] == 2 and verdicts[0]["evidence"]["suggested_lr"] < 8.0
    path = os.path.join(r0["log_dir"], "diag", "findings.jsonl")
    with open(path, encoding="utf-8") as fh:
        written = [json.loads(line)["code"] for line in fh if line.strip()]
    assert written.count("lr_too_high") == 1


def test_probe_under_ddp_leaves_training_bitwise_unchanged(ddp_results):
    watched, unwatched = ddp_results["lr_too_high"], ddp_results["lr_too_high_unwatched"]
    assert watched[0]["monitors"]["LearningRateProbe"]["probes_run"] >= 1
    for rank in (0, 1):
        assert watched[rank]["weights_sha256"] == unwatched[rank]["weights_sha256"]
