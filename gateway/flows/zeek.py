"""Zeek ``conn.log`` in and out: an incremental parser, readers and a TSV writer.

Formats read (auto-detected, line by line):

* Zeek TSV with its header block (``#separator`` with ``\\x..`` escapes,
  ``#set_separator``, ``#empty_field``, ``#unset_field``, ``#path``, ``#open``,
  ``#fields``, ``#types``, ``#close``); several header blocks in one stream; columns in
  any order; columns unknown to :class:`ConnRecord` kept raw in ``ConnRecord.extra``.
* IoT-23 ``conn.log.labeled``: Zeek TSV whose last column holds ``tunnel_parents``,
  ``label`` and ``detailed-label`` joined by three spaces (in ``#fields``/``#types`` too).
* Zeek JSON logs (``LogAscii::use_json``): one object per line, ``ts`` as epoch seconds
  or ISO-8601, flat ``id.orig_h`` keys (a nested ``{"id": {...}}`` is accepted too).
* gzip-compressed versions of all three (Zeek archives rotated logs as ``.gz``).

The parser (:class:`ZeekLogParser`) is pure: bytes in, records out, no file or socket.
It keeps a partial last line until its newline arrives, so any split of a byte stream
gives the same records.  Bad lines become :class:`Rejection` values (source, line
number, reason, text), counted and logged; the good records around them are kept.

The hot path is columnar: a block of about 64 KiB of lines whose field counts all match
the header is split once into a flat list and sliced into columns, and each column is
converted by a converter chosen when the header was read (``map(int, col)`` and friends
run in C); only a column that fails falls back to a per-value pass that pinpoints the
bad rows.  Records are built with ``tuple.__new__`` through ``map``, with the cyclic GC
paused while a chunk is parsed.
"""

from __future__ import annotations

import datetime as _dt
import gc
import gzip
import io
import json
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import IO, Any, BinaryIO, NamedTuple

from gateway.flows.record import COLUMN_BY_FIELD, FIELD_BY_COLUMN, TYPE_BY_FIELD, ConnRecord

__all__ = [
    "LogHeader",
    "Rejection",
    "ZeekLogParser",
    "ZeekParseError",
    "ZeekTsvWriter",
    "iter_record_batches",
    "iter_records",
    "json_record",
    "open_log",
    "read_log",
    "to_tsv_bytes",
    "write_tsv",
]

log = logging.getLogger(__name__)

IOT23_JOINER = "   "  # IoT-23 joins its last three columns with three spaces
REQUIRED_FIELDS = ("ts", "uid", "orig_h", "orig_p", "resp_h", "resp_p", "proto")
HEADER_KEYS = (
    "#separator",
    "#set_separator",
    "#empty_field",
    "#unset_field",
    "#path",
    "#open",
    "#fields",
    "#types",
    "#close",
)
ZEEK_STAMP_FORMAT = "%Y-%m-%d-%H-%M-%S"
MAX_COUNT = 2**64 - 1
MAX_REJECTION_TEXT = 200  # characters of a bad line kept in its Rejection
LOGGED_REJECTIONS = 20  # per parser, at WARNING; the rest at DEBUG

