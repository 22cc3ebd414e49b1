"""Alembic environment of the aggregator's store: runs on the connection that
``gateway.store.db.upgrade_to_head`` hands in (no alembic.ini; see that module)."""

from cloud_aggregator.migrations import VERSION_TABLE
from cloud_aggregator.store import Base
from gateway.store.db import run_env_migrations

run_env_migrations(Base.metadata, version_table=VERSION_TABLE)
