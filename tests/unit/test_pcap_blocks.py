"""The block path (gateway.flows.blocks) gives the packets the per-frame decoder gives, and
sharding splits them by address pair without losing or duplicating any."""

from __future__ import annotations

import io
import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.flows.blocks import (
    BLOCK_SIZE,
    KIND_ANY,
    decode_block,
    packet_shard,
    scan_records,
)
from gateway.flows.packets import PacketDecoder
from gateway.flows.pcap import CaptureStats, convert_captures, iter_frames, iter_packet_batches


def _csum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _frame(v6: bool, proto: int, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
           flags: int, link: str, bad_sum: bool, opts: bytes, bad_ip_sum: bool = False) -> bytes:
    if proto == 6:
        thl = 20 + len(opts)
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, (thl // 4) << 4, flags, 512, 0, 0) + opts + payload
        at = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        at = 6
    pseudo = src + dst + struct.pack("!HH", proto, len(l4)) if not v6 else src + dst + struct.pack("!IxxxB", len(l4), proto)
    cs = _csum(pseudo + l4) ^ (0x5A5A if bad_sum else 0)
    l4 = l4[:at] + struct.pack("!H", cs) + l4[at + 2:]
    if v6:
        ip = struct.pack("!IHBB", 0x60000000, len(l4), proto, 64) + src + dst
        etype = 0x86DD
    else:
        hdr = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0) + src + dst
        ip = hdr[:10] + struct.pack("!H", _csum(hdr) ^ (0x0101 if bad_ip_sum else 0)) + hdr[12:]
        etype = 0x0800
    mac = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"
    if link == "vlan":
        return mac + struct.pack("!HHH", 0x8100, 7, etype) + ip + l4
    if link == "pppoe":
        body = struct.pack("!H", 0x21 if not v6 else 0x57) + ip + l4
        return mac + struct.pack("!HBBHH", 0x8864, 0x11, 0, 1, len(body)) + body
    if link == "qinq":
        return mac + struct.pack("!HHHHH", 0x88A8, 5, 0x8100, 7, etype) + ip + l4
    if link == "mpls":  # one label: keyed at a fixed offset, not the decoder's fast path
        return mac + struct.pack("!HI", 0x8847, (16 << 12) | 0x100 | 64) + ip + l4
    if link == "mpls2":  # two labels: no fixed-offset address pair, decoded by every shard
        return mac + struct.pack("!HII", 0x8847, (17 << 12) | 64, (16 << 12) | 0x100 | 64) + ip + l4
    if link == "arp":  # not IP at all: only shard 0 looks at it
        return mac + struct.pack("!H", 0x0806) + ip + l4
    return mac + struct.pack("!H", etype) + ip + l4


_addr4 = st.sampled_from([bytes([10, 0, 0, i]) for i in range(1, 6)])
_addr6 = st.sampled_from([bytes(15) + bytes([i]) for i in range(1, 6)])


@st.composite
def frames(draw):
    v6 = draw(st.booleans())
    addr = _addr6 if v6 else _addr4
    proto = draw(st.sampled_from([6, 17]))
    frame = _frame(v6, proto, draw(addr), draw(addr),
                   draw(st.sampled_from([80, 443, 53, 4789, 40000, 40001])),
                   draw(st.sampled_from([80, 443, 53, 2152, 40000, 40001])),
                   draw(st.binary(max_size=40)), draw(st.sampled_from([0x02, 0x12, 0x10, 0x18, 0x11, 0x04])),
                   draw(st.sampled_from(["eth", "eth", "vlan", "pppoe", "qinq", "mpls", "mpls2", "arp"])), draw(st.booleans()),
                   draw(st.sampled_from([b"", b"\x01\x01\x01\x01", b"\x02\x04\x05\xb4"])),
                   draw(st.sampled_from([False, False, False, True])))
    mutate = draw(st.sampled_from(["none", "none", "byte", "cut", "snap"]))
    wire = len(frame)
    if mutate == "byte":  # any header byte may be hostile
        at = draw(st.integers(0, len(frame) - 1))
        frame = frame[:at] + bytes([draw(st.integers(0, 255))]) + frame[at + 1:]
    elif mutate == "cut":
        frame = frame[:draw(st.integers(0, len(frame)))]
        wire = len(frame)
    elif mutate == "snap":  # the capture kept less than the wire carried
        frame = frame[:draw(st.integers(0, len(frame)))]
    return frame, wire


