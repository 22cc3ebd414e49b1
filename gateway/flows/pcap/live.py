"""Live capture: frames from a network interface -> conn records as connections end.

Two capture methods (``source.capture_method``; docs/flows-performance.md has the
measurements that chose the default):

* ``tcpdump`` (the default where tcpdump is installed): tcpdump captures through libpcap's
  memory-mapped ring (TPACKET_V3, ``-B`` :data:`RING_KIB`) and writes a pcap stream into
  a pipe; the stream is walked in large chunks by the frame tracker (``feed_pcap``:
  compiled, no Python object per frame).  Kernel drops are libpcap's counters, which tcpdump prints
  on ``SIGUSR1`` and at exit (``stats.dropped``).  ``SIGUSR2`` makes tcpdump flush what it
  buffered, so at low rates no packet waits longer than ``poll_interval``.
* ``scapy``: scapy's AF_PACKET listening socket, one ``recv`` per frame in Python; no ring,
  so it loses packets from a few tens of thousands per second on a busy core.

Timers advance with wall-clock time when no packet arrives, so idle connections end.
"""

from __future__ import annotations

import io
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator

from gateway.flows.pcap import classic
from gateway.flows.pcap.common import CaptureError, CaptureStats
from gateway.flows.pcap.pipeline import new_frame_tracker
from gateway.flows.record import ConnRecord
from gateway.flows.settings import FlowSettings

CAPTURE_METHODS = ("auto", "tcpdump", "scapy")
RING_KIB = 64 << 10  # tcpdump -B: libpcap's ring, 64 MiB (about half a second at 1 Gbit/s)
_READ = 4 << 20
# libpcap hands tcpdump a ring block when it is full or a second old (TPACKET_V3); a block
# not yet handed over is lost when tcpdump exits, so a stop waits this long first
# (--immediate-mode would hand over every packet, at a few times the CPU per packet)
BLOCK_TIMEOUT = 1.2
_DROPS = re.compile(rb"(\d+) packets? dropped by kernel")


def capture_method(method: str) -> str:
    """The method ``auto`` stands for here: tcpdump when it is installed, else scapy."""
    if method not in CAPTURE_METHODS:
        raise ValueError(f"capture method must be one of {', '.join(CAPTURE_METHODS)}, not {method!r}")
    if method == "auto":
        return "tcpdump" if shutil.which("tcpdump") else "scapy"
    return method


def live_records(
    iface: str,
    *,
    method: str = "auto",
    bpf: str | None = None,
    ignore_checksums: bool = True,
    local_nets: Iterable[str] | None = None,
    stats: CaptureStats | None = None,
    stop: Callable[[], bool] | None = None,
    poll_interval: float = 1.0,
    socket_factory: Callable[..., object] | None = None,
    settings: FlowSettings | None = None,
    on_ready: Callable[[], object] | None = None,
) -> Iterator[ConnRecord]:
    """Capture on ``iface`` and yield conn records as connections end.

    ``bpf`` is a capture filter (tcpdump syntax).  Checksums are ignored by default because
    NIC checksum offloading makes locally sent packets look corrupt (Zeek recommends ``-C``
    on such hosts).  ``stop()`` is polled every ``poll_interval`` seconds; when it returns
    True the remaining connections are flushed and the iterator ends.  ``socket_factory``
    (tests) stands in for scapy's listening socket and implies the scapy method.
    ``on_ready()`` is called once the interface is being captured.
    """
    stats = stats if stats is not None else CaptureStats()
    ft = new_frame_tracker(ignore_checksums=ignore_checksums, local_nets=local_nets, settings=settings)
    if socket_factory is not None or capture_method(method) == "scapy":
        frames = _scapy(iface, bpf, ft, stats, stop, poll_interval, socket_factory, on_ready)
    else:
        frames = _tcpdump(iface, bpf, ft, stats, stop, poll_interval, on_ready)
    try:
        for records in frames:
            if records:
                stats.flows += len(records)
                yield from records
        rest = ft.flush()
        stats.flows += len(rest)
        yield from rest
    finally:
        stats.merge_skipped(ft.decoder.skipped)
        stats.merge_weird(ft.decoder.notes)
        stats.merge_skipped(ft.skipped)


