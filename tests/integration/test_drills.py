"""Fault drills, bounded in time, with real processes: the log writer is its own process,
the gateway is the real ``fedgate gateway run`` (or the service in-process where the test
must reach inside, e.g. to count outbox rows), the broker is a real mosquitto.

* kill -9 of the gateway during a live tail under load, then a restart: every flow
  stored exactly once;
* conn.log rotated (renamed, new file) under load, with a kill -9 between rotations:
  the same;
* the broker stopped and restarted under load: detection goes on, the outbox holds the
  alerts and drains after; a subscriber with a persistent session gets every alert;
* the store's file system fills up (a 3 MiB tmpfs when this box allows mounting one,
  otherwise SQLite's ``max_page_count`` as a size limit): clear logged error, counted,
  nothing lost, and the gateway catches up once space is freed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aggregator_helpers import dev_config_text
from benchmarks.live_latency import start_writer
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
from gateway.service import GatewayService

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_gateway(conf: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gateway.cli", "gateway", "run", "--config", str(conf)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_running(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the gateway says it runs (its sources are open): a first start on a loaded
    box takes over 10 s, and a log rotated before a gateway's first start is not its."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if b"running" in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"gateway did not start (exit {proc.poll()})")


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# A rotation every 2,500 lines at 500 lines/s (5 s): a restart takes ~3 s on an idle box
# and over 10 s on a loaded one, so an outage spans one rotation or two; the tail finds
# the renamed file by its inode and reads the ones renamed beside it after, in order.
@pytest.mark.parametrize("rate, total, rotate_every", [(1000, 4000, 0), (500, 6000, 2500)],
                         ids=["append", "rotating"])
def test_kill9_under_load_loses_and_doubles_nothing(tmp_path, rate, total, rotate_every):
    log = tmp_path / "conn.log"
    log.touch()
    # the shipped model when it is there (each flow's detection commits with it), else store-only
    model = str(DEFAULT_MODEL) if (DEFAULT_MODEL / "model.onnx").exists() else None
    doc = gateway_doc(tmp_path, poll=0.05, model=model, fl={"enabled": False})
    conf = write_toml(tmp_path / "gw.toml", doc)
    url = doc["gateway"]["database"]
    gw = run_gateway(conf)
    wait_running(gw)
    writer = start_writer(log, rate=rate, count=total, rotate_every=rotate_every)
    try:
        kills = 0
        for threshold in (600, 1800):  # kill -9 twice while lines keep coming
            assert wait_until(lambda: store_counts(url)[0] >= threshold, 60), store_counts(url)
            kill9(gw)
            kills += 1
            time.sleep(0.3)  # lines pile up while it is down
            gw = run_gateway(conf)
        assert writer.wait(timeout=60) == 0
        assert wait_until(lambda: store_counts(url)[0] >= total, 60), store_counts(url)
        time.sleep(0.5)  # anything extra would show now
        rows, uids, dets = store_counts(url)
        assert (rows, uids) == (total, total), f"{rows} rows, {uids} distinct uids, {total} lines written"
        assert dets == (total if model else 0)
        if rotate_every:
            assert len(list(tmp_path.glob("conn.log.*"))) == total // rotate_every
        assert kills == 2
    finally:
        writer.kill()
        stop(gw)


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_broker_restart_under_load_keeps_detecting_and_outbox_drains(tmp_path):
    broker = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    log = tmp_path / "conn.log"
    log.touch()
    cfg = gateway_config(tmp_path, broker_port=broker.port)
    listener = Listener(broker.port, ["fedgate/v1/gw/gw1/alerts"], client_id="alert-sink").start()
    service = GatewayService(cfg, classifier=RuleClassifier()).start()
    total = 3000
    writer = start_writer(log, rate=600, count=total)
    try:
        assert wait_until(lambda: service.link.connected, 10)
        assert wait_until(lambda: store_counts(cfg.database_url)[0] > 500, 30)
        broker.stop()
        assert wait_until(lambda: not service.link.connected, 10)
        during = store_counts(cfg.database_url)[0]
        # detection goes on without the broker; alerts wait in the outbox
        assert wait_until(lambda: store_counts(cfg.database_url)[0] > during + 600, 30)
        assert wait_until(lambda: service.outbox.pending() > 0, 10)
        broker.start()
        assert writer.wait(timeout=60) == 0
        assert wait_until(lambda: store_counts(cfg.database_url)[0] == total, 30)
        assert wait_until(lambda: service.outbox.pending() == 0, 30), service.outbox.pending()
        alerts = int(service.metrics.value("fedgate_gw_alerts_total"))
        assert alerts > 0
        assert wait_until(lambda: len(listener.alert_uids()) == alerts, 30), (len(listener.alert_uids()), alerts)
    finally:
        writer.kill()
        service.stop()
        listener.stop()
        broker.stop()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["tmpfs", "max_page_count"])
def test_full_disk_gives_clear_error_and_recovers(tmp_path, caplog, kind):
    """A real full tmpfs (skipped where mounting is not allowed), and a size-limited
    SQLite file (``PRAGMA max_page_count``: the same SQLITE_FULL error, anywhere)."""
    from sqlalchemy import event

    store_dir = tmp_path / "store"
    if kind == "tmpfs":
        real_fs = _mount_tmpfs(store_dir, "4m")
        if not real_fs:
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    else:
        store_dir.mkdir()
        real_fs = False
    log = tmp_path / "conn.log"
    log.touch()
    cfg = gateway_config(tmp_path, gateway={"database": f"sqlite:///{store_dir / 'gw.db'}"})
    service = GatewayService(cfg, classifier=RuleClassifier()).start()
    filler = store_dir / "filler"
    total = 3000
    try:
        if real_fs:  # leave ~200 KiB free
            free = shutil.disk_usage(store_dir).free
            filler.write_bytes(b"\0" * max(0, free - 200 * 1024))
        else:  # the SQLite file may not grow past its current size + ~200 KiB
            def limit(dbapi_conn, _):
                cur = dbapi_conn.cursor()
                page = cur.execute("PRAGMA page_size").fetchone()[0]
                pages = cur.execute("PRAGMA page_count").fetchone()[0]
                cur.execute(f"PRAGMA max_page_count={pages + 200 * 1024 // page}")
            event.listen(service.engine, "connect", limit)
            service.engine.dispose()
        writer = start_writer(log, rate=3000, count=total)
        assert wait_until(lambda: service.tail_counters.store_errors > 0, 30)
        assert writer.wait(timeout=60) == 0
        stored_while_full = store_counts(cfg.database_url)[0]
        assert 0 < stored_while_full < total
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "is not usable" in messages and "full" in messages, messages[-500:]
        assert service.state == "running"  # the process keeps going
        assert wait_until(lambda: service.status()["store_errors"] > 0, 5)  # and says so
        assert service.status()["tail_backlog_bytes"] > 0  # the lines it could not store yet
        # free the space: the tail catches up from its last committed position
        if real_fs:
            filler.unlink()
        else:
            event.remove(service.engine, "connect", limit)
            service.engine.dispose()
        assert wait_until(lambda: store_counts(cfg.database_url)[0] == total, 60), store_counts(cfg.database_url)
        rows, uids, dets = store_counts(cfg.database_url)
        assert rows == uids == dets == total
        assert wait_until(lambda: service.status()["tail_backlog_bytes"] == 0, 10)
    finally:
        service.stop()
        if real_fs:
            subprocess.run(["umount", str(store_dir)], capture_output=True)
