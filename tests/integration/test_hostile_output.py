"""Hostile Zeek fields through the analyst commands, end to end on a real SQLite store:
Rich markup, terminal escape sequences, bidi overrides, undecodable bytes and
spreadsheet formulas in a conn.log reach ``fedgate query`` (table, wide, CSV, JSON) and
``fedgate stats`` as inert text -- and ``fedgate query`` in an 80-column terminal shows
every address and uid whole."""

from __future__ import annotations

import csv
import io
import json
import unicodedata

import pytest
from click.testing import CliRunner

from gateway.cli import main

pytestmark = pytest.mark.integration

# (what the conn.log holds, Zeek-escaped as Zeek writes it; what the store holds)
HOSTILE = [
    ("[/x]", "[/x]"),
    ("[bold red]fake alert[/]", "[bold red]fake alert[/]"),
    ("\\x1b[31mRED\\x1b]0;pwned\\x07", "\x1b[31mRED\x1b]0;pwned\x07"),
    ("ok\\x0d\\x1b[2Kforged", "ok\r\x1b[2Kforged"),
    ("\\x1b[2J\\x1b[H", "\x1b[2J\x1b[H"),
    ("=HYPERLINK(\"http://evil\")", "=HYPERLINK(\"http://evil\")"),
    ("@SUM(1+1)", "@SUM(1+1)"),
    ("+1+cmd|' /C calc'!A0", "+1+cmd|' /C calc'!A0"),
    ("\\xe2\\x80\\xaeexe.txt", "\u202eexe.txt"),
    ("\\xff\\xfe", "\\xff\\xfe"),  # bytes that are not UTF-8: ingest stores Zeek's escapes as text
]
CONTROL = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")


def run(*args, columns: int = 80):
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": str(columns)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _inert(text: str) -> bool:
    """No control, format or undecodable character but line breaks (and CSV's CRLF)."""
    return all(ch in "\n\r" or unicodedata.category(ch) not in CONTROL for ch in text)


@pytest.fixture()
def hostile_db(tmp_path, iot23_dir):
    """A labelled IoT-23 log whose service, history and detailed-label fields are hostile."""
    src = (iot23_dir / "CTU-Honeypot-Capture-7-1" / "conn.log.labeled").read_text().splitlines()
    header = [ln for ln in src if ln.startswith("#")]
    body = [ln for ln in src if not ln.startswith("#")][: len(HOSTILE)]
    lines = []
    for i, (raw, _) in enumerate(HOSTILE):
        f = body[i].split("\t")
        f[1] = f"CHostile{i:02d}"
        f[7] = raw  # service
        f[15] = raw  # history
        tail = f[-1].split("   ")  # tunnel_parents   label   detailed-label
        tail[-1] = raw
        f[-1] = "   ".join(tail)
        lines.append("\t".join(f))
    log = tmp_path / "conn.log.labeled"
    log.write_text("\n".join(header + lines) + "\n")
    db = f"sqlite:///{tmp_path / 'h.db'}"
    out = json.loads(run("replay", "--no-classify", "--db", db, "--json", str(log)))
    assert out["stored"] == len(HOSTILE) and out["rejected"] == 0
    return db


def test_hostile_fields_are_stored_as_they_were(hostile_db):
    rows = json.loads(run("query", "--db", hostile_db, "--format", "json"))
    by_uid = {r["uid"]: r for r in rows}
    for i, (_, stored) in enumerate(HOSTILE):
        assert by_uid[f"CHostile{i:02d}"]["detailed_label"] == stored  # JSON is lossless


@pytest.mark.parametrize("fmt", ["table", "wide"])
def test_query_table_prints_hostile_fields_as_inert_text(hostile_db, fmt):
    out = run("query", "--db", hostile_db, "--format", fmt, columns=200)
    assert _inert(out) and "\r" not in out
    assert "[/x]" in out and "[bold red]fake alert[/]" in out  # markup shown, not applied (nor crashing)
    assert "\\x1b[31mRED\\x1b]0;pwned\\x07" in out and "\\u202eexe.txt" in out and "\\xff\\xfe" in out
    narrow = run("query", "--db", hostile_db, "--format", fmt, columns=80)
    assert _inert(narrow) and "\r" not in narrow


def test_query_csv_neutralises_formulas_and_escapes_controls(hostile_db):
    text = run("query", "--db", hostile_db, "--format", "csv")
    assert _inert(text) and "\x1b" not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(HOSTILE)
    for column in ("service", "detailed_label"):
        cells = {r[column] for r in rows}
        assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in cells if c != "-")
        assert {"'=HYPERLINK(\"http://evil\")", "'@SUM(1+1)", "'+1+cmd|' /C calc'!A0", "[/x]"} <= cells


def test_query_json_escapes_every_control_character(hostile_db):
    text = run("query", "--db", hostile_db, "--format", "json")
    assert text.isascii() and "\x1b" not in text and "\\u001b[31mRED" in text


def test_stats_prints_hostile_labels_as_inert_text(hostile_db):
    out = run("stats", "--db", hostile_db, columns=120)
    assert _inert(out) and "\r" not in out
    assert "[/x]" in out and "\\x1b[2J\\x1b[H" in out and "=HYPERLINK" in out
    data = json.loads(run("stats", "--db", hostile_db, "--json"))
    assert {r["detailed_label"] for r in data["by_label"]} == {stored for _, stored in HOSTILE}


def test_query_in_80_columns_shows_whole_addresses_and_uids(tmp_path, iot23_dir):
    """Real IoT-23 flows classified by the bundled model: at 80 columns every line fits,
    and every uid and IPv4 address:port of the page is there whole (never ``192.1…``)."""
    db = f"sqlite:///{tmp_path / 'q.db'}"
    log = iot23_dir / "CTU-Malware-Capture-8-1" / "conn.log.labeled"
    out = json.loads(run("replay", "--db", db, "--json", str(log)))
    assert out["detections"] == out["stored"] > 0
    rows = json.loads(run("query", "--db", db, "--limit", "60", "--format", "json"))
    table = run("query", "--db", db, "--limit", "60")
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in table
    for r in rows:
        line = next((ln for ln in lines if r["uid"] in ln), None)
        assert line is not None, f"uid {r['uid']} not whole in the table"
        assert f"{r['orig_h']}:{r['orig_p']}" in line and f"{r['resp_h']}:{r['resp_p']}" in line
    assert "detection" in lines[1]  # the verdict column still fits beside them
    assert "--format wide" in " ".join(table.split())  # and the table says how to see the rest


@pytest.mark.parametrize("verbose", [False, True])
def test_status_page_logs_libraries_at_warning_unless_verbose(tmp_path, verbose):
    """``python -m cloud_aggregator.web`` on a fresh database: Alembic's "Context impl" /
    "Running upgrade" INFO lines appear only with -v."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cloud_aggregator.web", "--database", str(tmp_path / "agg.db"),
           "--listen", f"127.0.0.1:{port}", *(["-v"] if verbose else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        line = proc.stdout.readline()
        while "status page on" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "status page on" in line, proc.stderr.read() if proc.poll() is not None else line
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    alembic_lines = [ln for ln in err.splitlines() if "alembic" in ln]
    if verbose:
        assert any("INFO" in ln for ln in alembic_lines), err
    else:
        assert not alembic_lines and " INFO " not in err, err
