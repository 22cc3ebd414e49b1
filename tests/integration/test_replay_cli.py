"""The analyst commands end to end on a real SQLite file: replay, query, stats, feedback."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.flows.zeek import read_log

pytestmark = pytest.mark.integration

SCENARIO = "CTU-Malware-Capture-20-1"  # 3,209 flows, 16 of them labelled C&C-Torii


@pytest.fixture()
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'cli.db'}"


def run(*args, ok=True):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture()
def loaded(db, iot23_dir):
    path = iot23_dir / SCENARIO / "conn.log.labeled"
    out = json.loads(run("replay", "--no-classify", "--db", db, "--json", str(path)).stdout)
    records, _ = read_log(path)
    assert out["records"] == out["stored"] == len(records)
    return records


@pytest.mark.parametrize("command", ["replay", "query", "stats", "feedback"])
def test_help_has_examples(command):
    out = run(command, "--help").output
    assert "Examples:" in out and f"fedgate {command}" in out


def test_replay_table_and_rerun(db, iot23_dir, loaded):
    path = iot23_dir / SCENARIO / "conn.log.labeled"
    out = run("replay", "--no-classify", "--db", db, str(path)).stdout
    assert "records_per_s" in out and "files" in out
    again = json.loads(run("replay", "--no-classify", "--db", db, "--json", "--from-start", str(path)).stdout)
    assert again["stored"] == 0 and again["duplicates"] == len(loaded)


def test_query_filters_and_formats(db, loaded):
    malicious = [r for r in loaded if r.is_malicious]
    rows = json.loads(run("query", "--db", db, "--label", "malicious", "--limit", "100000", "--format", "json").stdout)
    assert len(rows) == len(malicious) > 0
    assert {r["uid"] for r in rows} == {r.uid for r in malicious}
    rows = json.loads(run("query", "--db", db, "--label", "c&c-torii", "--format", "json").stdout)
    assert len(rows) == sum(r.detailed_label == "C&C-Torii" for r in loaded) == 16

    host = loaded[0].orig_h
    expect = {r.uid for r in loaded if host in (r.orig_h, r.resp_h)}
    rows = json.loads(run("query", "--db", db, "--host", host, "--limit", "100000", "--format", "json").stdout)
    assert {r["uid"] for r in rows} == expect

    ts = sorted(r.ts for r in loaded)
    lo, hi = ts[len(ts) // 4], ts[3 * len(ts) // 4]
    rows = json.loads(run("query", "--db", db, "--since", str(lo), "--until", str(hi), "--limit", "100000",
                          "--format", "json").stdout)
    assert len(rows) == sum(lo <= t < hi for t in ts)

    text = run("query", "--db", db, "--port", "53", "--limit", "5", "--format", "csv").stdout
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert 0 < len(parsed) <= 5 and all("53" in (p["orig_p"], p["resp_p"]) for p in parsed)

    one = json.loads(run("query", "--db", db, "--uid", loaded[5].uid, "--format", "json").stdout)
    assert [r["uid"] for r in one] == [loaded[5].uid]

    table = run("query", "--db", db, "--limit", "3").stdout
    assert "uid" in table and "3 flows" in table


def test_query_rejects_bad_options(db):
    bad = run("query", "--db", db, "--since", "yesterday", ok=False)
    assert bad.exit_code == 2 and "not a time" in bad.output
    bad = run("query", "--db", db, "--since", "1h", "--until", "2h", ok=False)
    assert bad.exit_code == 2 and "until is before since" in bad.output


def test_feedback_then_query_and_stats(db, loaded):
    uid = loaded[0].uid
    out = json.loads(run("feedback", uid, "Malicious", "--note", "beaconing", "--db", db, "--json").stdout)
    assert out["uid"] == uid and out["label"] == "Malicious" and out["note"] == "beaconing"
    rows = json.loads(run("query", "--db", db, "--host", loaded[0].orig_h, "--limit", "100000", "--format", "json").stdout)
    assert [r["feedback"] for r in rows if r["uid"] == uid] == ["Malicious"]

    missing = run("feedback", "Cnosuchuid", "benign", "--db", db, ok=False)
    assert missing.exit_code == 1 and "no stored flow has uid 'Cnosuchuid'" in missing.output

    stats = json.loads(run("stats", "--db", db, "--json", "--top", "3").stdout)
    assert stats["totals"]["flows"] == len(loaded) and stats["totals"]["feedback"] == 1
    assert sum(r["flows"] for r in stats["by_label"]) == len(loaded)
    assert len(stats["top_talkers"]) <= 3
    assert "flows by label" in run("stats", "--db", db).stdout


def test_stats_prune_days(db, loaded):
    kept = json.loads(run("stats", "--db", db, "--json", "--prune-days", "1").stdout)
    assert kept["pruned"]["flows"] == 0 and kept["totals"]["flows"] == len(loaded)
    gone = json.loads(run("stats", "--db", db, "--json", "--prune-days", "0").stdout)
    assert gone["pruned"]["flows"] == len(loaded) and gone["totals"]["flows"] == 0


def test_strict_exits_1_naming_file_and_line(db, tmp_path, iot23_dir):
    lines = (iot23_dir / SCENARIO / "conn.log.labeled").read_bytes().splitlines(keepends=True)
    bad = tmp_path / "bad.log"
    bad.write_bytes(b"".join(lines[:12]) + b"not a flow line\n" + b"".join(lines[12:]))
    result = run("replay", "--strict", "--no-classify", "--db", db, str(bad), ok=False)
    assert result.exit_code == 1
    assert "bad.log:13:" in result.stderr and "Traceback" not in result.output
    lenient = json.loads(run("replay", "--no-classify", "--db", db, "--json", str(bad)).stdout)
    assert lenient["rejected"] == 1
    assert lenient["stored"] == sum(not ln.startswith(b"#") for ln in lines)


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://postgres@127.0.0.1:1/test", "sqlite:////no/such/dir/fedgate.db"],
)
def test_unreachable_database_is_one_clear_line(url, iot23_dir):
    """What the user sees: one message and exit status 2, no traceback."""
    path = iot23_dir / SCENARIO / "conn.log.labeled"
    # a real process once, so nothing but the message reaches the terminal
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "replay", "--no-classify", "--db", url, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "not usable" in lines[0] or "does not exist" in lines[0]
    for args in (["query"], ["stats"], ["feedback", "Cx", "benign"]):
        result = run(*args, "--db", url, ok=False)
        assert result.exit_code == 2 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1


def test_database_refusing_writes_is_one_clear_line(db, iot23_dir):
    from sqlalchemy import text

    from gateway.store.db import open_store

    engine, _ = open_store(db)
    with engine.begin() as conn:  # a real write failure, like a full disk
        conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON flows BEGIN SELECT RAISE(ABORT, 'disk full'); END"))
    engine.dispose()
    result = run("replay", "--no-classify", "--db", db, str(iot23_dir / SCENARIO / "conn.log.labeled"), ok=False)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: database sqlite:") and "disk full" in result.stderr
    assert result.stderr.count("\n") == 1
