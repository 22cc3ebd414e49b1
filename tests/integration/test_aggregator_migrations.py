"""The aggregator store's Alembic migrations on real databases (a SQLite file; a
PostgreSQL schema when a server answers at 127.0.0.1:5432): the migrated schema is the
models' schema, and a database made by the old create_all path is adopted as it is."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, func, select, text

from aggregator_helpers import tiny_delta, tiny_model
from cloud_aggregator import store
from cloud_aggregator.migrations import DIRECTORY, INITIAL_REVISION, VERSION_TABLE
from cloud_aggregator.service import AggregatorConfig, AggregatorService
from gateway.mqtt import Inbound, MqttSettings
from gateway.protocol import topics
from gateway.protocol.envelope import encode_update
from gateway.store.db import StoreError, current_revision, head_revision

from store_backends import store_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


def schema_diffs(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}),
                                store.Base.metadata)


def service(url: str) -> AggregatorService:
    cfg = AggregatorConfig(database=url, mqtt=MqttSettings(client_id="agg-migration-test"),
                           strategy_params={"rho": 1.0, "deadline_s": 3600})
    return AggregatorService(cfg, initial_weights=tiny_model())


def update(sender: str, mid: int) -> Inbound:
    enc = encode_update(tiny_delta(0.1 * mid), sender=sender, base_version=0, num_samples=3)
    return Inbound(topics.gateway_update(sender), enc.data, 1, False, mid)


def test_migrations_build_the_models_schema_from_empty(store_url):  # noqa: F811
    engine = store.make_engine(store_url)
    try:
        assert current_revision(engine, version_table=VERSION_TABLE) == head_revision(DIRECTORY)
        assert schema_diffs(engine) == []
        store.migrate(engine)  # a second upgrade is a no-op
        assert current_revision(engine, version_table=VERSION_TABLE) == head_revision(DIRECTORY)
        with engine.connect() as conn:  # its own version table: the detection store's name stays free
            assert "alembic_version" not in {r[0] for r in conn.execute(
                text("select table_name from information_schema.tables where table_schema = current_schema()")
                if engine.dialect.name == "postgresql" else text("select name from sqlite_master"))}
    finally:
        engine.dispose()


def pre_migration_schema(engine) -> None:
    """What the aggregator's create_all made before it had migrations: the tables of the
    initial revision, and no version table (later revisions add to them)."""
    from alembic import command

    from gateway.store.db import alembic_config

    with engine.begin() as conn:
        cfg = alembic_config(conn, DIRECTORY)
        if current_revision(engine, version_table=VERSION_TABLE) is None:
            command.upgrade(cfg, INITIAL_REVISION)
        else:
            command.downgrade(cfg, INITIAL_REVISION)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))


def test_a_create_all_database_is_adopted_with_its_rows(store_url):  # noqa: F811
    old = create_engine(store_url)  # what the aggregator did before it had migrations
    pre_migration_schema(old)
    with old.begin() as conn:
        conn.execute(store.SeenUpdateRow.__table__.insert(), [
            {"sender": "gw1", "message_id": f"m{i}", "received_at": float(i), "base_version": 0, "wire_bytes": 10}
            for i in range(5)])
        conn.execute(text("INSERT INTO agg_state (id, version, round, selected, global_parts, strategy, updated_at) "
                          "VALUES (1, 7, 2, '[]', 1, 'gsfs', 1.0)"))  # the initial revision's columns
    old.dispose()

    engine = store.make_engine(store_url)
    try:
        assert current_revision(engine, version_table=VERSION_TABLE) == head_revision(DIRECTORY)
        assert schema_diffs(engine) == []
        with store.make_sessions(store_url)() as s:
            assert store.accepted_total(s) == 5 and store.get_state(s).version == 7
            s.get_bind().dispose()
    finally:
        engine.dispose()


def test_a_running_aggregator_database_without_revision_restarts_where_it_was(tmp_path):
    url = str(tmp_path / "agg.db")
    first = service(url)
    first.handle_batch([update("gw1", 1), update("gw2", 2)])
    assert first.aggregate_now() and first.version == 1
    first.handle_batch([update("gw1", 3)])
    first.stop()
    first.sessions.kw["bind"].dispose()
    engine = create_engine(f"sqlite:///{url}")
    pre_migration_schema(engine)  # as if made by create_all: the initial tables and rows, no revision
    engine.dispose()

    again = service(url)
    assert again.version == 1 and again.accepted == 3 and [u.sender for u in again.pool.updates()] == ["gw1"]
    assert current_revision(again.sessions.kw["bind"], version_table=VERSION_TABLE) == head_revision(DIRECTORY)
    again.stop()


def test_a_partial_schema_without_revision_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'agg.db'}"
    engine = create_engine(url)
    store.SeenUpdateRow.__table__.create(engine)
    engine.dispose()
    with pytest.raises(StoreError, match="partial schema"):
        store.make_engine(url)
    check = create_engine(url)
    with check.connect() as conn:  # nothing was stamped or created
        assert conn.execute(select(func.count()).select_from(store.SeenUpdateRow.__table__)).scalar() == 0
        assert current_revision(check, version_table=VERSION_TABLE) is None
    check.dispose()


def test_adoption_stamps_the_base_of_the_revision_chain():
    from alembic.script import ScriptDirectory

    from gateway.store.db import alembic_config

    assert ScriptDirectory.from_config(alembic_config(None, DIRECTORY)).get_base() == INITIAL_REVISION
