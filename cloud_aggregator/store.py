"""The aggregator's SQL store: ORM models (one module) and repository functions.

SQLite file by default (WAL mode), any SQLAlchemy URL (PostgreSQL) otherwise.  Sessions
are opened only at the edges (service, cli); repository functions take a Session and
never commit, so the caller makes each logical step one transaction: "update stored,
then acknowledged" and "checkpoint + round row + pool cleared" are atomic.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy as st_numpy
import zstandard
from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    Integer,
    LargeBinary,
    String,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cloud_aggregator.pool import ClientInfo, PooledUpdate
from gateway.protocol.envelope import decode_envelope

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


class Base(DeclarativeBase):
    pass


class AggregatorStateRow(Base):
    """One row: where the aggregator stands."""

    __tablename__ = "agg_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    round: Mapped[int] = mapped_column(Integer, default=0)
    selected: Mapped[list] = mapped_column(JSON, default=list)
    round_opened_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    global_parts: Mapped[int] = mapped_column(Integer, default=1)  # retained chunk topics in use
    strategy: Mapped[str] = mapped_column(String(32), default="")
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)
    gate_passed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # versions the gate scored


class PoolUpdateRow(Base):
    """The newest accepted update of each client not yet aggregated."""

    __tablename__ = "agg_pool"
    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(64))
    base_version: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    num_samples: Mapped[int] = mapped_column(Integer)
    submissions: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    received_at: Mapped[float] = mapped_column(Float)
    wire_bytes: Mapped[int] = mapped_column(Integer, default=0)
    # the validated wire envelope as received (already compressed: storing it costs no
    # re-encoding on the intake path; a restart decodes it again)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)


class SeenUpdateRow(Base):
    """Every accepted (sender, message id): replay detection survives restarts."""

    __tablename__ = "agg_seen"
    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    base_version: Mapped[int] = mapped_column(Integer)
    wire_bytes: Mapped[int] = mapped_column(Integer, default=0)


class ClientRow(Base):
    __tablename__ = "agg_clients"
    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[dict] = mapped_column(JSON, default=dict)
    status_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_update_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    total_submissions: Mapped[int] = mapped_column(Integer, default=0)
    window_submissions: Mapped[int] = mapped_column(Integer, default=0)


class CheckpointRow(Base):
    """Global weights and strategy state after each aggregation (version 0 = initial)."""

    __tablename__ = "agg_checkpoints"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    state_meta: Mapped[dict] = mapped_column(JSON, default=dict)
    envelope: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # signed wire form


class RoundRow(Base):
    """One aggregation: who, how much, what came out."""

    __tablename__ = "agg_rounds"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    strategy: Mapped[str] = mapped_column(String(32))
    round: Mapped[int] = mapped_column(Integer, default=0)
    num_updates: Mapped[int] = mapped_column(Integer)
    live_clients: Mapped[int] = mapped_column(Integer, default=0)
    senders: Mapped[list] = mapped_column(JSON, default=list)
    client_weights: Mapped[list] = mapped_column(JSON, default=list)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # central evaluation
    info: Mapped[dict] = mapped_column(JSON, default=dict)  # delta norm, DP noise/epsilon
    bytes_up: Mapped[int] = mapped_column(Integer, default=0)
    bytes_down: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float] = mapped_column(Float)


class RejectionRow(Base):
    __tablename__ = "agg_rejections"
    reason: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    last_detail: Mapped[str] = mapped_column(String(500), default="")
    last_sender: Mapped[str] = mapped_column(String(64), default="")
    last_at: Mapped[float] = mapped_column(Float, default=0.0)


class RefusalRow(Base):
    """A candidate global model that was not published (check or deployment gate)."""

    __tablename__ = "agg_refusals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    base_version: Mapped[int] = mapped_column(Integer)  # the version it would have followed
    round: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(String(32))  # cloud_aggregator.gate.REASONS
    detail: Mapped[str] = mapped_column(String(500), default="")
    senders: Mapped[list] = mapped_column(JSON, default=list)
    client_weights: Mapped[list] = mapped_column(JSON, default=list)
    figures: Mapped[dict] = mapped_column(JSON, default=dict)  # gate scores, step norms


class PendingChunkRow(Base):
    """Chunks of updates still being reassembled (stored before they are acknowledged)."""

    __tablename__ = "agg_pending_chunks"
    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    frame: Mapped[bytes] = mapped_column(LargeBinary)
    first_seen: Mapped[float] = mapped_column(Float)


# ---------------------------------------------------------------- engine


SQLITE_SYNCHRONOUS = ("NORMAL", "FULL")


def make_engine(url: str, *, create: bool = True, synchronous: str = "NORMAL",
                wal_autocheckpoint: int | None = None) -> Engine:
    """Engine for ``url``; SQLite gets WAL and a busy timeout.  ``create`` brings the
    schema to the newest migration (:func:`migrate`; the aggregator does, readers such
    as ``status`` do not).

    ``synchronous`` (SQLite): "NORMAL" keeps every committed -- hence acknowledged --
    update through a crash of the process (kill -9): in WAL mode a commit is in the WAL
    file before it returns; only a power cut or kernel crash can lose the transactions
    since the last checkpoint.  "FULL" fsyncs the WAL at every commit (one fsync per
    intake batch) and survives those too.  ``wal_autocheckpoint``: WAL pages after which
    a commit checkpoints by itself (SQLite's default 1000), see :class:`WalCheckpointer`."""
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {SQLITE_SYNCHRONOUS}")
    if "://" not in url:
        url = f"sqlite:///{url}"
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            # 64 KiB pages: pool rows hold whole update envelopes (~1 MB for a 200k model);
            # big pages cut the overflow-page chain ~16x (~2.7x less CPU per stored update).
            # Effective only when the file is created; harmless on an existing database.
            cur.execute("PRAGMA page_size=65536")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            # Debian/Ubuntu build SQLite with secure_delete on: every aggregation would
            # overwrite the freed pool rows (whole envelopes) with zeros, as much WAL as
            # the intake wrote (3-4x the aggregation's time).  FAST still zeroes b-tree
            # cells but not freed overflow pages; the envelopes are no secret from
            # whoever can read this file anyway.
            cur.execute("PRAGMA secure_delete=FAST")
            cur.execute("PRAGMA busy_timeout=5000")
            if wal_autocheckpoint is not None:
                cur.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
            cur.close()
    if create:
        try:
            migrate(engine)
        except Exception:
            engine.dispose()
            raise
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision of ``cloud_aggregator/migrations``.

    A database the aggregator made before it had migrations (create_all: its tables, no
    version table) is stamped with the initial revision first -- those tables are that
    revision's -- so it is adopted as it is, rows and all, then upgraded.  Raises
    ``gateway.store.db.StoreError`` when the database cannot be reached or migrated.
    """
    from alembic import command

    from cloud_aggregator.migrations import DIRECTORY, INITIAL_REVISION, INITIAL_TABLES, VERSION_TABLE
    from gateway.store.db import StoreError, alembic_config, current_revision, describe_db_error, upgrade_to_head

    try:
        if current_revision(engine, version_table=VERSION_TABLE) is None:
            found = INITIAL_TABLES & set(inspect(engine).get_table_names())
            if found and found != INITIAL_TABLES:
                raise StoreError(f"database {engine.url.render_as_string(hide_password=True)} has no migration "
                                 f"revision and only some aggregator tables ({sorted(found)}, not "
                                 f"{sorted(INITIAL_TABLES - found)}): not adopting a partial schema")
            if found:
                log.info("adopting an aggregator database made before migrations: stamping %s", INITIAL_REVISION)
                with engine.begin() as conn:
                    command.stamp(alembic_config(conn, DIRECTORY), INITIAL_REVISION)
    except SQLAlchemyError as exc:
        raise StoreError(describe_db_error(engine, exc)) from exc
    upgrade_to_head(engine, migrations_dir=DIRECTORY, version_table=VERSION_TABLE)


def make_sessions(url: str, *, create: bool = True, synchronous: str = "NORMAL",
                  wal_autocheckpoint: int | None = None) -> sessionmaker[Session]:
    return sessionmaker(make_engine(url, create=create, synchronous=synchronous,
                                    wal_autocheckpoint=wal_autocheckpoint), expire_on_commit=False)


class WalCheckpointer:
    """Copies a SQLite WAL back into the database file on a thread of its own.

    With SQLite's automatic checkpoints, the commit that takes the WAL past 1000 pages
    (64 MB of 64 KiB pages: ~400 student-sized updates) also copies the whole WAL into
    the database and fsyncs both before it returns -- ~0.3 s of I/O on the intake
    thread.  The service opens its engine with a high ``wal_autocheckpoint`` (a
    backstop, BACKSTOP_PAGES) and pokes this thread after its commits; it runs a PASSIVE
    checkpoint (which never blocks the writer) at most every ``interval_s``.  Nothing
    about durability changes: a commit is in the WAL either way.
    """

    BACKSTOP_PAGES = 4000  # 256 MB of WAL: the intake checkpoints itself if this thread falls behind

    def __init__(self, engine: Engine, *, interval_s: float = 1.0):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._engine = engine
        self.interval_s = interval_s
        self.checkpoints = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Something was committed: checkpoint soon."""
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                with self._engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
                self.checkpoints += 1
            except Exception:  # the backstop checkpoints instead; never fatal
                log.warning("background WAL checkpoint failed", exc_info=True)
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)


