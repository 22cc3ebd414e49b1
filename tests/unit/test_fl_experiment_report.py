"""Experiment harness pure parts: settings validation, gateway ids, report writing,
broker config rendering (no processes, no sockets)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from cloud_aggregator.broker import render_config
from cloud_aggregator.experiment import (
    ExperimentSettings,
    gateway_id_for,
    seed_summary,
    summary_rows,
    write_report,
    write_seed_report,
)


def test_settings_validation(tmp_path):
    ok = dict(gateway_data=(tmp_path,), out=tmp_path)
    ExperimentSettings(**ok)
    for bad in ({"strategies": ("sgd",)}, {"strategies": ()}, {"compressions": ("gzip",)}, {"rounds": 0},
                {"test_fraction": 1.0}, {"max_train_flows": 5}, {"dp_noise": 0.0}, {"gateway_data": ()}):
        with pytest.raises(ValueError):
            ExperimentSettings(**{**ok, **bad})


@pytest.mark.parametrize("name", ["fedopt_eta", "fedopt_tau"])
@pytest.mark.parametrize("bad", [0.0, -0.01, float("nan"), float("inf")])
def test_fedopt_server_settings_refused_and_passed_on(tmp_path, name, bad):
    from cloud_aggregator.experiment import _strategy_params
    from cloud_aggregator.strategies import fedopt

    with pytest.raises(ValueError, match=name):
        ExperimentSettings(gateway_data=(tmp_path,), out=tmp_path, **{name: bad})
    settings = ExperimentSettings(gateway_data=(tmp_path,), out=tmp_path, fedopt_eta=0.05, fedopt_tau=0.02)
    params = _strategy_params(settings, "fedopt")
    assert (params["eta"], params["tau"]) == (0.05, 0.02)
    defaults = _strategy_params(ExperimentSettings(gateway_data=(tmp_path,), out=tmp_path), "fedopt")
    assert (defaults["eta"], defaults["tau"]) == (fedopt.DEFAULT_ETA, fedopt.DEFAULT_TAU) == (0.01, 1e-3)


def test_template_is_the_models_default_unless_named(tmp_path):
    from gateway.model.prompt import DEFAULT_TEMPLATE

    assert ExperimentSettings(gateway_data=(tmp_path,), out=tmp_path).template == DEFAULT_TEMPLATE == "edge-compact/v2"
    assert ExperimentSettings(gateway_data=(tmp_path,), out=tmp_path, template="edge-compact/v3").template == "edge-compact/v3"
    for bad in ("edge-compact/v99", "nope", "edge-compact/3", ""):
        with pytest.raises(ValueError, match="unknown prompt template"):
            ExperimentSettings(gateway_data=(tmp_path,), out=tmp_path, template=bad)


def test_gateway_ids_are_topic_safe():
    assert gateway_id_for("CTU-Malware-Capture-34-1") == "CTU-Malware-Capture-34-1"
    assert gateway_id_for("my scenario/#1") == "my-scenario--1"


def test_render_dev_config_moves_port_and_persistence(tmp_path):
    text = "listener 1883 127.0.0.1\npersistence true\npersistence_location /tmp/x/\nlistener 8883\n"
    out = render_config(text, port=4242, workdir=tmp_path)
    assert "listener 4242 127.0.0.1" in out and "listener 8883" in out  # only the first listener
    assert f"persistence_location {tmp_path}/" in out


def fake_report() -> dict:
    def rounds(f1s, up):
        rows = [{"round": 0, "central_accuracy": 0.5, "central_f1": 0.4, "client_accuracy": None,
                 "client_f1": None, "updates_aggregated": 0, "uploads": 0, "bytes_up": 0, "bytes_down": 0,
                 "elapsed_s": 0.0, "round_s": None, "dp_epsilon": None}]
        for i, f1 in enumerate(f1s, 1):
            rows.append({"round": i, "central_accuracy": f1, "central_f1": f1, "client_accuracy": f1,
                         "client_f1": f1, "updates_aggregated": 2, "uploads": 2 * i, "bytes_up": up * i,
                         "bytes_down": 1000 * i, "elapsed_s": 3.0 * i, "round_s": 3.0, "dp_epsilon": None})
        return rows

    runs = []
    for label, f1s, up in (("gsfs", [0.9, 0.995], 500), ("fedavg", [0.95, 0.999], 1000)):
        r = rounds(f1s, up)
        runs.append({"label": label, "strategy": label, "compression": "none", "dp": False, "rounds": r,
                     "summary": {"rounds_reached": 2, "final_central_accuracy": f1s[-1], "final_central_f1": f1s[-1],
                                 "final_client_accuracy": f1s[-1], "final_client_f1": f1s[-1], "uploads": 4,
                                 "bytes_up": up * 2, "bytes_down": 2000, "mean_update_bytes": up / 2,
                                 "wall_s": 6.0, "time_to_target_s": 6.0, "dp_epsilon": None}})
    return {"settings": {"rounds": 2, "seed": 0, "local_epochs": 1, "max_local_steps": 5, "batch_size": 64,
                         "lr": 0.01, "test_fraction": 0.2, "max_train_flows": 100, "target_f1": 0.99},
            "gateways": [{"id": "a", "scenario": "a", "train_flows": 10, "train_flows_before_cap": 10,
                          "test_flows": 3}],
            "initial_model": {"central": {"accuracy": 0.5, "f1": 0.4}}, "raw_float32_update_bytes": 1000,
            "runs": runs, "total_wall_s": 20.0}


def test_summary_rows_compute_compression_ratio():
    rows = {r["run"]: r for r in summary_rows(fake_report())}
    assert rows["gsfs"]["raw/update"] == pytest.approx(4.0)  # 1000 raw bytes / 250 per update
    assert rows["fedavg"]["MB_up"] == pytest.approx(0.002)


def test_write_report_files(tmp_path: Path):
    write_report(fake_report(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| gsfs | 2 | 0.9950 |" in md and "## fedavg: per round" in md
    assert json.loads((tmp_path / "report.json").read_text())["runs"][0]["label"] == "gsfs"
    for png in ("central_f1", "central_accuracy", "client_f1", "bytes_up"):
        assert (tmp_path / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def _other_seed(report: dict, label: str, acc: float) -> dict:
    out = copy.deepcopy(report)
    run = next(r for r in out["runs"] if r["label"] == label)
    run["summary"]["final_central_accuracy"] = run["summary"]["final_central_f1"] = acc
    return out


def test_seed_summary_mean_std_and_min_per_run():
    a = fake_report()
    rows = {r["run"]: r for r in seed_summary([a, _other_seed(a, "gsfs", 0.9)])}
    assert list(rows) == ["gsfs", "fedavg"]
    g = rows["gsfs"]
    assert g["seeds"] == 2 and g["acc_mean"] == pytest.approx(0.9475) and g["acc_min"] == pytest.approx(0.9)
    assert g["acc_std"] == pytest.approx(0.095 / 2**0.5)  # sample standard deviation
    assert g["f1_mean"] == pytest.approx(0.9475) and g["uploads_mean"] == 4 and g["MB_up_mean"] == pytest.approx(0.001)
    assert rows["fedavg"]["acc_std"] == 0.0 and rows["fedavg"]["acc_mean"] == pytest.approx(0.999)
    assert g["last3_acc_mean"] is None  # not in these reports
    assert seed_summary([a])[0]["acc_std"] == 0.0  # one seed: no spread


def test_write_seed_report_files(tmp_path: Path):
    a = fake_report()
    b = _other_seed(a, "gsfs", 0.9)
    result = {"seeds": [0, 1], "summary": seed_summary([a, b]),
              "per_seed": [{"seed": 0, "rows": summary_rows(a)}, {"seed": 1, "rows": summary_rows(b)}]}
    write_seed_report(result, tmp_path)
    md = (tmp_path / "seeds.md").read_text()
    assert "| gsfs | 2 | 0.9475 | 0.0672 | 0.9000 |" in md
    assert "| 1 | 0.9000 / 0.9000, 4, 0.00 | 0.9990 / 0.9990, 4, 0.00 |" in md
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0, 1]
