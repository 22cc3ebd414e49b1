"""The Zeek conn.log parser: every format, every bad-input case, incremental feeding."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from gateway.flows.record import ConnRecord
from gateway.flows.zeek import (
    LogHeader,
    Rejection,
    ZeekLogParser,
    ZeekParseError,
    iter_records,
    json_record,
    read_log,
)

HEADER = (
    "#separator \\x09\n"
    "#set_separator\t,\n"
    "#empty_field\t(empty)\n"
    "#unset_field\t-\n"
    "#path\tconn\n"
    "#open\t2026-11-24-10-00-00\n"
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\tduration"
    "\torig_bytes\tresp_bytes\tconn_state\tlocal_orig\tlocal_resp\tmissed_bytes\thistory"
    "\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\ttunnel_parents\tip_proto\n"
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount"
    "\tstring\tbool\tbool\tcount\tstring\tcount\tcount\tcount\tcount\tset[string]\tcount\n"
)
LINE_A = (
    "1300475167.096535\tCHhAvVGS1DHFjwGM9\t141.142.228.5\t59856\t192.150.187.43\t80\ttcp"
    "\thttp\t0.211484\t136\t5007\tSF\tF\tF\t0\tShADadFf\t7\t512\t7\t5379\t-\t6\n"
)
LINE_B = (
    "1300475168.000001\tClEkJM2Vm5giqnMf4h\tfe80::c801:eff:fe88:8\t136\tff02::1\t135\ticmp"
    "\t-\t-\t-\t-\tOTH\tT\tF\t0\t-\t1\t64\t0\t0\t(empty)\t58\n"
)
IOT23_HEADER = (
    "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n#path\tconn\n"
    "#open\t2018-10-25-12-08-23\n"
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\tduration"
    "\torig_bytes\tresp_bytes\tconn_state\tlocal_orig\tlocal_resp\tmissed_bytes\thistory"
    "\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\ttunnel_parents   label   detailed-label\n"
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount\tstring"
    "\tbool\tbool\tcount\tstring\tcount\tcount\tcount\tcount\tset[string]   string   string\n"
)
IOT23_LINE = (
    "1547127288.026074\tCXY5uG2sSmjJ0grfY2\t192.168.1.197\t58312\t104.24.96.120\t80\ttcp\thttp"
    "\t3.909013\t83\t67212\tSF\t-\t-\t4380\tShADadttFf\t54\t3371\t50\t69224"
    "\t-   Malicious   FileDownload\n"
)

IOT23_COUNTS = {  # flows per scenario, from data/iot23/ATTRIBUTION.md
    "CTU-Honeypot-Capture-4-1": 452,
    "CTU-Honeypot-Capture-5-1": 1374,
    "CTU-Honeypot-Capture-7-1": 130,
    "CTU-Malware-Capture-8-1": 10403,
    "CTU-Malware-Capture-20-1": 3209,
    "CTU-Malware-Capture-34-1": 23145,
    "CTU-Malware-Capture-42-1": 4426,
}


def parse(text: str | bytes, **kwargs) -> tuple[list[ConnRecord], list[Rejection]]:
    data = text.encode() if isinstance(text, str) else text
    parser = ZeekLogParser(**kwargs)
    records = parser.feed(data) + parser.finish()
    return records, parser.drain_rejections()


# ------------------------------------------------------------------ Zeek TSV


def test_zeek_tsv_values():
    records, rejections = parse(HEADER + LINE_A + LINE_B + "#close\t2026-11-24-11-00-00\n")
    assert rejections == []
    a, b = records
    assert a == ConnRecord(
        ts=1300475167.096535, uid="CHhAvVGS1DHFjwGM9", orig_h="141.142.228.5", orig_p=59856,
        resp_h="192.150.187.43", resp_p=80, proto="tcp", service="http", duration=0.211484,
        orig_bytes=136, resp_bytes=5007, conn_state="SF", local_orig=False, local_resp=False,
        missed_bytes=0, history="ShADadFf", orig_pkts=7, orig_ip_bytes=512, resp_pkts=7,
        resp_ip_bytes=5379, tunnel_parents=None, ip_proto=6,
    )  # fmt: skip
    assert (b.service, b.duration, b.orig_bytes, b.history) == (None, None, None, None)
    assert (b.local_orig, b.local_resp) == (True, False)
    assert b.tunnel_parents == ()  # (empty) set
    assert b.orig_h == "fe80::c801:eff:fe88:8"


def test_zeek_samples_parse(fixtures_dir):
    """Zeek's own conn.logs (ts masked by BTest: substituted here)."""
    seen = 0
    for path in sorted((fixtures_dir / "zeek-samples").glob("*/conn.log")):
        data = path.read_bytes().replace(b"XXXXXXXXXX.XXXXXX", b"1300475167.096535")
        records, rejections = parse(data)
        assert rejections == [], path
        assert records and all(r.ip_proto in (6, 17, 58) for r in records)
        seen += len(records)
    assert seen == 21  # 1 + 3 + 7 + 6 + 1 + 3 records (fixtures README)


