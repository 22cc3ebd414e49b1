"""gateway.output: data cannot drive the terminal or a spreadsheet, and tables fit the
terminal without cutting addresses or uids."""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import logging
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.output import (
    SafeFormatter,
    csv_cell,
    emit_json,
    emit_mapping,
    emit_rows,
    printable,
    progress_label,
)

ESCAPED = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
HOSTILE = [
    "[/x]",
    "[bold red]fake[/]",
    "\x1b[31mred\x1b[0m",
    "\x1b]0;retitled\x07",  # OSC: set the window title
    "\x1b[2J\x1b[H",  # clear the screen, cursor home
    "ok\rforged",
    "line\nforged line",
    "\x9b31m",  # the one-byte C1 CSI
    "\u202eevil.exe",  # right-to-left override
    "zero\u200bwidth",
    "\udcff\udcfe",  # undecodable bytes (surrogateescape)
    "=HYPERLINK(\"http://evil\")",
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "\tleading tab",
]


def _rows(values):
    return [{"uid": f"C{i:017d}", "orig": "192.168.100.103:49152", "value": v} for i, v in enumerate(values)]


def _no_control(text: str) -> bool:
    return all(ch == "\n" or unicodedata.category(ch) not in ESCAPED for ch in text)


# ---------------------------------------------------------------- printable


@pytest.mark.parametrize("text, shown", [
    ("\x1b[31mred", "\\x1b[31mred"),
    ("a\rb", "a\\x0db"),
    ("a\nb", "a\\x0ab"),
    ("\x7f\x9b", "\\x7f\\x9b"),
    ("\u202eexe", "\\u202eexe"),
    ("\udcff", "\\xff"),
    ("plain text, café, 東京 [/x]", "plain text, café, 東京 [/x]"),
])
def test_printable_escapes_what_drives_a_terminal(text, shown):
    assert printable(text) == shown


def test_printable_can_keep_line_breaks():
    assert printable("Traceback\n  \x1b[2J", keep="\n") == "Traceback\n  \\x1b[2J"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_printable_output_has_no_control_or_invisible_character(text):
    out = printable(text)
    assert all(unicodedata.category(ch) not in ESCAPED for ch in out)
    out.encode("utf-8")  # no lone surrogate left: printing cannot raise


# ---------------------------------------------------------------- CSV


@pytest.mark.parametrize("value, cell", [
    ("=1+1", "'=1+1"),
    ("+1+cmd", "'+1+cmd"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "\\x09=1"),  # control characters are escaped first: no tab reaches the cell
    ("-", "-"),  # Zeek's unset marker is not a formula
    ("-3.5", "-3.5"),  # a number written as text
    ("benign", "benign"),
    (None, ""),
    (-7, -7),
    (0.25, 0.25),
])
def test_csv_cells_that_would_start_a_formula_are_neutralised(value, cell):
    assert csv_cell(value) == cell


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_no_csv_cell_starts_a_formula(text):
    cell = csv_cell(text)
    assert _no_control(cell)
    if cell[:1] in ("=", "+", "-", "@"):
        assert cell == "-" or float(cell) == float(cell)  # only the unset marker or a number


def test_csv_output_neutralises_and_escapes_every_hostile_field():
    out = io.StringIO()
    emit_rows(_rows(HOSTILE), ["uid", "orig", "value"], fmt="csv", stream=out)
    text = out.getvalue()
    assert "\x1b" not in text and "\u202e" not in text
    cells = [r["value"] for r in csv.DictReader(io.StringIO(text))]
    assert len(cells) == len(HOSTILE)
    assert all(not c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in cells)
    assert "'=HYPERLINK(\"http://evil\")" in cells and "[/x]" in cells


# ---------------------------------------------------------------- JSON


def test_json_escapes_control_characters_losslessly():
    out = io.StringIO()
    emit_rows(_rows(HOSTILE), ["uid", "value"], fmt="json", stream=out)
    text = out.getvalue()
    assert text.isascii() and "\x1b" not in text and "\r" not in text
    assert [r["value"] for r in json.loads(text)] == HOSTILE  # nothing lost: scripts get the raw data


# ---------------------------------------------------------------- tables


def test_markup_in_data_is_printed_as_text_not_interpreted():
    out = io.StringIO()
    emit_rows(_rows(HOSTILE), ["uid", "orig", "value"], title="[/x] flows", stream=out)
    text = out.getvalue()
    assert "[/x]" in text and "[bold red]fake[/]" in text
    assert _no_control(text)
    assert "\\x1b[31mred" in text and "\\u202eevil.exe" in text


