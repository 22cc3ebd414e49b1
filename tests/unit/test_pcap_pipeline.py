"""The capture pipeline: the compiled frame tracker gives the records, counts and
warnings of the pure-Python reference on hostile frames; sharding splits the connections
by address pair without losing or duplicating any; chunk boundaries, truncation, record
lengths past libpcap's limit, workers, progress, gzip and pcapng."""

from __future__ import annotations

import io
import struct
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.flows.pcap import CaptureStats, convert_captures, new_frame_tracker, record_batches
from gateway.flows.pcap.classic import CHUNK
from gateway.flows.shard import packet_shard


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


def _run(blob: bytes, ignore: bool, compiled: bool, shard=None, bpf=None):
    """Records, the capture counters and the frame tracker's decoder of one pipeline."""
    packet_filter = None
    if bpf:
        from gateway.flows.bpf import compile_filter

        packet_filter = compile_filter(bpf)
    ft = new_frame_tracker(ignore_checksums=ignore, compiled=compiled, shard=shard, packet_filter=packet_filter)
    stats = CaptureStats()
    records = [r for batch in record_batches(io.BytesIO(blob), stats, ft) for r in batch]
    return records, stats


def _same(a, b):
    """Two pipelines agree: records (order too), counters, skip reasons, weirds, warnings."""
    (ra, sa), (rb, sb) = a, b
    assert ra == rb
    assert sa.as_dict() | {"seconds": 0, "packets_per_second": 0} == sb.as_dict() | {"seconds": 0,
                                                                                    "packets_per_second": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), max_size=30), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([None, None, "tcp", "udp port 53 or icmp", "not host 10.0.0.1"]))
def test_compiled_pipeline_equals_the_reference(compiled, records, ignore, little, nano, bpf):
    blob = _pcap(records, little=little, nano=nano)
    want = _run(blob, ignore, False, bpf=bpf)
    _same(_run(blob, ignore, True, bpf=bpf), want)
    assert want[1].packets == len(records) and want[1].bytes == sum(w for _, w in records)
    # shards: every connection in exactly one, each shard the same both ways; what the
    # shards count adds up to the whole (the other shards' probe counts are dropped)
    for count in (2, 3):
        parts = []
        for i in range(count):
            ref = _run(blob, ignore, False, shard=(i, count), bpf=bpf)
            _same(_run(blob, ignore, True, shard=(i, count), bpf=bpf), ref)
            parts.append(ref)
        assert sorted(map(repr, (r for part in parts for r in part[0]))) == sorted(map(repr, want[0]))
        for attr in ("skipped", "weird"):
            total = Counter()
            for part in parts:
                total.update(getattr(part[1], attr))
            assert total == Counter(getattr(want[1], attr))
        assert sum(part[1].filtered for part in parts) == want[1].filtered


def test_shard_is_symmetric_and_the_same_for_every_shape(compiled):
    a, b = bytes([192, 168, 1, 7]), bytes([8, 8, 4, 4])
    assert all(packet_shard(a, b, n) == packet_shard(b, a, n) for n in range(1, 9))
    # the same connection plain, in QinQ, under one and two MPLS labels (the compiled
    # decoder takes these) and over ARP's ethertype (the reference decoder's business)
    shapes = [_frame(False, 6, *((a, b, 40000, 80) if i % 2 else (b, a, 80, 40000)), b"x", 0x18, link, False, b"")
              for i, link in enumerate(("eth", "qinq", "mpls", "mpls2"))]
    blob = _pcap([(f, len(f)) for f in shapes])
    for count in (2, 3, 5):
        for flag in (False, True):
            mine = [len(_run(blob, False, flag, (i, count))[0]) for i in range(count)]
            assert sorted(mine) == [0] * (count - 1) + [1]


def test_records_span_chunk_boundaries_and_truncation_is_reported(compiled):
    frame = _frame(False, 17, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 40000, 40001, b"z" * 1000, 0,
                   "eth", False, b"")
    n = CHUNK // len(frame) + 50  # a record straddles the first chunk boundary
    blob = _pcap([(frame, len(frame))] * n)
    for flag in (False, True):
        (rec,), stats = _run(blob, False, flag)
        assert rec.orig_pkts == n and stats.packets == n and not stats.truncated
        (rec,), stats = _run(blob[:-7], False, flag)
        assert rec.orig_pkts == n - 1 and stats.truncated and "last record is incomplete" in stats.warnings[0]


def test_a_record_longer_than_libpcap_allows_ends_the_file_at_once(compiled, tmp_path):
    """A 1 GiB record length fails fast with bounded memory, whatever the header's snaplen
    says: the records before it are kept and the file is reported truncated."""
    frame = _frame(False, 17, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 40000, 53, b"q" * 20, 0, "eth", False, b"")
    head = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 0xFFFFFFFF, 1)  # snaplen 4 GiB
    good = struct.pack("<IIII", 1_600_000_000, 0, len(frame), len(frame)) + frame
    huge = struct.pack("<IIII", 1_600_000_001, 0, 1 << 30, 1 << 30) + b"\0" * 4096
    path = tmp_path / "huge.pcap"
    path.write_bytes(head + good * 3 + huge)
    import resource

    for flag in (False, True):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (rec,), stats = _run(path.read_bytes(), False, flag)
        assert rec.orig_pkts == 3 and stats.truncated
        assert "record length 1073741824 is implausible" in stats.warnings[0]
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB: no 1 GiB buffer
    # just over libpcap's MAXIMUM_SNAPLEN (262144) is refused too, a record at it is read
    for length, kept in ((262_144, 4), (262_145, 3)):
        rec_bytes = struct.pack("<IIII", 1_600_000_002, 0, length, length) + frame + b"\0" * (length - len(frame))
        (rec,), stats = _run(head + good * 3 + rec_bytes, False, True)
        assert rec.orig_pkts == kept and stats.truncated == (kept == 3)


def test_worker_output_is_deterministic_and_complete(tmp_path):
    recs = []
    for i in range(40):
        src, dst = bytes([10, 0, 1, i]), bytes([10, 0, 2, i % 7])
        for flags in (0x02, 0x12, 0x10, 0x18, 0x11, 0x11, 0x10):
            fwd = flags in (0x02, 0x10, 0x18)
            f = _frame(False, 6, src if fwd else dst, dst if fwd else src, 40000 + i if fwd else 80,
                       80 if fwd else 40000 + i, b"", flags, "eth" if i % 5 else "mpls2", False, b"")
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
    path.write_bytes(_pcap([(frame, len(frame))] * (2 * CHUNK // len(frame))))
    seen = []
    stats = convert_captures([str(path)], io.BytesIO(), workers=2,
                             on_progress=lambda p, done, total: seen.append((done, total)))
    size = path.stat().st_size
    assert seen[-1] == (size, size) and len(seen) >= 3 and seen == sorted(seen)
    assert stats.packets == 2 * CHUNK // len(frame)
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