def test_btest_masked_ts_is_rejected_with_its_line(fixtures_dir):
    path = fixtures_dir / "zeek-samples" / "core.tcp.reassembly-known-ports" / "conn.log"
    records, rejections = parse(path.read_bytes(), source_name=str(path))
    assert records == []
    assert [(r.source, r.line_no) for r in rejections] == [(str(path), 10)]
    assert rejections[0].reason.startswith("ts:")


def test_custom_separators_and_placeholders():
    text = (
        "#separator \\x7c\n#set_separator|;\n#empty_field|EMPTY\n#unset_field|NULL\n"
        "#fields|ts|uid|id.orig_h|id.orig_p|id.resp_h|id.resp_p|proto|service|tunnel_parents\n"
        "#types|time|string|addr|port|addr|port|enum|string|set[string]\n"
        "1.5|Cabc|10.0.0.1|1|10.0.0.2|2|udp|NULL|Ca;Cb\n"
        "2.5|Cdef|10.0.0.1|1|10.0.0.2|2|udp|EMPTY|EMPTY\n"
    )
    (a, b), rejections = parse(text)
    assert rejections == []
    assert (a.service, a.tunnel_parents) == (None, ("Ca", "Cb"))
    assert (b.service, b.tunnel_parents) == ("", ())


def test_reordered_and_extra_columns():
    text = (
        "#fields\tuid\tproto\tvlan\tid.resp_p\tid.resp_h\tid.orig_p\tid.orig_h\tts\tcommunity_id\n"
        "#types\tstring\tenum\tint\tport\taddr\tport\taddr\ttime\tstring\n"
        "Cabc\ttcp\t42\t443\t10.0.0.2\t5555\t10.0.0.1\t12.25\t1:xyz=\n"
    )
    (rec,), rejections = parse(text)
    assert rejections == []
    assert (rec.ts, rec.uid, rec.orig_h, rec.orig_p, rec.resp_h, rec.resp_p, rec.proto) == (
        12.25, "Cabc", "10.0.0.1", 5555, "10.0.0.2", 443, "tcp",
    )  # fmt: skip
    assert rec.extra == (("vlan", "42"), ("community_id", "1:xyz="))
    assert rec.service is None and rec.label is None


def test_several_header_blocks_in_one_stream():
    second = (
        "#separator \\x09\n#fields\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tts\tuid\n"
        "10.0.0.9\t9\t10.0.0.8\t8\tudp\t99.5\tCsecond\n"
    )
    records, rejections = parse(HEADER + LINE_A + "#close\tx\n" + second + "#close\ty\n" + HEADER + LINE_B)
    assert rejections == []
    assert [r.uid for r in records] == ["CHhAvVGS1DHFjwGM9", "Csecond", "ClEkJM2Vm5giqnMf4h"]
    assert records[1].orig_p == 9 and records[1].ts == 99.5


def test_zeek_escapes_are_undone():
    line = LINE_A.replace("\thttp\t", "\tht\\x09tp\\x5cx\t").replace("ShADadFf", "\\x2d")
    (rec,), rejections = parse(HEADER + line)
    assert rejections == []
    assert rec.service == "ht\ttp\\x"
    assert rec.history == "-"  # an escaped literal "-", not the unset placeholder


def test_crlf_line_endings():
    records, rejections = parse((HEADER + LINE_A + LINE_B).replace("\n", "\r\n"))
    assert rejections == [] and len(records) == 2


def test_byte_order_mark_is_skipped():
    records, rejections = parse(b"\xef\xbb\xbf" + (HEADER + LINE_A).encode())
    assert rejections == [] and len(records) == 1


def test_btest_banner_and_comments_are_skipped():
    records, rejections = parse("### BTest baseline data\n# a comment\n" + HEADER + LINE_A)
    assert rejections == [] and len(records) == 1


# ------------------------------------------------------------------ IoT-23


def test_iot23_line():
    (rec,), rejections = parse(IOT23_HEADER + IOT23_LINE)
    assert rejections == []
    assert (rec.tunnel_parents, rec.label, rec.detailed_label) == (None, "Malicious", "FileDownload")
    assert rec.is_malicious is True
    assert rec.ip_proto is None


