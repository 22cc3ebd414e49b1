"""Pure pieces of the store and ingest: row conversion, time bounds, filters, sniffing, scoring."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.commands.analyst import parse_time_bound
from gateway.flows.record import ConnRecord
from gateway.ingest import (
    file_identity,
    score_against_labels,
    sniff_kind,
)
from gateway.store.repository import (
    FLOW_INSERT_COLUMNS,
    FlowQuery,
    clean_flow_rows,
    flow_row,
    flow_rows,
    record_from_row,
    zeek_escape,
)

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
opt_int = st.none() | st.integers(min_value=0, max_value=2**62)
record_st = st.builds(
    ConnRecord,
    ts=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    uid=st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789", min_size=1, max_size=20),
    orig_h=st.ip_addresses().map(str),
    orig_p=st.integers(0, 65535),
    resp_h=st.ip_addresses().map(str),
    resp_p=st.integers(0, 65535),
    proto=st.sampled_from(["tcp", "udp", "icmp"]),
    service=st.none() | text,
    duration=st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False),
    orig_bytes=opt_int,
    resp_bytes=opt_int,
    conn_state=st.none() | st.sampled_from(["S0", "SF", "REJ", "OTH"]),
    local_orig=st.none() | st.booleans(),
    local_resp=st.none() | st.booleans(),
    missed_bytes=opt_int,
    history=st.none() | text,
    orig_pkts=opt_int,
    orig_ip_bytes=opt_int,
    resp_pkts=opt_int,
    resp_ip_bytes=opt_int,
    # A set element cannot contain the joiner (Zeek's set separator is ',').
    tunnel_parents=st.none() | st.lists(st.text(alphabet="CDEFabc123", min_size=1, max_size=8), max_size=3).map(tuple),
    ip_proto=st.none() | st.integers(0, 255),
    label=st.none() | st.sampled_from(["benign", "Malicious"]),
    detailed_label=st.none() | text,
    extra=st.lists(st.tuples(text, text), max_size=3).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(record_st)
def test_flow_row_round_trips_every_field(rec):
    row = flow_row(rec, "src", 123.0)
    assert len(row) == len(FLOW_INSERT_COLUMNS)
    mapping = dict(zip(FLOW_INSERT_COLUMNS, row))
    assert mapping["source"] == "src" and mapping["ingested_at"] == 123.0
    assert record_from_row(mapping) == rec
    assert flow_rows([rec], "src", 123.0) == [row]


def test_flow_row_is_plain_values():
    rec = ConnRecord(1.5, "C1", "10.0.0.1", 1, "10.0.0.2", 2, "tcp", tunnel_parents=("a", "b"),
                     extra=(("x", "1"),))
    row = flow_row(rec, "s", 0.0)
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in row)
    m = dict(zip(FLOW_INSERT_COLUMNS, row))
    assert m["tunnel_parents"] == "a,b"
    assert m["extra"] == '[["x", "1"]]'


@pytest.mark.parametrize(
    "text,expected",
    [
        ("30m", 10_000 - 1800),
        ("1h", 10_000 - 3600),
        ("2d", 10_000 - 172_800),
        ("1.5s", 10_000 - 1.5),
        ("1W", 10_000 - 604_800),
        ("1540469303", 1540469303.0),
        ("2018-10-25T12:08:23", 1540469303.0),
        ("2018-10-25T12:08:23Z", 1540469303.0),
        ("2018-10-25T14:08:23+02:00", 1540469303.0),
    ],
)
def test_parse_time_bound(text, expected):
    assert math.isclose(parse_time_bound(text, now=10_000.0), expected)


@pytest.mark.parametrize("bad", ["", "yesterday", "1y", "h1", "2018-13-45"])
def test_parse_time_bound_rejects_with_a_clear_message(bad):
    with pytest.raises(ValueError, match="not a time"):
        parse_time_bound(bad, now=0.0)


@given(st.text(max_size=30))
def test_parse_time_bound_never_crashes_otherwise(s):
    try:
        value = parse_time_bound(s, now=1e9)
    except ValueError:
        return
    assert isinstance(value, float)


def test_flow_query_validation():
    assert FlowQuery().limit == 100
    with pytest.raises(ValueError, match="limit"):
        FlowQuery(limit=0)
    with pytest.raises(ValueError, match="port"):
        FlowQuery(port=70000)
    with pytest.raises(ValueError, match="before since"):
        FlowQuery(since=10.0, until=5.0)
    with pytest.raises(TypeError):
        FlowQuery(10.0)  # keyword-only


@pytest.mark.parametrize(
    "head,kind",
    [
        (b"\xd4\xc3\xb2\xa1\x02\x00", "pcap"),
        (b"\xa1\xb2\xc3\xd4", "pcap"),
        (b"\x4d\x3c\xb2\xa1", "pcap"),
        (b"\x0a\x0d\x0d\x0a\x00", "pcap"),
        (b"\x1f\x8b\x08\x00", "gzip"),
        (b"#separator \\x09\n", "zeek"),
        (b'{"ts":1}', "zeek"),
        (b"", "zeek"),
    ],
)
def test_sniff_kind(head, kind):
    assert sniff_kind(head) == kind


def test_file_identity_depends_on_the_first_bytes_only():
    a = file_identity(b"x" * 70_000)
    assert a == file_identity(b"x" * 65_536 + b"y")
    assert a != file_identity(b"y" + b"x" * 69_999)


def _rec(label, detailed=None):
    return ConnRecord(0.0, "C", "a", 1, "b", 2, "tcp", label=label, detailed_label=detailed)


def test_score_against_labels_counts_only_labelled_records():
    records = [_rec("benign"), _rec("Malicious", "C&C"), _rec(None), _rec("Malicious", "DDoS")]
    verdicts = [("benign", 0.1), ("C&C", 0.9), ("benign", 0.9), ("Okiru", 0.2)]
    labelled, correct, label_correct = score_against_labels(records, verdicts)
    assert labelled == 3
    assert correct == 2  # the DDoS flow scored 0.2: wrong
    assert label_correct == 2  # "benign" and "c&c" match; "Okiru" != "DDoS"


def test_score_against_labels_needs_one_verdict_per_record():
    with pytest.raises(ValueError):
        score_against_labels([_rec("benign")], [])


def test_zeek_escape_writes_nul_and_undecodable_bytes_like_zeek():
    assert zeek_escape("plain") == "plain"
    assert zeek_escape("a\x00b") == "a\\x00b"
    raw = b"S\xffh\x80".decode("utf-8", "surrogateescape")
    assert zeek_escape(raw) == "S\\xffh\\x80"


def test_clean_flow_rows_escapes_text_and_refuses_out_of_range_integers():
    ok = ConnRecord(1.0, "C1", "10.0.0.1", 1, "10.0.0.2", 2, "tcp", history="S\x00")
    big = ConnRecord(1.0, "C2", "10.0.0.1", 1, "10.0.0.2", 2, "tcp", orig_bytes=2**64 - 1)
    port = ConnRecord(1.0, "C3", "10.0.0.1", 2**40, "10.0.0.2", 2, "tcp")
    no_ts = ConnRecord(None, "C4", "10.0.0.1", 1, "10.0.0.2", 2, "tcp")
    rows, refused = clean_flow_rows(flow_rows([ok, big, port, no_ts], "s", 0.0))
    assert rows[1] is None and rows[2] is None and rows[3] is None
    assert dict(zip(FLOW_INSERT_COLUMNS, rows[0]))["history"] == "S\\x00"
    assert refused == [("C2", "orig_bytes out of range for the database"),
                       ("C3", "orig_p out of range for the database"),
                       ("C4", "ts missing")]


def test_batch_writer_commits_in_order_and_hands_errors_back():
    from gateway.ingest import _BatchWriter

    done = []
    writer = _BatchWriter(lambda n: done.append(n))
    for n in range(50):
        writer.put(n)
    writer.close()
    assert done == list(range(50))

    def commit(n):
        if n == 3:
            raise OSError("disk full")
        done.append(n)

    for _ in range(20):  # the error may surface at any later put, or at close
        done.clear()
        writer = _BatchWriter(commit)
        with pytest.raises(OSError, match="disk full"):
            try:
                for n in range(100):
                    writer.put(n)
            finally:
                writer.close()
        assert done == [0, 1, 2]  # nothing after the failed batch was committed
