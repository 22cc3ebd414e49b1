"""Follow a live Zeek ``conn.log`` as Zeek writes it.

:class:`ConnLogTail` reads what is new at each :meth:`~ConnLogTail.poll` and returns the
records with a :class:`TailPosition` (file identity, byte offset just past the last
complete line, the header in force, and a fingerprint of the file's first bytes).
Save the position in the same database transaction as the records it produced; a tail
built from that position after a restart resumes with no flow lost or duplicated.

What it survives:

* appends, in any pieces: a partial last line waits until its newline arrives;
* rotation (Zeek renames ``conn.log`` and opens a new one): the open old file is read
  to its end first (a last line without newline included), then the new file from 0;
  after a restart, a saved position whose file was renamed in the same directory is
  found by its inode, or in the archive (``archive_globs``, gzip too) by the digest of
  its first bytes, and finished first; files rotated after it (beside the log, or in
  the archive) are read next, oldest first, then the live file;
* truncation (``copytruncate``): a file shorter than the offset, or whose first bytes
  changed, is read again from 0 with its new header.

No sleeping inside :meth:`poll`: the caller loops (and polls again at once while
:attr:`ConnLogTail.caught_up` is False).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

from gateway.flows.record import ConnRecord
from gateway.flows.zeek import LogHeader, Rejection, ZeekLogParser, open_log

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 1024  # how much of a file's start identifies it (Zeek's header + #open)
MAX_KEPT_REJECTIONS = 10_000  # until drained; more are only counted
MAX_ARCHIVE_CANDIDATES = 200  # newest archived files checked for a lost position


def _mtime(name: str) -> float:
    try:
        return os.stat(name).st_mtime
    except OSError:
        return 0.0


def _digest(head: bytes) -> str:
    return hashlib.blake2b(head, digest_size=16).hexdigest() if head else ""


@dataclass(frozen=True)
class TailPosition:
    """Where a tail stands: which file (device, inode), how far, and how to parse on.

    ``offset`` is the byte offset just past the last complete line read; ``header`` is
    the :class:`LogHeader` dict in force there (None before the header was read);
    ``line_no`` counts lines before ``offset``; ``fingerprint`` is a digest of the
    file's first ``fingerprint_len`` bytes, which tells a truncated or replaced file
    with a reused inode from the one the position was taken in.
    """

    path: str
    device: int
    inode: int
    offset: int
    header: dict[str, Any] | None = None
    line_no: int = 0
    fingerprint: str = ""
    fingerprint_len: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("TailPosition.path must be a non-empty str")
        for name in ("device", "inode", "offset", "line_no", "fingerprint_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TailPosition.{name} must be an int >= 0, not {value!r}")
        if self.header is not None:
            LogHeader.from_dict(self.header)  # raises ValueError if it is not a header

    @property
    def identity(self) -> str:
        """The file's identity as text, ``device:inode``."""
        return f"{self.device}:{self.inode}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> TailPosition:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a TailPosition: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("not a TailPosition: a JSON object is needed")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as exc:
            raise ValueError(f"not a TailPosition: {exc}") from None


@dataclass
class TailCounters:
    rotations: int = 0  # files finished because a new one took the path
    truncations: int = 0  # files read again from 0
    lost_files: int = 0  # saved positions whose rotated file could not be found
    rejected: int = 0  # bad lines (see ConnLogTail.drain_rejections)
    records: int = 0
    bytes_read: int = 0