def test_iot23_rejection_quotes_the_line_as_it_was():
    bad = IOT23_LINE.replace("\t83\t", "\tlots\t")
    records, rejections = parse(IOT23_HEADER + bad + "short   line\n" + IOT23_LINE)
    assert len(records) == 1
    assert [r.text for r in rejections] == [bad.rstrip("\n"), "short   line"]
    assert [r.line_no for r in rejections] == [9, 10]


def test_iot23_header_state():
    parser = ZeekLogParser()
    parser.feed(IOT23_HEADER.encode())
    h = parser.header
    assert h.is_iot23 and h.joined_tail == 3
    assert h.fields[-3:] == ("tunnel_parents", "label", "detailed-label")
    assert h.types[-3:] == ("set[string]", "string", "string")
    assert h.open == "2018-10-25-12-08-23"


def test_iot23_scenarios_all_parse(iot23_dir):
    labels: Counter[str] = Counter()
    for name, expected in IOT23_COUNTS.items():
        records, parser = read_log(iot23_dir / name / "conn.log.labeled")
        assert parser.rejected == 0, name
        assert len(records) == expected, name
        assert all(r.label is not None for r in records)
        labels.update(r.detailed_label or r.label for r in records)
    assert labels["DDoS"] == 14394  # ATTRIBUTION.md: CTU-Malware-Capture-34-1
    assert labels["PartOfAHorizontalPortScan"] == 122


# ------------------------------------------------------------------ JSON


def test_json_lines_epoch_and_iso():
    lines = [
        {"ts": 1547127288.026074, "uid": "CXY5", "id.orig_h": "192.168.1.197", "id.orig_p": 58312,
         "id.resp_h": "104.24.96.120", "id.resp_p": 80, "proto": "tcp", "service": "http",
         "duration": 3.909013, "orig_bytes": 83, "conn_state": "SF", "local_orig": True,
         "tunnel_parents": ["Ca", "Cb"], "label": "Malicious", "detailed-label": "C&C"},
        {"ts": "2019-01-10T13:34:48.026074Z", "uid": "CABC", "id.orig_h": "10.0.0.1",
         "id.orig_p": 1, "id.resp_h": "10.0.0.2", "id.resp_p": 2, "proto": "udp", "vlan": 7},
        {"ts": 5, "uid": "Cnested", "id": {"orig_h": "10.0.0.1", "orig_p": 1, "resp_h": "::1",
         "resp_p": 2}, "proto": "icmp"},
    ]  # fmt: skip
    records, rejections = parse("".join(json.dumps(o) + "\n" for o in lines))
    assert rejections == []
    a, b, c = records
    assert (a.orig_p, a.duration, a.local_orig, a.tunnel_parents) == (58312, 3.909013, True, ("Ca", "Cb"))
    assert (a.label, a.detailed_label, a.resp_bytes) == ("Malicious", "C&C", None)
    assert b.ts == pytest.approx(1547127288.026074, abs=1e-6)
    assert b.extra == (("vlan", "7"),)
    assert (c.resp_h, c.ts) == ("::1", 5.0)


def test_json_copy_of_an_iot23_scenario_gives_the_same_records(iot23_dir):
    from gateway.flows.record import COLUMN_BY_FIELD

    records, _ = read_log(iot23_dir / "CTU-Malware-Capture-42-1" / "conn.log.labeled")
    lines = [
        json.dumps({COLUMN_BY_FIELD[k]: list(v) if isinstance(v, tuple) else v
                    for k, v in r._asdict().items() if k != "extra" and v is not None})
        for r in records
    ]  # fmt: skip
    again, rejections = parse("\n".join(lines) + "\n")
    assert rejections == [] and again == records


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"uid": "C", "id.orig_h": "1.1.1.1", "id.orig_p": 1, "id.resp_h": "1.1.1.2", "id.resp_p": 2, "proto": "tcp"}, "ts: missing"),
        ({"ts": 1, "uid": "C", "id.orig_h": "1.1.1.1", "id.orig_p": "1", "id.resp_h": "1.1.1.2", "id.resp_p": 2, "proto": "tcp"}, "id.orig_p: not a count"),
        ({"ts": 1, "uid": "C", "id.orig_h": "1.1.1.1", "id.orig_p": 70000, "id.resp_h": "1.1.1.2", "id.resp_p": 2, "proto": "tcp"}, "id.orig_p: out of range"),
        ({"ts": "yesterday", "uid": "C", "id.orig_h": "1.1.1.1", "id.orig_p": 1, "id.resp_h": "1.1.1.2", "id.resp_p": 2, "proto": "tcp"}, "ts: not ISO-8601"),
        ({"ts": 1, "uid": "C", "id.orig_h": "1.1.1.1", "id.orig_p": 1, "id.resp_h": "1.1.1.2", "id.resp_p": 2, "proto": "tcp", "orig_bytes": -1}, "orig_bytes: out of range"),
        ({"ts": 1, "uid": "C", "id.orig_h": "<script>", "id.orig_p": 1, "id.resp_h": "1.1.1.2", "id.resp_p": 2, "proto": "tcp"}, "id.orig_h: not an IP address"),
        ([1, 2], "not an object"),
    ],
)  # fmt: skip
def test_json_bad_values(obj, reason):
    with pytest.raises(ValueError, match=reason):
        json_record(json.dumps(obj))


