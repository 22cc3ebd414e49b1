"""Alembic environment: runs on the connection that ``gateway.store.db`` hands in.

There is no alembic.ini: ``gateway.store.db._alembic_config`` builds the configuration in
code, so the migrations work from an installed wheel.  To write a new revision:
``python -m gateway.store.migrations.new "message"`` (autogenerates from the models).
"""

from __future__ import annotations

from alembic import context

from gateway.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - offline SQL generation is not supported
    raise RuntimeError("fedgate migrations run online only, via gateway.store.db.upgrade_to_head")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds tables where needed.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
