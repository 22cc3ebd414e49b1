"""``fedgate flows``: capture files -> one conn log (Zeek TSV or JSON lines), in one
process or split over worker processes by address pair."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO

from gateway.flows.pcap.common import CaptureError, CaptureStats, NotACaptureError, is_capture_file
from gateway.flows.pcap.pipeline import new_frame_tracker, record_batches
from gateway.flows.record import ConnRecord
from gateway.flows.settings import FlowSettings
from gateway.flows.zeek.writer import LogHeader, ZeekTsvWriter, zeek_json_line

log = logging.getLogger("gateway.flows.pcap")

AUTO_WORKERS_MIN_BYTES = 32 << 20  # below this a single process is done before workers pay off
AUTO_WORKERS_MAX = 8  # every worker reads the whole file: past a few, reading dominates
# batches a worker may run ahead of the one the parent writes (memory bound of the merge)
_AHEAD = 32


def auto_workers(total_bytes: int, cpus: int) -> int:
    """Worker processes for ``--workers auto``: one per core (at most
    :data:`AUTO_WORKERS_MAX`), and one for inputs under :data:`AUTO_WORKERS_MIN_BYTES`."""
    if total_bytes < AUTO_WORKERS_MIN_BYTES:
        return 1
    return max(1, min(cpus, AUTO_WORKERS_MAX))


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _CountingReader:
    """Wraps a binary file and reports the bytes read so far (for a progress bar)."""

    def __init__(self, f: BinaryIO, report: Callable[[int], None]):
        self._f = f
        self._report = report
        self.done = 0
        self.name = getattr(f, "name", None)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.done += len(data)
        self._report(self.done)
        return data

    def peek(self, n: int = 1) -> bytes:
        return self._f.peek(n) if hasattr(self._f, "peek") else b""

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def readable(self) -> bool:
        return True


def _batch_formatter(fmt: str) -> Callable[[list[ConnRecord]], bytes]:
    """Records -> the bytes of their log lines (Zeek TSV without the header, or JSON lines)."""
    if fmt == "json":
        return lambda records: b"".join(zeek_json_line(rec).encode() + b"\n" for rec in records)
    import io

    buf = io.BytesIO()
    writer = ZeekTsvWriter(buf, header=LogHeader.zeek_conn(), close_line=False)
    writer.write(())  # the header goes first: dropped with the first reset below

    def lines(records: list[ConnRecord]) -> bytes:
        buf.seek(0)
        buf.truncate()
        writer.write(records)
        return buf.getvalue()

    return lines


def convert_captures(
    paths: Iterable[str],
    out: BinaryIO,
    *,
    fmt: str = "zeek",
    ignore_checksums: bool = False,
    local_nets: Iterable[str] | None = None,
    likely_server_ports: frozenset[tuple[int, int]] | None = None,
    protocols: Iterable[str] | None = None,
    bpf: str | None = None,
    workers: int | str = 1,
    on_progress: Callable[[str, int, int], None] | None = None,
    settings: FlowSettings | None = None,
) -> CaptureStats:
    """Turn capture files into one conn log on ``out`` (Zeek TSV or Zeek JSON lines).

    Each file is tracked on its own (connections do not span files).  ``on_progress(path,
    bytes_done, bytes_total)`` is called as the files are read.  Raises :class:`CaptureError`
    for a file that is not a capture or has an unsupported link type (records of earlier
    files are already written).

    ``workers`` > 1 splits each file by address pair over that many processes (each reads
    the whole file, decodes and tracks only its share, see :func:`_sharded_output`); the
    records are the same, in a different (still deterministic) order.  ``"auto"``: see
    :func:`auto_workers`.
    """
    paths = list(paths)
    if workers == "auto":
        workers = auto_workers(sum(os.path.getsize(p) for p in paths), usable_cpus())
    if not isinstance(workers, int) or workers < 1:
        raise ValueError("workers must be >= 1 or 'auto'")
    if fmt not in ("zeek", "json"):
        raise ValueError(f"unknown format {fmt!r}; choose zeek or json")
    packet_filter = None
    if bpf:
        from gateway.flows.bpf import compile_filter

        packet_filter = compile_filter(bpf)  # a bad filter fails before anything is written
    for path in paths:  # fail before writing anything if an input is not a capture
        with open(path, "rb") as f:
            head = f.read(1 << 16)  # enough compressed input for gzip to yield the magic
        if not is_capture_file(head):
            raise NotACaptureError(f"{path}: not a pcap/pcapng file (starts with {head[:4].hex() or 'nothing'})")
    options = dict(ignore_checksums=ignore_checksums, local_nets=local_nets, likely_server_ports=likely_server_ports,
                   protocols=protocols, settings=settings)
    stats = CaptureStats()
    started = time.perf_counter()
    writer = ZeekTsvWriter(out, header=LogHeader.zeek_conn()) if fmt == "zeek" else None
    gc_saved = _fewer_gc_passes()
    try:
        for path in paths:
            total = os.path.getsize(path)
            report = None if on_progress is None else (lambda done, p=path: on_progress(p, done, total))
            if workers > 1:
                # the workers format their records: only bytes cross the pipes
                if writer is not None:
                    writer.write(())  # the header, before the first worker's lines
                for chunk in _sharded_output(path, workers, fmt, options, bpf, stats, report):
                    out.write(chunk)
            else:
                with open(path, "rb") as raw:
                    f: BinaryIO = raw if report is None else _CountingReader(raw, report)  # type: ignore[assignment]
                    ft = new_frame_tracker(packet_filter=packet_filter, **options)
                    for records in record_batches(f, stats, ft):
                        if writer is not None:
                            writer.write(records)
                        else:
                            out.write(b"".join(zeek_json_line(rec).encode() + b"\n" for rec in records))
            if on_progress is not None:
                on_progress(path, total, total)
    finally:
        gc.set_threshold(*gc_saved)
        if writer is not None:
            writer.close()
        stats.elapsed = time.perf_counter() - started
    return stats


def _fewer_gc_passes() -> tuple[int, ...]:
    """Raise the cyclic collector's thresholds for a bulk run; returns the old ones.

    Tracking allocates a few objects per packet and frees them by reference counting
    (connections break their cycles when they end), yet at the default threshold (700)
    the collector would scan the young objects every ~100 packets: 10-20% of the run."""
    saved = gc.get_threshold()
    gc.set_threshold(max(saved[0], 50_000), max(saved[1], 20), max(saved[2], 100))
    return saved


# ---------------------------------------------------------------------- sharding over processes

def _shard_worker(conn, path: str, index: int, count: int, fmt: str, options: dict, bpf: str | None) -> None:
    """Track the connections of one shard of a file (runs in a worker process); sends
    ``("lines", bytes, file position)`` per batch of the file (its records formatted as
    ``fmt``), then ``("done", CaptureStats)``, or ``("error", exception)``."""
    try:
        _fewer_gc_passes()
        gc.freeze()  # what the parent had: never garbage, never scanned again
        if index:
            log.disabled = True  # every worker reads the file: one truncation warning is enough
        stats = CaptureStats()
        packet_filter = None
        if bpf:
            from gateway.flows.bpf import compile_filter

            packet_filter = compile_filter(bpf)
        ft = new_frame_tracker(packet_filter=packet_filter, shard=(index, count), **options)
        with open(path, "rb") as f:
            lines = _batch_formatter(fmt)
            for records in record_batches(f, stats, ft):
                # with the bytes of the file read so far, for the parent's progress bar
                conn.send(("lines", lines(records), f.tell()))
        if index != 0:  # worker 0 reports the file-wide counters
            stats.packets = stats.bytes = 0
            stats.first_ts = stats.last_ts = None
            stats.warnings.clear()
            stats.truncated = False
        conn.send(("done", stats))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        if not isinstance(exc, CaptureError):
            import traceback

            exc = RuntimeError(f"flows worker {index} failed: {traceback.format_exc()}")
        conn.send(("error", exc))
    finally:
        conn.close()


def _sharded_output(path, workers, fmt, options, bpf, stats: CaptureStats,
                    progress: Callable[[int], None] | None = None):
    """Log lines (bytes, formatted as ``fmt``) of one file tracked by ``workers`` processes,
    streamed as connections end.

    Every worker sends one message per batch of the file (the same batches in all
    workers); the parent writes them round-robin - batch 1 of worker 0, of worker 1, ...,
    then batch 2 - so the output is deterministic for a given number of workers, and
    memory follows the open connections: a worker runs at most ``_AHEAD`` batches ahead
    of the writer before its pipe blocks it."""
    import multiprocessing
    from collections import deque
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    conns, procs = [], []
    finished_cleanly = False
    try:
        for i in range(workers):
            recv, send = ctx.Pipe(duplex=False)
            _widen_pipe(send)
            proc = ctx.Process(target=_shard_worker, daemon=True, args=(send, path, i, workers, fmt, options, bpf))
            proc.start()
            send.close()
            conns.append(recv)
            procs.append(proc)
        pending = [deque() for _ in range(workers)]
        finished = [False] * workers  # "done" received (nothing more to read)
        order = list(range(workers))  # workers whose messages are still to be written
        turn = 0
        while order:
            i = order[turn % len(order)]
            if not pending[i]:
                readable = [conns[j] for j in range(workers) if not finished[j] and len(pending[j]) < _AHEAD]
                for c in wait(readable):
                    j = conns.index(c)
                    try:
                        msg = c.recv()
                    except EOFError:
                        msg = ("error", CaptureError(f"{path}: flows worker {j} ended without a result"))
                    pending[j].append(msg)
                    if msg[0] != "lines":
                        finished[j] = True
                continue
            tag, value, *done = pending[i].popleft()
            if tag == "lines":
                yield value
                turn += 1
                if progress is not None and i == 0:
                    progress(done[0])
            elif tag == "done":
                order.remove(i)
                stats.merge(value)
            else:
                raise value
        finished_cleanly = True
    finally:
        for proc in procs:
            if not finished_cleanly and proc.is_alive():
                proc.terminate()  # an error or an abandoned output: stop the others
            proc.join()
        for c in conns:
            c.close()


def _widen_pipe(conn) -> None:
    """Let a pipe hold a whole batch (Linux: up to 1 MiB instead of 64 KiB), so a worker
    hands its lines over and goes on instead of waiting for the parent to be scheduled a
    few times per batch (costly on busy cores)."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):
        pass  # other systems: the default pipe size, only slower