def test_json_log_whose_first_line_is_junk():
    good = json.dumps({"ts": 1, "uid": "C", "id.orig_h": "1.1.1.1", "id.orig_p": 1,
                       "id.resp_h": "1.1.1.2", "id.resp_p": 2, "proto": "tcp"})  # fmt: skip
    records, rejections = parse(f"\x00junk\n{good}\n{good}\n")
    assert len(records) == 2 and [r.line_no for r in rejections] == [1]


def test_json_junk_between_good_lines():
    good = json.dumps({"ts": 1, "uid": "C", "id.orig_h": "1.1.1.1", "id.orig_p": 1,
                       "id.resp_h": "1.1.1.2", "id.resp_p": 2, "proto": "tcp"})  # fmt: skip
    records, rejections = parse(f"{good}\n{{not json\n{good}\nplain text\n")
    assert len(records) == 2
    assert [r.line_no for r in rejections] == [2, 4]


# ------------------------------------------------------------------ bad input


def test_header_less_tsv_is_rejected_line_by_line():
    records, rejections = parse(LINE_A + LINE_B, source_name="x.log")
    assert records == []
    assert [(r.source, r.line_no, r.reason) for r in rejections] == [
        ("x.log", 1, "no #fields header before data"),
        ("x.log", 2, "no #fields header before data"),
    ]


def test_other_zeek_logs_are_not_conn_records():
    dns = HEADER.replace("#path\tconn", "#path\tdns")
    records, rejections = parse(dns + LINE_A)
    assert records == [] and rejections[0].reason == "not a conn log (#path dns)"


def test_header_without_required_column():
    records, rejections = parse("#fields\tts\tid.orig_h\n1.0\t10.0.0.1\n")
    assert records == []
    assert "uid" in rejections[0].reason and rejections[0].line_no == 2


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("1\t2\t3\n", "3 fields, header has 22"),
        (LINE_A.replace("\t136\t", "\tmany\t"), "orig_bytes"),
        (LINE_A.replace("\t136\t", "\t-136\t"), "orig_bytes: not a number"),
        (LINE_A.replace("\t59856\t", "\t70000\t"), "id.orig_p: out of range"),
        (LINE_A.replace("1300475167.096535", "nan"), "ts: not a number"),
        (LINE_A.replace("1300475167.096535", "-"), "ts: required value unset"),
        (LINE_A.replace("\tF\tF\t", "\tyes\tF\t"), "local_orig: not T/F"),
        (LINE_A.replace("141.142.228.5", "evil host"), "id.orig_h: not an IP address"),
        (LINE_A.replace("\thttp\t", "\t\t"), "service: empty field"),
        (LINE_A.replace("\t136\t", "\t1_36\t"), "orig_bytes: not a number"),
        (LINE_A.replace("\t136\t", "\t18446744073709551616\t"), "orig_bytes: out of range"),
        (LINE_A.replace("\t0.211484\t", "\t-0.5\t"), "duration: not a number"),
    ],
)
def test_bad_line_rejected_good_ones_kept(bad_line, reason):
    records, rejections = parse(HEADER + LINE_A + bad_line + LINE_B)
    assert [r.uid for r in records] == ["CHhAvVGS1DHFjwGM9", "ClEkJM2Vm5giqnMf4h"]
    assert len(rejections) == 1
    assert rejections[0].line_no == 10  # 8 header lines, LINE_A, then the bad one
    assert reason in rejections[0].reason
    assert rejections[0].text == bad_line.rstrip("\n")[:200]


def test_binary_junk_and_invalid_utf8():
    junk = b"\x00\x01\xff\xfe garbage \x80\n\x89PNG\r\n\x1a\n"
    records, rejections = parse(HEADER.encode() + LINE_A.encode() + junk + LINE_B.encode())
    assert len(records) == 2
    assert [r.line_no for r in rejections] == [10, 11, 12]
    assert "UTF-8" in rejections[0].reason


