"""The store against real databases: a SQLite file and a PostgreSQL schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from gateway.flows.record import ConnRecord
from gateway.store import repository as repo
from gateway.store.db import (
    StoreError,
    current_revision,
    head_revision,
    open_store,
    table_names,
    upgrade_to_head,
)
from gateway.store.models import Base

from store_backends import store_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

DAY = 86400.0


def rec(uid, ts=1000.0, orig_h="10.0.0.1", resp_h="10.0.0.2", resp_p=80, label=None, detailed=None, **kw):
    return ConnRecord(ts, uid, orig_h, 40000, resp_h, resp_p, "tcp", label=label, detailed_label=detailed,
                      orig_bytes=kw.pop("orig_bytes", 10), resp_bytes=kw.pop("resp_bytes", 20), **kw)


@pytest.fixture()
def store(store_url):  # noqa: F811
    engine, factory = open_store(store_url)
    yield engine, factory
    engine.dispose()


def test_migrations_build_the_models_schema_from_empty(store):
    engine, _ = store
    assert current_revision(engine) == head_revision()
    assert {"flows", "detections", "feedback", "model_versions", "ingest_offsets", "outbox"} <= table_names(engine)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []
    upgrade_to_head(engine)  # a second upgrade is a no-op
    assert current_revision(engine) == head_revision()


def test_insert_flows_is_idempotent_and_counts_new_rows(store):
    _, factory = store
    # big enough for PostgreSQL's COPY path (repo.COPY_THRESHOLD), with a repeat inside the batch
    batch = [rec(f"C{i}", ts=1000.0 + i) for i in range(1500)]
    with factory.begin() as s:
        assert repo.insert_flows(s, batch + batch[:5], source="a") == 1500
        # a second batch in the same transaction
        assert repo.insert_flows(s, batch[:1200] + [rec("Cnew", ts=9999.0)], source="a") == 1
    with factory.begin() as s:
        assert repo.insert_flows(s, batch[:100], source="a") == 0
        # the same uid under another source is another flow
        assert repo.insert_flows(s, batch[:3], source="b") == 3
    with factory() as s:
        assert repo.count_flows(s) == 1504
        assert repo.count_flows(s, source="a") == 1501
        back = repo.load_records(s, source="a", limit=2)
    assert back == batch[:2]


def test_rolled_back_batch_leaves_nothing(store):
    _, factory = store
    with pytest.raises(RuntimeError):
        with factory.begin() as s:
            repo.insert_flows(s, [rec("C1"), rec("C2")], source="a")
            repo.save_offset(s, "a", file_identity="f", offset=99)
            raise RuntimeError("crash before commit")
    with factory() as s:
        assert repo.count_flows(s) == 0
        assert repo.load_offset(s, "a") is None


def test_offsets_save_and_load(store):
    _, factory = store
    with factory.begin() as s:
        repo.save_offset(s, "src", file_identity="id1", offset=10, header='{"a":1}')
    with factory.begin() as s:
        repo.save_offset(s, "src", file_identity="id1", offset=2**40, header=None)
    with factory() as s:
        saved = repo.load_offset(s, "src")
    assert (saved.file_identity, saved.offset, saved.header) == ("id1", 2**40, None)


def test_detections_feedback_and_query_filters(store):
    _, factory = store
    with factory.begin() as s:
        repo.insert_flows(
            s,
            [
                rec("Cb1", ts=100.0, label="benign"),
                rec("Cm1", ts=200.0, orig_h="10.0.0.9", resp_p=23, label="Malicious", detailed="C&C"),
                rec("Cm2", ts=300.0, orig_h="10.0.0.9", resp_h="8.8.8.8", resp_p=53, label="Malicious", detailed="DDoS"),
                rec("Cu", ts=400.0),
            ],
            source="gw",
        )
        assert repo.insert_detections(
            s, [("gw", "Cb1", "benign", 0.05), ("gw", "Cm1", "C&C", 0.97), ("gw", "Cm2", "DDoS", 0.6)],
            model_version="v1",
        ) == 3
        # same model version again: skipped; a new version adds rows and becomes "latest"
        assert repo.insert_detections(s, [("gw", "Cb1", "benign", 0.05)], model_version="v1") == 0
        assert repo.insert_detections(s, [("gw", "Cm2", "Okiru", 0.99)], model_version="v2") == 1
        repo.add_feedback(s, "Cb1", "Malicious", note="actually a scan")
        repo.add_feedback(s, "Cb1", "benign", note="changed my mind")

    def uids(**kw):
        with factory() as s:
            return [r["uid"] for r in repo.query_flows(s, repo.FlowQuery(**kw))]

    assert uids() == ["Cu", "Cm2", "Cm1", "Cb1"]  # newest first
    assert uids(since=200.0, until=400.0) == ["Cm2", "Cm1"]
    assert uids(host="10.0.0.9") == ["Cm2", "Cm1"]
    assert uids(host="8.8.8.8") == ["Cm2"]
    assert uids(port=23) == ["Cm1"]
    assert uids(label="c&c") == ["Cm1"]
    assert uids(label="okiru") == ["Cm2"]  # latest detection's label
    assert uids(label="MALICIOUS") == ["Cm2", "Cm1"]
    assert uids(min_score=0.9) == ["Cm2", "Cm1"]
    assert uids(limit=1) == ["Cu"]
    assert uids(source="other") == []
    assert uids(uid="Cm1") == ["Cm1"]
    with factory() as s:
        row = repo.query_flows(s, repo.FlowQuery(host="8.8.8.8"))[0]
        assert (row["detection"], row["score"], row["model_version"]) == ("Okiru", 0.99, "v2")
        cb1 = repo.query_flows(s, repo.FlowQuery(until=150.0))[0]
        assert cb1["feedback"] == "benign"
        assert [f.label for f in repo.feedback_for(s, "Cb1")] == ["Malicious", "benign"]
        pairs = repo.labelled_feedback(s)
        assert [(r.uid, lab) for r, lab in pairs] == [("Cb1", "benign")]


def test_labelled_data_key_moves_with_training_data_only(store):
    _, factory = store
    with factory() as s:
        assert repo.labelled_data_key(s) == (0, 0, 0)
    with factory.begin() as s:
        repo.insert_flows(s, [rec("L1", label="benign"), rec("L2", label="Malicious", detailed="DDoS")], source="g")
    with factory() as s:
        first = repo.labelled_data_key(s)
    assert first == (2, 0, 0)
    with factory.begin() as s:  # live, unlabelled flows are not training data
        repo.insert_flows(s, [rec(f"U{i}", ts=2000.0 + i) for i in range(5)], source="g")
    with factory() as s:
        assert repo.labelled_data_key(s) == first
    with factory.begin() as s:  # an analyst label, then a revised one on the same flow
        repo.add_feedback(s, "U0", "Malicious")
    with factory() as s:
        after_one = repo.labelled_data_key(s)
    with factory.begin() as s:
        repo.add_feedback(s, "U0", "benign")
    with factory() as s:
        after_two = repo.labelled_data_key(s)
    assert after_one[:2] == (2, 1) and after_two[:2] == (2, 2) and after_two[2] > after_one[2] > 0


def test_feedback_errors(store):
    _, factory = store
    with factory.begin() as s:
        repo.insert_flows(s, [rec("Cx")], source="a")
        repo.insert_flows(s, [rec("Cx")], source="b")
    with factory.begin() as s:
        with pytest.raises(repo.FlowNotFound, match="no stored flow"):
            repo.add_feedback(s, "Cnope", "benign")
        with pytest.raises(repo.AmbiguousFlow, match="--source"):
            repo.add_feedback(s, "Cx", "benign")
        with pytest.raises(ValueError, match="empty"):
            repo.add_feedback(s, "Cx", "  ", source="a")
        fb = repo.add_feedback(s, "Cx", "benign", source="b")
        assert fb.source == "b"


def test_stats(store):
    _, factory = store
    with factory.begin() as s:
        repo.insert_flows(
            s,
            [rec("A1", orig_h="10.0.0.9", label="Malicious", detailed="C&C", orig_bytes=100, resp_bytes=None),
             rec("A2", orig_h="10.0.0.9", resp_h="10.0.0.3", label="Malicious", detailed="C&C", orig_bytes=1, resp_bytes=2),
             rec("A3", orig_h="10.0.0.1", label="benign")],
            source="s1",
        )
        repo.insert_flows(s, [rec("B1", ts=5.0, orig_h="10.0.0.5")], source="s2")
        repo.save_offset(s, "s1", file_identity="f", offset=1234)
        repo.insert_detections(s, [("s1", "A1", "C&C", 0.8), ("s1", "A2", "C&C", 0.6)], model_version="v1")
        repo.outbox_add(s, "t", b"x")
    with factory() as s:
        st = repo.store_stats(s, top=1)
    assert st["totals"] == {"flows": 4, "detections": 2, "feedback": 0, "outbox_pending": 1}
    by_label = {(r["label"], r["detailed_label"]): r["flows"] for r in st["by_label"]}
    assert by_label == {("Malicious", "C&C"): 2, ("benign", None): 1, (None, None): 1}
    assert st["by_detection"] == [{"model_version": "v1", "label": "C&C", "detections": 2, "mean_score": pytest.approx(0.7)}]
    assert st["top_talkers"] == [{"host": "10.0.0.9", "flows": 2, "bytes": 103, "peers": 2}]
    src = {r["source"]: r for r in st["per_source"]}
    assert src["s1"]["flows"] == 3 and src["s1"]["labelled_malicious"] == 2 and src["s1"]["offset"] == 1234
    assert src["s2"]["first_ts"] == 5.0 and src["s2"]["offset"] is None


def test_prune_deletes_old_flows_and_their_detections_only(store):
    engine, factory = store
    now = 1_000_000.0
    with factory.begin() as s:
        repo.insert_flows(s, [rec("Old1"), rec("Old2")], source="a", ingested_at=now - 10 * DAY)
        repo.insert_flows(s, [rec("New1")], source="a", ingested_at=now - 1 * DAY)
        repo.insert_detections(s, [("a", "Old1", "benign", 0.1), ("a", "New1", "benign", 0.1)], model_version="v")
        repo.add_feedback(s, "Old1", "benign")
        acked = repo.outbox_add(s, "t", b"1")
        repo.outbox_mark_acked(s, acked, at=now - 10 * DAY)
        repo.outbox_add(s, "t", b"2")  # pending: never pruned
    with factory.begin() as s:
        deleted = repo.prune(s, older_than_days=7, now=now)
    assert deleted == {"flows": 2, "detections": 1, "outbox": 1}
    with factory() as s:
        assert [r.uid for r in repo.load_records(s)] == ["New1"]
        assert repo.store_stats(s)["totals"] == {"flows": 1, "detections": 1, "feedback": 1, "outbox_pending": 1}
    with factory.begin() as s:
        with pytest.raises(ValueError):
            repo.prune(s, older_than_days=-1)


def test_outbox_lifecycle(store):
    _, factory = store
    with factory.begin() as s:
        a = repo.outbox_add(s, "fedgate/v1/gw/g1/update", b"\x00\x01" * 1000, qos=1)
        b = repo.outbox_add(s, "fedgate/v1/gw/g1/status", b"{}", qos=1, retain=True)
        with pytest.raises(ValueError):
            repo.outbox_add(s, "t", b"", qos=3)
    with factory.begin() as s:
        assert [m.id for m in repo.outbox_pending(s)] == [a, b]
        repo.outbox_mark_attempt(s, a, error="disconnected")
        assert repo.outbox_mark_acked(s, b) is True
        assert repo.outbox_mark_acked(s, b) is False
    with factory() as s:
        (m,) = repo.outbox_pending(s)
        assert (m.id, m.attempts, m.last_error, m.payload) == (a, 1, "disconnected", b"\x00\x01" * 1000)


def test_model_versions(store):
    _, factory = store
    with factory.begin() as s:
        repo.register_model_version(s, "v1", path="/m/v1", metrics={"f1": 0.9}, activate=True)
        repo.register_model_version(s, "v2", parent="v1", metrics={"f1": 0.95}, activate=True)
    with factory() as s:
        mv = repo.active_model_version(s)
        assert (mv.version, mv.parent, mv.metrics) == ("v2", "v1", {"f1": 0.95})


def test_sqlite_is_in_wal_mode(tmp_path):
    engine, _ = open_store(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


@pytest.mark.parametrize(
    "url,pattern",
    [
        ("postgresql+psycopg://postgres@127.0.0.1:1/test", "database postgresql\\+psycopg://postgres@127.0.0.1:1/test is not usable"),
        ("sqlite:////nonexistent-dir/x/fedgate.db", "directory /nonexistent-dir/x does not exist"),
        ("nosuchdb://x", "cannot use nosuchdb://x"),
        ("not a url", "not a database URL"),
    ],
)
def test_unreachable_database_gives_one_store_error(url, pattern):
    with pytest.raises(StoreError, match=pattern):
        open_store(url)


def test_unwritable_sqlite_file_gives_store_error(tmp_path):
    path = tmp_path / "ro.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(StoreError, match="is not usable"):
        open_store(f"sqlite:///{path}")


def test_portable_insert_ignore_fallback(tmp_path):
    """The path for dialects without an insert-or-ignore form, exercised on SQLite."""
    engine, factory = open_store(f"sqlite:///{tmp_path / 'portable.db'}")
    rows = repo.flow_rows([rec("P1"), rec("P2"), rec("P1")], "src", 1.0)
    with factory.begin() as s:
        assert repo._portable_insert_ignore(s, "flows", repo.FLOW_INSERT_COLUMNS, ("uid", "source"), rows) == 2
        assert repo._portable_insert_ignore(s, "flows", repo.FLOW_INSERT_COLUMNS, ("uid", "source"), rows) == 0
    with factory() as s:
        assert sorted(r.uid for r in repo.load_records(s)) == ["P1", "P2"]
    engine.dispose()


def test_processes_racing_to_create_a_fresh_store_all_succeed(tmp_path):
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'race.db'}"
    code = "import sys; from gateway.store.db import open_store; e, _ = open_store(sys.argv[1]); e.dispose()"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    engine, _ = open_store(url)
    assert current_revision(engine) == head_revision()
    engine.dispose()
