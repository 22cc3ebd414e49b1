"""At-least-once under failure, on a real broker (broker_config/dev.conf):

- the broker is restarted in the middle of a run: every update a gateway saw
  acknowledged is counted exactly once by the aggregator;
- the aggregator process is killed with SIGKILL and restarted: it continues from the
  same global version (checkpoints contiguous) and no acknowledged update is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.numpy as st_numpy

from aggregator_helpers import FakeGatewayClient, dev_config_text, tiny_delta, tiny_model
from brokers import Mosquitto, find_mosquitto
from cloud_aggregator import store
from cloud_aggregator.service import AggregatorConfig, AggregatorService
from gateway.mqtt import MqttSettings
from gateway.protocol import topics
from gateway.protocol.envelope import encode_update

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

REPO = Path(__file__).resolve().parents[2]


def deliver(gw: FakeGatewayClient, data: bytes, timeout: float = 30.0) -> None:
    """Publish until the broker acknowledges (what a gateway outbox does): retries
    after a lost connection resend the same bytes, i.e. the same message id."""
    topic = topics.gateway_update(gw.gateway_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not gw.link.connected:
            time.sleep(0.1)
            continue
        info = gw.link.publish(topic, data, qos=1)
        try:
            info.wait_for_publish(3)
        except (RuntimeError, ValueError):
            pass
        if info.is_published():
            return
    raise AssertionError(f"{gw.gateway_id}: update never acknowledged by the broker")


def seen_ids(db: Path) -> dict[str, set[str]]:
    with store.make_sessions(str(db), create=False)() as s:
        rows = s.query(store.SeenUpdateRow).all()
        out: dict[str, set[str]] = {}
        for r in rows:
            out.setdefault(r.sender, set()).add(r.message_id)
        return out


def test_broker_restart_mid_run_counts_every_acknowledged_update_once(tmp_path):
    broker = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    cfg = AggregatorConfig(database=str(tmp_path / "agg.db"), mqtt=MqttSettings(client_id="agg", port=broker.port),
                           max_staleness=None, tick_s=0.05, strategy_params={"rho": 0.6})
    svc = AggregatorService(cfg, initial_weights=tiny_model()).start()
    gws = [FakeGatewayClient(f"gw{i}", broker.port).start() for i in range(3)]
    sent: dict[str, set[str]] = {g.gateway_id: set() for g in gws}
    try:
        assert svc.wait_for(lambda s: len(s.pool.live_clients()) == 3, 10)
        for step in range(12):
            if step == 6:
                broker.restart()  # SIGTERM: persistent sessions and retained messages are saved
            for g in gws:
                enc = encode_update(tiny_delta(0.01 * step), sender=g.gateway_id, base_version=0, num_samples=10)
                deliver(g, enc.data)
                sent[g.gateway_id].add(enc.message_id)
        total = sum(len(v) for v in sent.values())
        assert svc.wait_for(lambda s: s.accepted == total, 30), svc.counters()
        time.sleep(0.5)  # a late duplicate would show up as a replay, never as a second count
        assert svc.accepted == total
        assert seen_ids(tmp_path / "agg.db") == sent
        assert {k: c.total_submissions for k, c in svc.pool.clients.items()} == {k: len(v) for k, v in sent.items()}
        assert set(svc.rejections) <= {"replay"}
        assert svc.version >= 1
    finally:
        for g in gws:
            g.stop()
        svc.stop()
        broker.stop()


def start_aggregator(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "cloud_aggregator.cli", "-v", "run", "--config", str(config)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def db_state(db: Path) -> tuple[int, list[int], int]:
    """(version, aggregated versions, known clients) as the aggregator committed them."""
    from sqlalchemy.exc import OperationalError

    if not db.exists():
        return -1, [], 0
    with store.make_sessions(str(db), create=False)() as s:
        try:
            st = store.get_state(s)
        except OperationalError:  # tables not created yet
            return -1, [], 0
        versions = [r.version for r in store.rounds(s)]
        clients = len(store.load_clients(s))
        return (st.version if st else -1), versions, clients


def test_kill_9_aggregator_restarts_same_version_no_update_lost(tmp_path):
    broker = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    st_numpy.save_file(tiny_model(), str(tmp_path / "initial.safetensors"))
    subprocess.run([sys.executable, "-m", "cloud_aggregator.cli", "keygen", str(tmp_path / "agg.key")], check=True,
                   capture_output=True, timeout=120)
    db = tmp_path / "agg.db"
    config = tmp_path / "agg.toml"
    config.write_text(f"""
[aggregator]
database = "agg.db"
initial_model = "initial.safetensors"
signing_key = "agg.key"
max_staleness = 1000
tick_s = 0.05

[mqtt]
port = {broker.port}
client_id = "agg-kill-test"

[strategy]
name = "gsfs"
rho = 0.6
""")
    gws = [FakeGatewayClient(f"gw{i}", broker.port).start() for i in range(3)]
    log = tmp_path / "aggregator.log"
    proc = start_aggregator(config, log)
    sent: dict[str, set[str]] = {g.gateway_id: set() for g in gws}
    try:
        deadline = time.monotonic() + 30
        while db_state(db)[2] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # subscribed once the three retained statuses are stored
        assert db_state(db)[2] == 3, log.read_text()[-3000:]

        def send_round(step: int) -> None:
            for g in gws:
                enc = encode_update(tiny_delta(0.01 * step), sender=g.gateway_id, base_version=0, num_samples=10)
                deliver(g, enc.data)
                sent[g.gateway_id].add(enc.message_id)

        step, deadline = 0, time.monotonic() + 20
        while db_state(db)[0] < 2 and time.monotonic() < deadline:
            send_round(step)  # updates that arrive together share one aggregation: keep going
            step += 1
            time.sleep(0.3)
        send_round(step)  # in flight while it dies
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        version_at_kill, versions_at_kill, _ = db_state(db)
        assert version_at_kill >= 2
        for later in range(step + 1, step + 4):
            send_round(later)  # broker queues these for the aggregator's persistent session
        proc = start_aggregator(config, log)
        total = sum(len(v) for v in sent.values())
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if sum(len(v) for v in seen_ids(db).values()) == total:
                break
            time.sleep(0.2)
        assert seen_ids(db) == sent, log.read_text()[-3000:]
        version, versions, _ = db_state(db)
        assert version >= version_at_kill
        assert versions[: len(versions_at_kill)] == versions_at_kill  # history kept
        assert versions == list(range(1, version + 1))  # no version lost or repeated
        with store.make_sessions(str(db), create=False)() as s:
            totals = {c.sender: c.total_submissions for c in s.query(store.ClientRow)}
        assert totals == {k: len(v) for k, v in sent.items()}  # each update counted once
        # what the operator sees
        from click.testing import CliRunner

        from cloud_aggregator.cli import main as cli_main

        out = CliRunner().invoke(cli_main, ["status", "--database", str(db), "--json"])
        assert out.exit_code == 0, out.output
        shown = json.loads(out.output)
        assert shown["state"]["version"] == db_state(db)[0] and shown["state"]["accepted_updates"] == total
        assert sorted(c["gateway"] for c in shown["clients"]) == ["gw0", "gw1", "gw2"]
        table = CliRunner().invoke(cli_main, ["status", "--database", str(db)])
        assert table.exit_code == 0 and "aggregations" in table.output
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        for g in gws:
            g.stop()
        broker.stop()