_RECORD_INDEX = {name: i for i, name in enumerate(ConnRecord._fields)}
_N_RECORD_FIELDS = len(ConnRecord._fields)
_EXTRA_INDEX = _RECORD_INDEX["extra"]
_make_record = partial(tuple.__new__, ConnRecord)  # C-level: no Python frame per record
_HEX_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_ADDR_TEXT = re.compile(r"[0-9a-fA-F.:\n]*")  # checked on a whole TSV column joined by "\n"
_ADDR_VALUE = re.compile(r"[0-9a-fA-F.:]+")  # a cheap sanity check, not a full parse
_GZIP_MAGIC = b"\x1f\x8b"
_NUMBER_TEXT = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_COLUMN = re.compile(r"[-+0-9.eE\n]*")
# Characters int()/float() skip or accept (" 1", "1_0"); one memchr each beats a regex.
_ODD_FOR_NUMBERS = ("_", " ", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")
_BLOCK_BYTES = 64 << 10  # lines are parsed in blocks of about this size


class Rejection(NamedTuple):
    """A line the parser could not turn into a record."""

    source: str
    line_no: int  # 1-based; 0 when the problem is not tied to one line
    reason: str
    text: str  # the line (or its start), for the log


class ZeekParseError(ValueError):
    """Raised in strict mode at the first rejected line."""

    def __init__(self, rejection: Rejection):
        self.rejection = rejection
        self.source = rejection.source
        self.line_no = rejection.line_no
        self.reason = rejection.reason
        super().__init__(f"{rejection.source}:{rejection.line_no}: {rejection.reason}")


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class LogHeader:
    """The header state of a Zeek log: everything needed to parse its data lines.

    ``fields``/``types`` are the logical columns; ``joined_tail`` > 1 means the last
    ``joined_tail`` of them share one TSV column joined by three spaces (IoT-23).
    ``format`` is ``"tsv"`` or ``"json"`` (JSON logs have no header block).
    """

    format: str = "tsv"
    separator: str = "\t"
    set_separator: str = ","
    empty_field: str = "(empty)"
    unset_field: str = "-"
    path: str | None = None
    open: str | None = None
    fields: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    joined_tail: int = 0

    def __post_init__(self) -> None:
        for name in ("separator", "set_separator", "empty_field", "unset_field"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"LogHeader.{name} must be a str")
        for name in ("path", "open"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"LogHeader.{name} must be a str or None")
        if not isinstance(self.joined_tail, int) or isinstance(self.joined_tail, bool):
            raise ValueError("LogHeader.joined_tail must be an int")
        if self.format not in ("tsv", "json"):
            raise ValueError(f"LogHeader.format must be 'tsv' or 'json', not {self.format!r}")
        if self.format == "tsv":
            if not self.separator or "\n" in self.separator:
                raise ValueError(f"bad separator {self.separator!r}")
            if not self.set_separator or not self.unset_field or not self.empty_field:
                raise ValueError("set_separator, unset_field and empty_field must be non-empty")
            if self.types and len(self.types) != len(self.fields):
                raise ValueError(
                    f"#types has {len(self.types)} entries but #fields has {len(self.fields)}"
                )
            if self.joined_tail and not 1 < self.joined_tail <= len(self.fields):
                raise ValueError(f"joined_tail {self.joined_tail} out of range")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for saving a tail position)."""
        return {
            "format": self.format,
            "separator": self.separator,
            "set_separator": self.set_separator,
            "empty_field": self.empty_field,
            "unset_field": self.unset_field,
            "path": self.path,
            "open": self.open,
            "fields": list(self.fields),
            "types": list(self.types),
            "joined_tail": self.joined_tail,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> LogHeader:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogHeader:
        if not isinstance(data, dict):
            raise ValueError(f"a LogHeader dict is needed, not {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("fields", "types"):
            if key in known:
                items = known[key]
                if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                    raise ValueError(f"LogHeader.{key} must be a list of str")
                known[key] = tuple(known[key])
        return cls(**known)

    @classmethod
    def zeek_conn(cls, *, labelled: bool = False, iot23: bool = False) -> LogHeader:
        """Zeek's own conn.log header (with ``ip_proto``); ``iot23=True`` gives the
        IoT-23 layout (no ``ip_proto``; label columns joined to ``tunnel_parents``);
        ``labelled=True`` adds ``label``/``detailed-label`` as ordinary columns."""
        from gateway.flows.record import ZEEK_CONN_COLUMNS

        cols = [c for c in ZEEK_CONN_COLUMNS if c[0] not in ("label", "detailed_label")]
        if iot23:
            cols = [c for c in ZEEK_CONN_COLUMNS if c[0] != "ip_proto"]
        elif labelled:
            cols = list(ZEEK_CONN_COLUMNS)
        return cls(
            path="conn",
            fields=tuple(c[1] for c in cols),
            types=tuple(c[2] for c in cols),
            joined_tail=3 if iot23 else 0,
        )

    @property
    def is_iot23(self) -> bool:
        return self.joined_tail > 1


def _unescape_hex(text: str) -> str:
    """Undo Zeek's ``\\xNN`` escapes (bytes; the result decoded as UTF-8)."""
    if "\\x" not in text:
        return text
    raw = bytearray()
    pos = 0
    for m in _HEX_ESCAPE.finditer(text):
        raw += text[pos : m.start()].encode("utf-8", "surrogateescape")
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += text[pos:].encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "surrogateescape")


def _split_joined(items: list[str]) -> tuple[list[str], int]:
    """IoT-23: expand a last ``#fields``/``#types`` entry joined by three spaces."""
    if items and IOT23_JOINER in items[-1]:
        tail = items[-1].split(IOT23_JOINER)
        return items[:-1] + tail, len(tail)
    return items, 0


# --------------------------------------------------------------------------- columns
# Each converter takes a column (a sequence of raw strings) and returns (values, bad) where
# bad maps a row index to a reason.  The fast path handles a clean column in C.


def _slow(col, convert, name) -> tuple[list, dict[int, str]]:
    vals: list = []
    bad: dict[int, str] = {}
    for i, v in enumerate(col):
        try:
            vals.append(convert(v))
        except (ValueError, KeyError, TypeError) as exc:
            vals.append(None)
            bad[i] = f"{name}: {exc}" if str(exc) else f"{name}: bad value {v!r}"
    return vals, bad


def _number_column(col, ctx, name, required, kind):
    unset = ctx.unset
    if kind == "float":
        base, lo, hi = float, 0.0, math.inf
    elif kind == "port":
        base, lo, hi = int, 0, 65535
    else:
        base, lo, hi = int, 0, MAX_COUNT

    def one(v):
        if v == unset:
            if required:
                raise ValueError(f"required value unset ({v!r})")
            return None
        if not _NUMBER_TEXT.fullmatch(v):
            raise ValueError(f"not a number: {v[:40]!r}")
        x = base(v)
        if base is float and not math.isfinite(x):
            raise ValueError(f"not a finite number: {v!r}")
        if not lo <= x <= hi:
            raise ValueError(f"out of range: {v!r}")
        return x

    try:
        if ctx.odd_text and not _NUMBER_COLUMN.fullmatch("\n".join(col)):
            raise ValueError  # int()/float() would accept " 1", "1_0", "\uff11"
        if unset in col:
            if required:
                raise ValueError
            vals = [None if v == unset else base(v) for v in col]
            present = list(filter(None, vals))
        else:
            vals = present = list(map(base, col))
        if present:
            if base is float:
                if not math.isfinite(sum(present)) or min(present) < lo:
                    raise ValueError
            elif min(present) < lo or max(present) > hi:
                raise ValueError
        return vals, None
    except (ValueError, TypeError):
        return _slow(col, one, name)


def _string_column(col, ctx, name, required, kind):
    unset, empty = ctx.unset, ctx.empty
    if "" in col:
        return _slow(col, partial(_string_value, ctx=ctx, required=required, kind=kind), name)
    has_unset = unset in col
    if required and has_unset:
        return _slow(col, partial(_string_value, ctx=ctx, required=required, kind=kind), name)
    if kind == "addr":
        joined = "\n".join(col)
        if not _ADDR_TEXT.fullmatch(joined):
            return _slow(col, partial(_string_value, ctx=ctx, required=required, kind=kind), name)
        return (
            [None if v == unset else v for v in col] if has_unset else col,
            None,
        )
    if has_unset or empty in col:
        vals = [None if v == unset else "" if v == empty else v for v in col]
    else:
        vals = col
    if ctx.escaped:
        vals = [_unescape_hex(v) if v and "\\x" in v else v for v in vals]
    return vals, None


