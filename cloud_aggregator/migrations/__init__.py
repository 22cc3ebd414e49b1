"""Alembic migrations of the aggregator's store (run by ``cloud_aggregator.store.migrate``
through the same machinery as the detection store's: ``gateway.store.db.upgrade_to_head``).

The aggregator keeps its revision in a table of its own (``VERSION_TABLE``), so one
PostgreSQL database can hold both stores.  To write a new revision, change the models in
``cloud_aggregator.store`` and autogenerate against a database at head::

    from alembic import command
    from gateway.store.db import alembic_config
    with engine.begin() as conn:
        command.revision(alembic_config(conn, DIRECTORY), message="...", autogenerate=True)
"""

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
VERSION_TABLE = "agg_alembic_version"
# what a database created before there were migrations (create_all) is stamped with
INITIAL_REVISION = "agg_0001_initial"
INITIAL_TABLES = frozenset({"agg_state", "agg_pool", "agg_seen", "agg_clients", "agg_checkpoints", "agg_rounds",
                            "agg_rejections", "agg_pending_chunks"})