class _OpenFile:
    """One live log file being read: descriptor, identity, its parser and read position."""

    archived = False
    broken: str | None = None  # why reading stopped early (a truncated archive)

    def __init__(self, name: str, fd: int, st: os.stat_result, parser: ZeekLogParser, read_pos: int):
        self.name = name
        self.fd = fd
        self.device = st.st_dev
        self.inode = st.st_ino
        self.parser = parser
        self.read_pos = read_pos  # bytes fed to the parser (complete lines + pending)
        self.fingerprint_len = 0
        self.fingerprint = ""

    def read(self, n: int) -> bytes:
        return os.pread(self.fd, n, self.read_pos)

    def head(self, n: int) -> bytes:
        return os.pread(self.fd, n, 0) if n > 0 else b""

    def size(self) -> int | None:
        return os.fstat(self.fd).st_size

    def same_file(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == (self.device, self.inode)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class _ArchivedFile(_OpenFile):
    """A rotated log found in an archive (gzip or plain) after a restart: read once to
    its end from the saved offset.  It keeps the identity it had while live, so that a
    position taken while draining it leads back to it."""

    archived = True

    def __init__(self, name: str, stream: IO[bytes], head: bytes, pos: TailPosition, parser: ZeekLogParser):
        self.name = name
        self.stream = stream
        self._head = head
        self.device = pos.device
        self.inode = pos.inode
        self.parser = parser
        self.read_pos = pos.offset
        self.fingerprint, self.fingerprint_len = pos.fingerprint, pos.fingerprint_len

    def read(self, n: int) -> bytes:
        if self.broken:
            return b""
        try:  # read1: one step of decompression, so a cut loses as little as it can
            return self.stream.read1(n)
        except (EOFError, OSError, zlib.error) as exc:
            self.broken = f"truncated or corrupt archive: {exc}"
            return b""

    def head(self, n: int) -> bytes:
        return self._head[:n]

    def size(self) -> int | None:
        return None  # an archive does not change

    def close(self) -> None:
        self.stream.close()


class ConnLogTail:
    """Follow ``path`` (a Zeek conn.log, TSV or JSON) across appends, rotation, truncation.

    Keyword options:
      position: a :class:`TailPosition` from an earlier run to resume from (default
        none: start at the beginning of the current file).
      read_size: bytes per read (default 1 MiB).
      max_bytes_per_poll: a poll returns after reading this much, leaving
        :attr:`caught_up` False, so that one poll's batch stays bounded (default 16 MiB).
      archive_globs: where rotated logs are archived, as glob patterns (e.g.
        ``"/opt/zeek/logs/*/conn.*.log.gz"``); after a restart, a saved position whose
        file left the log's directory is looked for there (default none).  Files
        rotated beside the log (``conn.log.1``, ``conn.<time>.log``) are always found,
        so a gateway down across several rotations reads each of them, in order.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        position: TailPosition | None = None,
        read_size: int = 1 << 20,
        max_bytes_per_poll: int = 16 << 20,
        archive_globs: Sequence[str] = (),
    ):
        if isinstance(archive_globs, str):
            raise TypeError("archive_globs must be a sequence of glob patterns, not one str")
        if position is not None and not isinstance(position, TailPosition):
            raise TypeError("position must be a TailPosition (use TailPosition.from_json)")
        if read_size < 1 or max_bytes_per_poll < 1:
            raise ValueError("read_size and max_bytes_per_poll must be >= 1")
        self.path = os.fspath(path)
        self.read_size = read_size
        self.max_bytes_per_poll = max_bytes_per_poll
        self.archive_globs = tuple(os.fspath(g) for g in archive_globs)
        self.counters = TailCounters()
        self.caught_up = False
        self._rejections: list[Rejection] = []
        self._file: _OpenFile | None = None
        self._resume = position
        self._last_position = position or TailPosition(self.path, 0, 0, 0)

    # -- public ---------------------------------------------------------------

    def poll(self) -> tuple[list[ConnRecord], TailPosition]:
        """Read what is new; return its records and the position just after them."""
        records: list[ConnRecord] = []
        budget = self.max_bytes_per_poll
        if self._file is None:
            self._open()
        while self._file is not None:
            f = self._file
            self._check_truncation(f)
            budget, at_eof = self._read(f, budget, records)
            if not at_eof:  # budget spent: come back for the rest
                self.caught_up = False
                self.counters.records += len(records)
                return records, self._position()
            st = self._stat_path()
            if st is None or (f.same_file(st) and not f.archived):
                break
            # Rotated: the file we hold is finished; the path names a new one.
            if f.broken:
                f.parser.abort(f.broken)
            else:
                records += f.parser.finish()
            self._collect(f.parser)
            self.counters.rotations += 1
            log.info("%s: rotated; finished %s at byte %d", self.path, f.name, f.parser.consumed)
            self._position()  # the old file's end stands if the new one cannot be opened
            f.close()
            self._file = None
            # a file found after a restart (archived, or renamed beside the log) may be
            # followed by others rotated while we were down and matched by archive_globs:
            # read those, oldest first, before the live one
            resumed = f.archived or os.path.abspath(f.name) != os.path.abspath(self.path)
            nxt = self._next_archived(f.name) if resumed else None
            if nxt is not None:
                log.info("%s: reading %s, archived while the gateway was down", self.path, nxt.name)
                self._file = nxt
            else:
                self._open_fresh()
        self.caught_up = True
        self.counters.records += len(records)
        return records, self._position()

    def drain_rejections(self) -> list[Rejection]:
        if self._file is not None:
            self._collect(self._file.parser)
        out, self._rejections = self._rejections, []
        return out

    def close(self) -> None:
        """Close the file; a later :meth:`poll` reopens it where this one stopped."""
        if self._file is not None:
            self._resume = self._position()
            self._collect(self._file.parser)
            self._file.close()
            self._file = None

    def __enter__(self) -> ConnLogTail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening ------------------------------------------------------------------

    def _stat_path(self) -> os.stat_result | None:
        try:
            return os.stat(self.path)
        except FileNotFoundError:
            return None

    def _open(self) -> None:
        pos, self._resume = self._resume, None
        if pos is None or (pos.device, pos.inode) == (0, 0):
            self._open_fresh()
            return
        st = self._stat_path()
        same_inode = st is not None and (st.st_dev, st.st_ino) == (pos.device, pos.inode)
        if same_inode and self._open_at(self.path, pos):
            return
        # The saved file no longer has the path (Zeek rotated it while we were down), or
        # the path's file changed under the same inode: truncated, or a new file that
        # reuses the rotated one's inode.  Look for the saved file before giving up.
        found = self._find_rotated(pos)
        if found is not None and self._open_at(found, pos):
            log.info("%s: resuming rotated file %s at byte %d", self.path, found, pos.offset)
            return
        archived = self._find_archived(pos)
        if archived is not None:
            log.info("%s: resuming archived file %s at byte %d", self.path, archived.name, pos.offset)
            self._file = archived
            return
        if same_inode:
            self.counters.truncations += 1
            log.warning("%s: changed since the saved position (truncated?); reading from 0", self.path)
            self._open_fresh()
            return
        self.counters.lost_files += 1
        log.warning(
            "%s: the file of the saved position (inode %d, byte %d) is gone (rotated and "
            "archived?); flows it held after that byte are not read",
            self.path,
            pos.inode,
            pos.offset,
        )
        self._open_fresh()

    def _find_rotated(self, pos: TailPosition) -> str | None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return None
        for entry in entries:
            try:
                if entry.is_file() and entry.inode() == pos.inode:
                    if entry.stat().st_dev == pos.device:
                        return entry.path
            except OSError:
                continue
        return None

    def _find_archived(self, pos: TailPosition) -> _ArchivedFile | None:
        """The rotated file of ``pos`` among the archives (newest first), told by the
        digest of its first bytes, opened at the saved offset."""
        if not self.archive_globs or not pos.fingerprint_len:
            return None
        names = {n for pattern in self.archive_globs for n in glob.glob(pattern)}
        newest = sorted(names, key=_mtime, reverse=True)[:MAX_ARCHIVE_CANDIDATES]
        for name in newest:
            try:
                stream = open_log(name)
            except OSError:
                continue
            try:
                head = stream.read(FINGERPRINT_BYTES)
                if _digest(head[: pos.fingerprint_len]) == pos.fingerprint:
                    stream.seek(pos.offset)  # gzip: decompresses up to there
                    if stream.tell() == pos.offset:
                        header = LogHeader.from_dict(pos.header) if pos.header is not None else None
                        parser = ZeekLogParser(
                            source_name=name, header=header, offset=pos.offset, line_no=pos.line_no
                        )
                        return _ArchivedFile(name, stream, head, pos, parser)
            except (EOFError, OSError, zlib.error):
                pass
            stream.close()
        return None

    def _rotation_globs(self) -> tuple[str, ...]:
        """Where files rotated after a restart's resumed one are looked for: the
        ``archive_globs``, and always the log's own siblings (``conn.log.1``,
        ``conn.2026-11-24-10-00-00.log``), where a rotation renames the file first."""
        directory, base = os.path.split(os.path.abspath(self.path))
        stem = base.split(".", 1)[0]
        return (*self.archive_globs, os.path.join(glob.escape(directory), glob.escape(stem) + ".*"))

    def _next_archived(self, finished: str) -> _ArchivedFile | None:
        """The file rotated next after ``finished`` (the oldest one among the rotation
        globs modified later), opened at byte 0; None when the live file comes next."""
        try:
            after = os.stat(finished).st_mtime_ns
        except OSError:
            return None
        live = self._stat_path()
        skip = {os.path.abspath(finished), os.path.abspath(self.path)}
        names = {n for pattern in self._rotation_globs() for n in glob.glob(pattern)}
        later = []
        for name in names:
            if os.path.abspath(name) in skip:
                continue
            try:
                st = os.stat(name)
            except OSError:
                continue
            if live is not None and (st.st_dev, st.st_ino) == (live.st_dev, live.st_ino):
                continue  # the live log under another name (a link): read as the live file
            if st.st_mtime_ns > after:
                later.append((st.st_mtime_ns, name, st))
        for _, name, st in sorted(later):
            try:
                stream = open_log(name)
                head = stream.read(FINGERPRINT_BYTES)
                stream.seek(0)
            except (EOFError, OSError, zlib.error):
                continue
            # the archive's own identity: a position taken in it leads back here by its
            # fingerprint (see _find_archived)
            pos = TailPosition(self.path, st.st_dev, st.st_ino, 0)
            return _ArchivedFile(name, stream, head, pos, ZeekLogParser(source_name=name))
        return None

    def _open_at(self, name: str, pos: TailPosition) -> bool:
        """Open ``name`` at the saved position if it is still that file; else False."""
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            return False
        st = os.fstat(fd)
        same = (st.st_dev, st.st_ino) == (pos.device, pos.inode) and st.st_size >= pos.offset
        if same and pos.fingerprint_len:
            same = _digest(os.pread(fd, pos.fingerprint_len, 0)) == pos.fingerprint
        if not same:
            os.close(fd)
            return False
        header = LogHeader.from_dict(pos.header) if pos.header is not None else None
        parser = ZeekLogParser(source_name=name, header=header, offset=pos.offset, line_no=pos.line_no)
        f = _OpenFile(name, fd, st, parser, pos.offset)
        f.fingerprint, f.fingerprint_len = pos.fingerprint, pos.fingerprint_len
        self._file = f
        return True

    def _open_fresh(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self._file = None
            return
        st = os.fstat(fd)
        self._file = _OpenFile(self.path, fd, st, ZeekLogParser(source_name=self.path), 0)

    # -- reading ------------------------------------------------------------------

    def _check_truncation(self, f: _OpenFile) -> None:
        size = f.size()
        if size is None:
            return
        changed = size < f.read_pos
        if not changed and f.fingerprint_len:
            changed = _digest(f.head(f.fingerprint_len)) != f.fingerprint
        if changed:
            self._collect(f.parser)
            self.counters.truncations += 1
            log.warning("%s: truncated or replaced at byte %d; reading from 0", f.name, f.read_pos)
            f.parser = ZeekLogParser(source_name=f.name)
            f.read_pos = 0
            f.fingerprint, f.fingerprint_len = "", 0

    def _read(self, f: _OpenFile, budget: int, records: list[ConnRecord]) -> tuple[int, bool]:
        while budget > 0:
            data = f.read(min(self.read_size, budget))
            if not data:
                return budget, True
            f.read_pos += len(data)
            budget -= len(data)
            self.counters.bytes_read += len(data)
            records += f.parser.feed(data)
            self._collect(f.parser)
        return budget, False

    def _collect(self, parser: ZeekLogParser) -> None:
        if parser.rejections:
            new = parser.drain_rejections()
            self.counters.rejected += len(new)
            room = MAX_KEPT_REJECTIONS - len(self._rejections)
            self._rejections += new[: max(room, 0)]  # all are counted and logged

    def _position(self) -> TailPosition:
        f = self._file
        if f is None:
            return self._last_position
        offset = f.parser.consumed
        want = min(FINGERPRINT_BYTES, offset)
        if want != f.fingerprint_len:
            f.fingerprint, f.fingerprint_len = _digest(f.head(want)), want
        header = f.parser.header
        self._last_position = TailPosition(
            path=self.path,
            device=f.device,
            inode=f.inode,
            offset=offset,
            header=header.to_dict() if header is not None else None,
            line_no=f.parser.line_no,
            fingerprint=f.fingerprint,
            fingerprint_len=f.fingerprint_len,
        )
        return self._last_position