def _string_value(v, *, ctx, required, kind):
    if v == "":
        raise ValueError("empty field")
    if v == ctx.unset:
        if required:
            raise ValueError("required value unset")
        return None
    if kind == "addr":
        if not _ADDR_VALUE.fullmatch(v):
            raise ValueError(f"not an IP address: {v[:60]!r}")
        return v
    if v == ctx.empty:
        return ""
    return _unescape_hex(v)


def _bool_column(col, ctx, name, required, kind):
    table = {"T": True, "F": False, ctx.unset: None}
    try:
        return list(map(table.__getitem__, col)), None
    except KeyError:

        def one(v):
            if v not in table:
                raise ValueError(f"not T/F: {v[:60]!r}")
            return table[v]

        return _slow(col, one, name)


def _set_column(col, ctx, name, required, kind):
    unset, empty, sep = ctx.unset, ctx.empty, ctx.set_separator

    def one(v):
        if v == "":
            raise ValueError("empty field")
        if v == unset:
            return None
        if v == empty:
            return ()
        return tuple(_unescape_hex(p) for p in v.split(sep))

    if "" in col or (ctx.escaped and any("\\x" in v for v in col)):
        return _slow(col, one, name)
    return [None if v == unset else () if v == empty else tuple(v.split(sep)) for v in col], None


_CONVERTERS: dict[str, tuple[Callable, str]] = {
    # Zeek type -> (column converter, kind)
    "time": (_number_column, "float"),
    "interval": (_number_column, "float"),
    "double": (_number_column, "float"),
    "count": (_number_column, "count"),
    "port": (_number_column, "port"),
    "bool": (_bool_column, "bool"),
    "addr": (_string_column, "addr"),
    "string": (_string_column, "string"),
    "enum": (_string_column, "string"),
    "set[string]": (_set_column, "set"),
}


class _Context(NamedTuple):
    unset: str
    empty: str
    set_separator: str
    escaped: bool  # the block holds a backslash: undo \x escapes in strings
    odd_text: bool  # the block holds characters int()/float() skip or accept oddly


@dataclass
class _Plan:
    """How to turn the columns of one header into records (built once per header)."""

    header: LogHeader
    width: int  # TSV columns per line after IoT-23 tails are split
    columns: list[tuple[int, str, Callable, str, bool]]  # (text col, field, conv, kind, required)
    extra: list[tuple[int, str]]  # (text col, column name) kept raw
    error: str | None = None


def _compile(header: LogHeader) -> _Plan:
    columns: list[tuple[int, str, Callable, str, bool]] = []
    extra: list[tuple[int, str]] = []
    seen: set[str] = set()
    for i, column in enumerate(header.fields):
        field = FIELD_BY_COLUMN.get(column)
        if field is None or field in seen:
            extra.append((i, column))
            continue
        seen.add(field)
        conv, kind = _CONVERTERS[TYPE_BY_FIELD[field]]
        columns.append((i, field, conv, kind, field in REQUIRED_FIELDS))
    missing = [COLUMN_BY_FIELD[f] for f in REQUIRED_FIELDS if f not in seen]
    error = None
    if not header.fields:
        error = "no #fields header before data"
    elif header.path is not None and not header.path.startswith("conn"):
        error = f"not a conn log (#path {header.path[:40]})"
    elif missing:
        error = f"header lacks required column(s): {', '.join(missing)}"
    return _Plan(header=header, width=len(header.fields), columns=columns, extra=extra, error=error)


# --------------------------------------------------------------------------- parser


