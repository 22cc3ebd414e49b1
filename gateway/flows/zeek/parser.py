"""The incremental Zeek conn log parser: bytes in, records out, no file or socket.

It keeps a partial last line until its newline arrives, so any split of a byte stream
gives the same records; header lines update the :class:`LogHeader` in force, data lines
go to :mod:`.tsv` or :mod:`.json`; bad lines become :class:`Rejection` values (source,
line number, reason, text), counted and logged, and the good records around them are
kept.  Records are built with ``tuple.__new__`` through ``map``, with the cyclic GC paused
while a chunk is parsed.
"""


from __future__ import annotations

import gc
import logging
from itertools import repeat
from typing import Any

from gateway.flows.record import COLUMN_BY_FIELD, ConnRecord
from gateway.flows.zeek.header import (
    IOT23_JOINER,
    HEADER_KEYS,
    MAX_REJECTION_TEXT,
    LOGGED_REJECTIONS,
    _RECORD_INDEX,
    _N_RECORD_FIELDS,
    _EXTRA_INDEX,
    _make_record,
    _ODD_FOR_NUMBERS,
    _BLOCK_BYTES,
    Rejection,
    ZeekParseError,
    LogHeader,
    _unescape_hex,
    _split_joined,
    _replace,
)
from gateway.flows.zeek.json import _JSON_COLUMNS, _json_columns, _json_object, _record_from_json
from gateway.flows.zeek.tsv import _compile, _Context, _Plan

log = logging.getLogger("gateway.flows.zeek")

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

