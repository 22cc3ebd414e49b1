"""Conn records out: Zeek TSV (header block, escaped lines, ``#close``) and Zeek JSON lines."""


from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import IO, Any

from gateway.flows.record import COLUMN_BY_FIELD, FIELD_BY_COLUMN, TYPE_BY_FIELD, ConnRecord
from gateway.flows.zeek.header import (
    IOT23_JOINER,
    ZEEK_STAMP_FORMAT,
    _RECORD_INDEX,
    LogHeader,
    _replace,
)

_WRITE_BATCH = 16_384  # records formatted at a time, column by column


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
        self._formatters: list[Callable[[list[ConnRecord], list[tuple]], Sequence[str]]] | None = None
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
    def _formatter(column: str, h: LogHeader) -> Callable[[list[ConnRecord], list[tuple]], Sequence[str]]:
        """How one header column is written: (records, their fields transposed) -> the
        column's texts.  A clean column (no unset value, nothing to escape: one C-level
        check of the whole column) takes one map() or none; others go value by value."""
        unset, empty, sep, set_sep = h.unset_field, h.empty_field, h.separator, h.set_separator
        field = FIELD_BY_COLUMN.get(column)
        if field is None:

            def extra(records: list[ConnRecord], cols: list[tuple]) -> list[str]:
                out = []
                for rec in records:
                    for name, raw in rec.extra:
                        if name == column:
                            out.append(raw)
                            break
                    else:
                        out.append(unset)
                return out

            return extra
        idx = _RECORD_INDEX[field]
        typ = TYPE_BY_FIELD[field]
        specials = (sep, IOT23_JOINER) if h.joined_tail else (sep,)
        needs_escape = _escape_finder(specials)
        if typ in ("time", "interval", "double"):

            def times(records: list[ConnRecord], cols: list[tuple]) -> Sequence[str]:
                col = cols[idx]
                if None in col:
                    return [unset if v is None else "%.6f" % v for v in col]
                return list(map("%.6f".__mod__, col))

            return times
        if typ in ("count", "port"):

            def counts(records: list[ConnRecord], cols: list[tuple]) -> Sequence[str]:
                col = cols[idx]
                if None in col:
                    return [unset if v is None else str(v) for v in col]
                return list(map(str, col))

            return counts
        if typ == "bool":

            def bools(records: list[ConnRecord], cols: list[tuple]) -> Sequence[str]:
                return [unset if v is None else ("T" if v else "F") for v in cols[idx]]

            return bools
        if typ == "set[string]":
            set_specials = specials + (set_sep,)
            element_needs_escape = _escape_finder(set_specials)

            def fmt_element(e: str) -> str:
                if element_needs_escape(e):
                    e = _escape(e, set_specials)
                if e == unset or e == empty:
                    e = f"\\x{ord(e[0]):02x}" + e[1:]
                return e

            def fmt_set(v) -> str:
                if v is None:
                    return unset
                if not v:
                    return empty
                return set_sep.join(map(fmt_element, v))

            def sets(records: list[ConnRecord], cols: list[tuple]) -> Sequence[str]:
                return [fmt_set(v) for v in cols[idx]]

            return sets

        def fmt_str(v) -> str:
            if v is None:
                return unset
            if v == "":
                return empty
            if needs_escape(v):
                v = _escape(v, specials)
            if v == unset or v == empty:  # a real value that looks like a placeholder
                v = f"\\x{ord(v[0]):02x}" + v[1:]
            return v

        def strings(records: list[ConnRecord], cols: list[tuple]) -> Sequence[str]:
            col = cols[idx]
            if None not in col and "" not in col and unset not in col and empty not in col:
                try:
                    if not needs_escape(" ".join(col)):
                        return col
                except TypeError:
                    pass
            return [fmt_str(v) for v in col]

        return strings

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
        while batch := list(islice(records, _WRITE_BATCH)):
            cols = list(zip(*batch))
            texts = [f(batch, cols) for f in fmts]
            if h.joined_tail:
                k = len(fmts) - h.joined_tail
                lines = [sep.join(row[:k]) + sep + IOT23_JOINER.join(row[k:]) for row in zip(*texts)]
            else:
                lines = list(map(sep.join, zip(*texts)))
            self._f.write(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
            n += len(lines)
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
