"""Property tests of the parser: any split of the stream, junk between good lines, fuzz."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.flows.zeek import ZeekLogParser
from test_zeek_parser import HEADER, IOT23_HEADER, IOT23_LINE, LINE_A, LINE_B

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_LINE = json.dumps(
    {"ts": 1.5, "uid": "Cjson", "id.orig_h": "10.0.0.1", "id.orig_p": 1, "id.resp_h": "10.0.0.2",
     "id.resp_p": 2, "proto": "udp", "label": "benign"}  # fmt: skip
) + "\n"
STREAMS = {
    "zeek": (HEADER + (LINE_A + LINE_B) * 6 + "#close\tx\n" + HEADER + LINE_B).encode(),
    "iot23": (IOT23_HEADER + IOT23_LINE * 9).encode(),
    "json": (JSON_LINE * 9).encode(),
    "with junk": (HEADER + LINE_A + "junk line\n" + LINE_B + "1\t2\n" + LINE_A).encode(),
}


def run(chunks, **kwargs):
    parser = ZeekLogParser(**kwargs)
    records = []
    for chunk in chunks:
        records += parser.feed(chunk)
    records += parser.finish()
    return records, parser.drain_rejections(), parser


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@FAST
@given(name=st.sampled_from(sorted(STREAMS)), cuts=st.lists(st.integers(0, 10**6), max_size=25))
def test_any_split_gives_the_same_records(name, cuts):
    data = STREAMS[name]
    whole, whole_rej, _ = run([data])
    records, rejections, parser = run(split_at(data, cuts))
    assert records == whole
    assert rejections == whole_rej
    assert parser.consumed == len(data)
    if name != "with junk":
        assert whole and not whole_rej


# Junk that can never be a record: no tab (so the wrong number of fields), does not
# start a header, not blank; or a line of the right width with a non-numeric count.
junk_text = st.text(
    alphabet=st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
).map(lambda s: "x" + s)
junk_width_ok = st.sampled_from(["many", "1_0", "-7", "0x10", "inf", "T"]).map(
    lambda bad: LINE_A.rstrip("\n").replace("\t136\t", f"\t{bad}\t")
)
junk_bytes = st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b).map(
    lambda b: b"\xff" + b  # never valid UTF-8
)


@FAST
@given(
    plan=st.lists(
        st.one_of(
            st.just("good"),
            junk_text.map(str.encode),
            junk_width_ok.map(str.encode),
            junk_bytes,
        ),
        min_size=1,
        max_size=30,
    ),
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_junk_lines_are_counted_and_good_lines_kept(plan, cuts):
    lines = [LINE_A.encode() if item == "good" else item + b"\n" for item in plan]
    data = HEADER.encode() + b"".join(lines)
    records, rejections, parser = run(split_at(data, cuts))
    n_good = plan.count("good")
    assert len(records) == n_good
    assert all(r.uid == "CHhAvVGS1DHFjwGM9" for r in records)
    assert parser.rejected == len(plan) - n_good
    header_lines = HEADER.count("\n")
    expected_lines = [header_lines + 1 + i for i, item in enumerate(plan) if item != "good"]
    assert [r.line_no for r in rejections] == expected_lines


@FAST
@given(junk=st.binary(max_size=600), cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_fuzz_bytes_never_raise(junk, cuts):
    for prefix in (b"", HEADER.encode(), IOT23_HEADER.encode()):
        data = prefix + junk
        records, rejections, parser = run(split_at(data, cuts))
        assert parser.consumed == len(data)
        assert parser.records == len(records)
        assert all(isinstance(r.ts, float) and 0 <= r.orig_p <= 65535 for r in records)


@FAST
@given(
    values=st.lists(
        st.tuples(
            st.integers(0, 2**64 - 1),
            st.floats(0, 1e9, allow_nan=False),
            st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
            st.none() | st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8), max_size=3),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_written_values_parse_back(values):
    """Counts, intervals, arbitrary strings and sets survive the writer and the parser."""
    from gateway.flows.zeek import LogHeader, to_tsv_bytes

    base, _, _ = run([(HEADER + LINE_A).encode()])
    records = [
        base[0]._replace(
            orig_bytes=n, duration=round(d, 6), history=s, service=s or None,
            tunnel_parents=None if parents is None else tuple(parents),
        )  # fmt: skip
        for n, d, s, parents in values
    ]
    header = LogHeader.zeek_conn()
    data = to_tsv_bytes(records, header=header, open_stamp="a", close_stamp="b")
    back, rejections, _ = run([data])
    assert rejections == []
    assert back == records


json_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "10.0.0.1", "::1", "C1", "tcp", "1.2.3.4\n5.6.7.8", "2019-01-10T13:34:48Z"]),
    st.lists(st.sampled_from(["Ca", "", 1]), max_size=2),
)  # fmt: skip
json_keys = st.sampled_from(
    ["ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "service", "duration",
     "orig_bytes", "local_orig", "tunnel_parents", "label"]
)  # fmt: skip
GOOD_JSON = {"ts": 1.5, "uid": "C1", "id.orig_h": "10.0.0.1", "id.orig_p": 1, "id.resp_h": "::1",
             "id.resp_p": 2, "proto": "udp"}  # fmt: skip


@FAST
@given(changes=st.lists(st.dictionaries(json_keys, json_values, max_size=3), min_size=1, max_size=12))
def test_json_columns_agree_with_object_by_object(changes):
    """The column-wise JSON path gives the records and rejections json_record gives."""
    from gateway.flows.zeek import json_record

    lines = [json.dumps({**GOOD_JSON, **c}) for c in changes]
    records, rejections, _ = run([("\n".join(lines) + "\n").encode()])
    expected, expected_bad = [], []
    for i, line in enumerate(lines, start=1):
        try:
            expected.append(json_record(line))
        except ValueError:
            expected_bad.append(i)
    assert records == expected
    assert [r.line_no for r in rejections] == expected_bad
