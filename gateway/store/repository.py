"""Reads and writes of the detection store.  Every function takes an open ``Session``.

Sessions are opened and committed at the edges (``gateway.ingest``, the CLI, the
gateway service); functions here never commit, so a caller can put several of them
(a batch of flows, its detections and the ingest offset) in one transaction.

Bulk paths (``insert_flows``, ``insert_detections``) send plain tuples through the
driver's ``executemany`` with ``INSERT ... ON CONFLICT DO NOTHING`` (COPY + the same on
PostgreSQL for big batches): building ORM objects
for a million flows would cost more than parsing them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import BigInteger, Integer, Select, and_, case, delete, func, or_, select, update
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, aliased

from gateway.flows.record import ConnRecord
from gateway.store.models import (
    Detection,
    Feedback,
    Flow,
    IngestOffset,
    ModelVersion,
    OutboxMessage,
)

# ConnRecord fields stored as flows columns, in ConnRecord order (then source,
# ingested_at).  `extra` is stored as JSON; `tunnel_parents` comma-joined.
_RECORD_FIELDS = tuple(f for f in ConnRecord._fields)
FLOW_INSERT_COLUMNS = ("source", *_RECORD_FIELDS, "ingested_at")
_TUNNEL_IDX = _RECORD_FIELDS.index("tunnel_parents")
_EXTRA_IDX = _RECORD_FIELDS.index("extra")
if _EXTRA_IDX != len(_RECORD_FIELDS) - 1:  # flow_rows' fast path slices it off the end
    raise RuntimeError("ConnRecord.extra must be the last field")
# Batches at least this big go through COPY on PostgreSQL; small ones use executemany.
COPY_THRESHOLD = 1000
DETECTION_INSERT_COLUMNS = ("source", "uid", "label", "score", "model_version", "created_at")
TEACHER_VERSION_PREFIX = "teacher/"
"""Detections whose model version starts so are the cloud teacher's answers to escalated
flows (gateway.escalation), stored beside the student's own detection."""


class FlowNotFound(LookupError):
    """No stored flow has the uid an analyst named."""


class AmbiguousFlow(LookupError):
    """The uid exists in several sources; the caller must name the source."""


# ---------------------------------------------------------------- flows (bulk)


def flow_row(record: ConnRecord, source: str, ingested_at: float) -> tuple:
    """The flows-table tuple (in ``FLOW_INSERT_COLUMNS`` order) for one record."""
    values = list(record)
    tp = values[_TUNNEL_IDX]
    if tp is not None:
        values[_TUNNEL_IDX] = ",".join(tp)
    extra = values[_EXTRA_IDX]
    values[_EXTRA_IDX] = json.dumps([list(p) for p in extra]) if extra else None
    return (source, *values, ingested_at)


def flow_rows(records: Iterable[ConnRecord], source: str, ingested_at: float) -> list[tuple]:
    """``flow_row`` for many records; the common case (no tunnel parents, no extra
    columns) is two tuple slices, which keeps conversion well under the insert cost."""
    head, tail = (source,), (None, ingested_at)
    out = []
    append = out.append
    for r in records:
        if r[_TUNNEL_IDX] is None and not r[_EXTRA_IDX]:
            append(head + r[:_EXTRA_IDX] + tail)
        else:
            append(flow_row(r, source, ingested_at))
    return out


# ---------------------------------------------------------------- values a database refuses

# What a database may refuse in a row: NUL in text (PostgreSQL), lone surrogates (the
# parser keeps undecodable bytes that way; no driver can encode them), integers beyond
# the column type.  Bulk inserts send rows unchecked (checking costs as much as
# inserting); a batch that fails with one of these is cleaned and sent again.
ROW_VALUE_ERRORS: tuple[type[BaseException], ...] = (DataError, IntegrityError, ValueError, OverflowError)
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def _int_limits() -> dict[int, tuple[int, int]]:
    limits = {}
    for i, name in enumerate(FLOW_INSERT_COLUMNS):
        col_type = Flow.__table__.c[name].type
        if isinstance(col_type, BigInteger):
            limits[i] = _INT64
        elif isinstance(col_type, Integer):
            limits[i] = _INT32
    return limits