def _pcap(records: list[tuple[bytes, int]], *, little: bool = True, nano: bool = False) -> bytes:
    e = "<" if little else ">"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)]
    for i, (frame, wire) in enumerate(records):
        out.append(struct.pack(e + "IIII", 1_600_000_000 + i // 3, (i * 123457) % (10**9 if nano else 10**6),
                               len(frame), wire) + frame)
    return b"".join(out)


def _reference(blob: bytes, ignore: bool):
    decoder = PacketDecoder(ignore_checksums=ignore)
    out = []
    for ts, lt, frame, wire in iter_frames(io.BytesIO(blob)):
        pkt = decoder.decode(lt, frame, ts, wire)
        if pkt is not None and pkt.__class__ is not str:
            out.append(pkt)
    return out, decoder


def _blocks(blob: bytes, ignore: bool, shard=None):
    decoder = PacketDecoder(ignore_checksums=ignore)
    probe = decoder if shard is None or shard[0] == 0 else PacketDecoder(ignore_checksums=ignore)
    stats = CaptureStats()
    out = [p for batch in iter_packet_batches(io.BytesIO(blob), stats, decoder, probe=probe, shard=shard)
           for p in batch]
    return out, decoder, stats


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), max_size=30), st.booleans(), st.booleans(), st.booleans())
def test_block_path_equals_the_frame_decoder(records, ignore, little, nano):
    blob = _pcap(records, little=little, nano=nano)
    want, ref = _reference(blob, ignore)
    got, dec, stats = _blocks(blob, ignore)
    assert got == want
    assert (dec.skipped, dec.notes) == (ref.skipped, ref.notes)
    assert stats.packets == len(records) and stats.bytes == sum(w for _, w in records)
    # shards: every packet in exactly one, in file order, one address pair in one shard
    for count in (2, 3):
        runs = [_blocks(blob, ignore, (i, count)) for i in range(count)]
        parts = [run[0] for run in runs]
        # what the shards' decoders count adds up to the whole (probe counts are dropped)
        for attr in ("skipped", "notes"):
            total = Counter()
            for run in runs:
                total.update(getattr(run[1], attr))
            assert total == Counter(getattr(ref, attr))
        assert sorted(map(repr, (p for part in parts for p in part))) == sorted(map(repr, want))
        for i, part in enumerate(parts):
            assert all(packet_shard(p.src, p.dst, count) == i for p in part)
            assert part == [p for p in want if packet_shard(p.src, p.dst, count) == i]


def test_shard_is_symmetric_and_agrees_with_the_vectorised_hash():
    a, b = bytes([192, 168, 1, 7]), bytes([8, 8, 4, 4])
    assert all(packet_shard(a, b, n) == packet_shard(b, a, n) for n in range(1, 9))
    # the same connection plain, in QinQ, MPLS (hashed from fixed offsets) and under two
    # MPLS labels (hashed on the decoded addresses)
    shapes = [_frame(False, 6, *((a, b, 40000, 80) if i % 2 else (b, a, 80, 40000)), b"x", 0x18, link, False, b"")
              for i, link in enumerate(("eth", "qinq", "mpls", "mpls2"))]
    blob = _pcap([(f, len(f)) for f in shapes])
    for count in (2, 3, 5):
        mine = [len(_blocks(blob, False, (i, count))[0]) for i in range(count)]
        assert sorted(mine) == [0] * (count - 1) + [4]
    offs, _, _ = scan_records(blob, 24, True, 65535)
    for index in (0, 1):
        block = decode_block(blob, offs, little=True, nano=False, linktype=1, ignore_checksums=False,
                             shard=(index, 2))
        if len(block.kind):
            assert block.kind.tolist()[-1] == KIND_ANY


def test_scan_records_stops_at_incomplete_and_implausible_records():
    rec = struct.pack("<IIII", 1, 2, 4, 4) + b"abcd"
    assert scan_records(rec * 3, 0, True, 100) == ([0, 20, 40], 60, None)
    assert scan_records(rec * 2 + rec[:10], 0, True, 100) == ([0, 20], 40, None)
    huge = struct.pack("<IIII", 1, 2, 1000, 1000)
    assert scan_records(rec + huge, 0, True, 100) == ([0], 20, 1000)
    assert scan_records(struct.pack(">IIII", 1, 2, 4, 4) + b"abcd", 0, False, 100) == ([0], 20, None)


