"""How commands print results: a rich table by default, JSON (or CSV) for scripts.

One home for output formatting, so every command behaves the same way.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

FORMATS = ("table", "json", "csv")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def emit_json(data: Any, stream=None) -> None:
    stream = stream or sys.stdout
    json.dump(data, stream, default=_jsonable, indent=None, separators=(",", ":"))
    stream.write("\n")


def emit_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    fmt: str = "table",
    title: str | None = None,
    stream=None,
) -> None:
    """Print ``rows`` (dicts) as a table, a JSON array or CSV."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    columns = list(columns or (rows[0].keys() if rows else []))
    if fmt == "json":
        emit_json([{c: _jsonable(r.get(c)) for c in columns} for r in rows], stream)
        return
    if fmt == "csv":
        writer = csv.writer(stream or sys.stdout)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else _jsonable(r.get(c)) for c in columns])
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    Console(file=stream).print(table)


def emit_mapping(data: Mapping[str, Any], *, as_json: bool, title: str | None = None) -> None:
    """Print a flat summary (key -> value) as a two-column table or one JSON object."""
    if as_json:
        emit_json(dict(data))
        return
    emit_rows([{"item": k, "value": v} for k, v in data.items()], ["item", "value"], title=title)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, Iterable) and not isinstance(value, str):
        return ",".join(map(str, value))
    return str(value)
