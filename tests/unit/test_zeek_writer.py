"""The Zeek TSV writer: byte-identical round trips, IoT-23 records equal, formatting."""

from __future__ import annotations

import io
import re

import pytest

from gateway.flows.record import ConnRecord
from gateway.flows.zeek import LogHeader, ZeekTsvWriter, read_log, to_tsv_bytes, write_tsv
from test_zeek_parser import HEADER, IOT23_HEADER, IOT23_LINE, LINE_A, LINE_B

STAMP_LINE = re.compile(rb"^#(open|close)[\t ].*$", re.M)


def without_stamps(data: bytes) -> bytes:
    return STAMP_LINE.sub(b"#stamp", data)


def round_trip(data: bytes) -> bytes:
    records, parser = read_log(data)
    assert parser.rejected == 0
    return to_tsv_bytes(records, header=parser.header)


def test_zeek_samples_round_trip_byte_identical(fixtures_dir):
    paths = sorted((fixtures_dir / "zeek-samples").glob("*/conn.log"))
    assert len(paths) == 6
    for path in paths:
        raw = path.read_bytes()
        banner, _, body = raw.partition(b"\n")
        assert banner.startswith(b"### BTest")
        # BTest masks ts; put a real one back so that the lines are real records.
        body = body.replace(b"XXXXXXXXXX.XXXXXX", b"1300475167.096535")
        assert without_stamps(round_trip(body)) == without_stamps(body), path


# A realistic Zeek 6 conn.log: local_orig/local_resp, several services, a tunnel set with
# two uids, an escaped string, IPv6, unset and (empty) values, a ts/duration with
# trailing zeros, and a column Zeek adds with policy scripts (community_id).
REALISTIC = (
    "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n#path\tconn\n"
    "#open\t2026-11-24-10-00-00\n"
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\tduration"
    "\torig_bytes\tresp_bytes\tconn_state\tlocal_orig\tlocal_resp\tmissed_bytes\thistory"
    "\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\ttunnel_parents\tip_proto\tcommunity_id\n"
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount\tstring"
    "\tbool\tbool\tcount\tstring\tcount\tcount\tcount\tcount\tset[string]\tcount\tstring\n"
    "1700000000.100000\tC1\t192.168.1.10\t51234\t93.184.216.34\t443\ttcp\tssl,http\t12.500000"
    "\t1024\t65536\tSF\tT\tF\t0\tShADadFf\t30\t2600\t50\t68000\t-\t6\t1:abc=\n"
    "1700000001.000000\tC2\t2001:db8::1\t5353\tff02::fb\t5353\tudp\tdns\t-\t-\t-\tS0\tT\tF\t0"
    "\tD\t1\t120\t0\t0\tCx1,Cx2\t17\t1:def=\n"
    "1700000002.123456\tC3\t10.0.0.1\t8\t10.0.0.2\t0\ticmp\t-\t0.000001\t0\t0\tOTH\tT\tT\t0"
    "\t-\t2\t56\t2\t56\t(empty)\t1\t-\n"
    "1700000003.000010\tC4\t10.0.0.1\t40000\t10.0.0.3\t21\ttcp\tftp\\x09data\t3600.000000\t5"
    "\t0\tS1\tF\tF\t1460\tSh\\x5cA\t3\t160\t1\t44\t-\t6\t1:ghi=\n"
    "#close\t2026-11-24-11-00-00\n"
)


def test_realistic_log_round_trip_byte_identical():
    data = REALISTIC.encode()
    out = round_trip(data)
    assert without_stamps(out) == without_stamps(data)
    assert out.split(b"\n")[:-2] == data.split(b"\n")[:-2]  # the header's #open is kept too
    records, _ = read_log(data)
    assert records[3].service == "ftp\tdata" and records[3].history == "Sh\\A"
    assert records[1].tunnel_parents == ("Cx1", "Cx2")
    assert records[0].extra == (("community_id", "1:abc="),)


def test_iot23_round_trip_records_equal(iot23_dir):
    files = sorted(iot23_dir.glob("*/conn.log.labeled"))
    assert len(files) == 7
    for path in files:
        records, parser = read_log(path)
        assert parser.rejected == 0
        out = to_tsv_bytes(records, header=parser.header)
        again, parser2 = read_log(out)
        assert parser2.rejected == 0
        assert again == records, path
        assert parser2.header == parser.header


def test_iot23_layout_is_written_back():
    data = (IOT23_HEADER + IOT23_LINE + "#close\t2018-10-25-12-08-23\n").encode()
    assert without_stamps(round_trip(data)) == without_stamps(data)


def test_default_header_follows_the_records():
    plain, _ = read_log((HEADER + LINE_A).encode())
    labelled, _ = read_log((IOT23_HEADER + IOT23_LINE).encode())
    assert b"\tip_proto\n" in to_tsv_bytes(plain)
    assert b"tunnel_parents   label   detailed-label\n" in to_tsv_bytes(labelled)


def test_formatting_rules():
    rec = ConnRecord(
        ts=1.5, uid="-", orig_h="10.0.0.1", orig_p=1, resp_h="10.0.0.2", resp_p=2,
        proto="tcp", service="", duration=2.0, history="a\tb", tunnel_parents=(),
        local_orig=True, orig_bytes=0,
    )  # fmt: skip
    out = to_tsv_bytes([rec], header=LogHeader.zeek_conn(), open_stamp="o", close_stamp="c")
    line = out.decode().splitlines()[8]
    fields = line.split("\t")
    assert fields[0] == "1.500000" and fields[8] == "2.000000"  # time/interval: 6 decimals
    assert fields[1] == "\\x2d"  # a real "-" is escaped, never confused with unset
    assert fields[7] == "(empty)"  # an empty string
    assert fields[15] == "a\\x09b"  # the separator inside a value
    assert fields[20] == "(empty)"  # an empty set
    assert fields[12:14] == ["T", "-"] and fields[9:11] == ["0", "-"]
    assert out.decode().splitlines()[5] == "#open\to"
    assert out.decode().splitlines()[-1] == "#close\tc"
    (back,), _ = read_log(out)
    assert back == rec


def test_stamps_default_to_now_in_zeek_format():
    buf = io.BytesIO()
    with ZeekTsvWriter(buf) as writer:
        writer.write([])
    text = buf.getvalue().decode()
    assert re.search(r"^#open\t\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d$", text, re.M)
    assert re.search(r"^#close\t\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d$", text, re.M)


def test_writer_streams_in_several_calls():
    records, parser = read_log((HEADER + LINE_A + LINE_B).encode())
    buf = io.BytesIO()
    writer = ZeekTsvWriter(buf, header=parser.header, close_stamp="x")
    assert writer.write(records[:1]) == 1
    assert writer.write(iter(records[1:])) == 1
    writer.close()
    with pytest.raises(ValueError):
        writer.write(records)
    assert buf.getvalue() == to_tsv_bytes(records, header=parser.header, close_stamp="x")
    assert write_tsv(records, io.BytesIO(), header=parser.header) == 2


def test_writer_validates_its_header():
    with pytest.raises(ValueError):
        ZeekTsvWriter(io.BytesIO(), header=LogHeader(format="json"))
    with pytest.raises(TypeError):
        ZeekTsvWriter(io.BytesIO(), header={"fields": ["ts"]})  # type: ignore[arg-type]