def test_records_span_block_boundaries_and_truncation_is_reported(tmp_path):
    frame = _frame(False, 17, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 40000, 40001, b"z" * 1000, 0,
                   "eth", False, b"")
    n = BLOCK_SIZE // len(frame) + 50  # a record straddles the first block boundary
    blob = _pcap([(frame, len(frame))] * n)
    got, _, stats = _blocks(blob, False)
    assert len(got) == n and stats.packets == n and not stats.truncated
    got, _, stats = _blocks(blob[:-7], False)
    assert len(got) == n - 1 and stats.truncated and "last record is incomplete" in stats.warnings[0]


def test_worker_output_is_deterministic_and_complete(tmp_path):
    recs = []
    for i in range(40):
        src, dst = bytes([10, 0, 1, i]), bytes([10, 0, 2, i % 7])
        for flags in (0x02, 0x12, 0x10, 0x18, 0x11, 0x11, 0x10):
            fwd = flags in (0x02, 0x10, 0x18)
            f = _frame(False, 6, src if fwd else dst, dst if fwd else src, 40000 + i if fwd else 80,
                       80 if fwd else 40000 + i, b"", flags, "eth" if i % 5 else "mpls", False, b"")
            recs.append((f, len(f)))
    path = tmp_path / "w.pcap"
    path.write_bytes(_pcap(recs))
    outs = {}
    for workers in (1, 2, 2, 3):
        buf = io.BytesIO()
        stats = convert_captures([str(path)], buf, workers=workers)
        lines = [x for x in buf.getvalue().splitlines() if not x.startswith(b"#")]
        assert stats.packets == len(recs) and stats.flows == len(lines) == 40
        if workers in outs:
            assert outs[workers] == lines  # the same order every time
        outs[workers] = lines
    assert sorted(outs[1]) == sorted(outs[2]) == sorted(outs[3])


def test_auto_workers_one_per_core_for_large_inputs_only():
    from gateway.flows.pcap import AUTO_WORKERS_MAX, AUTO_WORKERS_MIN_BYTES, auto_workers

    assert auto_workers(AUTO_WORKERS_MIN_BYTES - 1, 16) == 1
    assert auto_workers(AUTO_WORKERS_MIN_BYTES, 2) == 2
    assert auto_workers(10 * AUTO_WORKERS_MIN_BYTES, 64) == AUTO_WORKERS_MAX
    assert auto_workers(10 * AUTO_WORKERS_MIN_BYTES, 1) == 1


def test_workers_report_progress_and_the_cli_takes_auto(tmp_path):
    from click.testing import CliRunner

    from gateway.commands.flows import flows

    frame = _frame(False, 17, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 40000, 53, b"q" * 500, 0, "eth",
                   False, b"")
    path = tmp_path / "p.pcap"
    path.write_bytes(_pcap([(frame, len(frame))] * (2 * BLOCK_SIZE // len(frame))))
    seen = []
    stats = convert_captures([str(path)], io.BytesIO(), workers=2,
                             on_progress=lambda p, done, total: seen.append((done, total)))
    size = path.stat().st_size
    assert seen[-1] == (size, size) and len(seen) >= 3 and seen == sorted(seen)
    assert stats.packets == 2 * BLOCK_SIZE // len(frame)
    out = tmp_path / "conn.log"
    for option in ("auto", "2"):
        result = CliRunner().invoke(flows, [str(path), "--workers", option, "-o", str(out), "--json-summary"])
        assert result.exit_code == 0, result.output
        assert sum(1 for line in out.read_text().splitlines() if not line.startswith("#")) == 1
    result = CliRunner().invoke(flows, [str(path), "--workers", "many"])
    assert result.exit_code != 0 and "'many' is not 'auto'" in result.output


def test_gzip_and_pcapng_files_give_the_same_records_with_workers(tmp_path, fixtures_dir):
    import gzip

    samples = fixtures_dir / "zeek-samples"
    for trace in (samples / "core.pppoe" / "pppoe.pcap", samples / "core.pcapng-pktsrc" / "pcapng-multi-interface.pcapng"):
        gz = tmp_path / (trace.name + ".gz")
        gz.write_bytes(gzip.compress(trace.read_bytes()))  # deflate needs > 64 bytes to show the magic
        logs = set()
        for path in (trace, gz):
            for workers in (1, 2, 3):
                buf = io.BytesIO()
                stats = convert_captures([str(path)], buf, workers=workers)
                lines = sorted(x for x in buf.getvalue().splitlines() if not x.startswith(b"#"))
                logs.add((tuple(lines), stats.packets, stats.flows, tuple(sorted(stats.skipped.items()))))
        assert len(logs) == 1 and next(iter(logs))[2] > 0
