"""The gateway's SQL schema: every table, as SQLAlchemy 2 typed models, in one module.

Flows are keyed by ``(source, uid)`` (stored as one unique index on ``(uid, source)``): Zeek's ``uid`` is unique per sensor, and
``source`` names the stream it came from (a replayed file, or a gateway's live log), so
inserting the same flow twice is a no-op and replaying a file twice stores nothing
twice.  Times of flows are Zeek epoch seconds (``float``), which keeps bulk inserts
cheap and range filters simple; bookkeeping times (``created_at``, ``ingested_at``) are
epoch seconds too, for the same reasons and so retention compares numbers only.

The schema itself is created and upgraded by the Alembic migrations in
``gateway/store/migrations``; these models are what the code reads and writes, and a
test checks that the migrated schema matches them.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT primary keys autoincrement on PostgreSQL; SQLite needs plain INTEGER for that.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Flow(Base):
    """One Zeek conn record as stored; columns mirror ``gateway.flows.record.ConnRecord``.

    Text columns have no length limit: a hostile log must not make PostgreSQL refuse a
    whole batch for one over-long value.
    """

    __tablename__ = "flows"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(Text)
    uid: Mapped[str] = mapped_column(Text)
    ts: Mapped[float] = mapped_column(Float)
    orig_h: Mapped[str] = mapped_column(Text)
    orig_p: Mapped[int] = mapped_column(Integer)
    resp_h: Mapped[str] = mapped_column(Text)
    resp_p: Mapped[int] = mapped_column(Integer)
    proto: Mapped[str] = mapped_column(Text)
    service: Mapped[str | None] = mapped_column(Text)
    duration: Mapped[float | None] = mapped_column(Float)
    orig_bytes: Mapped[int | None] = mapped_column(BigInteger)
    resp_bytes: Mapped[int | None] = mapped_column(BigInteger)
    conn_state: Mapped[str | None] = mapped_column(Text)
    local_orig: Mapped[bool | None] = mapped_column(Boolean)
    local_resp: Mapped[bool | None] = mapped_column(Boolean)
    missed_bytes: Mapped[int | None] = mapped_column(BigInteger)
    history: Mapped[str | None] = mapped_column(Text)
    orig_pkts: Mapped[int | None] = mapped_column(BigInteger)
    orig_ip_bytes: Mapped[int | None] = mapped_column(BigInteger)
    resp_pkts: Mapped[int | None] = mapped_column(BigInteger)
    resp_ip_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Zeek set[string], comma-joined ("" for an empty set, NULL for unset).
    tunnel_parents: Mapped[str | None] = mapped_column(Text)
    ip_proto: Mapped[int | None] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(Text)
    detailed_label: Mapped[str | None] = mapped_column(Text)
    # Columns beyond Zeek's standard set, as a JSON list of [name, raw text] pairs.
    extra: Mapped[str | None] = mapped_column(Text)
    ingested_at: Mapped[float] = mapped_column(Float)

    # Every index costs bulk-insert time, so there are few: (uid, source) is the key and
    # also serves look-ups by uid alone (feedback); ts and hosts serve `fedgate query`.
    # Retention scans ingested_at without an index: it runs rarely.
    __table_args__ = (
        UniqueConstraint("uid", "source"),
        Index("ix_flows_ts", "ts"),
        Index("ix_flows_orig_h", "orig_h"),
        Index("ix_flows_resp_h", "resp_h"),
    )


class Detection(Base):
    """A model's verdict on one flow; one row per (flow, model version)."""

    __tablename__ = "detections"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(Text)
    uid: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(Text)
    score: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        ForeignKeyConstraint(
            ["source", "uid"], ["flows.source", "flows.uid"], ondelete="CASCADE"
        ),
        UniqueConstraint("source", "uid", "model_version"),
        Index("ix_detections_score", "score"),
        Index("ix_detections_created_at", "created_at"),
    )


class Feedback(Base):
    """An analyst's verdict on a flow (e.g. marking a false positive benign)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(Text)
    uid: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_feedback_source_uid", "source", "uid"),)


class ModelVersion(Base):
    """A model directory the gateway knows, with its lineage and metrics."""

    __tablename__ = "model_versions"

    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    parent: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    path: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=False)


class IngestOffset(Base):
    """How far a source has been ingested; written in the same transaction as its rows."""

    __tablename__ = "ingest_offsets"

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    # What the offset is valid for (e.g. device:inode:size-prefix digest of the file).
    file_identity: Mapped[str] = mapped_column(Text)
    offset: Mapped[int] = mapped_column(BigInteger)
    # Serialised log header (or the live tail's whole position), so a resume needs no re-read.
    header: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float)


class OutboxMessage(Base):
    """A durable outgoing MQTT message, kept until the broker acknowledged it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(512))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    qos: Mapped[int] = mapped_column(Integer, default=1)
    retain: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    acked_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("ix_outbox_acked_at", "acked_at"),)
