"""Throughput of pcap -> flows: `fedgate flows` against nfstream, dpkt and scapy.

    python benchmarks/pcap.py [--packets 1000000] [--scapy-slice 20000] [--keep FILE] [--stages]
    python benchmarks/pcap.py --pcap FILE --tools fedgate,fedgate-2w   # iterate on fedgate only

Builds a pcap of at least ``--packets`` packets in a temporary directory from the Zeek
sample traces (tests/fixtures/zeek-samples), each replica with shifted IPv4/IPv6 addresses
(checksums patched incrementally, RFC 1624, so valid ones stay valid) and shifted
timestamps, then runs, each in its own subprocess (peak memory = that process's
ru_maxrss):

* fedgate   - gateway.flows.pcap.convert_captures in one process: full Zeek conn
              semantics, checksums verified, Zeek TSV written to /dev/null
* fedgate-C - the same with checksum verification off (zeek -C)
* fedgate-2w - fedgate with --workers 2 (file split by address pair over 2 processes;
              what `fedgate flows` does by default on 2 cores), CPU of all processes
* nfstream  - NFStreamer without DPI or statistics (a flow meter with a C capture core)
* dpkt      - dpkt.pcap.Reader + Ethernet/IP decode + a dict keyed by the 5-tuple
* scapy     - scapy.utils.PcapReader (full dissection) on the first --scapy-slice packets

and prints packets/s and flows/s (wall clock), packets per CPU-second (steadier when the
cores are shared) and peak memory (the largest single process).  ``--stages`` adds CPU
seconds per stage of fedgate (finding records, gathering header fields, building packets,
the per-frame route they replace, tracking with and without the tracker's fast path,
writing TSV).  The machine's cores are shared, so wall-clock numbers are pessimistic;
compare tools within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "fixtures" / "zeek-samples"


# ----------------------------------------------------------------------------- building

def _ip_offset(frame: bytes) -> int | None:
    """Offset of the IP header in an Ethernet frame (VLAN, MPLS, PPPoE skipped), or None."""
    if len(frame) < 14:
        return None
    off, etype = 14, frame[12] << 8 | frame[13]
    for _ in range(6):
        if etype in (0x0800, 0x86DD):
            return off
        if etype in (0x8100, 0x88A8, 0x9100):
            etype, off = frame[off + 2] << 8 | frame[off + 3], off + 4
        elif etype in (0x8847, 0x8848):
            while off + 4 <= len(frame):
                bottom = frame[off + 2] & 1
                off += 4
                if bottom:
                    return off
            return None
        elif etype == 0x8864:
            return off + 8 if frame[off + 6:off + 8] in (b"\x00\x21", b"\x00\x57") else None
        else:
            return None
    return None


def _fold_add(csum: int, delta: int) -> int:
    """RFC 1624: new checksum after the 16-bit words it covers changed by ``delta``."""
    s = (~csum & 0xFFFF) + (delta % 0xFFFF)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _words(b: bytes) -> int:
    return sum(int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2))


class _Template:
    """A base frame with where its addresses and checksums are."""

    __slots__ = ("ts", "frame", "ip", "v6", "l4", "proto", "frag")

    def __init__(self, ts: float, frame: bytes):
        self.ts = ts
        self.frame = frame
        self.ip = _ip_offset(frame)
        self.v6 = self.l4 = self.proto = None
        self.frag = False
        if self.ip is None or len(frame) < self.ip + 20:
            self.ip = None
            return
        ver = frame[self.ip] >> 4
        if ver == 4:
            self.v6 = False
            self.l4 = self.ip + (frame[self.ip] & 0xF) * 4
            self.proto = frame[self.ip + 9]
            self.frag = bool((frame[self.ip + 6] << 8 | frame[self.ip + 7]) & 0x3FFF)
        elif ver == 6 and len(frame) >= self.ip + 40:
            self.v6 = True
            l4, proto = self.ip + 40, frame[self.ip + 6]
            while proto in (0, 43, 60) and l4 + 2 <= len(frame):  # hop-by-hop, routing, dest opts
                proto, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
            self.frag = proto == 44
            self.l4, self.proto = l4, proto
        else:
            self.ip = None

    def shifted(self, k: int) -> bytes:
        """The frame with the low 16-bit word of both addresses moved by ``k`` (mod 2**16).

        Every address moves by the same amount, so both directions of a connection land on
        the same shifted pair."""
        if self.ip is None:
            return self.frame
        f = bytearray(self.frame)
        ip = self.ip
        if self.v6:
            s_at, d_at = ip + 8 + 14, ip + 24 + 14
        else:
            s_at, d_at = ip + 12 + 2, ip + 16 + 2
        old = _words(f[s_at:s_at + 2]) + _words(f[d_at:d_at + 2])
        for at, step in ((s_at, k), (d_at, k)):  # same shift both ways: replies still match
            w = (int.from_bytes(f[at:at + 2], "big") + step) & 0xFFFF
            f[at:at + 2] = w.to_bytes(2, "big")
        delta = _words(f[s_at:s_at + 2]) + _words(f[d_at:d_at + 2]) - old
        if not self.v6:
            c = int.from_bytes(f[ip + 10:ip + 12], "big")
            f[ip + 10:ip + 12] = _fold_add(c, delta).to_bytes(2, "big")
        l4, proto = self.l4, self.proto
        if not self.frag and l4 is not None:
            at = {6: l4 + 16, 17: l4 + 6, 58: l4 + 2}.get(proto)
            if at is not None and at + 2 <= len(f):
                c = int.from_bytes(f[at:at + 2], "big")
                if not (proto == 17 and c == 0):  # UDP over IPv4 without checksum stays so
                    n = _fold_add(c, delta)
                    if proto == 17 and n == 0:
                        n = 0xFFFF
                    f[at:at + 2] = n.to_bytes(2, "big")
        return bytes(f)


def base_frames() -> list[_Template]:
    from gateway.flows.pcap import iter_frames

    frames: list[_Template] = []
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    for case in manifest:
        with open(SAMPLES / case["case"] / case["trace"], "rb") as f:
            trace = [(ts, data) for ts, lt, data, _ in iter_frames(f) if lt == 1]
        t0 = trace[0][0]
        frames += [_Template(ts - t0, data) for ts, data in trace]
    return frames


def build_pcap(path: Path, packets: int) -> tuple[int, int]:
    """Write a pcap of >= ``packets`` packets; returns (packets, replicas)."""
    templates = base_frames()
    per_replica = len(templates)
    replicas = -(-packets // per_replica)
    start = 1_600_000_000.0
    rec = struct.Struct("<IIII")
    n = 0
    # replicas are interleaved in time: replica r starts r * 10 ms after the previous one
    order = sorted(range(per_replica), key=lambda i: templates[i].ts)
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        chunk: list[bytes] = []
        window = 64  # replicas merged at a time keep the file nearly time-ordered
        for base in range(0, replicas, window):
            batch = []
            for r in range(base, min(base + window, replicas)):
                offset = start + r * 0.01
                k = r + 1
                for i in order:
                    t = templates[i]
                    batch.append((offset + t.ts, t, k))
            batch.sort(key=lambda x: x[0])
            for ts, t, k in batch:
                data = t.shifted(k)
                sec = int(ts)
                chunk.append(rec.pack(sec, int(round((ts - sec) * 1e6)) % 1_000_000, len(data), len(data)))
                chunk.append(data)
                n += 1
            out.write(b"".join(chunk))
            chunk.clear()
    return n, replicas


# ----------------------------------------------------------------------------- runners

def run_fedgate(path: str, ignore_checksums: bool, workers: int = 1) -> dict:
    from gateway.flows.pcap import convert_captures

    with open(os.devnull, "wb") as sink:
        t = time.perf_counter()
        stats = convert_captures([path], sink, ignore_checksums=ignore_checksums, workers=workers)
        dt = time.perf_counter() - t
    return {"packets": stats.packets, "flows": stats.flows, "seconds": dt}


def run_nfstream(path: str) -> dict:
    from nfstream import NFStreamer

    t = time.perf_counter()
    flows = packets = 0
    for flow in NFStreamer(source=path, statistical_analysis=False, n_dissections=0, n_meters=1):
        flows += 1
        packets += flow.bidirectional_packets
    return {"packets": packets, "flows": flows, "seconds": time.perf_counter() - t}


def run_dpkt(path: str) -> dict:
    import socket

    import dpkt

    t = time.perf_counter()
    flows: dict[tuple, int] = {}
    packets = 0
    with open(path, "rb") as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            packets += 1
            try:
                eth = dpkt.ethernet.Ethernet(buf)
            except (dpkt.UnpackError, struct.error):
                continue
            ip = eth.data
            if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)):
                continue
            l4 = ip.data
            sport = getattr(l4, "sport", 0)
            dport = getattr(l4, "dport", 0)
            a, b = (ip.src, sport), (ip.dst, dport)
            key = (ip.p if isinstance(ip, dpkt.ip.IP) else ip.nxt,) + ((a + b) if a <= b else (b + a))
            flows[key] = flows.get(key, 0) + 1
    _ = socket  # dpkt's addresses stay bytes: no formatting in this loop
    return {"packets": packets, "flows": len(flows), "seconds": time.perf_counter() - t}


def run_scapy(path: str, limit: int) -> dict:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.utils import PcapReader

    t = time.perf_counter()
    flows = set()
    packets = 0
    with PcapReader(path) as reader:
        for pkt in reader:
            packets += 1
            if IP in pkt:
                ip = pkt[IP]
                l4 = ip[TCP] if TCP in ip else ip[UDP] if UDP in ip else None
                flows.add((ip.proto, ip.src, ip.dst, getattr(l4, "sport", 0), getattr(l4, "dport", 0)))
            if packets >= limit:
                break
    return {"packets": packets, "flows": len(flows), "seconds": time.perf_counter() - t}


def stage_seconds(path: str) -> list[tuple[str, float, int]]:
    """CPU seconds of each stage of `fedgate flows` (one process), each stage run on its own
    over the whole file: where the time goes (the next thing to make faster).  The cyclic
    collector is off here: the lists of a million packets held between stages would make
    its passes dominate (the streaming pipeline never holds them)."""
    import gc

    gc.disable()
    from gateway.flows.blocks import BLOCK_SIZE, block_packets, decode_block, scan_records
    from gateway.flows.conntrack import ConnTracker
    from gateway.flows.packets import PacketDecoder
    from gateway.flows.pcap import iter_frames

    rows = []
    data = Path(path).read_bytes()
    little = data[:4] == b"\xd4\xc3\xb2\xa1"
    chunks = []
    c = time.process_time()
    pos, frames = 24, 0
    while pos < len(data):
        buf = data[pos:pos + BLOCK_SIZE]
        offsets, stop, _bad = scan_records(buf, 0, little, 262144)
        if not offsets:
            break
        chunks.append((buf, offsets))
        frames += len(offsets)
        pos += stop
    rows.append(("find records (blocks.scan_records)", time.process_time() - c, frames))
    c = time.process_time()
    blocks = [decode_block(buf, offsets, little=little, nano=False, linktype=1, ignore_checksums=False)
              for buf, offsets in chunks]
    rows.append(("gather header fields (blocks.decode_block, numpy)", time.process_time() - c, frames))
    decoder = PacketDecoder()
    c = time.process_time()
    batches = [list(block_packets(b, decoder, 1)) for b in blocks]
    rows.append(("build packets (blocks.block_packets)", time.process_time() - c, frames))
    del blocks, chunks
    # the per-frame route, for comparison: what the block route replaces
    with open(path, "rb") as f:
        c = time.process_time()
        frame_list = list(iter_frames(f))
        rows.append(("  per-frame: read records (iter_frames)", time.process_time() - c, len(frame_list)))
    decode = PacketDecoder().decode
    c = time.process_time()
    for ts, lt, fr, wl in frame_list:
        decode(lt, fr, ts, wl)
    rows.append(("  per-frame: decode (PacketDecoder)", time.process_time() - c, len(frame_list)))
    del frame_list
    packets = sum(map(len, batches))
    for fast in (True, False):
        tracker = ConnTracker(fast_path=fast)
        c = time.process_time()
        records = []
        for batch in batches:
            records += tracker.feed_many(batch)
        records.extend(tracker.flush())
        label = "track + build records (ConnTracker.feed_many)" + ("" if fast else ", fast_path=False")
        rows.append((label, time.process_time() - c, packets))
    from gateway.flows.zeek import LogHeader, ZeekTsvWriter

    with open(os.devnull, "wb") as sink:
        c = time.process_time()
        writer = ZeekTsvWriter(sink, header=LogHeader.zeek_conn())
        writer.write(records)
        writer.close()
        rows.append(("write Zeek TSV (ZeekTsvWriter)", time.process_time() - c, len(records)))
    return rows


def child(tool: str, path: str, limit: int) -> None:
    if tool == "stages":
        print(json.dumps({"stages": stage_seconds(path)}))
        return
    if tool == "fedgate":
        out = run_fedgate(path, False)
    elif tool == "fedgate-C":
        out = run_fedgate(path, True)
    elif tool == "fedgate-2w":
        out = run_fedgate(path, False, workers=2)
    elif tool == "nfstream":
        out = run_nfstream(path)
    elif tool == "dpkt":
        out = run_dpkt(path)
    elif tool == "scapy":
        out = run_scapy(path, limit)
    else:
        raise SystemExit(f"unknown tool {tool}")
    # nfstream meters in child processes: count them too (CPU summed, memory the larger peak)
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["peak_rss_mib"] = max(own.ru_maxrss, kids.ru_maxrss) / 1024
    # includes interpreter start-up and imports
    out["cpu_seconds"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    print(json.dumps(out))


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--scapy-slice", type=int, default=20_000)
    ap.add_argument("--tools", default="fedgate,fedgate-C,fedgate-2w,nfstream,dpkt,scapy")
    ap.add_argument("--keep", help="also keep the generated pcap at this path")
    ap.add_argument("--pcap", help="measure this pcap instead of building one (e.g. one kept with --keep)")
    ap.add_argument("--stages", action="store_true",
                    help="also print CPU seconds per stage of fedgate (read, decode, track, write)")
    ap.add_argument("--child", nargs=3, metavar=("TOOL", "PCAP", "LIMIT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    with tempfile.TemporaryDirectory() as tmp:
        if args.pcap:
            path = Path(args.pcap)
            console.print(f"using {path} ({path.stat().st_size / 2**20:.1f} MiB)")
            title = f"pcap -> flows, {path.name}"
        else:
            path = Path(args.keep) if args.keep else Path(tmp) / "bench.pcap"
            t = time.perf_counter()
            n, replicas = build_pcap(path, args.packets)
            size = path.stat().st_size
            console.print(f"built {path.name}: {n:,} packets ({replicas:,} replicas of the samples), "
                          f"{size / 2**20:.1f} MiB in {time.perf_counter() - t:.1f} s")
            title = f"pcap -> flows, {n:,} packets"
        table = Table(title=title)
        for col in ("tool", "packets", "flows", "seconds", "packets/s", "flows/s", "CPU s", "packets/CPU-s",
                    "peak RSS MiB", "what it does"):
            table.add_column(col, justify="left" if col in ("tool", "what it does") else "right")
        what = {
            "fedgate": "Zeek conn semantics, checksums verified, TSV written, 1 process",
            "fedgate-C": "same, checksums not verified (-C)",
            "fedgate-2w": "same, 2 worker processes (--workers 2; auto on 2 cores)",
            "nfstream": "flow meter, C core, no DPI",
            "dpkt": "Ethernet/IP decode + 5-tuple dict",
            "scapy": f"full dissection, first {args.scapy_slice:,} packets",
        }
        for tool in args.tools.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", tool, str(path), str(args.scapy_slice)],
                capture_output=True, text=True, cwd=ROOT,
            )
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                table.add_row(tool, "-", "-", "-", "-", "-", "-", "-", "-", f"not run: {last[:60]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            table.add_row(tool, f"{r['packets']:,}", f"{r['flows']:,}", f"{r['seconds']:.2f}",
                          f"{r['packets'] / r['seconds']:,.0f}", f"{r['flows'] / r['seconds']:,.0f}",
                          f"{r['cpu_seconds']:.1f}", f"{r['packets'] / r['cpu_seconds']:,.0f}",
                          f"{r['peak_rss_mib']:.0f}", what[tool])
        console.print(table)
        if args.stages:
            proc = subprocess.run([sys.executable, __file__, "--child", "stages", str(path), "0"],
                                  capture_output=True, text=True, cwd=ROOT, check=True)
            stages = Table(title="fedgate stages (CPU seconds, each stage alone over the whole file)")
            for col in ("stage", "items", "CPU s", "µs/item", "items/CPU-s"):
                stages.add_column(col, justify="left" if col == "stage" else "right")
            for name, sec, items in json.loads(proc.stdout.strip().splitlines()[-1])["stages"]:
                stages.add_row(name, f"{items:,}", f"{sec:.2f}", f"{sec / items * 1e6:.2f}", f"{items / sec:,.0f}")
            console.print(stages)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        console.print(f"{os.cpu_count()} CPUs visible, 1-min load average {load:.1f} at the end: "
                      "wall-clock figures are pessimistic when it exceeds the CPU count.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
