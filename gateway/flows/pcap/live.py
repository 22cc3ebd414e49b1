"""Live capture: frames from a network interface -> conn records as connections end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from gateway.flows.pcap.common import CaptureStats
from gateway.flows.pcap.pipeline import new_frame_tracker
from gateway.flows.record import ConnRecord
from gateway.flows.settings import FlowSettings


def live_records(
    iface: str,
    *,
    bpf: str | None = None,
    ignore_checksums: bool = True,
    local_nets: Iterable[str] | None = None,
    stats: CaptureStats | None = None,
    stop: Callable[[], bool] | None = None,
    poll_interval: float = 1.0,
    socket_factory: Callable[..., object] | None = None,
    settings: FlowSettings | None = None,
) -> Iterator[ConnRecord]:
    """Sniff ``iface`` with scapy and yield conn records as connections end.

    ``bpf`` is a capture filter (tcpdump syntax).  Checksums are ignored by default because
    NIC checksum offloading makes locally sent packets look corrupt (Zeek recommends ``-C``
    on such hosts).  ``stop()`` is polled every ``poll_interval`` seconds; when it returns
    True the remaining connections are flushed and the iterator ends.  Timers advance with
    wall-clock time even when no packet arrives, so idle connections still end.
    """
    from scapy.config import conf  # heavy import, only for live capture

    if socket_factory is None:
        import scapy.arch  # noqa: F401 - sets conf.L2listen (None until the arch layer is loaded)
    stats = stats if stats is not None else CaptureStats()
    factory = socket_factory or conf.L2listen
    sock = factory(iface=iface, filter=bpf)
    # the socket's link-layer class (Ether, CookedLinux, ...) -> its pcap link type
    dlt = conf.l2types.layer2num.get(getattr(sock, "LL", None), 1)
    ft = new_frame_tracker(ignore_checksums=ignore_checksums, local_nets=local_nets, settings=settings)
    try:
        while not (stop and stop()):
            ready = sock.select([sock], poll_interval) if hasattr(sock, "select") else [sock]
            now = time.time()
            if not ready:
                done = ft.advance(now)
                stats.flows += len(done)
                yield from done
                continue
            raw = sock.recv_raw()
            if not raw or raw[1] is None:
                continue
            _cls, data, ts = raw[0], raw[1], raw[2] if len(raw) > 2 and raw[2] else now
            stats.frames(1, len(data), float(ts), float(ts))
            done = ft.feed_frame(dlt, bytes(data), float(ts), len(data))
            if done:
                stats.flows += len(done)
                yield from done
        rest = ft.flush()
        stats.flows += len(rest)
        yield from rest
    finally:
        stats.merge_skipped(ft.decoder.skipped)
        stats.merge_weird(ft.decoder.notes)
        stats.merge_skipped(ft.skipped)
        sock.close()
