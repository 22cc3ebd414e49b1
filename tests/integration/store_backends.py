"""Database backends for store tests: a real SQLite file, and a real PostgreSQL schema.

Each PostgreSQL test gets its own schema (``search_path`` set in the URL), dropped
afterwards, so concurrent runs never see each other's rows.  PostgreSQL tests are
skipped, with the reason, when no server answers at ``$FEDGATE_TEST_PG`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

PG_BASE = os.environ.get("FEDGATE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pg_admin_engine():
    return create_engine(PG_BASE, connect_args={"connect_timeout": 3})


def pg_reachable() -> str | None:
    """None when the server answers, else why not."""
    try:
        engine = pg_admin_engine()
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "skip with this reason"
        return f"PostgreSQL at {PG_BASE} unreachable: {str(exc).splitlines()[0]}"
    return None


class PgSchema:
    """A fresh schema on the test server; ``url`` points a store at it."""

    def __init__(self) -> None:
        self.name = f"fedgate_t_{uuid.uuid4().hex[:12]}"
        self.admin = pg_admin_engine()
        with self.admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{self.name}"'))
        sep = "&" if "?" in PG_BASE else "?"
        self.url = f"{PG_BASE}{sep}options={quote(f'-csearch_path={self.name}')}"

    def drop(self) -> None:
        with self.admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE'))
        self.admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A URL of an empty database: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    why = pg_reachable()
    if why:
        pytest.skip(why)
    schema = PgSchema()
    try:
        yield schema.url
    finally:
        schema.drop()
