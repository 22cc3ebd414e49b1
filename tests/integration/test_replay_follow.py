"""``gateway.ingest.follow``: a live conn.log into a real SQLite store, across restarts,
rotation, partial lines and a failing database."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from gateway.flows.zeek import read_log
from gateway.ingest import follow
from gateway.store import repository as repo
from gateway.store.db import open_store

pytestmark = pytest.mark.integration


@pytest.fixture()
def store(tmp_path):
    engine, factory = open_store(f"sqlite:///{tmp_path / 'follow.db'}")
    yield engine, factory
    engine.dispose()


@pytest.fixture()
def log_lines(iot23_dir):
    raw = (iot23_dir / "CTU-Malware-Capture-20-1" / "conn.log.labeled").read_bytes().splitlines(keepends=True)
    header = [ln for ln in raw if ln.startswith(b"#") and not ln.startswith(b"#close")]
    data = [ln for ln in raw if not ln.startswith(b"#")]
    return header, data


def count(factory) -> int:
    with factory() as s:
        return repo.count_flows(s)


def test_follow_appends_partial_lines_restarts_and_rotation(store, tmp_path, log_lines):
    _, factory = store
    header, data = log_lines
    live = tmp_path / "conn.log"
    live.write_bytes(b"".join(header + data[:1000]))
    c = follow(live, session_factory=factory, max_polls=1, interval=0.01)
    assert (c.records, c.stored) == (1000, 1000) and count(factory) == 1000

    # half a line arrives: nothing new yet; a new follow (a restarted gateway) resumes
    with open(live, "ab") as fh:
        fh.write(b"".join(data[1000:1500]) + data[1500][:40])
    c = follow(live, session_factory=factory, max_polls=1, interval=0.01)
    assert c.stored == 500 and count(factory) == 1500
    with open(live, "ab") as fh:
        fh.write(data[1500][40:] + b"".join(data[1501:2000]))

    # rotation: the old file gets its tail written, is renamed, a new conn.log starts
    with open(live, "ab") as fh:
        fh.write(b"".join(data[2000:2200]))
    live.rename(tmp_path / "conn.2026-11-24-14-00-00.log")
    live.write_bytes(b"".join(header + data[2200:]))
    c = follow(live, session_factory=factory, max_polls=3, interval=0.01)
    assert count(factory) == len(data)
    assert c.stored == len(data) - 1500

    # nothing new: nothing stored, and the same position is not rewritten
    c = follow(live, session_factory=factory, max_polls=2, interval=0.01)
    assert (c.records, c.commits) == (0, 0)
    with factory() as s:
        assert sorted(r.uid for r in repo.load_records(s)) == sorted(
            r.uid for r in read_log(b"".join(header + data))[0])


def test_follow_survives_a_failing_database_and_loses_nothing(store, tmp_path, log_lines):
    engine, factory = store
    header, data = log_lines
    live = tmp_path / "conn.log"
    live.write_bytes(b"".join(header + data[:300]))
    with engine.begin() as conn:  # a real database error on every insert, like a full disk
        conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON flows BEGIN SELECT RAISE(ABORT, 'disk full'); END"))
    stop = threading.Event()
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(c=follow(live, session_factory=factory, interval=0.02, stop=stop)))
    worker.start()
    try:
        time.sleep(0.5)  # several polls fail meanwhile
        assert count(factory) == 0
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse"))
        with open(live, "ab") as fh:
            fh.write(b"".join(data[300:600]))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and count(factory) < 600:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=30)
    c = result["c"]
    assert c.store_errors >= 1
    assert count(factory) == 600 and c.stored == 600


def test_follow_updates_given_counters(store, tmp_path, log_lines):
    _, factory = store
    header, data = log_lines
    live = tmp_path / "conn.log"
    live.write_bytes(b"".join(header + data[:50]))
    counters = follow(live, session_factory=factory, max_polls=1, interval=0.01)
    same = follow(live, session_factory=factory, max_polls=2, interval=0.01, counters=counters)
    assert same is counters and (counters.polls, counters.stored) == (3, 50)


def test_follow_finishes_a_log_archived_while_down(store, tmp_path, log_lines):
    """Zeek rotated the log, gzipped it into its archive and started a new one while the
    gateway was down: with archive_globs the restarted follow finishes the archived file
    first, then reads the new one; every flow is stored once."""
    import gzip

    _, factory = store
    header, data = log_lines
    live = tmp_path / "spool" / "conn.log"
    live.parent.mkdir()
    live.write_bytes(b"".join(header + data[:800]))
    c = follow(live, session_factory=factory, max_polls=1, interval=0.01)
    assert c.stored == 800

    # while down: 400 more lines, rotation into a gzip archive, a new log with the rest
    with open(live, "ab") as fh:
        fh.write(b"".join(data[800:1200]))
    archive = tmp_path / "logs" / "2026-11-24"
    archive.mkdir(parents=True)
    with gzip.open(archive / "conn.14:00:00-15:00:00.log.gz", "wb") as gz:
        gz.write(live.read_bytes())
    live.unlink()
    live.write_bytes(b"".join(header + data[1200:]))

    c = follow(live, session_factory=factory, max_polls=4, interval=0.01,
               archive_globs=[str(tmp_path / "logs" / "*" / "conn.*.log.gz")])
    assert count(factory) == len(data)
    assert c.stored == len(data) - 800
