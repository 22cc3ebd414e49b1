"""Readers: paths, file objects, byte chunks; gzip (whole, multi-member, truncated)."""

from __future__ import annotations

import gzip
import io

import pytest

from gateway.flows.zeek import (
    ZeekLogParser,
    ZeekParseError,
    iter_record_batches,
    iter_records,
    open_log,
    read_log,
)
from test_zeek_parser import HEADER, IOT23_HEADER, IOT23_LINE, LINE_A, LINE_B

# Distinct uids and times, so that gzip cannot squeeze the whole log into a few bytes.
PLAIN = (
    HEADER
    + "".join(
        LINE_A.replace("CHhAvVGS1DHFjwGM9", f"C{i * 7919:012x}").replace("1300475167.0", f"13{i:08d}.0")
        + LINE_B.replace("\t64\t", f"\t{i * 31}\t")
        for i in range(50)
    )
).encode()


@pytest.fixture
def plain_records():
    records, parser = read_log(PLAIN)
    assert parser.rejected == 0 and len(records) == 100
    return records


def test_sources_agree(tmp_path, plain_records):
    path = tmp_path / "conn.log"
    path.write_bytes(PLAIN)
    chunks = [PLAIN[i : i + 77] for i in range(0, len(PLAIN), 77)]
    assert list(iter_records(path)) == plain_records
    assert list(iter_records(str(path), chunk_size=100)) == plain_records
    with open(path, "rb") as f:
        assert list(iter_records(f)) == plain_records
    assert list(iter_records(io.BytesIO(PLAIN), chunk_size=3)) == plain_records
    assert list(iter_records(chunks)) == plain_records
    assert list(iter_records(iter(chunks))) == plain_records


def test_gzip_path_file_object_and_chunks(tmp_path, plain_records):
    packed = gzip.compress(PLAIN)
    path = tmp_path / "conn.00:00:00-01:00:00.log.gz"
    path.write_bytes(packed)
    assert list(iter_records(path)) == plain_records
    with open_log(path) as f:
        assert f.read() == PLAIN
    with open(path, "rb") as f:
        assert list(iter_records(f, chunk_size=50)) == plain_records
    assert list(iter_records([packed[i : i + 10] for i in range(0, len(packed), 10)])) == plain_records
    with open_log(path) as f:  # an already-decompressing file object works too
        assert list(iter_records(f)) == plain_records


def test_gzip_of_iot23_and_json(tmp_path):
    data = (IOT23_HEADER + IOT23_LINE * 3).encode()
    (tmp_path / "a.gz").write_bytes(gzip.compress(data))
    records, parser = read_log(tmp_path / "a.gz")
    assert parser.rejected == 0 and [r.detailed_label for r in records] == ["FileDownload"] * 3
    line = b'{"ts":1,"uid":"C","id.orig_h":"1.1.1.1","id.orig_p":1,"id.resp_h":"1.1.1.2","id.resp_p":2,"proto":"tcp"}\n'
    records, parser = read_log(gzip.compress(line * 4))
    assert parser.rejected == 0 and len(records) == 4


def test_multi_member_gzip(plain_records):
    half = len(PLAIN) // 2
    cut = PLAIN.rfind(b"\n", 0, half) + 1
    packed = gzip.compress(PLAIN[:cut]) + gzip.compress(PLAIN[cut:])
    assert list(iter_records(packed)) == plain_records


def test_truncated_gzip_yields_what_it_could_and_one_rejection(tmp_path, plain_records):
    packed = gzip.compress(PLAIN)
    path = tmp_path / "cut.log.gz"
    path.write_bytes(packed[: len(packed) * 2 // 3])
    for source in (path, open_log(path), packed[: len(packed) * 2 // 3]):
        parser = ZeekLogParser(source_name="cut")
        records = list(iter_records(source, parser=parser))
        assert 0 < len(records) < 100
        assert records == plain_records[: len(records)]
        (rej,) = parser.rejections
        assert "truncated" in rej.reason and rej.line_no == parser.line_no + 1
    with pytest.raises(ZeekParseError, match="truncated"):
        list(iter_records(path, strict=True))


def test_corrupt_gzip_is_one_rejection():
    packed = bytearray(gzip.compress(PLAIN))
    packed[40:60] = b"\x00" * 20
    parser = ZeekLogParser()
    list(iter_records(bytes(packed), parser=parser))
    assert parser.rejected == 1 and "gzip" in parser.rejections[0].reason


def test_empty_input_is_one_rejection(tmp_path):
    path = tmp_path / "empty.log"
    path.write_bytes(b"")
    parser = ZeekLogParser(source_name=str(path))
    assert list(iter_records(path, parser=parser)) == []
    assert [(r.source, r.line_no, r.reason) for r in parser.rejections] == [(str(path), 0, "empty input")]
    with pytest.raises(ZeekParseError, match="empty input"):
        list(iter_records(path, strict=True))


def test_batches_follow_chunks_and_header_only_is_no_records():
    batches = list(iter_record_batches(PLAIN, chunk_size=4096))
    assert len(batches) > 1 and sum(map(len, batches)) == 100
    parser = ZeekLogParser()
    assert list(iter_record_batches(HEADER.encode(), parser=parser)) == []
    assert parser.rejected == 0


def test_bad_chunk_type_is_a_clear_error():
    with pytest.raises(TypeError, match="bytes"):
        list(iter_records(["not bytes"]))  # type: ignore[list-item]
    with pytest.raises(ValueError):
        list(iter_records(PLAIN, chunk_size=0))