# ---------------------------------------------------------------- tensor blobs


def pack_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(
        st_numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))


def unpack_tensors(blob: bytes) -> Tensors:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    return dict(st_numpy.load(raw))


# ---------------------------------------------------------------- repository


def get_state(session: Session) -> AggregatorStateRow | None:
    return session.get(AggregatorStateRow, 1)


def ensure_state(session: Session, *, strategy: str) -> AggregatorStateRow:
    row = get_state(session)
    if row is None:
        row = AggregatorStateRow(id=1, version=0, round=0, selected=[], global_parts=1, strategy=strategy,
                                 gate_passed=0)
        session.add(row)
    return row


def save_checkpoint(session: Session, *, version: int, weights: Mapping[str, np.ndarray],
                    state_arrays: Mapping[str, np.ndarray], state_meta: Mapping[str, Any],
                    envelope: bytes | None, keep: int) -> None:
    session.merge(CheckpointRow(version=version, created_at=time.time(), weights=pack_tensors(weights),
                                state=pack_tensors(state_arrays), state_meta=dict(state_meta), envelope=envelope))
    session.flush()
    if keep > 0:
        old = session.scalars(select(CheckpointRow.version).order_by(CheckpointRow.version.desc()).offset(keep)).all()
        if old:
            session.execute(delete(CheckpointRow).where(CheckpointRow.version.in_(old)))


