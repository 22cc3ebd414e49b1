"""What every Zeek log reader shares: the header state, rejections and the constants
of the format (Zeek's ``LogAscii`` writer)."""


from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from gateway.flows.record import ConnRecord



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



def _replace(header: LogHeader, **changes: Any) -> LogHeader:
    values = header.to_dict()
    values.update(changes)
    return LogHeader.from_dict(values)