def test_overlong_line_is_skipped():
    parser = ZeekLogParser(max_line_bytes=1000)
    out = parser.feed((HEADER + LINE_A).encode())
    out += parser.feed(b"x" * 3000)
    out += parser.feed(b"y" * 3000 + b"\n" + LINE_B.encode())
    out += parser.finish()
    assert [r.uid for r in out] == ["CHhAvVGS1DHFjwGM9", "ClEkJM2Vm5giqnMf4h"]
    (rej,) = parser.drain_rejections()
    assert rej.line_no == 10 and "longer than 1000" in rej.reason
    assert parser.consumed == len((HEADER + LINE_A + LINE_B).encode()) + 6001
    assert parser.line_no == 11


def test_blank_lines_are_ignored():
    records, rejections = parse(HEADER + "\n" + LINE_A + "  \n\n" + LINE_B)
    assert rejections == [] and len(records) == 2


def test_strict_raises_with_source_and_line():
    parser = ZeekLogParser(source_name="conn.log", strict=True)
    with pytest.raises(ZeekParseError) as err:
        parser.feed((HEADER + LINE_A + "junk\n").encode())
    assert (err.value.source, err.value.line_no) == ("conn.log", 10)
    assert str(err.value).startswith("conn.log:10: ")


def test_kept_rejections_are_capped_but_counted():
    parser = ZeekLogParser(max_kept_rejections=3)
    parser.feed((HEADER + "junk\n" * 10).encode())
    assert parser.rejected == 10 and len(parser.rejections) == 3
    assert len(parser.drain_rejections()) == 3 and parser.rejections == []


def test_iter_records_strict_and_counts():
    with pytest.raises(ZeekParseError):
        list(iter_records((HEADER + "junk\n").encode(), strict=True))
    parser = ZeekLogParser()
    seen: list[Rejection] = []
    records = list(iter_records((HEADER + "junk\n" + LINE_A).encode(), parser=parser, on_rejection=seen.append))
    assert len(records) == 1 and parser.rejected == 1 and [r.line_no for r in seen] == [9]


# ------------------------------------------------------------------ incremental


def test_partial_last_line_is_kept_until_complete():
    parser = ZeekLogParser()
    data = (HEADER + LINE_A).encode()
    cut = len(HEADER) + 20
    assert parser.feed(data[:cut]) == []
    assert parser.consumed == len(HEADER) and parser.pending_bytes == 20
    (rec,) = parser.feed(data[cut:])
    assert rec.uid == "CHhAvVGS1DHFjwGM9" and parser.consumed == len(data)


def test_finish_parses_a_last_line_without_newline():
    parser = ZeekLogParser()
    assert len(parser.feed((HEADER + LINE_A + LINE_B.rstrip("\n")).encode())) == 1
    assert [r.uid for r in parser.finish()] == ["ClEkJM2Vm5giqnMf4h"]
    with pytest.raises(RuntimeError):
        parser.feed(b"more\n")


def test_resume_mid_file_from_header_offset_and_line():
    data = (HEADER + LINE_A + LINE_B + "junk\n").encode()
    first = ZeekLogParser()
    first.feed(data[: len(HEADER) + len(LINE_A) + 5])
    saved = (first.header.to_json(), first.consumed, first.line_no)
    header = LogHeader.from_json(saved[0])
    resumed = ZeekLogParser(header=header, offset=saved[1], line_no=saved[2])
    records = resumed.feed(data[saved[1] :]) + resumed.finish()
    assert [r.uid for r in records] == ["ClEkJM2Vm5giqnMf4h"]
    assert [r.line_no for r in resumed.drain_rejections()] == [11]
    assert resumed.consumed == len(data)


def test_header_dict_round_trip_and_validation():
    parser = ZeekLogParser()
    parser.feed(IOT23_HEADER.encode())
    h = parser.header
    assert LogHeader.from_dict(json.loads(json.dumps(h.to_dict()))) == h
    with pytest.raises(ValueError):
        LogHeader(format="xml")
    with pytest.raises(ValueError):
        LogHeader(fields=("a", "b"), types=("string",))
    with pytest.raises(ValueError):
        LogHeader.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LogHeader.from_dict({"separator": 9})
    with pytest.raises(ValueError):
        LogHeader.from_dict({"fields": "ts uid"})


def test_parser_options_are_validated():
    with pytest.raises(ValueError):
        ZeekLogParser(offset=-1)
    with pytest.raises(ValueError):
        ZeekLogParser(max_line_bytes=1)
    with pytest.raises(TypeError):
        ZeekLogParser(header={"fields": []})  # type: ignore[arg-type]
