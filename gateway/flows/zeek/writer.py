"""Conn records out: Zeek TSV (header block, escaped lines, ``#close``) and Zeek JSON lines."""


from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from gateway.flows.record import COLUMN_BY_FIELD, FIELD_BY_COLUMN, TYPE_BY_FIELD, ConnRecord
from gateway.flows.zeek.header import (
    IOT23_JOINER,
    ZEEK_STAMP_FORMAT,
    _RECORD_INDEX,
    LogHeader,
    _replace,
)

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



def zeek_json_line(rec: ConnRecord) -> str:
    """One record as a line of Zeek's JSON log format (``LogAscii::use_json=T``)."""
    out = {}
    for name, value in zip(rec._fields, rec):
        if name == "extra":
            continue
        if value is None or value == ():
            continue
        if isinstance(value, tuple):
            value = list(value)
        out[COLUMN_BY_FIELD.get(name, name)] = value
    return json.dumps(out, separators=(",", ":"))
