"""Zeek JSON log lines (``LogAscii::use_json=T``) -> records: ``ts`` as epoch seconds or
ISO-8601, flat ``id.orig_h`` keys (a nested ``{"id": {...}}`` is accepted too); clean
columns are checked once per column, others value by value."""


from __future__ import annotations

import datetime as _dt
import json
import math
from itertools import repeat
from typing import Any

from gateway.flows.record import COLUMN_BY_FIELD, FIELD_BY_COLUMN, TYPE_BY_FIELD, ConnRecord
from gateway.flows.zeek.header import (
    REQUIRED_FIELDS,
    MAX_COUNT,
    _RECORD_INDEX,
    _N_RECORD_FIELDS,
    _EXTRA_INDEX,
    _make_record,
    _ADDR_VALUE,
)

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

