"""Alembic environment: runs on the connection that ``gateway.store.db`` hands in.

There is no alembic.ini: ``gateway.store.db.alembic_config`` builds the configuration in
code, so the migrations work from an installed wheel.  To write a new revision:
``python -m gateway.store.migrations.new "message"`` (autogenerates from the models).
"""

from gateway.store.db import run_env_migrations
from gateway.store.models import Base

run_env_migrations(Base.metadata)
