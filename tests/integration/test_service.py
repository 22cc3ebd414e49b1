"""The running gateway on a real mosquitto and a real SQLite file: live tail -> detections
-> store, alerts and retained status on MQTT, /api/status and /metrics, graceful SIGTERM
of the real ``fedgate gateway run`` process, config errors on the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from aggregator_helpers import dev_config_text
from benchmarks.live_latency import start_writer, write_at_rate
from brokers import Mosquitto, find_mosquitto
from gateway_helpers import (
    DEFAULT_MODEL,
    Listener,
    RuleClassifier,
    gateway_config,
    gateway_doc,
    store_counts,
    wait_until,
    write_toml,
)
from gateway.service import GatewayService, ServiceError

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")]


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    yield b
    b.stop()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def test_live_tail_detects_stores_alerts_and_reports(tmp_path, broker):
    (tmp_path / "conn.log").touch()
    cfg = gateway_config(tmp_path, broker_port=broker.port, http="127.0.0.1:0")
    listener = Listener(broker.port, ["fedgate/v1/gw/gw1/alerts", "fedgate/v1/gw/gw1/status"]).start()
    service = GatewayService(cfg, classifier=RuleClassifier()).start()
    try:
        assert wait_until(lambda: service.link.connected, 10)
        n = 1500
        write_at_rate(tmp_path / "conn.log", rate=3000, count=n)
        assert wait_until(lambda: store_counts(cfg.database_url)[0] == n, 30)
        rows, uids, dets = store_counts(cfg.database_url)
        assert (rows, uids, dets) == (n, n, n)
        status = json.loads(get(service.http.url + "/api/status"))
        assert status["flows"] == n and status["model_version"] == "rules-1" and status["mqtt_connected"]
        scans = status["detections_by_label"].get("PartOfAHorizontalPortScan", 0)
        assert scans > 0 and scans + status["detections_by_label"]["Benign"] == n
        assert status["alerts"] == scans
        # every alert reaches the broker through the durable outbox
        assert wait_until(lambda: len(listener.alert_uids()) == scans, 20), (len(listener.alert_uids()), scans)
        assert wait_until(lambda: (listener.last_status() or {}).get("flows") == n, 10)
        assert listener.last_status()["state"] == "online"
        metrics = get(service.http.url + "/metrics").decode()
        assert f"fedgate_gw_flows_total{{source=\"{(tmp_path / 'conn.log').resolve()}\"}} {float(n)}" in metrics
        assert 'fedgate_gw_model_info{version="rules-1"} 1.0' in metrics
        assert "fedgate_gw_inference_seconds_bucket" in metrics and "fedgate_gw_outbox_pending 0.0" in metrics
        assert "fedgate_gw_tail_backlog_bytes 0.0" in metrics  # caught up
        page = get(service.http.url + "/").decode()
        assert "<title>fedgate gateway</title>" in page
    finally:
        service.stop()
    # graceful stop: offline retained, nothing pending
    assert wait_until(lambda: (listener.last_status() or {}).get("state") == "offline", 10)
    listener.stop()


def test_restart_resumes_without_loss_or_duplicates(tmp_path):
    (tmp_path / "conn.log").touch()
    cfg = gateway_config(tmp_path)
    write_at_rate(tmp_path / "conn.log", rate=10_000, count=700)
    first = GatewayService(cfg, classifier=RuleClassifier()).start()
    assert wait_until(lambda: store_counts(cfg.database_url)[0] == 700, 20)
    first.stop()
    write_at_rate(tmp_path / "conn.log", rate=10_000, count=300, uid_offset=700)
    second = GatewayService(cfg, classifier=RuleClassifier()).start()
    assert wait_until(lambda: store_counts(cfg.database_url)[0] == 1000, 20)
    time.sleep(0.3)
    second.stop()
    assert store_counts(cfg.database_url) == (1000, 1000, 1000)
    assert second.status()["flows"] == 300  # the restart read only what was new


def test_bad_lines_are_counted_and_the_gateway_keeps_going(tmp_path):
    log = tmp_path / "conn.log"
    log.touch()
    cfg = gateway_config(tmp_path, http="127.0.0.1:0")
    service = GatewayService(cfg, classifier=RuleClassifier()).start()
    try:
        write_at_rate(log, rate=10_000, count=100)
        with open(log, "ab") as fh:
            fh.write(b"garbage\tline\n\x00\xff\xfe binary junk\n")
        write_at_rate(log, rate=10_000, count=100, uid_offset=100)
        assert wait_until(lambda: store_counts(cfg.database_url)[0] == 200, 20)
        assert wait_until(lambda: "fedgate_gw_rejected_total" in get(service.http.url + "/metrics").decode()
                          and service.metrics.value("fedgate_gw_rejected_total",
                                                    source=str(log.resolve())) == 2, 10)
    finally:
        service.stop()


def test_start_errors_name_the_setting(tmp_path):
    cfg = gateway_config(tmp_path, source={"zeek_log": str(tmp_path / "missing" / "conn.log")})
    with pytest.raises(ServiceError, match="source.zeek_log"):
        GatewayService(cfg, classifier=RuleClassifier()).start()
    cfg = gateway_config(tmp_path, gateway={"model": str(tmp_path / "no-model")})
    with pytest.raises(ServiceError, match="gateway.model"):
        GatewayService(cfg).start()


@pytest.mark.slow
def test_fedgate_gateway_run_process_stops_cleanly_on_sigterm(tmp_path, broker):
    """The real command: starts from its TOML, follows a log under load, SIGTERM ->
    commits, says offline, exits 0; a restart carries on with nothing lost or doubled."""
    log = tmp_path / "conn.log"
    log.touch()
    model = str(DEFAULT_MODEL) if (DEFAULT_MODEL / "model.onnx").exists() else None
    doc = gateway_doc(tmp_path, broker_port=broker.port, model=model, http="127.0.0.1:0", fl={"enabled": False})
    conf = write_toml(tmp_path / "gw.toml", doc)
    url = doc["gateway"]["database"]
    listener = Listener(broker.port, ["fedgate/v1/gw/gw1/status"], client_id="status-watch").start()
    writer = start_writer(log, rate=800, count=2400)
    env = {**os.environ, "FEDGATE__SOURCE__POLL_INTERVAL_S": "0.05"}
    cmd = [sys.executable, "-m", "gateway.cli", "gateway", "run", "--config", str(conf)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: store_counts(url)[0] > 300, 60)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "stopping: committing" in err
        assert wait_until(lambda: (listener.last_status() or {}).get("state") == "offline", 10)
        writer.wait(timeout=60)
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        # the first run may have stored every line while it drained: wait until the
        # restarted gateway says it is online, or SIGTERM can beat its signal handler
        assert wait_until(lambda: (listener.last_status() or {}).get("state") == "online", 60)
        assert wait_until(lambda: store_counts(url)[0] == 2400, 60), store_counts(url)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
        rows, uids, dets = store_counts(url)
        assert rows == uids == 2400
        assert dets == (2400 if model else 0)
    finally:
        if proc.poll() is None:
            proc.kill()
        writer.kill()
        listener.stop()


def test_config_check_command(tmp_path):
    good = write_toml(tmp_path / "gw.toml", gateway_doc(tmp_path))
    cmd = [sys.executable, "-m", "gateway.cli", "config", "check", "--config", str(good), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FEDGATE__MQTT__PORT": "8883"})
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["valid"] and shown["settings"]["mqtt"]["port"] == 8883 and shown["env_overrides"] == ["mqtt.port"]
    bad = gateway_doc(tmp_path)
    bad["mqtt"]["port"] = 70000
    bad_path = write_toml(tmp_path / "bad.toml", bad)
    out = subprocess.run(cmd[:-2] + [str(bad_path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "mqtt.port: 70000 is not a TCP port" in out.stderr