def test_emit_mapping_and_progress_labels_are_safe():
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        emit_mapping({"[/x]": "\x1b[2J", "path": "[bold]x"}, as_json=False, title="[red]")
    assert "[/x]" in out.getvalue() and "\\x1b[2J" in out.getvalue()
    from rich.text import Text

    assert Text.from_markup(progress_label("[/x]\x1b.log")).plain == "[/x]\\x1b.log"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=5), st.integers(40, 160))
def test_any_cell_text_prints_safely_at_any_width(values, width):
    out = io.StringIO()
    emit_rows(_rows(values), ["uid", "orig", "value"], title="t", stream=out, whole=("uid", "orig"))
    assert _no_control(out.getvalue())


def _query_rows(n=12):
    rows = []
    for i in range(n):
        a = ipaddress.IPv4Address(0xC0A86400 + 7 * i + 100)  # 192.168.100.x, up to 15 characters
        b = ipaddress.IPv4Address(0xCB64C800 + 13 * i + 150)  # 203.100.200.x
        rows.append({"time (UTC)": "2018-10-25 12:00:00", "uid": f"CGm6jB4dXK71ZDW{i:03d}",
                     "orig": f"{a}:{49152 + i}", "resp": f"{b}:65535", "proto": "tcp", "state": "S0",
                     "label": "C&C-HeartBeat-FileDownload", "detection": "Malicious 0.99", "feedback": None})
    return rows


QUERY_COLUMNS = ["time (UTC)", "uid", "orig", "resp", "proto", "state", "label", "detection", "feedback"]
OPTIONAL = ["detection", "time (UTC)", "label", "feedback", "proto", "state"]


def test_80_columns_keep_every_address_and_uid_whole(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    rows = _query_rows()
    out = io.StringIO()
    emit_rows(rows, QUERY_COLUMNS, title="12 flows", stream=out, whole=("uid", "orig", "resp"), optional=OPTIONAL,
              hidden_hint="--format wide shows them")
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for r in rows:
        assert r["uid"] in text and r["orig"] in text and r["resp"] in text
    assert "…" not in text
    assert "not shown for width" in text and "--format wide" in text
    assert "Malicious 0.99" in text  # the most wanted optional column still fits


def test_wide_prints_every_column_whole(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    rows = _query_rows(3)
    out = io.StringIO()
    emit_rows(rows, QUERY_COLUMNS, fmt="wide", stream=out)
    text = out.getvalue()
    assert all(c in text for c in ("time (UTC)", "label", "feedback")) and "C&C-HeartBeat-FileDownload" in text
    assert "…" not in text


def test_too_wide_for_any_table_prints_records(monkeypatch):
    """Long IPv6 endpoints cannot sit side by side in 80 columns: each row becomes a
    record, one whole value per line."""
    monkeypatch.setenv("COLUMNS", "80")
    rows = _query_rows(2)
    rows[0]["orig"] = "[2001:db8:85a3:1234:5678:8a2e:370:7334]:49152"
    rows[0]["resp"] = "[2001:db8:85a3:4321:8765:8a2e:370:7335]:443"
    out = io.StringIO()
    emit_rows(rows, QUERY_COLUMNS, stream=out, whole=("uid", "orig", "resp"), optional=OPTIONAL)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert rows[0]["orig"] in text and rows[0]["resp"] in text and rows[1]["orig"] in text
    assert "label" in text and "C&C-HeartBeat-FileDownload" in text  # nothing left out in records


# ---------------------------------------------------------------- logging


def test_log_messages_cannot_forge_lines_or_drive_the_terminal():
    fmt = SafeFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("gateway.ingest", logging.WARNING, __file__, 1, "bad line %r: %s", None, None)
    record.args = ("x", "\x1b[2J\nINFO forged: all good")
    line = fmt.format(record)
    assert "\n" not in line and "\x1b" not in line and "\\x1b[2J\\x0aINFO forged" in line
    try:
        raise ValueError("field \x1b[31m")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    text = fmt.format(record)
    assert "Traceback" in text and "\n" in text and "\x1b" not in text  # tracebacks keep their lines


def test_emit_json_is_ascii():
    out = io.StringIO()
    emit_json({"v": "\x1b]0;t\x07 é"}, out)
    assert out.getvalue().isascii()