def latest_checkpoint(session: Session) -> CheckpointRow | None:
    return session.scalars(select(CheckpointRow).order_by(CheckpointRow.version.desc()).limit(1)).first()


_UPSERTS: dict[tuple[str, str], Any] = {}
_SEEN_INSERT = insert(SeenUpdateRow.__table__)


def _upsert_statement(dialect: str, model: type[Base]):
    """INSERT ... ON CONFLICT (primary key) DO UPDATE of every other column, built once
    per (dialect, table) and executed with parameters."""
    key = (dialect, model.__tablename__)
    if key not in _UPSERTS:
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        table = model.__table__
        pk = [c.name for c in table.primary_key.columns]
        stmt = dialect_insert(table)
        _UPSERTS[key] = stmt.on_conflict_do_update(
            index_elements=pk, set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name not in pk})
    return _UPSERTS[key]


def _upsert(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> None:
    """One prepared statement for all ``rows`` (an executemany: no ORM merge round trip
    per row; the intake path runs this for every batch); other databases fall back to
    the portable ORM merge.  ``rows`` must not repeat a primary key (PostgreSQL refuses
    to update one row twice in one statement)."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        session.execute(_upsert_statement(dialect, model), rows)
    else:
        for values in rows:
            session.merge(model(**values))


def store_updates(session: Session, updates: Sequence[tuple[PooledUpdate, bytes]],
                  clients: Mapping[str, ClientInfo]) -> None:
    """The accepted updates of one intake transaction, as (update, wire envelope) in
    arrival order: one replay key each, the pool row of each sender's newest (it
    replaces any older one), and the rows of ``clients`` -- three statements per batch
    instead of three per update."""
    if updates:
        newest = {u.sender: (u, env) for u, env in updates}  # later arrivals win
        _upsert(session, PoolUpdateRow, [dict(
            sender=u.sender, message_id=u.message_id, base_version=u.base_version, round=u.round,
            num_samples=u.num_samples, submissions=u.submissions, metrics=dict(u.metrics),
            received_at=u.received_at, wire_bytes=u.wire_bytes, envelope=env) for u, env in newest.values()])
        session.execute(_SEEN_INSERT, [dict(
            sender=u.sender, message_id=u.message_id, received_at=u.received_at, base_version=u.base_version,
            wire_bytes=u.wire_bytes) for u, _env in updates])
    save_clients(session, clients)


def store_update(session: Session, update: PooledUpdate, client: ClientInfo, *, envelope: bytes) -> None:
    """One update: pool row (replacing the sender's older one), replay key, client row."""
    store_updates(session, [(update, envelope)], {update.sender: client})


def save_clients(session: Session, clients: Mapping[str, ClientInfo]) -> None:
    _upsert(session, ClientRow, [dict(
        sender=sender, online=info.online, status=info.status, status_at=info.status_at,
        last_update_at=info.last_update_at, total_submissions=info.total_submissions,
        window_submissions=info.window_submissions) for sender, info in clients.items()])


def save_client(session: Session, sender: str, info: ClientInfo) -> None:
    save_clients(session, {sender: info})


def remove_pool_updates(session: Session, senders: Iterable[str]) -> None:
    senders = list(senders)
    if senders:
        session.execute(delete(PoolUpdateRow).where(PoolUpdateRow.sender.in_(senders)))


def load_pool(session: Session) -> list[PooledUpdate]:
    """The pooled updates, decoded again from their stored envelopes (validated on intake)."""
    return [
        PooledUpdate(sender=r.sender, message_id=r.message_id, base_version=r.base_version, round=r.round,
                     num_samples=r.num_samples, delta=decode_envelope(r.envelope).tensors,
                     received_at=r.received_at, metrics=dict(r.metrics or {}), submissions=r.submissions,
                     wire_bytes=r.wire_bytes)
        for r in session.scalars(select(PoolUpdateRow).order_by(PoolUpdateRow.sender))
    ]


def load_clients(session: Session) -> dict[str, ClientInfo]:
    return {
        r.sender: ClientInfo(online=r.online, status=dict(r.status or {}), status_at=r.status_at,
                             last_update_at=r.last_update_at, total_submissions=r.total_submissions,
                             window_submissions=r.window_submissions)
        for r in session.scalars(select(ClientRow))
    }


def load_seen(session: Session, *, limit: int) -> list[tuple[str, str]]:
    rows = session.execute(select(SeenUpdateRow.sender, SeenUpdateRow.message_id)
                           .order_by(SeenUpdateRow.received_at.desc()).limit(limit)).all()
    return [(s, m) for s, m in reversed(rows)]


def was_seen(session: Session, sender: str, message_id: str) -> bool:
    return session.get(SeenUpdateRow, (sender, message_id)) is not None


def count_rejection(session: Session, reason: str, detail: str, sender: str, *, n: int = 1) -> None:
    row = session.get(RejectionRow, reason)
    if row is None:
        row = RejectionRow(reason=reason, count=0)
        session.add(row)
    row.count += n
    row.last_detail = detail[:500]
    row.last_sender = sender[:64]
    row.last_at = time.time()


def rejection_counts(session: Session) -> dict[str, int]:
    return {r.reason: r.count for r in session.scalars(select(RejectionRow))}


def add_round(session: Session, **fields: Any) -> None:
    session.add(RoundRow(**fields))


def rounds(session: Session, *, limit: int | None = None) -> list[RoundRow]:
    q = select(RoundRow).order_by(RoundRow.version.desc())
    if limit:
        q = q.limit(limit)
    return list(reversed(session.scalars(q).all()))


def bytes_up_between(session: Session, start: float, end: float) -> int:
    """Wire bytes of updates accepted in (start, end]."""
    return int(session.scalar(select(func.coalesce(func.sum(SeenUpdateRow.wire_bytes), 0))
                              .where(SeenUpdateRow.received_at > start, SeenUpdateRow.received_at <= end)) or 0)


def accepted_total(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(SeenUpdateRow)) or 0)


