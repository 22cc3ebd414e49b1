"""How commands print results: a rich table by default, JSON (or CSV) for scripts.

One home for output formatting, so every command behaves the same way -- and one home
for making data safe to print.  Flow records, file names and log lines come from the
network and are treated as hostile:

* :func:`printable` escapes control characters (ESC sequences, CR, backspace...), bidi
  and other invisible format characters, and undecodable bytes, so data cannot move the
  cursor, recolour or retitle the terminal, or hide text.
* Table cells are :class:`rich.text.Text`, never markup: a field holding ``[/x]`` is
  printed as those four characters.
* CSV cells that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab,
  CR first) get a leading ``'`` (:func:`csv_cell`).
* JSON escapes every control and non-ASCII character (``\\u001b``), losslessly.

Tables fit the terminal without cutting what must stay whole (addresses, uids, paths):
``whole`` columns are never shortened, ``optional`` columns are left out (and named)
when there is no room, and when even that does not fit the rows are printed as records,
one ``key value`` line each.  ``wide`` prints every column at its full width.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "wide", "json", "csv")
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_ESCAPED_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")  # controls, format chars, surrogates, private, separators


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with every character that is not plain visible text escaped (``\\x1b``,
    ``\\u202e``, ...); characters in ``keep`` (e.g. ``"\\n"``) are left alone."""
    if text.isprintable() and not keep:  # the common case: nothing to do (fast)
        return text
    return "".join(
        _escape_char(ch) if ch not in keep and unicodedata.category(ch) in _ESCAPED_CATEGORIES else ch
        for ch in text
    )


def csv_cell(value: Any) -> Any:
    """One CSV cell: numbers as they are; text printable, and neutralised (leading ``'``)
    when a spreadsheet would read it as a formula.  A lone ``-`` (Zeek's "unset") and
    numbers written as text ("-3.5") are left alone: they are not formulas."""
    if value is None:
        return ""
    value = _jsonable(value)
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, dict)):
        value = json.dumps(value, separators=(",", ":"))
    text = printable(str(value))
    if text.startswith(CSV_FORMULA_START) and text != "-" and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def emit_json(data: Any, stream=None) -> None:
    """One JSON document; ``ensure_ascii`` escapes control characters (and all non-ASCII)."""
    stream = stream or sys.stdout
    json.dump(data, stream, default=_jsonable, indent=None, separators=(",", ":"), ensure_ascii=True)
    stream.write("\n")


def emit_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    fmt: str = "table",
    title: str | None = None,
    stream=None,
    whole: Iterable[str] = (),
    optional: Sequence[str] = (),
    hidden_hint: str | None = "--json shows them",
) -> None:
    """Print ``rows`` (dicts) as a table, a JSON array or CSV.

    Table only: ``whole`` columns are never shortened; ``optional`` columns, most
    wanted first, are dropped from the end of that list while the table is wider than
    the console (the caption names them, and ``hidden_hint`` says how to see them);
    when the rest is still too wide, each row is printed as a record.  ``fmt="wide"``
    keeps every column and prints at full width.
    """
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
            writer.writerow([csv_cell(r.get(c)) for c in columns])
        return
    cells = [{c: _cell(r.get(c)) for c in columns} for r in rows]
    console = Console(file=stream, highlight=False)
    whole = [c for c in columns if c in set(whole)]
    if fmt == "wide":
        table = _table(cells, columns, title, whole=columns)
        console.width = max(console.width, _measure(console, table).maximum)
        console.print(table)
        return
    wanted = [c for c in optional if c in columns]
    shown = [c for c in columns if c not in wanted]
    if _measure(console, _table(cells, columns, title, whole=whole)).maximum <= console.width:
        shown = list(columns)
    else:  # add the optional columns, most wanted first, each one that still fits
        for c in wanted:
            trial = [x for x in columns if x in shown or x == c]
            if _measure(console, _table(cells, trial, title, whole=whole)).maximum <= console.width:
                shown = trial
    dropped = [c for c in wanted if c not in shown]
    caption = None
    if dropped:
        caption = f"not shown for width: {', '.join(dropped)}" + (f" ({hidden_hint})" if hidden_hint else "")
    if _narrowest(cells, shown, whole) > console.width:
        _print_records(console, cells, columns, title)  # the whole columns alone are too wide
        return
    console.print(_table(cells, shown, title, whole=whole, caption=caption))


def emit_mapping(data: Mapping[str, Any], *, as_json: bool, title: str | None = None) -> None:
    """Print a flat summary (key -> value) as a two-column table or one JSON object."""
    if as_json:
        emit_json(dict(data))
        return
    emit_rows([{"item": k, "value": v} for k, v in data.items()], ["item", "value"], title=title)


def progress_label(text: str) -> str:
    """``text`` (a file name...) for a progress bar's description, which Rich reads as markup."""
    from rich.markup import escape

    return escape(printable(text))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, Iterable) and not isinstance(value, str):
        value = ",".join(map(str, value))
    return printable(str(value))


def _measure(console: Console, table: Table):
    """Narrowest and natural width of ``table`` (not capped at the console's width)."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update(max_width=1_000_000), table)


FOLDED_MIN = 8  # the narrowest a column that may wrap is given before rows become records


def _narrowest(cells, columns, whole) -> int:
    """The least width a table of ``columns`` needs: whole columns at full width, the
    others folded to a few characters, two spaces between columns."""
    def longest(c):
        return max([cell_len(c), *(cell_len(r[c]) for r in cells)])

    return sum(longest(c) if c in whole else min(longest(c), FOLDED_MIN) for c in columns) + 2 * (len(columns) - 1)


def _table(cells, columns, title, *, whole, caption=None) -> Table:
    """A plain table (a rule under the header, two spaces between columns): the most
    columns an 80-character line can hold.  Cells are Text, never markup."""
    table = Table(title=Text(printable(title)) if title else None,
                  caption=Text(caption) if caption else None, caption_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for c in columns:
        if c in whole:
            longest = max([cell_len(c), *(cell_len(r[c]) for r in cells)])
            table.add_column(Text(c), no_wrap=True, min_width=longest)
        else:
            table.add_column(Text(c), overflow="fold")
    for r in cells:
        table.add_row(*(Text(r[c]) for c in columns))
    return table


def _print_records(console: Console, cells, columns, title) -> None:
    if title:
        console.print(Text(printable(title), style="italic"))
    key_width = max(len(c) for c in columns)
    for i, r in enumerate(cells):
        if i:
            console.print(Text("-" * min(console.width, 40), style="dim"))
        for c in columns:
            console.print(Text(f"{c:<{key_width}}  ") + Text(r[c]), soft_wrap=True)


# ---------------------------------------------------------------- logging


class SafeFormatter(logging.Formatter):
    """Log lines with the message made :func:`printable` (a flow field or a file name
    in a message cannot forge log lines or drive the terminal); tracebacks keep their
    line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return printable(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return printable(super().formatStack(stack_info), keep="\n")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(verbose: int, *, fmt: str = LOG_FORMAT) -> None:
    """Log to stderr at WARNING -- fedgate's and every library's (Alembic, paho,
    ONNX Runtime) -- unless asked: ``-v`` INFO, ``-vv`` DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(fmt))
    logging.basicConfig(level=logging.WARNING - 10 * min(max(verbose, 0), 2), handlers=[handler])
