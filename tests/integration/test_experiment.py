"""The experiment harness end to end, tiny: 2 gateway processes, 2 rounds, small data,
a real mosquitto from broker_config/dev.conf, the real aggregator and real torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cloud_aggregator.broker import find_mosquitto
from cloud_aggregator.experiment import ExperimentSettings, run_experiment, summary_rows

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory, iot23_dir):
    out = tmp_path_factory.mktemp("experiment")
    settings = ExperimentSettings(
        strategies=("gsfs", "fedavg", "fedopt"),
        gateway_data=(iot23_dir / "CTU-Honeypot-Capture-7-1", iot23_dir / "CTU-Malware-Capture-8-1"),
        out=out, rounds=2, max_train_flows=400, max_local_steps=10, local_epochs=5,
        round_timeout_s=60, stall_timeout_s=20, gsfs_deadline_s=3, quick=True,
    )
    return out, run_experiment(settings)


def test_report_files_exist(report):
    out, _ = report
    for name in ("report.md", "report.json", "central_f1.png", "central_accuracy.png", "client_f1.png",
                 "bytes_up.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "## fedavg: per round" in md and "## gsfs: per round" in md and "## fedopt: per round" in md
    assert json.loads((out / "report.json").read_text())["settings"]["rounds"] == 2


def test_numbers_are_sane(report):
    _, rep = report
    gws = {g["id"]: g for g in rep["gateways"]}
    assert set(gws) == {"CTU-Honeypot-Capture-7-1", "CTU-Malware-Capture-8-1"}
    assert all(g["test_flows"] > 0 and 0 < g["train_flows"] <= 400 for g in gws.values())
    # the test part is stratified and never trained on: both classes are present in it
    assert rep["test_labels"].get("Benign", 0) > 0 and sum(rep["test_labels"].values()) > rep["test_labels"]["Benign"]
    by_run = {r["label"]: r for r in rep["runs"]}
    assert set(by_run) == {"gsfs", "fedavg", "fedopt"}
    for run in by_run.values():
        rounds = run["rounds"]
        assert [r["round"] for r in rounds] == list(range(len(rounds)))
        assert 1 <= run["summary"]["rounds_reached"] <= 2
        for prev, row in zip(rounds, rounds[1:]):
            assert 0.0 <= row["central_accuracy"] <= 1.0 and 0.0 <= row["central_f1"] <= 1.0
            assert row["bytes_up"] >= prev["bytes_up"] and row["bytes_down"] > prev["bytes_down"]
            assert row["elapsed_s"] >= prev["elapsed_s"] and row["updates_aggregated"] >= 1
        assert run["summary"]["uploads"] >= 1 and run["summary"]["bytes_up"] > 0
        assert run["summary"]["rejections"] == {}
    # synchronous strategies: every gateway answers every round, once
    for name in ("fedavg", "fedopt"):
        s = by_run[name]["summary"]
        assert s["rounds_reached"] == 2 and s["uploads"] == 2 * 2
    # GSFS uploads only when its trigger fires: never more than one per gateway and version
    assert by_run["gsfs"]["summary"]["uploads"] <= 2 * by_run["gsfs"]["summary"]["rounds_reached"]
    assert len(summary_rows(rep)) == 3


def test_seeds_run_the_experiment_once_per_seed_and_summarise(tmp_path, iot23_dir):
    out = tmp_path / "seeds"
    res = subprocess.run(
        [sys.executable, "-m", "cloud_aggregator.cli", "experiment", "--quick", "--strategies", "fedavg",
         "--max-train-flows", "300", "--max-local-steps", "5", "--seeds", "0,1", "--json",
         "--gateway-data", str(iot23_dir / "CTU-Honeypot-Capture-7-1"),
         "--gateway-data", str(iot23_dir / "CTU-Malware-Capture-8-1"), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads(res.stdout)
    per_seed = [json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in (0, 1)]
    assert [r["settings"]["seed"] for r in per_seed] == [0, 1]
    finals = [r["runs"][0]["summary"]["final_central_accuracy"] for r in per_seed]
    assert row["run"] == "fedavg" and row["seeds"] == 2
    assert row["acc_mean"] == pytest.approx(sum(finals) / 2) and row["acc_min"] == pytest.approx(min(finals))
    assert "| fedavg | 2 |" in (out / "seeds.md").read_text()
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [0, 1]


@pytest.mark.parametrize("seeds", ["1,x", "1,1", ","])
def test_bad_seeds_are_a_usage_error(tmp_path, iot23_dir, seeds):
    res = subprocess.run(
        [sys.executable, "-m", "cloud_aggregator.cli", "experiment", "--seeds", seeds,
         "--gateway-data", str(iot23_dir / "CTU-Honeypot-Capture-7-1"), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "seeds" in res.stderr and not (tmp_path / "x").exists()


def test_cli_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "cloud_aggregator.cli", "experiment", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "Examples:" in out.stdout and "--gateway-data" in out.stdout and "--compression" in out.stdout


def test_demo_help():
    out = subprocess.run([sys.executable, "-m", "cloud_aggregator.demo", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Examples:" in out.stdout and "--skip-experiment" in out.stdout