_FLOW_INT_LIMITS = _int_limits()
_FLOW_REQUIRED = {i: name for i, name in enumerate(FLOW_INSERT_COLUMNS) if not Flow.__table__.c[name].nullable}
_UNSAFE_TEXT = re.compile("[\x00\udc80-\udcff]")


def zeek_escape(text: str) -> str:
    """NUL and undecodable bytes written as Zeek writes them: ``\\xNN``."""
    return _UNSAFE_TEXT.sub(lambda m: f"\\x{ord(m.group()) & 0xFF:02x}", text)


class RefusedRow(NamedTuple):
    uid: str
    reason: str


def clean_flow_rows(rows: Sequence[tuple]) -> tuple[list[tuple | None], list[RefusedRow]]:
    """Rows every database takes: text escaped; a row with an out-of-range integer or a
    missing required value is refused (None in its place, and a RefusedRow saying why)."""
    out: list[tuple | None] = []
    refused: list[RefusedRow] = []
    uid_idx = FLOW_INSERT_COLUMNS.index("uid")
    for row in rows:
        missing = next((name for i, name in _FLOW_REQUIRED.items() if row[i] is None), None)
        bad = next(
            (FLOW_INSERT_COLUMNS[i] for i, (lo, hi) in _FLOW_INT_LIMITS.items()
             if isinstance(row[i], int) and not lo <= row[i] <= hi),
            None,
        )
        if missing is not None or bad is not None:
            out.append(None)
            why = f"{missing} missing" if missing is not None else f"{bad} out of range for the database"
            refused.append(RefusedRow(str(row[uid_idx]), why))
            continue
        out.append(tuple(zeek_escape(v) if isinstance(v, str) and _UNSAFE_TEXT.search(v) else v for v in row))
    return out, refused


def insert_flow_rows(session: Session, rows: list[tuple]) -> int:
    """Insert ready rows (``flow_rows``/``clean_flow_rows`` output); existing flows skipped."""
    return _bulk_insert_ignore(session, "flows", FLOW_INSERT_COLUMNS, ("uid", "source"), rows)


def record_from_row(row: Any) -> ConnRecord:
    """Rebuild a ``ConnRecord`` from a flows row (an ORM ``Flow`` or a mapping)."""
    if isinstance(row, Flow):
        values = {f: getattr(row, f) for f in _RECORD_FIELDS}
    else:
        values = {f: row[f] for f in _RECORD_FIELDS}
    tp = values["tunnel_parents"]
    if tp is not None:
        values["tunnel_parents"] = tuple(tp.split(",")) if tp else ()
    extra = values["extra"]
    values["extra"] = tuple(tuple(p) for p in json.loads(extra)) if extra else ()
    for b in ("local_orig", "local_resp"):
        if values[b] is not None:
            values[b] = bool(values[b])
    return ConnRecord(**values)


def _insert_ignore_sql(dialect: str, table: str, columns: Sequence[str], conflict: Sequence[str]) -> str:
    # ON CONFLICT (key) DO NOTHING, not SQLite's INSERT OR IGNORE: that would also skip,
    # silently, rows breaking NOT NULL; those must fail and be refused by name.
    marks = {"sqlite": "?", "postgresql": "%s"}.get(dialect)
    if marks is None:
        raise NotImplementedError(dialect)
    cols = ", ".join(f'"{c}"' for c in columns)
    values = ", ".join(marks for _ in columns)
    keys = ", ".join(f'"{c}"' for c in conflict)
    return f'INSERT INTO "{table}" ({cols}) VALUES ({values}) ON CONFLICT ({keys}) DO NOTHING'