def _tcpdump(iface: str, bpf: str | None, ft, stats: CaptureStats, stop, poll_interval: float,
             on_ready) -> Iterator[list]:
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise CaptureError("capture method tcpdump: tcpdump is not installed (apt-get install tcpdump)")
    args = [tcpdump, "-i", iface, "-w", "-", "-B", str(RING_KIB), "-s", str(classic.MAX_SNAPLEN), "-n", "-q"]
    if bpf:
        args.append(bpf)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    errors = _listening(proc)  # tcpdump says so once its capture is open
    if proc.poll() is not None:
        proc.stdout.close()
        proc.stderr.close()
        raise CaptureError(f"tcpdump on {iface} failed: {errors.decode(errors='replace').strip()[-300:]}")
    if on_ready is not None:
        on_ready()
    os.set_blocking(err, False)
    try:  # a 1 MiB pipe: tcpdump keeps writing while this process is busy with a chunk
        import fcntl

        fcntl.fcntl(out, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):
        pass
    buf = b""
    header = None
    stopping = None  # when stop() said so
    interrupted = False
    last_stats = time.monotonic()
    try:
        while True:
            if stopping is None and stop is not None and stop():
                stopping = time.monotonic()
            if stopping is not None and not interrupted and time.monotonic() - stopping >= BLOCK_TIMEOUT:
                interrupted = True
                proc.send_signal(signal.SIGINT)  # tcpdump flushes, prints its counters and exits
            ready, _, _ = select.select([out], [], [], poll_interval if stopping is None else 0.1)
            data = os.read(out, _READ) if ready else None
            if data == b"":
                break
            if data:
                buf += data
                if header is None and len(buf) >= 24:
                    header = classic.read_header(io.BytesIO(buf[:24]), iface)
                    buf = buf[24:]
                if header is not None:
                    walked = ft.feed_pcap(buf, 0, header)
                    stats.frames(walked.frames, walked.wire_bytes, walked.first_ts, walked.last_ts)
                    buf = buf[walked.stop:]
                    yield walked.out
            else:
                yield ft.advance(time.time())
                if proc.poll() is None:
                    proc.send_signal(signal.SIGUSR2)  # flush what tcpdump buffered
            errors = _drain(err, errors)
            if time.monotonic() - last_stats > 10 and proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)  # print libpcap's counters
                last_stats = time.monotonic()
            _drops(errors, stats)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.set_blocking(err, True)
        errors += proc.stderr.read()
        _drops(errors, stats)
        proc.stdout.close()
        proc.stderr.close()
    if proc.returncode not in (0, -signal.SIGINT) and stopping is None and header is None:
        raise CaptureError(f"tcpdump on {iface} failed: {errors.decode(errors='replace').strip()[-300:]}")


def _listening(proc, timeout: float = 30.0) -> bytes:
    """tcpdump's first stderr lines, up to "listening on" (or its exit, or the timeout)."""
    text = b""
    deadline = time.monotonic() + timeout
    err = proc.stderr.fileno()
    while b"listening on" not in text and time.monotonic() < deadline:
        ready, _, _ = select.select([err], [], [], 0.2)
        if ready:
            chunk = os.read(err, 4096)
            if not chunk:
                break
            text += chunk
        elif proc.poll() is not None:
            break
    return text


def _drain(fd: int, errors: bytes) -> bytes:
    try:
        while chunk := os.read(fd, 65536):
            errors = (errors + chunk)[-65536:]
    except BlockingIOError:
        pass
    return errors


def _drops(errors: bytes, stats: CaptureStats) -> None:
    found = _DROPS.findall(errors)
    if found:
        stats.dropped = int(found[-1])


def _scapy(iface: str, bpf: str | None, ft, stats: CaptureStats, stop, poll_interval: float,
           socket_factory, on_ready) -> Iterator[list]:
    from scapy.config import conf  # heavy import, only for live capture

    if socket_factory is None:
        import scapy.arch  # noqa: F401 - sets conf.L2listen (None until the arch layer is loaded)
    factory = socket_factory or conf.L2listen
    sock = factory(iface=iface, filter=bpf)
    # the socket's link-layer class (Ether, CookedLinux, ...) -> its pcap link type
    dlt = conf.l2types.layer2num.get(getattr(sock, "LL", None), 1)
    if on_ready is not None:
        on_ready()
    try:
        while not (stop and stop()):
            ready = sock.select([sock], poll_interval) if hasattr(sock, "select") else [sock]
            now = time.time()
            if not ready:
                yield ft.advance(now)
                continue
            raw = sock.recv_raw()
            if not raw or raw[1] is None:
                continue
            _cls, data, ts = raw[0], raw[1], raw[2] if len(raw) > 2 and raw[2] else now
            stats.frames(1, len(data), float(ts), float(ts))
            yield ft.feed_frame(dlt, bytes(data), float(ts), len(data))
        stats.dropped = _socket_drops(sock)
    finally:
        sock.close()


def _socket_drops(sock) -> int | None:
    """PACKET_STATISTICS of an AF_PACKET socket: drops since the last read (None elsewhere)."""
    import struct

    raw = getattr(sock, "ins", None)
    try:
        return struct.unpack("II", raw.getsockopt(263, 6, 8))[1]  # SOL_PACKET, PACKET_STATISTICS
    except (AttributeError, OSError, struct.error):
        return None
