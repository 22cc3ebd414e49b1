"""Alembic migrations of the detection store (run by ``gateway.store.db.upgrade_to_head``)."""
