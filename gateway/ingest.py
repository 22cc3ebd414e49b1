"""Replay and live ingest: flow logs (and pcaps) in, rows (and detections) in the store.

``replay`` reads files from start to end; ``follow`` loops a live ``conn.log`` tail.
Both commit each batch of flows, its detections and the source's ingest offset in ONE
transaction, so a crash (even ``kill -9``) at any point followed by a rerun resumes
where the last commit ended: no flow is lost and none is stored twice (flows are also
keyed by ``(source, uid)``, so a re-read batch inserts nothing).

Bad lines are counted by reason and logged with file and line number; the good records
around them are kept.  With ``strict=True`` the first bad line stops the run with a
``ReplayError`` naming it (batches before it stay committed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.flows.record import ConnRecord
from gateway.store import repository
from gateway.store.db import StoreError, describe_db_error

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 20_000
READ_CHUNK = 1 << 20
# Bytes hashed to recognise a file again (its first bytes do not change while Zeek appends).
IDENTITY_PREFIX = 64 * 1024
# Score at or above which a flow counts as "malicious" when scoring against labels.
MALICIOUS_THRESHOLD = 0.5
MAX_RETRY_WAIT = 30.0  # seconds between retries of a failing database, at most
_UID = repository.FLOW_INSERT_COLUMNS.index("uid")


@runtime_checkable
class FlowClassifier(Protocol):
    """What replay/follow need from a model: a version and batched classification."""

    model_version: str

    def classify(self, records: Sequence[ConnRecord]) -> list[tuple[str, float]]:
        """One ``(detailed label, malicious score in [0, 1])`` per record, in order."""
        ...


class ReplayError(RuntimeError):
    """A replay stopped: a bad line under ``strict``, or an unreadable file."""


ProgressFn = Callable[[str, int, int], None]  # (path, bytes done, bytes total)


@dataclass
class FileSummary:
    path: str
    source: str
    records: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    resumed_from: int = 0
    kind: str = "zeek"
    error: str | None = None


@dataclass
class ReplaySummary:
    """What a replay did; ``records_per_s`` counts records parsed (and stored) per second."""

    files: list[FileSummary] = field(default_factory=list)
    records: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    skipped_packets: dict[str, int] = field(default_factory=dict)
    detections: int = 0
    model_version: str | None = None
    labelled: int = 0
    correct: int = 0
    label_correct: int = 0
    elapsed_s: float = 0.0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def records_per_s(self) -> float:
        return self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def accuracy(self) -> float | None:
        """Malicious-vs-benign accuracy of the classifier on labelled records."""
        return self.correct / self.labelled if self.labelled else None

    @property
    def label_accuracy(self) -> float | None:
        """Share of labelled records whose predicted label equals their detailed label."""
        return self.label_correct / self.labelled if self.labelled else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": [vars(f) for f in self.files],
            "records": self.records,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "rejected": self.rejected_total,
            "rejected_by_reason": dict(self.rejected),
            "skipped_packets": dict(self.skipped_packets),
            "detections": self.detections,
            "model_version": self.model_version,
            "labelled": self.labelled,
            "accuracy": self.accuracy,
            "label_accuracy": self.label_accuracy,
            "elapsed_s": round(self.elapsed_s, 3),
            "records_per_s": round(self.records_per_s, 1),
        }


# ---------------------------------------------------------------- helpers (pure)


def read_size(batch_size: int) -> int:
    """Bytes read per parser feed: about a batch of lines (~128 bytes each), within
    64 KiB..1 MiB, so small batches commit (and can resume) at fine grain."""
    return max(64 * 1024, min(READ_CHUNK, batch_size * 128))


def file_identity(head: bytes) -> str:
    """Identity of a file from its first bytes: a rerun resumes only the same file."""
    return "sha256-prefix:" + hashlib.sha256(head[:IDENTITY_PREFIX]).hexdigest()


def sniff_kind(head: bytes) -> str:
    """'pcap' for a capture (pcap/pcapng, gzip'd or not), 'gzip' for a gzip'd log,
    else 'zeek' (a text log)."""
    from gateway.flows.gz import is_gzip
    from gateway.flows.pcap import is_capture_file

    if is_capture_file(head):
        return "pcap"
    if is_gzip(head):
        return "gzip"
    return "zeek"


def default_source(path: str | os.PathLike) -> str:
    """The key flows of a replayed file are stored under: its absolute path."""
    return str(Path(path).expanduser().resolve())


def _display_label(record: ConnRecord) -> str | None:
    if record.label is None:
        return None
    if record.detailed_label and record.detailed_label not in ("-", "(empty)"):
        return record.detailed_label
    return record.label


def score_against_labels(
    records: Sequence[ConnRecord], verdicts: Sequence[tuple[str, float]], *, threshold: float = MALICIOUS_THRESHOLD
) -> tuple[int, int, int]:
    """(labelled, binary-correct, label-correct) of ``verdicts`` against record labels."""
    labelled = correct = label_correct = 0
    for rec, (label, score) in zip(records, verdicts, strict=True):
        truth = rec.is_malicious
        if truth is None:
            continue
        labelled += 1
        correct += (score >= threshold) == truth
        want = _display_label(rec)
        label_correct += want is not None and label.lower() == want.lower()
    return labelled, correct, label_correct


# ---------------------------------------------------------------- one transaction per batch


class BatchResult(NamedTuple):
    stored: int  # new flows
    detections: int  # new detections
    refused: list[repository.RefusedRow]  # records the database could not take


def commit_batch(
    session_factory: sessionmaker[Session],
    records: Sequence[ConnRecord],
    *,
    source: str,
    classifier: FlowClassifier | None = None,
    verdicts: Sequence[tuple[str, float]] | None = None,
    offset: tuple[str, int, str | None] | None = None,
) -> BatchResult:
    """Store ``records`` (+ their verdicts, + the ingest offset) in one transaction.

    ``offset`` is ``(file_identity, offset, header)``.  If the database refuses a value
    in the batch (NUL bytes, an integer beyond the column), the transaction is rolled
    back and the batch sent again cleaned: text escaped, such records refused.
    Anything else the database raises becomes a ``StoreError``.
    """
    now = time.time()
    rows: list[tuple | None] = repository.flow_rows(records, source, now)
    refused: list[repository.RefusedRow] = []
    for attempt in ("bulk", "cleaned"):
        if attempt == "cleaned":
            rows, refused = repository.clean_flow_rows(rows)
            for r in refused:
                log.warning("%s: flow %r refused: %s", source, r.uid, r.reason)
        try:
            with session_factory.begin() as session:
                kept = [r for r in rows if r is not None]
                stored = repository.insert_flow_rows(session, kept)
                dets = 0
                if classifier is not None and verdicts is not None:
                    # the uid as stored (escaped when cleaned), only for flows kept
                    dets = repository.insert_detections(
                        session,
                        ((source, row[_UID], lab, score) for row, (lab, score) in zip(rows, verdicts) if row is not None),
                        model_version=classifier.model_version,
                    )
                if offset is not None:
                    ident, off, header = offset
                    repository.save_offset(session, source, file_identity=ident, offset=off, header=header)
            return BatchResult(stored, dets, refused)
        except repository.ROW_VALUE_ERRORS as exc:
            if attempt == "cleaned":
                raise StoreError(describe_db_error(session_factory.kw["bind"], exc)) from exc
            log.info("%s: batch refused (%s); sending it again cleaned", source, str(exc).splitlines()[0][:200])
        except SQLAlchemyError as exc:
            raise StoreError(describe_db_error(session_factory.kw["bind"], exc)) from exc
    raise AssertionError("unreachable")


def _classify(classifier: FlowClassifier | None, records: Sequence[ConnRecord]):
    if classifier is None or not records:
        return None
    verdicts = classifier.classify(records)
    if len(verdicts) != len(records):
        raise ValueError(
            f"classifier {classifier.model_version!r} returned {len(verdicts)} verdicts for {len(records)} records"
        )
    # plain values, checked here: a model's bug must not look like a database failure
    return [(str(label), float(score)) for label, score in verdicts]


# ---------------------------------------------------------------- record sources


class _Reader:
    """A binary reader over an opened log that can hand back one peeked chunk first."""

    def __init__(self, fh, first: bytes = b""):
        self.fh = fh
        self.first = first
        self.name = getattr(fh, "name", "<stream>")

    def read(self, n: int = -1) -> bytes:
        if self.first:
            data, self.first = self.first, b""
            return data
        return self.fh.read(n)

    def read1(self, n: int = -1) -> bytes:
        # read1 hands out what one decompression step gave: a truncated gzip then fails
        # only at its cut, after the lines before it were parsed (read(n) loses them).
        if self.first:
            data, self.first = self.first, b""
            return data
        read1 = getattr(self.fh, "read1", None) or self.fh.read
        return read1(n)


def resume_state(parser) -> str | None:
    """What a rerun needs to continue mid-file: the header in force and the line count."""
    if parser.header is None:
        return None
    return json.dumps({"header": parser.header.to_dict(), "line_no": parser.line_no})


def _raw_position(fh) -> int:
    try:
        return getattr(fh, "fileobj", fh).tell()  # GzipFile: position in the compressed file
    except (OSError, ValueError, AttributeError):
        return 0


def _zeek_batches(
    path: Path,
    *,
    strict: bool,
    batch_size: int,
    resume: tuple[int, str | None] | None,
    on_rejection: Callable,
) -> Iterator[tuple[list[ConnRecord], int, str | None, int]]:
    """Batches of at least ``batch_size`` records (the last may be smaller) of a Zeek
    log, each with the (decompressed) byte offset just after it, the resume state and
    the position in the file on disk (for progress).

    ``resume`` is a saved ``(offset, state)``: reading starts there, with the saved
    header, so a rerun neither re-reads nor re-parses what was committed.
    """
    from gateway.flows.zeek import LogHeader, ZeekLogParser, ZeekParseError, iter_record_batches, open_log

    fh = open_log(path)
    try:
        parser = ZeekLogParser(source_name=str(path))
        reader = _Reader(fh)
        if resume is not None:
            offset, state = resume
            try:
                saved = json.loads(state) if state else None
                fh.seek(offset)  # gzip: decompresses up to there
                first = fh.read(READ_CHUNK)
                parser = ZeekLogParser(
                    source_name=str(path),
                    header=LogHeader.from_dict(saved["header"]) if saved else None,
                    offset=offset,
                    line_no=saved["line_no"] if saved else 0,
                )
                reader = _Reader(fh, first)
            except (EOFError, OSError, zlib.error, ValueError, KeyError, TypeError) as exc:
                # Stored rows are keyed by uid: reading it all again costs time, not correctness.
                log.warning("%s: cannot resume at byte %d (%s); reading from the start", path, offset, exc)
                fh.close()
                fh = open_log(path)
                parser = ZeekLogParser(source_name=str(path))
                reader = _Reader(fh)
            else:
                if not first:
                    return  # everything was committed by an earlier run
        pending: list[ConnRecord] = []
        try:
            for records in iter_record_batches(
                reader, strict=strict, chunk_size=read_size(batch_size), parser=parser, on_rejection=on_rejection
            ):
                pending.extend(records)
                if len(pending) >= batch_size:
                    yield pending, parser.consumed, resume_state(parser), _raw_position(fh)
                    pending = []
        except ZeekParseError as exc:
            raise ReplayError(f"{exc.source}:{exc.line_no}: {exc.reason}") from exc
        yield pending, parser.consumed, resume_state(parser), _raw_position(fh)
    finally:
        fh.close()


def _pcap_batches(path: Path, fh, *, batch_size: int, stats) -> Iterator[list[ConnRecord]]:
    from gateway.flows.pcap import CaptureError, pcap_records

    batch: list[ConnRecord] = []
    try:
        for rec in pcap_records(fh, stats=stats):
            batch.append(rec)
            if len(batch) >= batch_size:
                yield batch
                batch = []
    except CaptureError as exc:
        raise ReplayError(f"{path}: {exc}") from exc
    if batch:
        yield batch


# ---------------------------------------------------------------- replay


def replay(
    paths: Iterable[str | os.PathLike],
    *,
    session_factory: sessionmaker[Session],
    classifier: FlowClassifier | None = None,
    strict: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressFn | None = None,
    source: str | None = None,
    from_start: bool = False,
) -> ReplaySummary:
    """Ingest each file (Zeek TSV/JSON/IoT-23 log, gzipped or not, or a pcap).

    source: key the flows are stored under (default: each file's absolute path).
    from_start: ignore a saved offset and re-read the whole file (flows already stored
    are skipped; new detections are added if the model version is new).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    summary = ReplaySummary(model_version=classifier.model_version if classifier else None)
    started = time.perf_counter()
    try:
        for p in paths:
            path = Path(p)
            src = source or default_source(path)
            fsum = FileSummary(path=str(path), source=src)
            summary.files.append(fsum)
            try:
                _replay_file(
                    path, fsum, summary,
                    session_factory=session_factory, classifier=classifier, strict=strict,
                    batch_size=batch_size, progress=progress, from_start=from_start,
                )
            except OSError as exc:
                fsum.error = f"cannot read: {exc.strerror or exc}"
                _count_rejection(summary, fsum, "unreadable file")
                log.error("%s: %s", path, fsum.error)
                if strict:
                    raise ReplayError(f"{path}: {fsum.error}") from exc
    finally:
        summary.elapsed_s = time.perf_counter() - started
    return summary


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|\b\d{3,}\b")
MAX_REASONS = 50  # distinct rejection reasons kept; the rest count as "other"


def reason_key(reason: str) -> str:
    """A rejection reason without the offending values, so counts group by kind."""
    return _QUOTED.sub("…", reason)[:120]


_COUNT_LOCK = threading.Lock()  # rejections are counted by the reader and the writer thread


def _count_rejection(summary: ReplaySummary, fsum: FileSummary, reason: str) -> None:
    key = reason_key(reason)
    with _COUNT_LOCK:
        if key not in summary.rejected and len(summary.rejected) >= MAX_REASONS:
            key = "other"
        summary.rejected[key] = summary.rejected.get(key, 0) + 1
        fsum.rejected += 1


class _BatchWriter:
    """Commits batches on one background thread, in order, while the caller parses the
    next one: parsing and the database's work (which releases the GIL) overlap.

    At most one batch waits, so memory stays bounded.  An error of a commit is raised
    in the caller at its next ``put`` or at ``close``; batches queued after a failed
    one are dropped (not committed), so offsets still only move forward in order.
    """

    _STOP = object()

    def __init__(self, commit: Callable[..., None]):
        self._commit = commit
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None  # not yet raised in the caller
        self._failed = False  # stays set: nothing after a failed batch is committed
        self._thread = threading.Thread(target=self._run, name="fedgate-replay-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if not self._failed:
                try:
                    self._commit(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self._failed = True
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, *item) -> None:
        self._raise()
        self._queue.put(item)

    def close(self) -> None:
        """Wait until every queued batch is committed; raise a commit's error."""
        self._queue.put(self._STOP)
        self._thread.join()
        self._raise()


class _InlineWriter:
    """``_BatchWriter``'s interface, committing in the caller's thread."""

    def __init__(self, commit: Callable[..., None]):
        self.put = commit

    def close(self) -> None:
        return None


def _thread_safe_store(session_factory: sessionmaker[Session]) -> bool:
    """False for an in-memory SQLite database: each thread would see its own, empty one."""
    url = session_factory.kw["bind"].url
    return not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))


def _replay_file(
    path: Path,
    fsum: FileSummary,
    summary: ReplaySummary,
    *,
    session_factory,
    classifier,
    strict,
    batch_size,
    progress,
    from_start,
) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(IDENTITY_PREFIX)
    ident = file_identity(head)
    kind = sniff_kind(head)
    fsum.kind = kind
    resume = None
    if not from_start:
        try:
            with session_factory() as session:
                saved = repository.load_offset(session, fsum.source)
        except SQLAlchemyError as exc:
            raise StoreError(describe_db_error(session_factory.kw["bind"], exc)) from exc
        if (
            saved is not None
            and saved.offset > 0
            and saved.file_identity == ident
            and (kind == "gzip" or saved.offset <= size)
        ):
            resume = (saved.offset, saved.header)
            fsum.resumed_from = saved.offset
            log.info("%s: resuming after byte %d", path, saved.offset)

    def account(records: list[ConnRecord], offset: tuple | None, done_bytes: int, verdicts=None) -> None:
        if verdicts is None:
            verdicts = _classify(classifier, records)
        stored, dets, refused = commit_batch(
            session_factory, records, source=fsum.source,
            classifier=classifier, verdicts=verdicts, offset=offset,
        )
        for r in refused:
            _count_rejection(summary, fsum, r.reason)
        n = len(records) - len(refused)
        fsum.records += n
        fsum.stored += stored
        fsum.duplicates += n - stored
        summary.records += n
        summary.stored += stored
        summary.duplicates += n - stored
        summary.detections += dets
        if verdicts is not None:
            lab, cor, lcor = score_against_labels(
                records, verdicts, threshold=getattr(classifier, "threshold", MALICIOUS_THRESHOLD)
            )
            summary.labelled += lab
            summary.correct += cor
            summary.label_correct += lcor
        if progress is not None:
            progress(str(path), done_bytes, size)

    if kind == "pcap":
        if resume is not None and resume[0] >= size:
            return  # this exact capture was ingested completely before
        _replay_capture(path, fsum, summary, ident=ident, size=size, strict=strict,
                        batch_size=batch_size, account=account)
        return

    def on_rejection(rej) -> None:
        _count_rejection(summary, fsum, rej.reason)

    # This thread reads, parses and classifies; the writer commits the batch before.
    writer = _BatchWriter(account) if _thread_safe_store(session_factory) else _InlineWriter(account)
    try:
        for batch, offset, state, raw_pos in _zeek_batches(
            path, strict=strict, batch_size=batch_size, resume=resume, on_rejection=on_rejection
        ):
            writer.put(batch, (ident, offset, state), raw_pos, _classify(classifier, batch))
    finally:
        writer.close()  # batches handed over before an error or Ctrl-C are still committed


def _replay_capture(path, fsum, summary, *, ident, size, strict, batch_size, account) -> None:
    """A pcap/pcapng: Zeek-semantics flows; its skipped packets count as rejections.

    A capture has no resumable record offsets, so it is marked done only at its end; a
    rerun after a crash reads it again and its flows (stable uids) are skipped as stored.
    """
    from gateway.flows.pcap import CaptureStats

    stats = CaptureStats()
    with open(path, "rb") as fh:
        try:
            for batch in _pcap_batches(path, fh, batch_size=batch_size, stats=stats):
                account(batch, None, _raw_position(fh))
        except ReplayError as exc:
            fsum.error = str(exc)
            _count_rejection(summary, fsum, "unreadable capture")
            if strict:
                raise
            return
    # Skipped packets (ARP, bad checksums...) are normal traffic Zeek ignores too: counted
    # apart from rejections, and never fatal under strict.
    for reason, n in stats.skipped.items():
        summary.skipped_packets[reason] = summary.skipped_packets.get(reason, 0) + n
    if stats.truncated:
        _count_rejection(summary, fsum, "truncated capture")
        if strict:
            raise ReplayError(f"{path}: truncated capture (the flows before the cut are stored)")
    account([], (ident, size, None), size)


# ---------------------------------------------------------------- live follow


@dataclass
class FollowCounters:
    polls: int = 0
    commits: int = 0
    records: int = 0
    stored: int = 0
    detections: int = 0
    rejected: int = 0
    store_errors: int = 0


def follow(
    path: str | os.PathLike,
    *,
    session_factory: sessionmaker[Session],
    classifier: FlowClassifier | None = None,
    source: str | None = None,
    interval: float = 1.0,
    stop: threading.Event | None = None,
    on_batch: Callable[[list[ConnRecord], list[tuple[str, float]] | None], None] | None = None,
    max_polls: int | None = None,
    counters: FollowCounters | None = None,
    archive_globs: Sequence[str] = (),
) -> FollowCounters:
    """Follow a live Zeek ``conn.log`` until ``stop`` is set (or after ``max_polls`` polls).

    Each poll's records, their detections and the tail position are committed in one
    transaction; the position is loaded from the store at start, so a restarted gateway
    resumes with no flow lost or duplicated (rotation and truncation are the tail's
    business: ``gateway.flows.tail.ConnLogTail``).  ``on_batch`` (e.g. the alert
    publisher) runs after the commit.  If the database fails, the records are read
    again from the last committed position at the next poll; the loop keeps running.

    source: key of the flows and of the saved position (default: the log's absolute path).
    interval: seconds to wait when caught up (a backlog is read without waiting).
    archive_globs: where rotated logs are archived (the tail finds the file it was
      reading there after a restart).
    """
    from gateway.flows.tail import ConnLogTail, TailPosition

    if interval <= 0:
        raise ValueError(f"interval must be > 0, got {interval}")
    src = source or default_source(path)
    stop = stop or threading.Event()
    with session_factory() as session:
        saved = repository.load_offset(session, src)
    committed: TailPosition | None = None
    if saved is not None and saved.header:
        try:
            committed = TailPosition.from_json(saved.header)
        except ValueError as exc:
            log.error("follow %s: saved position unusable (%s); starting at the beginning", path, exc)
    tail = ConnLogTail(path, position=committed, archive_globs=archive_globs)
    counters = counters if counters is not None else FollowCounters()  # a caller's: live figures
    polls = 0  # this call's polls (a caller's counters may carry earlier runs')
    failures = 0  # consecutive store errors, for the back-off
    try:
        while not stop.is_set():
            if max_polls is not None and polls >= max_polls:
                break
            polls += 1
            counters.polls += 1
            try:
                records, pos = tail.poll()
                for rej in tail.drain_rejections():
                    counters.rejected += 1
                    log.debug("follow %s:%d: rejected: %s", rej.source, rej.line_no, rej.reason)
                if records or pos != committed:
                    verdicts = _classify(classifier, records)
                    stored, dets, refused = commit_batch(
                        session_factory, records, source=src, classifier=classifier, verdicts=verdicts,
                        offset=(pos.identity, pos.offset, pos.to_json()),
                    )
                    counters.rejected += len(refused)
                    committed = pos
                    counters.commits += 1
                    counters.records += len(records)
                    counters.stored += stored
                    counters.detections += dets
                    if records and on_batch is not None:
                        on_batch(records, verdicts)
            except StoreError as exc:
                # Disk full, server restarting...: read the same records again from the
                # last committed position next time.
                counters.store_errors += 1
                failures += 1
                wait = min(interval * 2 ** (failures - 1), MAX_RETRY_WAIT)
                log.error("follow %s: %s; retrying in %.1fs", path, exc, wait)
                tail.close()
                tail = ConnLogTail(path, position=committed, archive_globs=archive_globs)
                stop.wait(wait)
                continue
            failures = 0
            if tail.caught_up and (max_polls is None or polls < max_polls):
                stop.wait(interval)
    finally:
        tail.close()
    return counters
