"""Alembic environment of the aggregator's store: runs on the connection that
``gateway.store.db.upgrade_to_head`` hands in (no alembic.ini; see that module)."""

from __future__ import annotations

from alembic import context

from cloud_aggregator.migrations import VERSION_TABLE
from cloud_aggregator.store import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - offline SQL generation is not supported
    raise RuntimeError("aggregator migrations run online only, via cloud_aggregator.store.migrate")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things; batch mode rebuilds tables where needed.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