def _bulk_insert_ignore(
    session: Session, table: str, columns: Sequence[str], conflict: Sequence[str], rows: list[tuple]
) -> int:
    """Insert ``rows``, skipping those whose ``conflict`` key exists; return rows inserted."""
    if not rows:
        return 0
    conn = session.connection()
    dialect = conn.dialect.name
    if dialect == "postgresql" and conn.dialect.driver == "psycopg" and len(rows) >= COPY_THRESHOLD:
        return _pg_copy_insert_ignore(conn, table, columns, conflict, rows)
    try:
        sql = _insert_ignore_sql(dialect, table, columns, conflict)
    except NotImplementedError:
        return _portable_insert_ignore(session, table, columns, conflict, rows)
    result = conn.exec_driver_sql(sql, rows)
    return max(result.rowcount, 0)


def _pg_copy_insert_ignore(conn, table, columns, conflict, rows) -> int:
    """PostgreSQL: COPY the rows into a transaction-scoped staging table, then one
    INSERT ... SELECT ... ON CONFLICT DO NOTHING (several times faster than executemany)."""
    cols = ", ".join(f'"{c}"' for c in columns)
    keys = ", ".join(f'"{c}"' for c in conflict)
    stage = f"_fedgate_stage_{table}"
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" ON COMMIT DELETE ROWS AS '
            f'SELECT {cols} FROM "{table}" WITH NO DATA'
        )
        with cur.copy(f'COPY "{stage}" ({cols}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(f'INSERT INTO "{table}" ({cols}) SELECT {cols} FROM "{stage}" ON CONFLICT ({keys}) DO NOTHING')
        inserted = cur.rowcount
        # ON COMMIT DELETE ROWS empties it at commit; empty it now too, for a second
        # batch in the same transaction.
        cur.execute(f'TRUNCATE "{stage}"')
    return max(inserted, 0)


def _portable_insert_ignore(session, table, columns, conflict, rows) -> int:
    """Fallback for other dialects: look up existing keys, insert the rest (one writer)."""
    tbl = Flow.metadata.tables[table]
    key_idx = [columns.index(c) for c in conflict]
    keys = {tuple(r[i] for i in key_idx) for r in rows}
    existing = set()
    key_cols = [tbl.c[c] for c in conflict]
    for key in keys:
        cond = and_(*(col == v for col, v in zip(key_cols, key)))
        if session.execute(select(func.count()).select_from(tbl).where(cond)).scalar():
            existing.add(key)
    fresh, seen = [], set()
    for r in rows:
        k = tuple(r[i] for i in key_idx)
        if k in existing or k in seen:
            continue
        seen.add(k)
        fresh.append(dict(zip(columns, r)))
    if fresh:
        session.execute(tbl.insert(), fresh)
    return len(fresh)


def insert_flows(
    session: Session,
    records: Iterable[ConnRecord],
    *,
    source: str,
    ingested_at: float | None = None,
) -> int:
    """Store ``records`` under ``source``; flows already stored are skipped.  Returns new rows."""
    now = time.time() if ingested_at is None else ingested_at
    return insert_flow_rows(session, flow_rows(records, source, now))


def insert_detections(
    session: Session,
    detections: Iterable[tuple[str, str, str, float]],
    *,
    model_version: str,
    created_at: float | None = None,
) -> int:
    """Store ``(source, uid, label, score)`` verdicts of ``model_version``; repeats skipped."""
    now = time.time() if created_at is None else created_at
    rows = [(s, u, lab, float(score), model_version, now) for s, u, lab, score in detections]
    return _bulk_insert_ignore(
        session, "detections", DETECTION_INSERT_COLUMNS, ("source", "uid", "model_version"), rows
    )


def count_flows(session: Session, *, source: str | None = None) -> int:
    stmt = select(func.count()).select_from(Flow)
    if source is not None:
        stmt = stmt.where(Flow.source == source)
    return session.execute(stmt).scalar_one()


def labelled_data_key(session: Session, *, teacher: bool = False) -> tuple[int, ...]:
    """(labelled flows, feedback rows, newest feedback id[, teacher verdicts]): changes
    whenever the training data of the FL client does (a new labelled flow, a new or
    revised analyst label, retention removing labelled flows, with ``teacher`` a new
    teacher verdict), not with every unlabelled live flow."""
    flows = session.execute(select(func.count()).select_from(Flow).where(Flow.label.is_not(None))).scalar_one()
    n_feedback, newest = session.execute(select(func.count(Feedback.id), func.max(Feedback.id))).one()
    key = (int(flows), int(n_feedback), int(newest or 0))
    if teacher:
        n = session.execute(select(func.count()).select_from(Detection)
                            .where(Detection.model_version.startswith(TEACHER_VERSION_PREFIX))).scalar_one()
        key += (int(n),)
    return key


def teacher_labels(session: Session) -> list[tuple[ConnRecord, str]]:
    """Each flow with the cloud teacher's latest verdict on it (escalated flows)."""
    latest = (
        select(func.max(Detection.id).label("id"))
        .where(Detection.model_version.startswith(TEACHER_VERSION_PREFIX))
        .group_by(Detection.source, Detection.uid)
        .subquery()
    )
    stmt = (
        select(Flow, Detection.label)
        .join(Detection, and_(Detection.source == Flow.source, Detection.uid == Flow.uid))
        .join(latest, latest.c.id == Detection.id)
        .order_by(Detection.id)
    )
    return [(record_from_row(f), lab) for f, lab in session.execute(stmt)]


def load_records(session: Session, *, source: str | None = None, limit: int | None = None) -> list[ConnRecord]:
    """Stored flows as ``ConnRecord``s, oldest first (for training and exports)."""
    stmt = select(Flow).order_by(Flow.ts, Flow.id)
    if source is not None:
        stmt = stmt.where(Flow.source == source)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [record_from_row(f) for f in session.scalars(stmt)]


# ---------------------------------------------------------------- ingest offsets


class SavedOffset(NamedTuple):
    source: str
    file_identity: str
    offset: int
    header: str | None
    updated_at: float


def save_offset(
    session: Session, source: str, *, file_identity: str, offset: int, header: str | None = None
) -> None:
    """Record how far ``source`` is ingested (call in the transaction of its rows)."""
    row = session.get(IngestOffset, source)
    now = time.time()
    if row is None:
        session.add(
            IngestOffset(
                source=source, file_identity=file_identity, offset=offset, header=header, updated_at=now
            )
        )
    else:
        row.file_identity, row.offset, row.header, row.updated_at = file_identity, offset, header, now
    session.flush()


def load_offset(session: Session, source: str) -> SavedOffset | None:
    row = session.get(IngestOffset, source)
    if row is None:
        return None
    return SavedOffset(row.source, row.file_identity, row.offset, row.header, row.updated_at)


# ---------------------------------------------------------------- feedback


def resolve_flow_source(session: Session, uid: str, source: str | None = None) -> str:
    """The source of the stored flow ``uid``; raises FlowNotFound / AmbiguousFlow."""
    stmt = select(Flow.source).where(Flow.uid == uid)
    if source is not None:
        stmt = stmt.where(Flow.source == source)
    sources = list(session.scalars(stmt.limit(5)))
    if not sources:
        where = f" in source {source!r}" if source is not None else ""
        raise FlowNotFound(f"no stored flow has uid {uid!r}{where}")
    if len(sources) > 1:
        raise AmbiguousFlow(
            f"uid {uid!r} is stored under several sources ({', '.join(sources)}); name one with --source"
        )
    return sources[0]


def add_feedback(
    session: Session,
    uid: str,
    label: str,
    *,
    note: str | None = None,
    source: str | None = None,
    created_at: float | None = None,
) -> Feedback:
    """Record an analyst's verdict on the stored flow ``uid``."""
    label = label.strip()
    if not label:
        raise ValueError("feedback label must not be empty")
    src = resolve_flow_source(session, uid, source)
    fb = Feedback(
        source=src, uid=uid, label=label, note=note,
        created_at=time.time() if created_at is None else created_at,
    )
    session.add(fb)
    session.flush()
    return fb


def feedback_for(session: Session, uid: str) -> list[Feedback]:
    return list(session.scalars(select(Feedback).where(Feedback.uid == uid).order_by(Feedback.id)))


def labelled_feedback(session: Session, *, since: float | None = None) -> list[tuple[ConnRecord, str]]:
    """Each flow with its latest analyst label (training data from feedback)."""
    latest = (
        select(func.max(Feedback.id).label("id"))
        .group_by(Feedback.source, Feedback.uid)
        .subquery()
    )
    stmt = (
        select(Flow, Feedback.label)
        .join(Feedback, and_(Feedback.source == Flow.source, Feedback.uid == Flow.uid))
        .join(latest, latest.c.id == Feedback.id)
        .order_by(Feedback.id)
    )
    if since is not None:
        stmt = stmt.where(Feedback.created_at >= since)
    return [(record_from_row(f), lab) for f, lab in session.execute(stmt)]


# ---------------------------------------------------------------- query


@dataclass(frozen=True, kw_only=True)
class FlowQuery:
    """Filters of ``query_flows``; every one is optional.

    since/until: flow ``ts`` bounds (epoch seconds, until exclusive); host: either end;
    port: either end; label: case-insensitive match of the flow's label, detailed label
    or the latest detection's label; min_score: latest detection's score >= it;
    source, uid: exact; limit: newest first (default 100).
    """

    since: float | None = None
    until: float | None = None
    host: str | None = None
    port: int | None = None
    label: str | None = None
    min_score: float | None = None
    source: str | None = None
    uid: str | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {self.port}")
        if self.since is not None and self.until is not None and self.until < self.since:
            raise ValueError("until is before since")


QUERY_COLUMNS = (
    "ts", "uid", "source", "orig_h", "orig_p", "resp_h", "resp_p", "proto", "service",
    "duration", "orig_bytes", "resp_bytes", "conn_state", "label", "detailed_label",
    "detection", "score", "model_version", "feedback",
)


def detections_to_alert(
    session: Session, *, since: float, min_score: float, limit: int = 100_000
) -> list[Any]:
    """Detections stored after ``since`` (epoch s) scoring at least ``min_score``, oldest
    first, as rows with the flow fields an alert carries (ts, source, uid, orig_h, resp_h,
    resp_p, proto, label, score, model_version): what a gateway alerts again after a
    stop that may have lost alerts still held in memory."""
    stmt = (
        select(Flow.ts, Detection.source, Detection.uid, Flow.orig_h, Flow.resp_h, Flow.resp_p,
               Flow.proto, Detection.label, Detection.score, Detection.model_version)
        .join(Flow, and_(Flow.source == Detection.source, Flow.uid == Detection.uid))
        .where(Detection.created_at > since, Detection.score >= min_score)
        .order_by(Detection.id)
        .limit(limit)
    )
    return list(session.execute(stmt))


def query_flows(session: Session, q: FlowQuery) -> list[dict[str, Any]]:
    """Flows matching ``q``, newest first, with their latest detection and feedback."""
    # Correlated "latest row of this flow" look-ups use the (source, uid...) indexes and
    # cost nothing per flow skipped; grouping all detections first took seconds at 1M.
    det, fb = aliased(Detection), aliased(Feedback)
    latest_det = (
        select(func.max(Detection.id))
        .where(Detection.source == Flow.source, Detection.uid == Flow.uid)
        .correlate(Flow)
        .scalar_subquery()
    )
    latest_fb = (
        select(func.max(Feedback.id))
        .where(Feedback.source == Flow.source, Feedback.uid == Flow.uid)
        .correlate(Flow)
        .scalar_subquery()
    )
    stmt: Select = (
        select(
            Flow.ts, Flow.uid, Flow.source, Flow.orig_h, Flow.orig_p, Flow.resp_h, Flow.resp_p,
            Flow.proto, Flow.service, Flow.duration, Flow.orig_bytes, Flow.resp_bytes,
            Flow.conn_state, Flow.label, Flow.detailed_label,
            det.label.label("detection"), det.score, det.model_version,
            fb.label.label("feedback"),
        )
        .select_from(Flow)
        .outerjoin(det, det.id == latest_det)
        .outerjoin(fb, fb.id == latest_fb)
    )
    if q.since is not None:
        stmt = stmt.where(Flow.ts >= q.since)
    if q.until is not None:
        stmt = stmt.where(Flow.ts < q.until)
    if q.host is not None:
        stmt = stmt.where(or_(Flow.orig_h == q.host, Flow.resp_h == q.host))
    if q.port is not None:
        stmt = stmt.where(or_(Flow.orig_p == q.port, Flow.resp_p == q.port))
    if q.source is not None:
        stmt = stmt.where(Flow.source == q.source)
    if q.uid is not None:
        stmt = stmt.where(Flow.uid == q.uid)
    if q.label is not None:
        want = q.label.lower()
        stmt = stmt.where(
            or_(
                func.lower(Flow.label) == want,
                func.lower(Flow.detailed_label) == want,
                func.lower(det.label) == want,
                func.lower(fb.label) == want,
            )
        )
    if q.min_score is not None:
        stmt = stmt.where(det.score >= q.min_score)
    stmt = stmt.order_by(Flow.ts.desc(), Flow.id.desc()).limit(q.limit)
    out = []
    for row in session.execute(stmt):
        out.append(dict(row._mapping))
    return out


# ---------------------------------------------------------------- stats


def store_stats(session: Session, *, top: int = 10) -> dict[str, Any]:
    """Counts by label, top talkers and per-source figures."""
    totals = {
        "flows": session.execute(select(func.count()).select_from(Flow)).scalar_one(),
        "detections": session.execute(select(func.count()).select_from(Detection)).scalar_one(),
        "feedback": session.execute(select(func.count()).select_from(Feedback)).scalar_one(),
        "outbox_pending": session.execute(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.acked_at.is_(None))
        ).scalar_one(),
    }
    by_label = [
        {"label": lab, "detailed_label": det, "flows": n}
        for lab, det, n in session.execute(
            select(Flow.label, Flow.detailed_label, func.count())
            .group_by(Flow.label, Flow.detailed_label)
            .order_by(func.count().desc())
        )
    ]
    by_detection = [
        {"model_version": mv, "label": lab, "detections": n, "mean_score": float(ms) if ms is not None else None}
        for mv, lab, n, ms in session.execute(
            select(Detection.model_version, Detection.label, func.count(), func.avg(Detection.score))
            .group_by(Detection.model_version, Detection.label)
            .order_by(func.count().desc())
        )
    ]
    total_bytes = func.sum(func.coalesce(Flow.orig_bytes, 0) + func.coalesce(Flow.resp_bytes, 0))
    top_talkers = [
        {"host": h, "flows": n, "bytes": int(b or 0), "peers": int(p)}
        for h, n, b, p in session.execute(
            select(Flow.orig_h, func.count(), total_bytes, func.count(func.distinct(Flow.resp_h)))
            .group_by(Flow.orig_h)
            .order_by(func.count().desc(), Flow.orig_h)
            .limit(top)
        )
    ]
    malicious = func.sum(case((func.lower(Flow.label) == "malicious", 1), else_=0))
    offsets = {o.source: o for o in session.scalars(select(IngestOffset))}
    per_source = []
    for src, n, first, last, mal, ingested in session.execute(
        select(
            Flow.source, func.count(), func.min(Flow.ts), func.max(Flow.ts), malicious,
            func.max(Flow.ingested_at),
        )
        .group_by(Flow.source)
        .order_by(Flow.source)
    ):
        off = offsets.get(src)
        per_source.append(
            {
                "source": src, "flows": n, "first_ts": first, "last_ts": last,
                "labelled_malicious": int(mal or 0), "last_ingested_at": ingested,
                "offset": off.offset if off is not None else None,
            }
        )
    return {
        "totals": totals,
        "by_label": by_label,
        "by_detection": by_detection,
        "top_talkers": top_talkers,
        "per_source": per_source,
    }