def add_refusal(session: Session, **fields: Any) -> None:
    fields["detail"] = str(fields.get("detail", ""))[:500]
    session.add(RefusalRow(**fields))


def refusals(session: Session, *, limit: int | None = None) -> list[RefusalRow]:
    """Refused candidates, oldest first (the newest ``limit``)."""
    q = select(RefusalRow).order_by(RefusalRow.id.desc())
    if limit:
        q = q.limit(limit)
    return list(reversed(session.scalars(q).all()))


def refusal_counts(session: Session) -> dict[str, int]:
    return {reason: int(n) for reason, n in session.execute(
        select(RefusalRow.reason, func.count()).group_by(RefusalRow.reason)).all()}


def save_chunk(session: Session, *, sender: str, message_id: str, index: int, frame: bytes, first_seen: float) -> None:
    session.merge(PendingChunkRow(sender=sender, message_id=message_id, index=index, frame=frame,
                                  first_seen=first_seen))


def drop_chunks(session: Session, sender: str, message_id: str) -> None:
    session.execute(delete(PendingChunkRow).where(PendingChunkRow.sender == sender,
                                                  PendingChunkRow.message_id == message_id))


def load_chunks(session: Session) -> list[PendingChunkRow]:
    """Every stored chunk (tests and tools; a restart streams them: :func:`iter_chunks`)."""
    return list(session.scalars(select(PendingChunkRow).order_by(PendingChunkRow.first_seen)))