class ZeekLogParser:
    """Incremental parser of Zeek conn logs (TSV, IoT-23 labelled TSV, JSON lines).

    ``feed(data)`` returns the records of the complete lines seen so far and keeps a
    partial last line; ``finish()`` parses that last line at the end of input.  Bad lines
    go to ``rejections`` (drain with :meth:`drain_rejections`) and ``rejected``.

    Keyword options (all optional):
      source_name: name used in rejections and log messages (default ``"<bytes>"``).
      header: a :class:`LogHeader` to start with, for resuming mid-file (default none:
        the stream's own header is read).
      offset: byte offset of the first byte fed, for ``consumed`` (default 0).
      line_no: number of lines before the first byte fed (default 0).
      max_line_bytes: longer lines are rejected and skipped (default 1 MiB).
      max_kept_rejections: rejections kept until drained; more are only counted
        (default 10,000).
      strict: raise :class:`ZeekParseError` at the first rejected line (default False).
    """

    def __init__(
        self,
        *,
        source_name: str = "<bytes>",
        header: LogHeader | None = None,
        offset: int = 0,
        line_no: int = 0,
        max_line_bytes: int = 1 << 20,
        max_kept_rejections: int = 10_000,
        strict: bool = False,
    ):
        if not isinstance(source_name, str):
            raise TypeError("source_name must be a str")
        if header is not None and not isinstance(header, LogHeader):
            raise TypeError("header must be a LogHeader (use LogHeader.from_dict)")
        if offset < 0 or line_no < 0:
            raise ValueError("offset and line_no must be >= 0")
        if max_line_bytes < 64:
            raise ValueError("max_line_bytes must be at least 64")
        if max_kept_rejections < 0:
            raise ValueError("max_kept_rejections must be >= 0")
        self.source_name = source_name
        self.strict = bool(strict)
        self.max_line_bytes = max_line_bytes
        self.max_kept_rejections = max_kept_rejections
        self.consumed = offset  # byte offset just past the last complete line
        self.line_no = line_no  # lines consumed so far
        self.records = 0  # records produced
        self.rejected = 0  # lines rejected
        self.rejections: list[Rejection] = []
        self._header: LogHeader | None = header
        self._plan: _Plan | None = None
        self._pending = b""
        self._skipping = False  # inside an over-long line, dropping bytes to its newline
        self._skipped = 0
        self._finished = False

    # -- public API ---------------------------------------------------------

    @property
    def header(self) -> LogHeader | None:
        """The header in force now (None before any header or JSON line was seen)."""
        return self._header

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def drain_rejections(self) -> list[Rejection]:
        out, self.rejections = self.rejections, []
        return out

    def feed(self, data: bytes) -> list[ConnRecord]:
        """Records of the complete lines in ``data`` (after earlier partial bytes)."""
        # Parsing allocates ~25 objects per line that all survive: the cyclic GC would
        # rescan them again and again (halving throughput) and can find no cycle here.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._feed(data)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _feed(self, data: bytes) -> list[ConnRecord]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not data:
            return []
        if not isinstance(data, bytes):
            data = bytes(data)
        if self._skipping:
            cut = data.find(b"\n")
            if cut < 0:
                self._skipped += len(data)
                return []
            self.consumed += self._skipped + cut + 1
            self._skipped = 0
            self._skipping = False
            data = data[cut + 1 :]
            if not data:
                return []
        buf = self._pending + data if self._pending else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            self._pending = buf
            self._check_overlong()
            return []
        self._pending = buf[cut + 1 :]
        if cut < _BLOCK_BYTES:
            records = self._parse_block(buf[: cut + 1])
            self.consumed += cut + 1
        else:
            # Parse in cache-sized blocks of whole lines: a 1 MiB block of columns no
            # longer fits in the CPU caches and runs ~40% slower than 64 KiB ones.
            records = []
            start = 0
            while start <= cut:
                stop = buf.find(b"\n", start + _BLOCK_BYTES, cut + 1)
                if stop < 0:
                    stop = cut
                records += self._parse_block(buf[start : stop + 1])
                self.consumed += stop + 1 - start
                start = stop + 1
        self._check_overlong()
        return records

    def finish(self) -> list[ConnRecord]:
        """End of input: parse a last line that has no newline."""
        if self._finished:
            return []
        self._finished = True
        if self._skipping:
            self.consumed += self._skipped
            self._skipping = False
            return []
        if not self._pending:
            return []
        block, self._pending = self._pending + b"\n", b""
        records = self._parse_block(block)
        self.consumed += len(block) - 1
        return records

    def abort(self, reason: str) -> None:
        """End of input that cut the stream short (a truncated gzip): one rejection,
        carrying the partial last line if there is one, which is dropped, not parsed."""
        if self._finished:
            return
        self._finished = True
        self._reject(self.line_no + 1, reason, self._pending)
        self._pending = b""
        self._skipping = False

    # -- internals ----------------------------------------------------------

    def _check_overlong(self) -> None:
        if len(self._pending) > self.max_line_bytes:
            self._reject(
                self.line_no + 1, f"line longer than {self.max_line_bytes} bytes", self._pending
            )
            self.line_no += 1
            self._skipping = True
            self._skipped = len(self._pending)
            self._pending = b""

    def _reject(self, line_no: int, reason: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text[: MAX_REJECTION_TEXT * 4].decode("utf-8", "replace")
        text = text[:MAX_REJECTION_TEXT]
        self.rejected += 1
        rej = Rejection(self.source_name, line_no, reason, text)
        if len(self.rejections) < self.max_kept_rejections:
            self.rejections.append(rej)
        level = logging.WARNING if self.rejected <= LOGGED_REJECTIONS else logging.DEBUG
        log.log(level, "%s:%d: rejected: %s: %r", rej.source, line_no, reason, text[:80])
        if self.strict:
            raise ZeekParseError(rej)

    def _parse_block(self, block: bytes) -> list[ConnRecord]:
        kept = len(self.rejections)
        records = self._parse_lines(block)
        if len(self.rejections) - kept > 1:  # width and value checks run in two passes
            self.rejections[kept:] = sorted(self.rejections[kept:], key=lambda r: r.line_no)
        return records

    def _parse_lines(self, block: bytes) -> list[ConnRecord]:
        first = self.line_no + 1
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            parts = []
            for i, raw in enumerate(block[:-1].split(b"\n")):
                try:
                    parts.append(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    self._reject(first + i, f"not UTF-8 text ({exc.reason} at byte {exc.start})", raw)
                    parts.append("")
            text = "\n".join(parts) + "\n"
        text = text[:-1]
        if first == 1 and text.startswith("\ufeff"):  # a byte-order mark some editors add
            text = text[1:]
        n_lines = text.count("\n") + 1
        self.line_no += n_lines
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        if "\x00" in text:  # binary junk: keep it from reaching anything downstream
            text = text.replace("\x00", "\ufffd")
        out: list[ConnRecord] = []
        if "#" not in text or not (text.startswith("#") or "\n#" in text):
            self._parse_data(text, first, out)
            return out
        # Split into runs of data lines and single header lines.
        lines = text.split("\n")
        start = 0
        for i, line in enumerate(lines):
            if line.startswith("#"):
                if i > start:
                    self._parse_data("\n".join(lines[start:i]), first + start, out)
                self._header_line(line, first + i)
                start = i + 1
        if start < len(lines):
            self._parse_data("\n".join(lines[start:]), first + start, out)
        return out

    def _header_line(self, line: str, line_no: int) -> None:
        if line.startswith("#separator"):
            value = line[len("#separator") :].strip(" \t")
            sep = _unescape_hex(value)
            try:
                self._header = LogHeader(separator=sep)
            except ValueError as exc:
                self._reject(line_no, f"bad #separator: {exc}", line)
                self._header = LogHeader()
            self._plan = None
            return
        header = self._header if self._header is not None and self._header.format == "tsv" else LogHeader()
        sep = header.separator
        key, found, value = line.partition(sep)
        if not found:
            key, _, value = line.partition(" ")
        if key not in HEADER_KEYS:
            return  # a comment (e.g. a "### BTest" banner): not data, not an error
        changes: dict[str, Any] = {}
        if key in ("#fields", "#types"):
            items, joined = _split_joined(value.split(sep))
            items = [_unescape_hex(v) for v in items]
            if key == "#fields":
                changes = {"fields": tuple(items), "joined_tail": joined}
                if header.types and len(header.types) != len(items):
                    changes["types"] = ()
            else:
                changes = {"types": tuple(items)}
                if header.fields and len(header.fields) != len(items):
                    self._reject(line_no, "#types and #fields differ in length", line)
                    return
        elif key == "#close":
            return
        else:
            attr = key[1:]
            changes = {attr: _unescape_hex(value) if attr != "open" else value}
        try:
            self._header = _replace(header, **changes)
        except ValueError as exc:
            self._reject(line_no, f"bad header line: {exc}", line)
            return
        self._plan = None

    def _parse_data(self, text: str, first: int, out: list[ConnRecord]) -> None:
        header = self._header
        if header is None and (text.lstrip().startswith("{") or "\n{" in text):
            header = self._header = LogHeader(format="json")  # no header: JSON lines
        if header is not None and header.format == "json":
            self._parse_json(text, first, out)
            return
        if self._plan is None:
            self._plan = _compile(header if header is not None else LogHeader())
        plan = self._plan
        if plan.error is not None:
            for i, line in enumerate(text.split("\n")):
                if line.strip():
                    self._reject(first + i, plan.error, line)
            return
        sep = plan.header.separator
        raw_text = text  # rejections quote lines as they were
        if plan.header.joined_tail and sep != " ":
            text = text.replace(IOT23_JOINER, sep)
        lines = text.split("\n")
        width = plan.width
        if set(map(str.count, lines, repeat(sep))) == {width - 1}:
            # Every line has the header's width: split the block once and slice columns.
            flat = text.replace("\n", sep).split(sep)
            cols = [flat[k::width] for k in range(width)]
            self._convert(plan, cols, len(lines), None, first, text, raw_text, out)
            return
        raw_lines = raw_text.split("\n")
        rows, line_nos = [], []
        for i, line in enumerate(lines):
            row = line.split(sep)
            if len(row) == width:
                rows.append(row)
                line_nos.append(first + i)
            elif line.strip():
                self._reject(first + i, f"{len(row)} fields, header has {width}", raw_lines[i])
        if rows:
            cols = list(zip(*rows))
            self._convert(plan, cols, len(rows), line_nos, first, text, raw_text, out)

    def _convert(self, plan, cols, n, line_nos, first, text, raw_text, out) -> None:
        """Columns (one sequence of raw texts per TSV column) -> records."""
        h = plan.header
        escaped = "\\" in text
        odd = not text.isascii() or any(c in text for c in _ODD_FOR_NUMBERS)
        ctx = _Context(h.unset_field, h.empty_field, h.set_separator, escaped, odd)
        record_cols: list[Any] = [repeat(None)] * _N_RECORD_FIELDS
        record_cols[_EXTRA_INDEX] = repeat(())
        bad: dict[int, str] = {}
        for text_col, field, conv, kind, required in plan.columns:
            vals, col_bad = conv(cols[text_col], ctx, COLUMN_BY_FIELD[field], required, kind)
            if col_bad:
                for i, reason in col_bad.items():
                    bad.setdefault(i, reason)
            record_cols[_RECORD_INDEX[field]] = vals
        if plan.extra:
            names = [name for _, name in plan.extra]
            extra_cols = [cols[i] for i, _ in plan.extra]
            record_cols[_EXTRA_INDEX] = [tuple(zip(names, vals)) for vals in zip(*extra_cols)]
        records = list(map(_make_record, zip(*record_cols)))
        if len(records) != n:  # cannot happen: every converter returns n values
            raise AssertionError("column length mismatch")
        if bad:
            raw_lines = raw_text.split("\n")
            for i in sorted(bad):
                line_no = line_nos[i] if line_nos else first + i
                self._reject(line_no, bad[i], raw_lines[line_no - first])
            records = [r for i, r in enumerate(records) if i not in bad]
        self.records += len(records)
        out.extend(records)

    # -- JSON ---------------------------------------------------------------

    def _parse_json(self, text: str, first: int, out: list[ConnRecord]) -> None:
        lines = text.split("\n")
        objs: list[dict] = []
        line_nos: list[int] = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = _json_object(line)
            except ValueError as exc:
                self._reject(first + i, str(exc), line)
                continue
            objs.append(obj)
            line_nos.append(first + i)
        if not objs:
            return
        keys = set().union(*objs)
        if keys <= _JSON_COLUMNS.keys():
            results = _json_columns(objs, keys)
        else:  # extra keys or a nested "id": object by object
            results = []
            for obj in objs:
                try:
                    results.append(_record_from_json(obj))
                except ValueError as exc:
                    results.append(str(exc))
        for line_no, result in zip(line_nos, results):
            if isinstance(result, str):
                self._reject(line_no, result, lines[line_no - first])
            else:
                self.records += 1
                out.append(result)


def _replace(header: LogHeader, **changes: Any) -> LogHeader:
    values = header.to_dict()
    values.update(changes)
    return LogHeader.from_dict(values)


def _json_ts(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("ts: not a time")
    if isinstance(value, (int, float)):
        ts = float(value)
    elif isinstance(value, str):
        try:
            when = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"ts: not ISO-8601 or epoch: {value[:40]!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        ts = when.timestamp()
    else:
        raise ValueError("ts: not a time")
    if not math.isfinite(ts) or ts < 0:
        raise ValueError(f"ts: out of range: {value!r}")
    return ts


def _json_value(field: str, value: Any) -> Any:
    typ = TYPE_BY_FIELD[field]
    col = COLUMN_BY_FIELD[field]
    if value is None:
        return None
    if typ == "time":
        return _json_ts(value)
    if typ in ("interval", "double"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{col}: not a number: {value!r:.40}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{col}: out of range: {value!r}")
        return float(value)
    if typ in ("count", "port"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{col}: not a count: {value!r:.40}")
        if not 0 <= value <= (65535 if typ == "port" else MAX_COUNT):
            raise ValueError(f"{col}: out of range: {value!r}")
        return value
    if typ == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{col}: not a bool: {value!r:.40}")
        return value
    if typ == "set[string]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{col}: not a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(f"{col}: not a string: {value!r:.40}")
    if typ == "addr" and not _ADDR_VALUE.fullmatch(value):
        raise ValueError(f"{col}: not an IP address: {value[:60]!r}")
    return value


def _json_object(line: str | bytes) -> dict:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("JSON line is not an object")
    return obj


_JSON_COLUMNS = {COLUMN_BY_FIELD[f]: f for f in ConnRecord._fields if f != "extra"}
_NONE = type(None)


def _json_columns(objs: list[dict], keys: set[str]) -> list[ConnRecord | str]:
    """Objects whose keys are all conn columns -> a record or a reason for each, column by
    column: one type check per column when it is clean, per value only when it is not."""
    n = len(objs)
    record_cols: list[Any] = [repeat(None)] * _N_RECORD_FIELDS
    record_cols[_EXTRA_INDEX] = repeat(())
    bad: dict[int, str] = {}
    for key, field in _JSON_COLUMNS.items():
        if key not in keys:
            if field in REQUIRED_FIELDS:
                return [f"{key}: missing"] * n
            continue
        col = [o.get(key) for o in objs]
        vals = _json_column_fast(field, col)
        if vals is None:  # something is off: find which rows, and why
            vals = []
            for i, v in enumerate(col):
                try:
                    if field in REQUIRED_FIELDS and (v is None or v == ""):
                        raise ValueError(f"{key}: missing")
                    vals.append(_json_value(field, v))
                except ValueError as exc:
                    vals.append(None)
                    bad.setdefault(i, str(exc))
        record_cols[_RECORD_INDEX[field]] = vals
    records: list[ConnRecord | str] = list(map(_make_record, zip(*record_cols)))
    for i, reason in bad.items():
        records[i] = reason
    return records


def _json_column_fast(field: str, col: list) -> list | None:
    """The converted column if every value is already right, else None."""
    typ = TYPE_BY_FIELD[field]
    types = set(map(type, col))
    if _NONE in types:
        if field in REQUIRED_FIELDS:
            return None
        present = [v for v in col if v is not None]
    else:
        present = col
    types.discard(_NONE)
    if typ in ("count", "port"):
        top = 65535 if typ == "port" else MAX_COUNT
        if types <= {int} and (not present or (min(present) >= 0 and max(present) <= top)):
            return col
        return None
    if typ in ("time", "interval", "double"):
        if types <= {int, float} and (not present or (math.isfinite(sum(present)) and min(present) >= 0)):
            return col if types <= {float} else [None if v is None else float(v) for v in col]
        return None
    if typ == "bool":
        return col if types <= {bool} else None
    if typ in ("string", "enum", "addr"):
        if not types <= {str} or (field in REQUIRED_FIELDS and "" in col):
            return None
        if typ == "addr" and not all(map(_ADDR_VALUE.fullmatch, present)):
            return None
        return col
    return None  # sets: value by value


def json_record(line: str | bytes) -> ConnRecord:
    """One Zeek JSON log line -> ConnRecord; ``ValueError`` says what is wrong."""
    return _record_from_json(_json_object(line))


def _record_from_json(obj: dict) -> ConnRecord:
    nested = obj.get("id")
    if isinstance(nested, dict):
        obj = {k: v for k, v in obj.items() if k != "id"}
        for k, v in nested.items():
            obj.setdefault(f"id.{k}", v)
    values: list[Any] = [None] * _N_RECORD_FIELDS
    extra: list[tuple[str, str]] = []
    for key, value in obj.items():
        field = FIELD_BY_COLUMN.get(key)
        if field is None:
            extra.append((key, value if isinstance(value, str) else json.dumps(value)))
            continue
        values[_RECORD_INDEX[field]] = _json_value(field, value)
    for field in REQUIRED_FIELDS:
        if values[_RECORD_INDEX[field]] is None or values[_RECORD_INDEX[field]] == "":
            raise ValueError(f"{COLUMN_BY_FIELD[field]}: missing")
    values[_EXTRA_INDEX] = tuple(extra)
    return _make_record(values)


# --------------------------------------------------------------------------- readers


def open_log(path: str | os.PathLike) -> BinaryIO:
    """Open a log for binary reading; gzip (by its magic bytes) is undone transparently.

    Reading a truncated gzip this way raises ``EOFError`` at the cut; read it through
    :func:`iter_records` to get what it held and one rejection instead."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 - returned to the caller


Source = str | os.PathLike | IO[bytes] | bytes | Iterable[bytes]


def _source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    return "<stream>"


class _ReadFailed(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _raw_chunks(source: Any, chunk_size: int) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
        return
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from _raw_chunks(f, chunk_size)
        return
    if hasattr(source, "read"):
        read = getattr(source, "read1", None) or source.read
        while True:
            try:
                chunk = read(chunk_size)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise _ReadFailed(f"truncated or corrupt gzip: {exc}") from None
            if not chunk:
                return
            yield chunk
        return
    for chunk in source:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"chunks must be bytes, not {type(chunk).__name__}")
        if chunk:
            yield bytes(chunk)


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress a gzip stream (several members allowed) if it is one; else pass through."""
    first = next(chunks, b"")
    while len(first) < 2:
        more = next(chunks, None)
        if more is None:
            break
        first += more
    if not first.startswith(_GZIP_MAGIC):
        if first:
            yield first
        yield from chunks
        return

    def compressed() -> Iterator[bytes]:
        yield first
        yield from chunks

    member = None  # the decompressor of the gzip member in progress
    for data in compressed():
        while data:
            if member is None:
                if not data.strip(b"\x00"):  # zero padding after the last member
                    break
                member = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out = member.decompress(data)
            except zlib.error as exc:
                raise _ReadFailed(f"corrupt gzip: {exc}") from None
            if out:
                yield out
            if member.eof:
                data, member = member.unused_data, None
            else:
                data = b""
    if member is not None:
        tail = member.flush()
        if tail:
            yield tail
        raise _ReadFailed("truncated gzip: ended before its end-of-stream marker")


def iter_record_batches(
    source: Source,
    *,
    strict: bool = False,
    chunk_size: int = 1 << 20,
    parser: ZeekLogParser | None = None,
    on_rejection: Callable[[Rejection], None] | None = None,
) -> Iterator[list[ConnRecord]]:
    """Records of a log, a list per chunk read (empty lists are not yielded).

    ``source``: a path (gzip undone), a binary file object, ``bytes``, or an iterable of
    bytes chunks.  Bad lines are rejected and counted (``parser.rejected``; pass your
    own ``parser`` to read the counts afterwards, or ``on_rejection`` to see each one);
    ``strict=True`` raises :class:`ZeekParseError` at the first instead.  An empty
    source and a truncated gzip each give one rejection.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if parser is None:
        parser = ZeekLogParser(source_name=_source_name(source), strict=strict)
    elif strict:
        parser.strict = True

    def drain() -> None:
        if on_rejection is not None and parser.rejections:
            for rej in parser.drain_rejections():
                on_rejection(rej)

    total = 0
    try:
        for data in _gunzip(_raw_chunks(source, chunk_size)):
            total += len(data)
            # Feed in chunk_size slices so memory stays bounded for a huge decompressed chunk.
            for start in range(0, len(data), chunk_size):
                batch = parser.feed(data[start : start + chunk_size])
                drain()
                if batch:
                    yield batch
    except _ReadFailed as exc:
        parser.abort(exc.reason)
        drain()
        return
    batch = parser.finish()
    if total == 0:
        parser._reject(0, "empty input", b"")
    drain()
    if batch:
        yield batch


def iter_records(
    source: Source,
    *,
    strict: bool = False,
    chunk_size: int = 1 << 20,
    parser: ZeekLogParser | None = None,
    on_rejection: Callable[[Rejection], None] | None = None,
) -> Iterator[ConnRecord]:
    """Records of a log one by one; see :func:`iter_record_batches`."""
    for batch in iter_record_batches(
        source, strict=strict, chunk_size=chunk_size, parser=parser, on_rejection=on_rejection
    ):
        yield from batch


def read_log(source: Source, **kwargs: Any) -> tuple[list[ConnRecord], ZeekLogParser]:
    """All records of a (small) log and the parser, whose counts and rejections say
    what was dropped."""
    parser = kwargs.pop("parser", None) or ZeekLogParser(source_name=_source_name(source))
    records = list(iter_records(source, parser=parser, **kwargs))
    return records, parser


# --------------------------------------------------------------------------- writer


def _escape(value: str, specials: tuple[str, ...]) -> str:
    """Zeek's ASCII escaping: backslash, control bytes, separators as ``\\xNN``."""
    out = []
    for ch in value:
        o = ord(ch)
        if ch == "\\" or o < 0x20 or o == 0x7F or ch in specials:
            out.append("".join(f"\\x{b:02x}" for b in ch.encode("utf-8")))
        elif 0xDC80 <= o <= 0xDCFF:  # an undecodable byte kept by surrogateescape
            out.append(f"\\x{o - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _escape_finder(specials: tuple[str, ...]) -> Callable[[str], Any]:
    """``search`` of a pattern that finds what :func:`_escape` must rewrite."""
    alternatives = [r"[\\\x00-\x1f\x7f\udc80-\udcff]"] + [re.escape(s) for s in specials]
    return re.compile("|".join(alternatives)).search


class ZeekTsvWriter:
    """Write conn records as a Zeek TSV log (header block, lines, ``#close``).

    Keyword options:
      header: the columns and separators to write (default: :meth:`LogHeader.zeek_conn`,
        or the IoT-23 layout when the first record carries a label).  A header read by
        the parser reproduces that log's layout.
      open_stamp / close_stamp: the ``#open``/``#close`` texts (default: the time of
        writing, UTC, Zeek's ``%Y-%m-%d-%H-%M-%S``).
      close_line: write ``#close`` on :meth:`close` (default True).
    Records' fields missing from the header are not written; header columns the record
    type lacks are taken from ``record.extra`` (unset if absent).
    """

    def __init__(
        self,
        fileobj: IO[bytes],
        *,
        header: LogHeader | None = None,
        open_stamp: str | None = None,
        close_stamp: str | None = None,
        close_line: bool = True,
    ):
        if header is not None:
            if not isinstance(header, LogHeader):
                raise TypeError("header must be a LogHeader")
            if header.format != "tsv" or not header.fields:
                raise ValueError("the writer needs a TSV header with #fields")
        self._f = fileobj
        self._header = header
        self._open_stamp = open_stamp
        self._close_stamp = close_stamp
        self._close_line = close_line
        self._formatters: list[Callable[[ConnRecord], str]] | None = None
        self.written = 0
        self.closed = False

    @property
    def header(self) -> LogHeader | None:
        return self._header

    def _start(self, first: ConnRecord | None) -> None:
        h = self._header
        if h is None:
            labelled = first is not None and (first.label is not None or first.detailed_label is not None)
            h = LogHeader.zeek_conn(iot23=labelled)
            if first is not None and first.extra:
                h = _replace(
                    h,
                    fields=h.fields + tuple(k for k, _ in first.extra),
                    types=h.types + tuple("string" for _ in first.extra),
                    joined_tail=0,
                )
            self._header = h
        stamp = self._open_stamp or h.open or time.strftime(ZEEK_STAMP_FORMAT, time.gmtime())
        sep = h.separator
        types = h.types or tuple(TYPE_BY_FIELD.get(FIELD_BY_COLUMN.get(c, ""), "string") for c in h.fields)
        sep_text = "".join(f"\\x{b:02x}" for b in sep.encode("utf-8"))
        lines = [
            f"#separator {sep_text}",
            f"#set_separator{sep}{_escape(h.set_separator, (sep,))}",
            f"#empty_field{sep}{_escape(h.empty_field, (sep,))}",
            f"#unset_field{sep}{_escape(h.unset_field, (sep,))}",
            f"#path{sep}{_escape(h.path or 'conn', (sep,))}",
            f"#open{sep}{stamp}",
            f"#fields{sep}{self._join_header(h.fields, h)}",
            f"#types{sep}{self._join_header(types, h)}",
        ]
        self._f.write(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
        self._formatters = [self._formatter(col, h) for col in h.fields]

    @staticmethod
    def _join_header(items, h: LogHeader) -> str:
        items = [_escape(i, (h.separator,)) for i in items]
        if h.joined_tail:
            k = len(items) - h.joined_tail
            return h.separator.join(items[:k] + [IOT23_JOINER.join(items[k:])])
        return h.separator.join(items)

    @staticmethod
    def _formatter(column: str, h: LogHeader) -> Callable[[ConnRecord], str]:
        unset, empty, sep, set_sep = h.unset_field, h.empty_field, h.separator, h.set_separator
        field = FIELD_BY_COLUMN.get(column)
        if field is None:

            def extra(rec: ConnRecord) -> str:
                for name, raw in rec.extra:
                    if name == column:
                        return raw
                return unset

            return extra
        idx = _RECORD_INDEX[field]
        typ = TYPE_BY_FIELD[field]
        specials = (sep, IOT23_JOINER) if h.joined_tail else (sep,)
        needs_escape = _escape_finder(specials)
        if typ in ("time", "interval", "double"):
            return lambda rec: unset if rec[idx] is None else "%.6f" % rec[idx]
        if typ in ("count", "port"):
            return lambda rec: unset if rec[idx] is None else str(rec[idx])
        if typ == "bool":
            return lambda rec: unset if rec[idx] is None else ("T" if rec[idx] else "F")
        if typ == "set[string]":
            set_specials = specials + (set_sep,)
            element_needs_escape = _escape_finder(set_specials)

            def fmt_element(e: str) -> str:
                if element_needs_escape(e):
                    e = _escape(e, set_specials)
                if e == unset or e == empty:
                    e = f"\\x{ord(e[0]):02x}" + e[1:]
                return e

            def fmt_set(rec: ConnRecord) -> str:
                v = rec[idx]
                if v is None:
                    return unset
                if not v:
                    return empty
                return set_sep.join(map(fmt_element, v))

            return fmt_set

        def fmt_str(rec: ConnRecord) -> str:
            v = rec[idx]
            if v is None:
                return unset
            if v == "":
                return empty
            if needs_escape(v):
                v = _escape(v, specials)
            if v == unset or v == empty:  # a real value that looks like a placeholder
                v = f"\\x{ord(v[0]):02x}" + v[1:]
            return v

        return fmt_str

    def write(self, records: Iterable[ConnRecord]) -> int:
        """Write records; returns how many."""
        if self.closed:
            raise ValueError("write() on a closed ZeekTsvWriter")
        records = iter(records)
        if self._formatters is None:
            first = next(records, None)
            self._start(first)
            if first is None:
                return 0
            records = _chain_one(first, records)
        h = self._header
        assert h is not None and self._formatters is not None
        fmts = self._formatters
        sep = h.separator
        n = 0
        lines = []
        if h.joined_tail:
            k = len(fmts) - h.joined_tail
            head, tail = fmts[:k], fmts[k:]
            for rec in records:
                lines.append(
                    sep.join([f(rec) for f in head]) + sep + IOT23_JOINER.join([f(rec) for f in tail])
                )
        else:
            for rec in records:
                lines.append(sep.join([f(rec) for f in fmts]))
        n = len(lines)
        if lines:
            self._f.write(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
        self.written += n
        return n

    def close(self) -> None:
        """Write ``#close`` (the file object itself is left open)."""
        if self.closed:
            return
        if self._formatters is None:
            self._start(None)
        if self._close_line:
            h = self._header
            assert h is not None
            stamp = self._close_stamp or time.strftime(ZEEK_STAMP_FORMAT, time.gmtime())
            self._f.write(f"#close{h.separator}{stamp}\n".encode())
        self.closed = True

    def __enter__(self) -> ZeekTsvWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chain_one(first, rest):
    yield first
    yield from rest


def write_tsv(
    records: Iterable[ConnRecord],
    fileobj: IO[bytes],
    *,
    header: LogHeader | None = None,
    open_stamp: str | None = None,
    close_stamp: str | None = None,
) -> int:
    """Write ``records`` to a binary file object as one Zeek TSV log; returns the count."""
    with ZeekTsvWriter(fileobj, header=header, open_stamp=open_stamp, close_stamp=close_stamp) as w:
        return w.write(records)


def to_tsv_bytes(records: Iterable[ConnRecord], **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    write_tsv(records, buf, **kwargs)
    return buf.getvalue()
