"""Replay into real databases: idempotence, crash/resume, bad input, classification, pcaps."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.flows.record import ConnRecord
from gateway.flows.zeek import read_log
from gateway.ingest import ReplayError, replay
from gateway.store import repository as repo
from gateway.store.db import open_store

from store_backends import store_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL_SCENARIOS = ("CTU-Honeypot-Capture-4-1", "CTU-Honeypot-Capture-7-1", "CTU-Malware-Capture-20-1")


def _bench_module():
    spec = importlib.util.spec_from_file_location("fedgate_bench_ingest", REPO_ROOT / "benchmarks" / "ingest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parsed(path) -> list[ConnRecord]:
    records, _ = read_log(path)
    return records


@pytest.fixture()
def store(store_url):  # noqa: F811
    engine, factory = open_store(store_url)
    yield factory
    engine.dispose()


@pytest.fixture()
def sqlite_store(tmp_path):
    engine, factory = open_store(f"sqlite:///{tmp_path / 'replay.db'}")
    yield factory
    engine.dispose()


def test_replay_stores_every_record_once_and_twice_stores_nothing(store, iot23_dir):
    files = [iot23_dir / s / "conn.log.labeled" for s in SMALL_SCENARIOS]
    expected = {str(f.resolve()): parsed(f) for f in files}
    total = sum(map(len, expected.values()))

    first = replay(files, session_factory=store, batch_size=1000)
    assert (first.records, first.stored, first.duplicates, first.rejected_total) == (total, total, 0, 0)
    with store() as s:
        assert repo.count_flows(s) == total
        for source, records in expected.items():
            back = repo.load_records(s, source=source)
            assert sorted(back) == sorted(records)  # every field survives the store

    again = replay(files, session_factory=store)  # resumes at the end: reads nothing
    assert (again.records, again.stored) == (0, 0)
    assert all(f.resumed_from > 0 for f in again.files)

    reread = replay(files, session_factory=store, from_start=True)
    assert (reread.records, reread.stored, reread.duplicates) == (total, 0, total)
    with store() as s:
        assert repo.count_flows(s) == total


class CrashAfter:
    """A classifier that dies after ``n`` batches, like a process killed mid-file."""

    model_version = "crash-test"

    def __init__(self, n: int):
        self.n = n

    def classify(self, records):
        if self.n == 0:
            raise KeyboardInterrupt("simulated crash")
        self.n -= 1
        return [("benign", 0.0)] * len(records)


def _as_zeek_json(src) -> bytes:
    from gateway.flows.pcap import zeek_json_line

    return "".join(zeek_json_line(r) + "\n" for r in parsed(src)).encode()


@pytest.mark.parametrize("form", ["plain", "gzip", "json"])
def test_crash_mid_file_then_rerun_resumes_with_one_row_per_record(store, iot23_dir, tmp_path, form):
    src = iot23_dir / "CTU-Malware-Capture-20-1" / "conn.log.labeled"
    path = tmp_path / {"plain": "conn.log", "gzip": "conn.log.gz", "json": "conn.json.log"}[form]
    body = {"plain": src.read_bytes, "gzip": lambda: gzip.compress(src.read_bytes()),
            "json": lambda: _as_zeek_json(src)}[form]()
    path.write_bytes(body)
    records = parsed(path)
    assert len(records) == len(parsed(src))

    with pytest.raises(KeyboardInterrupt):
        replay([path], session_factory=store, classifier=CrashAfter(2), batch_size=500)
    with store() as s:
        committed = repo.count_flows(s)
        saved = repo.load_offset(s, str(path.resolve()))
    assert 0 < committed < len(records)
    assert saved is not None and saved.offset > 0

    rerun = replay([path], session_factory=store, batch_size=500)
    assert rerun.files[0].resumed_from == saved.offset
    # only the uncommitted rest was read again, and all of it was new
    assert rerun.records == rerun.stored == len(records) - committed
    with store() as s:
        assert repo.count_flows(s) == len(records)
        assert sorted(repo.load_records(s)) == sorted(records)


@pytest.mark.slow
def test_kill_9_of_fedgate_replay_mid_file_then_rerun(store_url, tmp_path):  # noqa: F811
    """A real ``kill -9`` of the CLI while it commits batches; the rerun completes the file."""
    from sqlalchemy import text

    log = tmp_path / "big.conn.log"
    lines = 60_000
    _bench_module().build_conn_log(log, lines)
    engine, _ = open_store(store_url)  # schema first, so the poller can count from the start
    cmd = [sys.executable, "-m", "gateway.cli", "replay", "--no-classify", "--batch-size", "2000",
           "--db", store_url, "--json", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)

    def count(what: str = "count(*)"):
        with engine.connect() as conn:
            return conn.execute(text(f"select {what} from flows")).one()

    try:
        deadline = time.monotonic() + 120
        while count()[0] < 4000:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "replay committed nothing in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        (before,) = count()
        assert 4000 <= before < lines, "killed too late to test a resume"

        done = subprocess.run(cmd, capture_output=True, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr.decode()
        summary = json.loads(done.stdout)
        assert summary["files"][0]["resumed_from"] > 0
        assert summary["records"] == summary["stored"] == lines - before
        assert tuple(count("count(*), count(distinct uid)")) == (lines, lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        engine.dispose()


JUNK_LINES = [
    b"garbage",
    b"1540469303\tCshort\t1.2.3.4",  # too few fields
    b"\x00\x01\x02\xff\xfe binary junk \x80\x81",
    b"1540469303\tCxx\t192.168.1.1\t1\t8.8.8.8\t53\tudp\t-\t0.1\tNOTANUMBER\t48\tSF\t-\t-\t0\tDd\t1\t76\t1\t76\t-   benign   -",
]


def _iot23_with_junk(iot23_dir, junk_at: dict[int, bytes]) -> tuple[bytes, int]:
    src = (iot23_dir / "CTU-Honeypot-Capture-7-1" / "conn.log.labeled").read_bytes().splitlines(keepends=True)
    header = [ln for ln in src if ln.startswith(b"#") and not ln.startswith(b"#close")]
    data = [ln for ln in src if not ln.startswith(b"#")]
    out = list(header)
    for i, ln in enumerate(data):
        if i in junk_at:
            out.append(junk_at[i] + b"\n")
        out.append(ln)
    return b"".join(out), len(data)


def test_bad_lines_are_counted_and_good_records_kept(sqlite_store, iot23_dir, tmp_path):
    body, good = _iot23_with_junk(iot23_dir, {3: JUNK_LINES[0], 10: JUNK_LINES[1], 50: JUNK_LINES[2], 90: JUNK_LINES[3]})
    path = tmp_path / "junk.log"
    path.write_bytes(body)
    summary = replay([path], session_factory=sqlite_store)
    assert summary.stored == good
    assert summary.rejected_total == 4
    with pytest.raises(ReplayError, match=r"junk.log:\d+: "):
        replay([path], session_factory=sqlite_store, strict=True, from_start=True)


def test_hostile_files_each_give_a_counted_rejection(sqlite_store, iot23_dir, tmp_path):
    good = iot23_dir / "CTU-Honeypot-Capture-4-1" / "conn.log.labeled"
    n_good = len(parsed(good))
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    headerless = tmp_path / "headerless.log"
    headerless.write_bytes(b"".join(ln for ln in good.read_bytes().splitlines(keepends=True)[:20] if not ln.startswith(b"#")))
    truncated = tmp_path / "cut.log.gz"
    whole = gzip.compress(good.read_bytes())
    truncated.write_bytes(whole[: len(whole) * 2 // 3])
    missing = tmp_path / "does-not-exist.log"

    summary = replay([empty, headerless, truncated, missing, good], session_factory=sqlite_store)
    by_file = {Path(f.path).name: f for f in summary.files}
    assert by_file["empty.log"].rejected == 1 and by_file["empty.log"].stored == 0
    assert by_file["headerless.log"].rejected >= 1 and by_file["headerless.log"].stored == 0
    assert by_file["does-not-exist.log"].error.startswith("cannot read")
    cut = by_file["cut.log.gz"]
    assert cut.rejected >= 1 and 0 < cut.stored < n_good  # the records before the cut are kept
    assert by_file["conn.log.labeled"].stored == n_good  # the run went on after the bad files
    assert any("gzip" in reason for reason in summary.rejected)
    with pytest.raises(ReplayError, match="empty"):
        replay([empty], session_factory=sqlite_store, strict=True)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.dictionaries(st.integers(0, 120), st.sampled_from(JUNK_LINES) | st.binary(min_size=1, max_size=60).filter(
        lambda b: b"\n" not in b and not b.lstrip().startswith(b"#") and b.strip())),
    batch_size=st.integers(1, 200),
)
def test_replay_agrees_with_the_parser_on_any_junk(sqlite_store, iot23_dir, tmp_path_factory, junk, batch_size):
    body, _ = _iot23_with_junk(iot23_dir, junk)
    path = tmp_path_factory.mktemp("junk") / "conn.log"
    path.write_bytes(body)
    records, parser = read_log(path)
    source = str(path)  # a fresh source per example: one database for all of them
    summary = replay([path], session_factory=sqlite_store, batch_size=batch_size, source=source)
    assert summary.stored == len({r.uid for r in records})
    assert summary.rejected_total == parser.rejected
    with sqlite_store() as s:
        assert repo.count_flows(s, source=source) == summary.stored


class RuleClassifier:
    """A tiny real classifier: half-open or rejected TCP flows look like scanning."""

    model_version = "rules-1"

    def classify(self, records):
        return [("PartOfAHorizontalPortScan", 0.9) if r.conn_state in ("S0", "REJ") else ("benign", 0.1)
                for r in records]


def test_replay_with_a_classifier_stores_detections_and_scores_labels(store, iot23_dir):
    path = iot23_dir / "CTU-Malware-Capture-20-1" / "conn.log.labeled"
    records = parsed(path)
    summary = replay([path], session_factory=store, classifier=RuleClassifier(), batch_size=700)
    assert summary.detections == len(records)
    labelled = [r for r in records if r.label is not None]
    right = sum((r.conn_state in ("S0", "REJ")) == r.is_malicious for r in labelled)
    assert summary.labelled == len(labelled)
    assert summary.accuracy == pytest.approx(right / len(labelled))
    with store() as s:
        st_ = repo.store_stats(s)
        assert sum(d["detections"] for d in st_["by_detection"]) == len(records)
        hits = repo.query_flows(s, repo.FlowQuery(min_score=0.5, limit=100_000))
        assert len(hits) == sum(r.conn_state in ("S0", "REJ") for r in records)


def test_pcap_replay_is_idempotent(sqlite_store, fixtures_dir):
    pytest.importorskip("gateway.flows.pcap")
    from gateway.flows.pcap import pcap_records

    pcaps = sorted((fixtures_dir / "zeek-samples").glob("*/*.pcap*"))
    expected = 0
    for p in pcaps:
        with open(p, "rb") as fh:
            expected += len({r.uid for r in pcap_records(fh)})
    first = replay(pcaps, session_factory=sqlite_store)
    assert first.stored == expected > 0
    assert {f.kind for f in first.files} == {"pcap"}
    again = replay(pcaps, session_factory=sqlite_store, from_start=True)
    assert again.stored == 0 and again.duplicates == first.records
    assert replay(pcaps, session_factory=sqlite_store).records == 0  # marked done


def test_a_copy_of_a_file_under_the_same_source_key_is_recognised(sqlite_store, iot23_dir, tmp_path):
    src = iot23_dir / "CTU-Honeypot-Capture-7-1" / "conn.log.labeled"
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    shutil.copy(src, a)
    shutil.copy(src, b)
    one = replay([a], session_factory=sqlite_store, source="sensor-1")
    two = replay([b], session_factory=sqlite_store, source="sensor-1")
    assert one.stored == len(parsed(src))
    # same bytes under the same key: the copy is recognised by its first bytes, nothing is read
    assert two.files[0].resumed_from == src.stat().st_size and two.records == two.stored == 0
    # under another key the same flows are other flows: stored again, once
    three = replay([b], session_factory=sqlite_store, source="sensor-2")
    assert three.stored == one.stored


HOSTILE = [
    ConnRecord(1.0, "Cnul\x00uid", "10.0.0.1", 1, "10.0.0.2", 2, "tcp"),
    ConnRecord(2.0, "Csurrogate", "10.0.0.1", 1, "10.0.0.2", 2, "tcp",
               history=b"Sh\xff".decode("utf-8", "surrogateescape")),
    ConnRecord(3.0, "Chuge", "10.0.0.1", 1, "10.0.0.2", 2, "tcp", orig_bytes=2**64 - 1),
    ConnRecord(4.0, "Clong" + "x" * 5000, "10.0.0.1", 1, "10.0.0.2", 2, "tcp", service="s" * 10_000),
    ConnRecord(5.0, "Cnoproto", "10.0.0.1", 1, "10.0.0.2", 2, None),
]


def test_values_a_database_refuses_cost_only_their_records(store):
    from gateway.ingest import commit_batch

    good = [ConnRecord(10.0 + i, f"Cgood{i}", "10.0.0.1", 1, "10.0.0.2", 2, "tcp") for i in range(5)]
    batch = good[:2] + HOSTILE + good[2:]
    result = commit_batch(store, batch, source="hostile", classifier=RuleClassifier(),
                          verdicts=RuleClassifier().classify(batch), offset=("id", 123, None))
    assert [(r.uid, r.reason) for r in result.refused] == [
        ("Chuge", "orig_bytes out of range for the database"), ("Cnoproto", "proto missing")]
    assert result.stored == len(batch) - 2 == result.detections
    with store() as s:
        uids = {r.uid for r in repo.load_records(s, source="hostile")}
        assert repo.load_offset(s, "hostile").offset == 123
    # alone, a missing value is refused by name too (not skipped silently as a "duplicate")
    alone = commit_batch(store, [HOSTILE[-1], ConnRecord(9.0, "Cfine", "a", 1, "b", 2, "udp")], source="hostile")
    assert [r.uid for r in alone.refused] == ["Cnoproto"] and alone.stored == 1
    # every database stores text the same way: NUL and undecodable bytes escaped as Zeek writes them
    assert {"Cnul\\x00uid", "Csurrogate", "Clong" + "x" * 5000} <= uids
    with store() as s:
        (hist,) = [r.history for r in repo.load_records(s, source="hostile") if r.uid == "Csurrogate"]
    assert hist == "Sh\\xff"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.builds(
    ConnRecord,
    ts=st.floats(0, 2e9),
    uid=st.text(min_size=1, max_size=30),
    orig_h=st.text(max_size=50), orig_p=st.integers(-(2**70), 2**70),
    resp_h=st.text(max_size=50), resp_p=st.integers(0, 65535),
    proto=st.text(max_size=10),
    history=st.none() | st.text(max_size=40),
    orig_bytes=st.none() | st.integers(0, 2**64 - 1),
), max_size=20))
def test_commit_batch_never_fails_on_hostile_values(sqlite_store, records):
    from gateway.ingest import commit_batch

    result = commit_batch(sqlite_store, records, source="fuzz")
    assert result.stored + len(result.refused) <= len(records)
    for r in result.refused:
        assert "out of range" in r.reason or "missing" in r.reason


def test_unusable_saved_offset_means_reading_again_not_failing(sqlite_store, iot23_dir, tmp_path):
    src = iot23_dir / "CTU-Honeypot-Capture-7-1" / "conn.log.labeled"
    path = tmp_path / "conn.log"
    path.write_bytes(src.read_bytes())
    first = replay([path], session_factory=sqlite_store)
    with sqlite_store.begin() as s:
        saved = repo.load_offset(s, str(path.resolve()))
        repo.save_offset(s, saved.source, file_identity=saved.file_identity, offset=100, header="{not json")
    again = replay([path], session_factory=sqlite_store)
    assert again.records == first.records and again.stored == 0 and again.rejected_total == 0


def test_replay_into_an_in_memory_sqlite_database(iot23_dir):
    """No writer thread there: another thread would see another, empty database."""
    engine, factory = open_store("sqlite://")
    path = iot23_dir / "CTU-Honeypot-Capture-7-1" / "conn.log.labeled"
    summary = replay([path], session_factory=factory)
    with factory() as s:
        assert repo.count_flows(s) == summary.stored == len(parsed(path))
    engine.dispose()
