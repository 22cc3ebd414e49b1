"""The Grafana dashboard queries only series the gateway and the aggregator export.

Series names come from the real exporters: a gateway metrics registry with every
callback figure present, and the aggregator collector over a real aggregator DB."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator_helpers import tiny_model

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "fedgate-dashboard.json"
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "le", "instance", "label", "reason",
                "metric", "job", "gateway", "version"}

pytestmark = pytest.mark.integration


def exported_series(tmp_path) -> set[str]:
    from cloud_aggregator import metrics as agg_metrics
    from cloud_aggregator import store
    from cloud_aggregator.service import AggregatorConfig, AggregatorService
    from gateway.metrics import GatewayMetrics

    gw = GatewayMetrics()
    gw.flows.labels("s").inc()
    gw.rejected.labels("s").inc()
    gw.detections.labels("Benign").inc()
    gw.set_model_version("v1")
    gw.add_callback(lambda: {"fl_uploads": 1, "fl_upload_bytes": 10, "fl_globals_loaded": 1, "fl_global_version": 3,
                             "outbox_pending": 0, "tail_backlog_bytes": 0,
                             "fl_rejected": {"signature": 1}})
    text = gw.exposition().decode()
    # a real aggregator DB (initial checkpoint written by the service itself)
    db = str(tmp_path / "agg.db")
    AggregatorService(AggregatorConfig(database=db), initial_weights=tiny_model())
    with store.make_sessions(db).begin() as session:  # a refused message, as the service records one
        store.count_rejection(session, "bad_signature", "test", "gw1")
    text += agg_metrics.exposition(agg_metrics.make_registry(store.make_sessions(db))).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def test_every_dashboard_series_is_exported(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    wanted = {name for e in exprs for name in re.findall(r"\b(fedgate_[a-z_]+)", e)}
    exported = exported_series(tmp_path)
    missing = sorted(wanted - exported)
    assert not missing, f"dashboard queries series nobody exports: {missing}"
    # and the important ones are on the dashboard
    for name in ("fedgate_gw_flows_total", "fedgate_gw_inference_seconds_bucket", "fedgate_gw_queue_depth",
                 "fedgate_gw_detections_total", "fedgate_gw_fl_uploads_total", "fedgate_gw_detection_delay_seconds_bucket", "fedgate_agg_clients_alive",
                 "fedgate_agg_pool_size", "fedgate_agg_central_metric", "fedgate_agg_aggregations_total"):
        assert name in wanted, name


@pytest.mark.skipif(__import__("brokers").find_mosquitto() is None, reason="mosquitto is not installed")
def test_aggregator_command_serves_page_status_and_metrics(tmp_path):
    """``fedgate-aggregator run --http``: the real command serves the page, its JSON and
    Prometheus metrics beside the running aggregator, and stops on SIGTERM."""
    import signal
    import subprocess
    import sys
    import urllib.request

    import safetensors.numpy as st_numpy

    from aggregator_helpers import dev_config_text
    from brokers import Mosquitto
    from gateway_helpers import wait_until

    broker = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    st_numpy.save_file(tiny_model(), str(tmp_path / "initial.safetensors"))
    (tmp_path / "agg.toml").write_text(
        '[aggregator]\ndatabase = "agg.db"\ninitial_model = "initial.safetensors"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n[strategy]\nname = "gsfs"\n')
    # port 0: the command picks a free port and says which (no race with other listeners)
    proc = subprocess.Popen([sys.executable, "-m", "cloud_aggregator.cli", "run", "--config",
                             str(tmp_path / "agg.toml"), "--http", "127.0.0.1:0"],
                            stderr=subprocess.PIPE, text=True)
    said = []
    for line in proc.stderr:  # ends if the process dies
        said.append(line)
        found = re.search(r"status page http://127\.0\.0\.1:(\d+)/", line)
        if found:
            port = int(found.group(1))
            break
    else:
        pytest.fail("no status page line: " + "".join(said)[-2000:])

    def get(path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.read().decode()

    def serving() -> bool:  # the page may be up a moment before the aggregator wrote its state
        try:
            return "fedgate_agg_global_version 0.0" in get("/metrics") and bool(json.loads(get("/api/status"))["state"])
        except OSError:
            return False

    try:
        assert wait_until(serving, 60), "".join(said)[-2000:]
        metrics = get("/metrics")
        assert "fedgate_agg_store_up 1.0" in metrics and "fedgate_agg_pool_size 0.0" in metrics
        status = json.loads(get("/api/status"))
        assert status["state"]["version"] == 0 and status["state"]["strategy"] == "gsfs"
        assert "<title>fedgate aggregator</title>" in get("/")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, "".join(said) + err
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop()
