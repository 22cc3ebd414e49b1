"""Zeek TSV data lines -> records, column by column.

A block of lines whose field counts all match the header is split once into a flat list
and sliced into columns; each column is converted by a converter chosen when the header
was read (``map(int, col)`` and friends run in C); only a column that fails falls back to
a per-value pass that pinpoints the bad rows.
"""


from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from gateway.flows.record import COLUMN_BY_FIELD, FIELD_BY_COLUMN, TYPE_BY_FIELD
from gateway.flows.zeek.header import (
    REQUIRED_FIELDS,
    MAX_COUNT,
    _ADDR_TEXT,
    _ADDR_VALUE,
    _NUMBER_TEXT,
    _NUMBER_COLUMN,
    LogHeader,
    _unescape_hex,
)

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


