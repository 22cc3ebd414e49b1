"""Throughput of pcap -> flows: `fedgate flows` against nfstream (and dpkt, scapy), one run.

    python -m benchmarks.pcap [--packets 1000000] [--keep FILE]      # the table below
    python -m benchmarks.pcap --pcap FILE --tools fedgate-w1,fedgate-auto   # fedgate only
    python -m benchmarks.pcap --stages                 # + CPU per stage of one process
    python -m benchmarks.pcap --table-full 1000000     # + per-packet cost, full table vs empty

Builds a pcap of at least ``--packets`` packets in a temporary directory from the Zeek
sample traces (tests/fixtures/zeek-samples), each replica with shifted IPv4/IPv6 addresses
(checksums patched incrementally, RFC 1624, so valid ones stay valid) and shifted
timestamps, then runs each tool in a process of its own, one after the other:

* fedgate-w1   - the real CLI, ``fedgate flows FILE -o /dev/null --workers 1``: full Zeek
                 conn semantics, checksums verified, Zeek TSV written
* fedgate-auto - the same with ``--workers auto`` (what ``fedgate flows`` does by default:
                 one process per core for inputs of 32 MiB or more)
* fedgate-pure - ``--workers 1`` on the pure-Python reference (FEDGATE_PURE_PYTHON=1)
* nfstream     - NFStreamer without DPI or statistics (a flow meter with a C core);
                 installed by ``make bench`` (the ``bench`` extra)
* dpkt         - dpkt.pcap.Reader + Ethernet/IP decode + a dict keyed by the 5-tuple
* scapy        - scapy.utils.PcapReader (full dissection) on the first --scapy-slice packets

Packets/s is the file's packet count over the wall-clock seconds of the whole process
(start-up and imports included, as a user sees it); ``vs nfstream`` divides by
nfstream's rate in the same run.  CPU seconds and peak memory (largest single process,
workers included) come from the process's own rusage.  The machine's cores may be shared:
compare tools within one run, never across runs.

``--stages`` adds CPU seconds per stage of one process (walk + decode + track, compiled
and pure-Python reference; writing TSV).  ``--table-full N`` feeds a steady stream of TCP
sessions to a tracker whose table already holds N connections (so every new connection
evicts one) and to an empty one, and prints the cost per packet of each (compiled and
reference).
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
DEFAULT_TOOLS = "fedgate-w1,fedgate-auto,nfstream,dpkt"


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

def run_fedgate(path: str, workers: str) -> dict:
    """The real CLI, in this process (the child's start-up and imports are timed by the parent)."""
    from gateway.cli import main

    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    out.close()
    try:
        code = None
        argv = ["flows", path, "-o", os.devnull, "--workers", workers, "--no-progress", "--json-summary"]
        saved = sys.stdout
        sys.stdout = open(out.name, "w")
        try:
            main(argv, standalone_mode=False)
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.stdout.close()
            sys.stdout = saved
        if code not in (None, 0):
            raise SystemExit(f"fedgate flows exited {code}")
        summary = json.loads(Path(out.name).read_text())
    finally:
        os.unlink(out.name)
    return {"packets": summary["packets"], "flows": summary["flows"]}


def run_nfstream(path: str) -> dict:
    from nfstream import NFStreamer

    flows = packets = 0
    for flow in NFStreamer(source=path, statistical_analysis=False, n_dissections=0, n_meters=1):
        flows += 1
        packets += flow.bidirectional_packets
    return {"packets": packets, "flows": flows}


def run_dpkt(path: str) -> dict:
    import dpkt

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
    return {"packets": packets, "flows": len(flows)}


def run_scapy(path: str, limit: int) -> dict:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.utils import PcapReader

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
    return {"packets": packets, "flows": len(flows)}


def stage_seconds(path: str) -> list[tuple[str, float, int]]:
    """CPU seconds of each stage of one `fedgate flows` process, each over the whole file."""
    from gateway.flows import pcap
    from gateway.flows.pcap import CaptureStats, new_frame_tracker, record_batches
    from gateway.flows.zeek import LogHeader, ZeekTsvWriter

    rows = []
    records = []
    for compiled in (True, False):
        if compiled and not pcap.compiled_available():
            continue
        stats = CaptureStats()
        ft = new_frame_tracker(compiled=compiled)
        c = time.process_time()
        with open(path, "rb") as f:
            records = [r for batch in record_batches(f, stats, ft) for r in batch]
        name = "compiled" if compiled else "pure-Python reference"
        rows.append((f"read + decode + track + build records, {name}", time.process_time() - c, stats.packets))
    with open(os.devnull, "wb") as sink:
        c = time.process_time()
        writer = ZeekTsvWriter(sink, header=LogHeader.zeek_conn())
        writer.write(records)
        writer.close()
        rows.append(("write Zeek TSV (ZeekTsvWriter)", time.process_time() - c, len(records)))
    return rows


# ----------------------------------------------------------------------------- full table

def _pcap_bytes(frames: list[tuple[float, bytes]]) -> bytes:
    rec = struct.Struct("<IIII")
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for ts, data in frames:
        sec = int(ts)
        out.append(rec.pack(sec, int(round((ts - sec) * 1e6)) % 1_000_000, len(data), len(data)))
        out.append(data)
    return b"".join(out)


def _csum(data: bytes) -> int:
    s = int.from_bytes(data + b"\0" * (len(data) & 1), "big") % 0xFFFF
    return 0xFFFF - s if s else 0xFFFF


def _tcp_frame(src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int, ack: int,
               payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 64240, 0, 0) + payload
    pseudo = src + dst + struct.pack("!HH", 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0) + src + dst
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + ip + tcp


def session_stream(packets: int, t0: float) -> bytes:
    """A pcap of steady TCP traffic: sessions of 10 packets (handshake, two requests and
    replies, both FINs), 100 us apart: closed sessions end on their timers meanwhile."""
    frames = []
    ts = t0
    i = 0
    while len(frames) < packets:
        c, s = bytes([10, 1, (i >> 8) & 255, i & 255]), bytes([192, 0, 2, i % 200 + 1])
        cp, cs, ss = 1024 + i % 60000, 1000 * i & 0xFFFFFFFF, 7 * i & 0xFFFFFFFF
        q, r = b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 200
        steps = [(True, 0x02, cs, 0, b""), (False, 0x12, ss, cs + 1, b""), (True, 0x10, cs + 1, ss + 1, b""),
                 (True, 0x18, cs + 1, ss + 1, q), (False, 0x18, ss + 1, cs + 1 + len(q), r),
                 (True, 0x18, cs + 1 + len(q), ss + 1 + len(r), q),
                 (False, 0x18, ss + 1 + len(r), cs + 1 + 2 * len(q), r),
                 (True, 0x11, cs + 1 + 2 * len(q), ss + 1 + 2 * len(r), b""),
                 (False, 0x11, ss + 1 + 2 * len(r), cs + 2 + 2 * len(q), b""),
                 (True, 0x10, cs + 2 + 2 * len(q), ss + 2 + 2 * len(r), b"")]
        for fwd, flags, seq, ack, data in steps:
            frame = (_tcp_frame(c, s, cp, 80, flags, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, data) if fwd else
                     _tcp_frame(s, c, 80, cp, flags, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, data))
            frames.append((ts, frame))
            ts += 1e-4
        i += 1
    return _pcap_bytes(frames[:packets])


def preload_stream(connections: int, t0: float) -> bytes:
    """A pcap of one UDP datagram each to ``connections`` distinct connections, all at t0."""
    udp = struct.pack("!HHHH", 5000, 9999, 12, 0) + b"load"
    frames = []
    for i in range(connections):
        src = bytes([10, 64 + (i >> 16), (i >> 8) & 255, i & 255])
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0) + src + b"\xc6\x33\x64\x01"
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        frames.append((t0, b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\x00" + ip + udp))
    return _pcap_bytes(frames)


def table_cost(stream: bytes, preload: bytes, compiled: bool, max_connections: int) -> dict:
    """CPU seconds per packet of ``stream`` on a tracker that first took ``preload``."""
    import gc
    import io

    from gateway.flows.pcap import CaptureStats, new_frame_tracker, record_batches
    from gateway.flows.settings import FlowSettings

    ft = new_frame_tracker(compiled=compiled, settings=FlowSettings(max_connections=max_connections))
    gc.disable()  # a million live connections: the measured loop should not pay for GC passes
    if preload:
        for _ in record_batches(io.BytesIO(preload), CaptureStats(), ft, flush=False):
            pass
    held = ft.open_connections
    stats = CaptureStats()
    c = time.process_time()
    for _ in record_batches(io.BytesIO(stream), stats, ft, flush=False):
        pass
    seconds = time.process_time() - c
    return {"held": held, "packets": stats.packets, "seconds": seconds, "evicted": stats.skipped.get(
        "connection_table_full", 0), "us_per_packet": seconds / stats.packets * 1e6}


# ----------------------------------------------------------------------------- children

def child(tool: str, path: str, limit: int) -> None:
    if tool == "stages":
        print(json.dumps({"stages": stage_seconds(path)}))
        return
    if tool.startswith("table:"):
        _, kind, conns, packets = tool.split(":")
        t0 = 1_700_000_000.0
        stream = session_stream(int(packets), t0)
        preload = preload_stream(int(conns), t0 - 1.0)
        compiled = kind == "compiled"
        empty = table_cost(stream, b"", compiled, int(conns))
        full = table_cost(stream, preload, compiled, int(conns))
        print(json.dumps({"empty": empty, "full": full}))
        return
    if tool == "fedgate-w1":
        out = run_fedgate(path, "1")
    elif tool == "fedgate-auto":
        out = run_fedgate(path, "auto")
    elif tool == "fedgate-pure":
        out = run_fedgate(path, "1")
    elif tool == "nfstream":
        out = run_nfstream(path)
    elif tool == "dpkt":
        out = run_dpkt(path)
    elif tool == "scapy":
        out = run_scapy(path, limit)
    else:
        raise SystemExit(f"unknown tool {tool}")
    # worker processes (fedgate's, nfstream's meters): CPU summed, memory the larger peak
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["peak_rss_mib"] = max(own.ru_maxrss, kids.ru_maxrss) / 1024
    out["cpu_seconds"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    print(json.dumps(out))


def _spawn(tool: str, path: str, limit: int) -> tuple[dict | None, float, str]:
    env = dict(os.environ)
    env.pop("FEDGATE_PURE_PYTHON", None)
    if tool in ("fedgate-pure",) or tool.startswith("table:pure"):
        env["FEDGATE_PURE_PYTHON"] = "1"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pcap", "--child", tool, path, str(limit)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return None, wall, (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, ""


# ----------------------------------------------------------------------------- main

WHAT = {
    "fedgate-w1": "fedgate flows --workers 1",
    "fedgate-auto": "fedgate flows --workers auto",
    "fedgate-pure": "--workers 1, pure Python",
    "nfstream": "NFStreamer, no DPI",
    "dpkt": "decode + 5-tuple dict",
    "scapy": "dissection, a slice",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--scapy-slice", type=int, default=20_000)
    ap.add_argument("--tools", default=DEFAULT_TOOLS, help=f"comma-separated, of: {', '.join(WHAT)}")
    ap.add_argument("--keep", help="also keep the generated pcap at this path")
    ap.add_argument("--pcap", help="measure this pcap instead of building one (e.g. one kept with --keep)")
    ap.add_argument("--stages", action="store_true", help="also print CPU seconds per stage of one process")
    ap.add_argument("--table-full", type=int, metavar="N", default=0,
                    help="also measure the cost per packet with N connections in the table against none")
    ap.add_argument("--table-packets", type=int, default=200_000, help="packets of the --table-full stream")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--child", nargs=3, metavar=("TOOL", "PCAP", "LIMIT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=args.json)
    doc: dict = {"tools": {}, "stages": None, "table_full": None}
    with tempfile.TemporaryDirectory() as tmp:
        if args.pcap:
            path = Path(args.pcap)
            console.print(f"using {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        else:
            path = Path(args.keep) if args.keep else Path(tmp) / "bench.pcap"
            t = time.perf_counter()
            n, replicas = build_pcap(path, args.packets)
            console.print(f"built {path.name}: {n:,} packets ({replicas:,} replicas of the samples), "
                          f"{path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t:.1f} s")
        from gateway.flows.pcap import CaptureStats, iter_frames

        with open(path, "rb") as f:
            file_packets = sum(1 for _ in iter_frames(f, CaptureStats()))
        doc["file_packets"] = file_packets
        tools = [t for t in args.tools.split(",") if t]
        results = {}
        for tool in tools:
            r, wall, err = _spawn(tool, str(path), args.scapy_slice)
            results[tool] = (r, wall, err)
        base = results.get("nfstream", (None,))[0]
        base_rate = file_packets / results["nfstream"][1] if base else None
        table = Table(title=f"pcap -> flows, {file_packets:,} packets ({path.name})")
        for col in ("tool", "packets/s", "vs nfstream", "wall s", "CPU s", "peak RSS MiB", "flows", "what"):
            table.add_column(col, justify="left" if col in ("tool", "what") else "right", overflow="fold")
        for tool in tools:
            r, wall, err = results[tool]
            if r is None:
                table.add_row(tool, "-", "-", f"{wall:.2f}", "-", "-", "-", f"not run: {err[:60]}")
                doc["tools"][tool] = {"error": err}
                continue
            counted = r["packets"] if tool == "scapy" else file_packets
            rate = counted / wall
            ratio = rate / base_rate if base_rate else None
            table.add_row(tool, f"{rate:,.0f}", f"{ratio:.2f}x" if ratio else "-", f"{wall:.2f}",
                          f"{r['cpu_seconds']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['flows']:,}", WHAT[tool])
            doc["tools"][tool] = dict(r, wall_seconds=wall, packets_per_second=rate, vs_nfstream=ratio)
        console.print(table)
        if "fedgate-w1" in doc["tools"] and "fedgate-auto" in doc["tools"] and \
                "packets_per_second" in doc["tools"]["fedgate-auto"]:
            speedup = doc["tools"]["fedgate-auto"]["packets_per_second"] / doc["tools"]["fedgate-w1"][
                "packets_per_second"]
            doc["auto_vs_one_worker"] = speedup
            console.print(f"--workers auto ({os.cpu_count()} CPUs visible) runs {speedup:.2f}x one worker")
        if args.stages:
            r, _, err = _spawn("stages", str(path), 0)
            stages = Table(title="fedgate stages (CPU seconds, each stage alone over the whole file)")
            for col in ("stage", "items", "CPU s", "us/item", "items/CPU-s"):
                stages.add_column(col, justify="left" if col == "stage" else "right")
            for name, sec, items in (r or {"stages": []})["stages"]:
                stages.add_row(name, f"{items:,}", f"{sec:.2f}", f"{sec / items * 1e6:.2f}", f"{items / sec:,.0f}")
            doc["stages"] = (r or {}).get("stages")
            console.print(stages if r else f"stages not run: {err}")
    if args.table_full:
        full = Table(title=f"cost per packet, table holding {args.table_full:,} connections vs empty "
                           f"({args.table_packets:,} packets of TCP sessions)")
        for col in ("tracker", "empty us/pkt", "full us/pkt", "full / empty", "evicted", "held"):
            full.add_column(col, justify="left" if col == "tracker" else "right")
        doc["table_full"] = {}
        for kind in ("compiled", "pure"):
            r, _, err = _spawn(f"table:{kind}:{args.table_full}:{args.table_packets}", "-", 0)
            if r is None:
                full.add_row(kind, "-", "-", "-", "-", f"not run: {err[:50]}")
                continue
            e, f = r["empty"], r["full"]
            full.add_row(kind, f"{e['us_per_packet']:.2f}", f"{f['us_per_packet']:.2f}",
                         f"{f['us_per_packet'] / e['us_per_packet']:.2f}x", f"{f['evicted']:,}", f"{f['held']:,}")
            doc["table_full"][kind] = r
        console.print(full)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    doc["cpus"], doc["load_1min"] = os.cpu_count(), load
    console.print(f"{os.cpu_count()} CPUs visible, 1-min load average {load:.1f} at the end: "
                  "wall-clock figures are pessimistic when it exceeds the CPU count.")
    if args.json:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