def iter_chunks(session: Session, *, batch: int = 64):
    """(sender, message id, frame, first seen) of every stored chunk, oldest first,
    ``batch`` rows in memory at a time (a restart never loads them all at once)."""
    result = session.execute(select(PendingChunkRow.sender, PendingChunkRow.message_id, PendingChunkRow.frame,
                                    PendingChunkRow.first_seen)
                             .order_by(PendingChunkRow.first_seen, PendingChunkRow.sender,
                                       PendingChunkRow.message_id, PendingChunkRow.index)
                             .execution_options(yield_per=batch))
    for row in result:
        yield row.sender, row.message_id, row.frame, row.first_seen


def purge_chunks(session: Session, *, older_than: float, senders: frozenset[str] | None) -> int:
    """Delete chunks first seen before ``older_than`` and, given ``senders``, chunks of
    anyone else; returns how many rows went."""
    cond = PendingChunkRow.first_seen < older_than
    if senders is not None:
        cond = cond | PendingChunkRow.sender.not_in(sorted(senders))
    return int(session.execute(delete(PendingChunkRow).where(cond)).rowcount or 0)


@dataclass(frozen=True)
class StatusSummary:
    state: dict[str, Any]
    clients: list[dict[str, Any]]
    pool: list[dict[str, Any]]
    rounds: list[dict[str, Any]]
    rejections: dict[str, int]
    refusals: list[dict[str, Any]] = field(default_factory=list)  # newest refused candidates, oldest first
    refused: dict[str, int] = field(default_factory=dict)  # refused candidates by reason


def status_summary(session: Session, *, last_rounds: int = 20) -> StatusSummary:
    st = get_state(session)
    state = {} if st is None else {
        "version": st.version, "round": st.round, "strategy": st.strategy, "selected": st.selected,
        "updated_at": st.updated_at, "accepted_updates": accepted_total(session), "gate_passed": st.gate_passed,
    }
    clients = [
        {"gateway": c.sender, "online": c.online, "state": (c.status or {}).get("state"),
         "submissions": c.total_submissions, "window": c.window_submissions,
         "last_update_at": c.last_update_at, "status_at": c.status_at}
        for c in session.scalars(select(ClientRow).order_by(ClientRow.sender))
    ]
    pool = [
        {"gateway": r.sender, "message_id": r.message_id, "base_version": r.base_version, "round": r.round,
         "num_samples": r.num_samples, "submissions": r.submissions, "bytes": r.wire_bytes,
         "received_at": r.received_at}
        for r in session.scalars(select(PoolUpdateRow).order_by(PoolUpdateRow.sender))
    ]
    rws = [
        {"version": r.version, "strategy": r.strategy, "round": r.round, "updates": r.num_updates,
         "live": r.live_clients, **{f"central_{k}": v for k, v in (r.metrics or {}).items()},
         **{f"client_{k}": v for k, v in ((r.info or {}).get("client_metrics") or {}).items()},
         **{k: v for k, v in ((r.info or {}).get("gate") or {}).items()},
         "epsilon": (r.info or {}).get("dp_epsilon"), "bytes_up": r.bytes_up, "bytes_down": r.bytes_down,
         "seconds": None if r.started_at is None else round(r.finished_at - r.started_at, 3),
         "finished_at": r.finished_at}
        for r in rounds(session, limit=last_rounds)
    ]
    refused = [
        {"at": r.at, "base_version": r.base_version, "round": r.round, "reason": r.reason, "detail": r.detail,
         "senders": r.senders, **{k: v for k, v in (r.figures or {}).items() if isinstance(v, (int, float))}}
        for r in refusals(session, limit=last_rounds)
    ]
    return StatusSummary(state, clients, pool, rws, rejection_counts(session), refused, refusal_counts(session))


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)
