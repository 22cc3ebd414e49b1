"""The conn record: one Zeek ``conn.log`` entry, typed.

A ``ConnRecord`` is an immutable NamedTuple so that parsers can build millions of them
cheaply (``ConnRecord._make(values)`` is a single C-level tuple construction) and so that
records compare and hash by value (round-trip tests compare them directly).

Field names follow Zeek's ``conn.log`` column names with ``id.`` dropped and ``-``
replaced by ``_`` (``id.orig_h`` -> ``orig_h``, IoT-23's ``detailed-label`` ->
``detailed_label``).  ``None`` means Zeek's unset value (``-``); an empty set is ``()``.
Columns a log carries beyond the ones below are kept, in order, in ``extra`` as
``(column name, raw text)`` pairs, so that a log read and written back loses nothing.
"""

from __future__ import annotations

from typing import NamedTuple


class ConnRecord(NamedTuple):
    ts: float
    uid: str
    orig_h: str
    orig_p: int
    resp_h: str
    resp_p: int
    proto: str
    service: str | None = None
    duration: float | None = None
    orig_bytes: int | None = None
    resp_bytes: int | None = None
    conn_state: str | None = None
    local_orig: bool | None = None
    local_resp: bool | None = None
    missed_bytes: int | None = None
    history: str | None = None
    orig_pkts: int | None = None
    orig_ip_bytes: int | None = None
    resp_pkts: int | None = None
    resp_ip_bytes: int | None = None
    tunnel_parents: tuple[str, ...] | None = None
    ip_proto: int | None = None
    label: str | None = None
    detailed_label: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def is_malicious(self) -> bool | None:
        """IoT-23 verdict: True for 'Malicious', False for 'benign', None if unlabelled."""
        if self.label is None:
            return None
        return self.label.lower() != "benign"


# Zeek's own column name and type for every typed field, in Zeek's conn.log order.
# `label` and `detailed_label` are IoT-23 additions (written as `label`/`detailed-label`).
ZEEK_CONN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (record field, Zeek column name, Zeek type)
    ("ts", "ts", "time"),
    ("uid", "uid", "string"),
    ("orig_h", "id.orig_h", "addr"),
    ("orig_p", "id.orig_p", "port"),
    ("resp_h", "id.resp_h", "addr"),
    ("resp_p", "id.resp_p", "port"),
    ("proto", "proto", "enum"),
    ("service", "service", "string"),
    ("duration", "duration", "interval"),
    ("orig_bytes", "orig_bytes", "count"),
    ("resp_bytes", "resp_bytes", "count"),
    ("conn_state", "conn_state", "string"),
    ("local_orig", "local_orig", "bool"),
    ("local_resp", "local_resp", "bool"),
    ("missed_bytes", "missed_bytes", "count"),
    ("history", "history", "string"),
    ("orig_pkts", "orig_pkts", "count"),
    ("orig_ip_bytes", "orig_ip_bytes", "count"),
    ("resp_pkts", "resp_pkts", "count"),
    ("resp_ip_bytes", "resp_ip_bytes", "count"),
    ("tunnel_parents", "tunnel_parents", "set[string]"),
    ("ip_proto", "ip_proto", "count"),
    ("label", "label", "string"),
    ("detailed_label", "detailed-label", "string"),
)

FIELD_BY_COLUMN: dict[str, str] = {col: field for field, col, _ in ZEEK_CONN_COLUMNS}
COLUMN_BY_FIELD: dict[str, str] = {field: col for field, col, _ in ZEEK_CONN_COLUMNS}
TYPE_BY_FIELD: dict[str, str] = {field: typ for field, _, typ in ZEEK_CONN_COLUMNS}
