"""The aggregator's durable state on real databases (SQLite file; PostgreSQL when it
runs at 127.0.0.1:5432), driven through the service's own intake without a broker:
the MQTT link is never connected, so acknowledgements and publishes are no-ops."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from aggregator_helpers import tiny_delta, tiny_model
from cloud_aggregator import store
from cloud_aggregator.service import AggregatorConfig, AggregatorService
from gateway.mqtt import Inbound, MqttSettings
from gateway.protocol import chunking, topics
from gateway.protocol.envelope import encode_update

pytestmark = pytest.mark.integration


def service(url: str, **kw) -> AggregatorService:
    cfg = AggregatorConfig(database=url, mqtt=MqttSettings(client_id="agg-store-test"),
                           strategy_params=kw.pop("strategy_params", {"rho": 1.0, "deadline_s": 3600}), **kw)
    return AggregatorService(cfg, initial_weights=tiny_model())


def msg(sender: str, payload: bytes, mid: int = 1) -> Inbound:
    return Inbound(topics.gateway_update(sender), payload, 1, False, mid)


def status(sender: str, state: str) -> Inbound:
    return Inbound(topics.gateway_status(sender), f'{{"state": "{state}"}}'.encode(), 1, True, 99)


def test_restart_restores_pool_counts_replay_and_chunks(tmp_path):
    url = str(tmp_path / "agg.db")
    first = service(url)
    rng = np.random.default_rng(0)
    a1 = encode_update(tiny_delta(0.1), sender="gw1", base_version=0, num_samples=3)
    a2 = encode_update(tiny_delta(0.2), sender="gw1", base_version=0, num_samples=4)
    big = encode_update({k: rng.normal(size=v.shape).astype(np.float32) for k, v in tiny_delta(0).items()},
                        sender="gw2", base_version=0, num_samples=5)
    frames = chunking.split_message(big.data, max_chunk_bytes=1024)
    first.handle_batch([status("gw1", "online"), status("gw2", "online"), status("gw3", "online"),
                        msg("gw1", a1.data), msg("gw1", a2.data), msg("gw2", frames[0])])
    assert first.accepted == 2 and len(first.reassembler) == 1
    first.stop()

    second = service(url)  # a new process on the same store
    assert second.version == 0 and second.accepted == 2
    (pooled,) = second.pool.updates()
    assert pooled.message_id == a2.message_id and pooled.submissions == 2  # newest, s_i = 2
    np.testing.assert_allclose(pooled.delta["encoder.bias"], 0.2)
    assert second.pool.live_clients() == {"gw1", "gw2", "gw3"}
    second.handle_batch([msg("gw1", a1.data)])  # redelivery of something stored before
    assert second.rejections["replay"] == 1 and second.accepted == 2
    second.handle_batch([msg("gw2", f) for f in frames[1:]])  # the rest of the chunked update
    assert second.accepted == 3 and len(second.reassembler) == 0
    with second.sessions() as s:
        assert store.load_chunks(s) == []
    assert second.aggregate_now() and second.version == 1
    second.stop()

    third = service(url)
    assert third.version == 1 and len(third.pool) == 0
    np.testing.assert_allclose(third.weights["encoder.weight"], second.weights["encoder.weight"])
    third.stop()


def test_replay_inside_one_batch_is_counted_once(tmp_path):
    svc = service(str(tmp_path / "agg.db"), decode_threads=2)
    enc = encode_update(tiny_delta(0.1), sender="gw1", base_version=0, num_samples=3)
    svc.handle_batch([msg("gw1", enc.data, 1), msg("gw1", enc.data, 2), msg("gw1", b"junk", 3)])
    assert svc.accepted == 1 and svc.rejections == {"replay": 1, "schema": 1}
    svc.stop()


def test_fedopt_state_survives_restart(tmp_path):
    url = str(tmp_path / "agg.db")
    svc = service(url, strategy="fedopt", strategy_params={"eta": 0.1})
    svc.pool.set_status("gw1", True)
    svc.tick()  # opens round 1 for gw1
    assert svc.pool.round == 1
    svc.handle_batch([msg("gw1", encode_update(tiny_delta(0.1), sender="gw1", base_version=0, num_samples=3,
                                               round=1).data)])
    svc.tick()
    assert svc.version == 1 and svc.state.adam.t == 1
    m = svc.state.adam.m["encoder.weight"].copy()
    svc.stop()
    again = service(url, strategy="fedopt", strategy_params={"eta": 0.1})
    assert again.version == 1 and again.state.adam.t == 1
    np.testing.assert_array_equal(again.state.adam.m["encoder.weight"], m)
    again.stop()


def _postgres_url() -> str | None:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=2,
                             autocommit=True) as conn:
            name = f"fedgate_agg_{uuid.uuid4().hex[:8]}"
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    except Exception:
        return None


def test_the_same_store_on_postgresql():
    url = _postgres_url()
    if url is None:
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
    try:
        svc = service(url, strategy_params={"rho": 0.5})
        first = encode_update(tiny_delta(0.1), sender="gw1", base_version=0, num_samples=3)
        enc = encode_update(tiny_delta(0.3), sender="gw1", base_version=0, num_samples=3)
        # two updates and a status of one sender in one transaction: PostgreSQL refuses an
        # upsert that touches a row twice, so the batch must write each row once
        assert svc.handle_batch([status("gw1", "online"), msg("gw1", first.data, 1), msg("gw1", enc.data, 2)]) == []
        assert svc.accepted == 2 and svc.pool.updates()[0].submissions == 2
        svc.tick()
        assert svc.version == 1
        svc.stop()
        again = service(url, strategy_params={"rho": 0.5})
        assert again.version == 1 and again.accepted == 2
        np.testing.assert_allclose(again.weights["encoder.bias"], 0.3)
        again.handle_batch([msg("gw1", enc.data)])
        assert again.rejections["replay"] == 1
        again.stop()
        again.sessions.kw["bind"].dispose()
        svc.sessions.kw["bind"].dispose()
    finally:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_unknown_gateways_do_not_count_and_bad_topics_are_rejected(tmp_path):
    svc = service(str(tmp_path / "agg.db"), known_senders=frozenset({"gw1"}))
    enc = encode_update(tiny_delta(0.1), sender="gw1", base_version=0, num_samples=3)
    svc.handle_batch([status("gw1", "online"), status("intruder", "online"),
                      Inbound("fedgate/v1/gw/bad id/update", enc.data, 1, False, 5)])
    assert svc.pool.live_clients() == {"gw1"}  # an unknown gateway cannot inflate N
    assert svc.rejections == {"unknown_sender": 1}
    svc.stop()


def test_failed_intake_commit_acknowledges_nothing_and_memory_follows_the_store(tmp_path, monkeypatch):
    svc = service(str(tmp_path / "agg.db"))
    acked = []
    monkeypatch.setattr(svc.link, "ack", lambda m: acked.append(m.mid))
    enc = encode_update(tiny_delta(0.1), sender="gw1", base_version=0, num_samples=3)
    real_store_updates = store.store_updates

    def disk_full_for_updates(session, updates, clients):
        if updates:
            raise OSError("disk full")
        real_store_updates(session, updates, clients)

    monkeypatch.setattr(store, "store_updates", disk_full_for_updates)
    update = msg("gw1", enc.data, 7)
    # the batch fails; one by one, the status is stored and acknowledged, the update is not
    assert svc.handle_batch([status("gw1", "online"), update]) == [update]
    assert acked == [99] and len(svc.pool) == 0 and not svc.pool.is_replay("gw1", enc.message_id)
    assert svc.pool.live_clients() == {"gw1"}
    monkeypatch.setattr(store, "store_updates", real_store_updates)
    assert svc.handle_batch([msg("gw1", enc.data, 8)]) == []  # the broker's redelivery is taken, not a replay
    assert acked == [99, 8] and svc.accepted == 1 and svc.rejections == {}
    svc.stop()


def test_one_bad_row_does_not_block_the_rest_of_its_batch(tmp_path, monkeypatch):
    svc = service(str(tmp_path / "agg.db"))
    acked = []
    monkeypatch.setattr(svc.link, "ack", lambda m: acked.append(m.mid))
    encs = {gw: encode_update(tiny_delta(0.1), sender=gw, base_version=0, num_samples=3) for gw in ("gw1", "gw2", "gw3")}
    real_store_updates = store.store_updates

    def gw2_cannot_be_written(session, updates, clients):
        if any(u.sender == "gw2" for u, _ in updates):
            raise OSError("row refused")
        real_store_updates(session, updates, clients)

    monkeypatch.setattr(store, "store_updates", gw2_cannot_be_written)
    batch = [msg(gw, e.data, mid) for mid, (gw, e) in enumerate(encs.items(), start=1)]
    assert svc.handle_batch(batch) == [batch[1]]
    assert acked == [1, 3] and svc.accepted == 2 and {u.sender for u in svc.pool.updates()} == {"gw1", "gw3"}
    monkeypatch.undo()
    again = service(str(tmp_path / "agg.db"))  # what was acknowledged is what the store holds
    assert {u.sender for u in again.pool.updates()} == {"gw1", "gw3"} and again.accepted == 2
    again.stop()
    svc.stop()


def test_failed_checkpoint_keeps_the_version_and_the_pool(tmp_path, monkeypatch):
    svc = service(str(tmp_path / "agg.db"))
    monkeypatch.setattr(svc.link, "ack", lambda m: None)
    svc.handle_batch([msg("gw1", encode_update(tiny_delta(0.1), sender="gw1", base_version=0, num_samples=3).data)])
    before = {k: v.copy() for k, v in svc.weights.items()}

    def broken(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(store, "save_checkpoint", broken)
    with pytest.raises(OSError):
        svc.aggregate_now()
    assert svc.version == 0 and len(svc.pool) == 1
    np.testing.assert_array_equal(svc.weights["encoder.weight"], before["encoder.weight"])
    monkeypatch.undo()
    monkeypatch.setattr(svc.link, "ack", lambda m: None)
    assert svc.aggregate_now() and svc.version == 1 and len(svc.pool) == 0
    svc.stop()


def test_wal_is_checkpointed_off_the_intake_thread(tmp_path):
    svc = service(str(tmp_path / "agg.db"))
    with svc.sessions() as s:  # the intake's own commits checkpoint only past the backstop
        assert s.connection().exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == \
            store.WalCheckpointer.BACKSTOP_PAGES
    svc.handle_batch([msg(f"gw{i}", encode_update(tiny_delta(0.1), sender=f"gw{i}", base_version=0,
                                                  num_samples=3).data, i) for i in range(1, 4)])
    assert svc.wait_for(lambda s: s._checkpointer.checkpoints >= 1, timeout=10)
    with svc.sessions() as s:  # (busy, frames in the WAL, frames copied into the database)
        busy, frames, copied = s.connection().exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
    assert busy == 0 and frames == copied
    thread = svc._checkpointer._thread
    svc.stop()
    assert not thread.is_alive()


def test_updates_validated_ahead_are_judged_against_the_pool_as_it_is_now(tmp_path):
    """The inbox starts validation when a message arrives; what the pool did since (a
    new version, a rolled-back commit) decides when the worker takes the message."""
    svc = service(str(tmp_path / "agg.db"), max_staleness=0, decode_threads=2)
    acked = []
    svc.link.ack = lambda m: acked.append(m.mid)
    old = encode_update(tiny_delta(0.1), sender="gw1", base_version=0, num_samples=3)
    svc.inbox.put(msg("gw1", old.data, 1))
    arrived = svc.inbox.get_nowait()
    assert arrived.decoded.result(timeout=10).header.message_id == old.message_id  # valid at version 0
    svc.handle_batch([msg("gw2", encode_update(tiny_delta(0.1), sender="gw2", base_version=0, num_samples=3).data, 2)])
    assert svc.aggregate_now() and svc.version == 1
    svc._handle_batch([arrived.msg], {0: arrived.decoded})  # now one version too old
    assert svc.rejections == {"stale_base": 1} and acked == [2, 1]

    # a replay verdict reached ahead is redone: here the pool no longer holds the key
    again = encode_update(tiny_delta(0.1), sender="gw3", base_version=1, num_samples=3)
    svc.pool._remember("gw3", again.message_id)
    svc.inbox.put(msg("gw3", again.data, 3))
    arrived = svc.inbox.get_nowait()
    assert arrived.decoded.result(timeout=10).reason.value == "replay"
    svc.pool._seen.clear()  # as after a failed commit rolled the pool back to the store
    svc._handle_batch([arrived.msg], {0: arrived.decoded})
    assert svc.accepted == 2 and svc.rejections == {"stale_base": 1} and acked == [2, 1, 3]
    svc.stop()


def test_a_replay_older_than_the_replay_window_is_refused_and_acknowledged(tmp_path):
    svc = service(str(tmp_path / "agg.db"))
    acked = []
    svc.link.ack = lambda m: acked.append(m.mid)
    svc.pool.replay_window = 2  # remembers only the newest two (sender, message id) pairs
    encs = [encode_update(tiny_delta(0.1), sender=f"gw{i}", base_version=0, num_samples=3) for i in range(4)]
    svc.handle_batch([msg(f"gw{i}", e.data, i) for i, e in enumerate(encs)])
    assert not svc.pool.is_replay("gw0", encs[0].message_id)  # forgotten in memory, kept in the store
    fresh = encode_update(tiny_delta(0.2), sender="gw5", base_version=0, num_samples=3)
    assert svc.handle_batch([msg("gw0", encs[0].data, 10), msg("gw5", fresh.data, 11)]) == []
    assert acked == [0, 1, 2, 3, 10, 11] and svc.accepted == 5 and svc.rejections == {"replay": 1}
    with svc.sessions() as s:
        assert store.accepted_total(s) == 5 and store.rejection_counts(s) == {"replay": 1}
    svc.stop()