# ---------------------------------------------------------------- retention


def prune(session: Session, *, older_than_days: float, now: float | None = None) -> dict[str, int]:
    """Delete flows (and their detections) stored more than ``older_than_days`` ago,
    and outbox messages acknowledged before then.  Feedback is kept: it is the
    analysts' work and small.  Returns rows deleted per table."""
    if older_than_days < 0:
        raise ValueError(f"older_than_days must be >= 0, got {older_than_days}")
    cutoff = (time.time() if now is None else now) - older_than_days * 86400.0
    # Explicit delete first: SQLite enforces ON DELETE CASCADE only with foreign_keys=ON.
    det = session.execute(
        delete(Detection).where(
            Detection.id.in_(
                select(Detection.id).join(
                    Flow, and_(Flow.source == Detection.source, Flow.uid == Detection.uid)
                ).where(Flow.ingested_at < cutoff)
            )
        ).execution_options(synchronize_session=False)
    ).rowcount
    flows = session.execute(
        delete(Flow).where(Flow.ingested_at < cutoff).execution_options(synchronize_session=False)
    ).rowcount
    outbox = session.execute(
        delete(OutboxMessage)
        .where(OutboxMessage.acked_at.is_not(None), OutboxMessage.acked_at < cutoff)
        .execution_options(synchronize_session=False)
    ).rowcount
    return {"flows": max(flows, 0), "detections": max(det, 0), "outbox": max(outbox, 0)}


