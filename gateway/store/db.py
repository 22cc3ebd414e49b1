"""Engine and session factory for the detection store, and schema migrations.

``open_store(url)`` is the one entry point for the edges (service, CLI, benchmarks): it
builds the engine (SQLite gets WAL mode and pragmas suited to bulk ingest), brings the
schema to the newest Alembic revision and returns a session factory.  Whatever goes
wrong reaching or writing the database surfaces as one ``StoreError`` with a message
an operator can act on; the CLI prints it without a traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///./fedgate.db"
# Lets deployments and tests point every command at another database without a flag.
URL_ENV = "FEDGATE_DB"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version"  # the aggregator's store keeps its own (cloud_aggregator.migrations)


class StoreError(RuntimeError):
    """The database cannot be reached, opened, migrated or written."""


def default_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def redact(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers (fedgate query) never block the ingesting writer and vice versa.
    cur.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across process crashes in WAL mode (only a power cut can lose the
    # last transactions), and far faster than FULL for many small commits.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    # Wait for another writer instead of failing at once with "database is locked".
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache
    cur.close()


def make_engine(url: str | None = None, *, echo: bool = False) -> Engine:
    """An engine for ``url`` (default ``$FEDGATE_DB`` or ``sqlite:///./fedgate.db``)."""
    url = url or default_url()
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"not a database URL: {url!r} ({exc})") from exc
    kwargs: dict = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            parent = Path(database).expanduser().resolve().parent
            if not parent.is_dir():
                raise StoreError(
                    f"cannot open {redact(url)}: directory {parent} does not exist"
                )
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
        if parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ArgumentError, ImportError) as exc:
        raise StoreError(f"cannot use {redact(url)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(connection, migrations_dir: Path = MIGRATIONS_DIR):
    """The Alembic configuration of a store's migrations (there is no alembic.ini):
    ``migrations_dir`` (this store's, or the aggregator's) and the ``connection`` that
    its env.py runs on.  Public: the aggregator's store migrates through it too."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.attributes["connection"] = connection
    return cfg


def run_env_migrations(metadata, *, version_table: str = VERSION_TABLE) -> None:
    """The body of an Alembic ``env.py`` (gateway and aggregator stores): run the
    migrations on the connection :func:`upgrade_to_head` hands in."""
    from alembic import context

    connection = context.config.attributes.get("connection")
    if connection is None:  # pragma: no cover - offline SQL generation is not supported
        raise RuntimeError("fedgate migrations run online only, via gateway.store.db.upgrade_to_head")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=version_table,
        # SQLite cannot ALTER most things; batch mode rebuilds tables where needed.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def upgrade_to_head(engine: Engine, *, migrations_dir: Path = MIGRATIONS_DIR,
                    version_table: str = VERSION_TABLE) -> None:
    """Create or upgrade the schema to the newest migration (idempotent).  The other
    store with migrations (the aggregator's) passes its own directory and the version
    table its env.py uses."""
    from alembic import command

    try:
        if engine.dialect.name == "sqlite":
            _upgrade_sqlite(engine, migrations_dir)
        else:
            with engine.begin() as conn:
                command.upgrade(alembic_config(conn, migrations_dir), "head")
    except SQLAlchemyError as exc:
        # Two processes starting on a fresh database race to create it; the loser
        # fails ("table already exists") but finds the schema at head: that is fine.
        try:
            if current_revision(engine, version_table=version_table) == head_revision(migrations_dir):
                return
        except SQLAlchemyError:
            pass
        raise StoreError(describe_db_error(engine, exc)) from exc


def _upgrade_sqlite(engine: Engine, migrations_dir: Path = MIGRATIONS_DIR) -> None:
    """Migrate under ``BEGIN IMMEDIATE``: one atomic transaction holding the write lock
    from the start, so processes opening a fresh file at once migrate one after the
    other.  (Python's sqlite3 before 3.12 begins transactions only before DML, so DDL
    would otherwise commit statement by statement.)"""
    from alembic import command

    with engine.connect() as conn:
        dbapi_conn = conn.connection.driver_connection
        saved = dbapi_conn.isolation_level
        dbapi_conn.isolation_level = None  # we issue BEGIN/COMMIT ourselves
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            command.upgrade(alembic_config(conn, migrations_dir), "head")
            conn.commit()
        finally:
            if dbapi_conn.in_transaction:
                dbapi_conn.rollback()
            dbapi_conn.isolation_level = saved


def current_revision(engine: Engine, *, version_table: str = VERSION_TABLE) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_revision()


def head_revision(migrations_dir: Path = MIGRATIONS_DIR) -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(None, migrations_dir)).get_current_head()


def describe_db_error(engine: Engine, exc: BaseException) -> str:
    """One line saying which database failed and why, without the SQL."""
    where = redact(engine.url.render_as_string(hide_password=False))
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
    else:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"database {where} is not usable: {reason}"


def open_store(url: str | None = None, *, migrate: bool = True, echo: bool = False):
    """Engine + migrated schema + session factory: ``(engine, sessionmaker)``.

    Raises ``StoreError`` when the database cannot be reached or written.
    """
    engine = make_engine(url, echo=echo)
    try:
        if migrate:
            upgrade_to_head(engine)
        else:
            with engine.connect():
                pass
    except StoreError:
        engine.dispose()
        raise
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StoreError(describe_db_error(engine, exc)) from exc
    return engine, session_factory(engine)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: services hand out plain values after commit.
    return sessionmaker(engine, expire_on_commit=False)


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())