# ---------------------------------------------------------------- outbox


def outbox_add(
    session: Session, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
) -> int:
    """Queue a message; returns its id.  Commit before publishing it."""
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
    msg = OutboxMessage(
        topic=topic, payload=bytes(payload), qos=qos, retain=retain,
        created_at=time.time(), attempts=0,
    )
    session.add(msg)
    session.flush()
    return msg.id


def outbox_pending(session: Session, *, limit: int = 100) -> list[OutboxMessage]:
    """Unacknowledged messages, oldest first."""
    return list(
        session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.acked_at.is_(None))
            .order_by(OutboxMessage.id)
            .limit(limit)
        )
    )


def outbox_mark_attempt(session: Session, message_id: int, *, error: str | None = None) -> None:
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == message_id)
        .values(attempts=OutboxMessage.attempts + 1, last_error=error)
    )


def outbox_mark_acked(session: Session, message_id: int, *, at: float | None = None) -> bool:
    """Mark a message acknowledged by the broker; False if it was unknown or already acked."""
    result = session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == message_id, OutboxMessage.acked_at.is_(None))
        .values(acked_at=time.time() if at is None else at)
    )
    return result.rowcount == 1


# ---------------------------------------------------------------- model versions


def register_model_version(
    session: Session,
    version: str,
    *,
    parent: str | None = None,
    path: str | None = None,
    metrics: dict | None = None,
    activate: bool = False,
) -> ModelVersion:
    """Add (or update) a model version; with ``activate`` it becomes the only active one."""
    mv = session.get(ModelVersion, version)
    if mv is None:
        mv = ModelVersion(version=version, created_at=time.time(), active=False)
        session.add(mv)
    mv.parent, mv.path, mv.metrics = parent, path, metrics
    if activate:
        session.execute(update(ModelVersion).where(ModelVersion.version != version).values(active=False))
        mv.active = True
    session.flush()
    return mv


def active_model_version(session: Session) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True))).first()
