"""Intake hardening (issue 16.6) through the aggregator's own intake and store: chunk
sets, size bounds that follow the model, hostile headers / statuses / norms on SQLite
and PostgreSQL, QoS 0 on a real mosquitto, the bounded decode queue, the page and
/metrics under junk statuses, and a missing signing key."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator_helpers import FakeGatewayClient, dev_config_text, tiny_model
from brokers import Mosquitto, find_mosquitto
from cloud_aggregator import store
from cloud_aggregator.service import AggregatorConfig, AggregatorService, SigningKeyMissing
from gateway.mqtt import Inbound, MqttSettings
from gateway.protocol import chunking, topics
from gateway.protocol.envelope import MAGIC, encode_update

from store_backends import store_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


def model() -> dict[str, np.ndarray]:
    """~17 KB of float32: its updates travel in 1 KB chunks."""
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(64, 64)).astype(np.float32), "b": np.zeros(64, np.float32),
            "ids": np.arange(4, dtype=np.int64)}


def service(url: str, **kw) -> AggregatorService:
    cfg = AggregatorConfig(database=url, mqtt=MqttSettings(client_id="agg-intake"),
                           strategy_params=kw.pop("strategy_params", {"rho": 1.0, "deadline_s": 3600}), **kw)
    return AggregatorService(cfg, initial_weights=model())


def delta(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, np.float32) for k, v in model().items() if v.dtype == np.float32}


def msg(sender: str, payload: bytes, mid: int = 1, qos: int = 1) -> Inbound:
    return Inbound(topics.gateway_update(sender), payload, qos, False, mid)


def status(sender: str, payload: bytes) -> Inbound:
    return Inbound(topics.gateway_status(sender), payload, 1, True, 99)


def random_update(sender: str, seed: int = 0, samples: int = 5) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_update({k: rng.normal(size=v.shape).astype(np.float32) * 0.01 for k, v in delta(0).items()},
                         sender=sender, base_version=0, num_samples=samples).data


def chunk_rows(svc) -> list[tuple[str, str]]:
    with svc.sessions() as s:
        return sorted({(r.sender, r.message_id) for r in store.load_chunks(s)})


def rebuild(data: bytes, mutate) -> bytes:
    import struct

    hlen = struct.unpack_from(">I", data, 4)[0]
    header = json.loads(data[8:8 + hlen])
    mutate(header)
    hb = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(hb)) + hb + data[8 + hlen:]


# ---------------------------------------------------------------- chunk sets


def test_chunks_from_unknown_senders_are_refused_before_they_are_stored(tmp_path):
    svc = service(str(tmp_path / "agg.db"), known_senders=frozenset({"gw1"}))
    frames = chunking.split_message(random_update("gw9"), max_chunk_bytes=1024)
    assert len(frames) > 10
    svc.handle_batch([msg("gw9", f, i) for i, f in enumerate(frames)])
    assert chunk_rows(svc) == [] and len(svc.reassembler) == 0
    assert svc.rejections["unknown_sender"] == len(frames) and svc.accepted == 0
    svc.stop()


def test_a_chunk_set_that_fails_deletes_its_rows(tmp_path):
    svc = service(str(tmp_path / "agg.db"))
    good = random_update("gw1")
    frames = chunking.split_message(good, max_chunk_bytes=1024, message_id="m1")
    svc.handle_batch([msg("gw1", f, i) for i, f in enumerate(frames[:-1])])
    assert chunk_rows(svc) == [("gw1", "m1")]
    # the last chunk carries other bytes: the whole set fails its digest and its rows go
    bad_last = bytearray(frames[-1])
    bad_last[-1] ^= 0xFF
    svc.handle_batch([msg("gw1", bytes(bad_last), 50)])
    assert svc.rejections["digest"] == 1 and chunk_rows(svc) == [] and len(svc.reassembler) == 0
    # a chunk that disagrees with its set (other size, same id) drops it too
    frames = chunking.split_message(good, max_chunk_bytes=1024, message_id="m2")
    liar = chunking.split_message(good[:-100], max_chunk_bytes=1024, message_id="m2")
    svc.handle_batch([msg("gw1", frames[0], 60), msg("gw1", liar[1], 61)])
    assert svc.rejections["schema"] == 1 and chunk_rows(svc) == []
    svc.stop()


def test_pending_chunk_sets_are_capped_per_sender(tmp_path):
    svc = service(str(tmp_path / "agg.db"), chunk_sets_per_gateway=2)
    other = chunking.split_message(random_update("gw2"), max_chunk_bytes=1024, message_id="keep")[0]
    svc.handle_batch([msg("gw2", other, 1)])
    firsts = [chunking.split_message(random_update("gw1", seed=i), max_chunk_bytes=1024, message_id=f"s{i}")[0]
              for i in range(10)]
    svc.handle_batch([msg("gw1", f, 10 + i) for i, f in enumerate(firsts)])
    assert chunk_rows(svc) == [("gw1", "s8"), ("gw1", "s9"), ("gw2", "keep")]
    assert svc.rejections["incomplete_chunk"] == 8  # its own oldest, counted
    svc.stop()


def test_a_restart_never_loads_unbounded_chunk_rows(tmp_path):
    """Rows left by a flood (or an older version without caps) are streamed in within
    the reassembler's bounds at a restart; expired ones, unknown senders' and those
    beyond the caps are deleted, not held."""
    url = str(tmp_path / "agg.db")
    first = service(url, known_senders=frozenset({"gw1", "gw2"}))
    now = time.time()
    with first.sessions.begin() as s:
        for i in range(600):
            sender = ("gw1", "gw2", "intruder")[i % 3]
            frame = chunking.split_message(random_update(sender, seed=i), max_chunk_bytes=1024, message_id=f"x{i}")[0]
            store.save_chunk(s, sender=sender, message_id=f"x{i}", index=0, frame=frame,
                             first_seen=now - (10_000 if i % 2 else 1))  # half of them long expired
    first.stop()
    again = service(url, known_senders=frozenset({"gw1", "gw2"}))
    held = again.reassembler.pending_keys()
    assert len(held) <= 2 * again.config.chunk_sets_per_gateway
    assert {s for s, _ in held} <= {"gw1", "gw2"}
    assert sorted(chunk_rows(again)) == sorted(held)  # everything not held was deleted
    again.stop()


# ---------------------------------------------------------------- size, norms, headers, statuses


def test_size_bounds_follow_the_model(tmp_path):
    svc = service(str(tmp_path / "agg.db"))
    floats = sum(v.size for v in model().values() if v.dtype == np.float32)
    assert svc.max_decoded_bytes == 2 * 4 * floats + 64 * 1024  # not the old fixed 256 MiB
    assert svc.max_update_bytes < 2 * svc.max_decoded_bytes and svc.reassembler.max_message_bytes == svc.max_update_bytes
    rng = np.random.default_rng(0)
    bloated = encode_update({**{k: rng.normal(size=v.shape).astype(np.float32) for k, v in delta(0).items()},
                             "extra": rng.normal(size=60_000).astype(np.float32)},
                            sender="gw1", base_version=0, num_samples=1).data
    svc.handle_batch([msg("gw1", bloated)])
    assert svc.rejections["oversize"] == 1 and svc.accepted == 0
    big = chunking.split_message(bloated, max_chunk_bytes=1024)
    svc.handle_batch([msg("gw1", big[0], 2)])  # the announced size alone is refused
    assert svc.rejections["oversize"] == 2 and chunk_rows(svc) == []
    svc.stop()


def hostile_messages() -> list[Inbound]:
    """Twenty messages a hostile or broken gateway can send, each of which used to fail
    the intake transaction (PostgreSQL) or pass with absurd values."""
    good = random_update("gw1")
    out = []
    for i, (field, value) in enumerate([("num_samples", 2**40), ("base_version", 2**31), ("round", 2**33),
                                        ("num_samples", 2**31), ("round", 10**15)]):
        out.append(msg("gw1", rebuild(good, lambda h, f=field, v=value: h.update({f: v})), 100 + i))
    for i, body in enumerate([b'{"state": "online", "flows": NaN}', b'{"state": "online", "alerts": Infinity}',
                              b'{"state": "online", "flows": -Infinity}', b'{"state": "online", "flows": 1e400}',
                              b'{"state": "online", "flows": ' + b"9" * 500 + b"}"]):
        out.append(status("gw2", body))
    for i, value in enumerate([1e20, 3e38, -3e38, 1e30, 1e25]):  # finite float32, absurd norms
        out.append(msg("gw1", encode_update(delta(value), sender="gw1", base_version=0, num_samples=1).data,
                       200 + i))
    for i, change in enumerate([{"metrics": {"f1": "NaN"}}, {"metrics": {str(k): 1.0 for k in range(100)}},
                                {"message_id": "m" * 200}, {"payload_bytes": -1}, {"kind": "global"}]):
        out.append(msg("gw1", rebuild(good, lambda h, c=change: h.update(c)), 300 + i))
    return out


def test_twenty_hostile_messages_in_a_row_are_counted_and_do_not_stop_intake(store_url):  # noqa: F811
    """Header integers beyond the database column, NaN / Infinity / huge numbers in a
    status, absurd update norms: each rejected and counted on SQLite and PostgreSQL,
    every one acknowledged (none left for the broker to redeliver for ever), and the
    next good update is taken in -- in one batch and one by one."""
    svc = service(store_url)
    hostile = hostile_messages()
    assert len(hostile) == 20
    assert svc.handle_batch(hostile) == []  # one transaction, nothing left unstored
    assert svc.handle_batch([msg("gw1", random_update("gw1", seed=1), 999)]) == [] and svc.accepted == 1
    counted = dict(svc.rejections)
    assert counted["schema"] >= 10 and counted["norm"] == 5, counted
    for m in hostile_messages():  # one by one: each is its own transaction
        assert svc.handle_batch([m]) == []
    assert sum(svc.rejections.values()) >= sum(counted.values()) + 15
    assert svc.handle_batch([msg("gw2", random_update("gw2", seed=2), 998)]) == [] and svc.accepted == 2
    with svc.sessions() as s:  # what the store counted matches, and the gateway rows stayed clean
        assert store.rejection_counts(s) == dict(svc.rejections)
        assert all(math.isfinite(x) for x in [store.load_clients(s)["gw1"].last_update_at])
    assert svc.aggregate_now() and svc.version == 1
    svc.stop()


def test_the_page_and_metrics_survive_junk_in_gateway_statuses(tmp_path):
    from cloud_aggregator.web import serve

    db = str(tmp_path / "agg.db")
    svc = service(db)
    nested = {"state": "online", "flows": 12, "alerts": {"a": [1, {"b": [[[[2]]]]}]}, "model_version": ["x"] * 500,
              "detections_by_label": {"Benign": 10, "C&C": "lots", "x" * 1000: {"deep": {"deeper": [1]}}},
              "version": {"nested": True}, "uploads": "many"}
    svc.handle_batch([status("gw1", json.dumps(nested).encode()),
                      status("gw2", b'{"state": "online", "flows": NaN}'),
                      status("gw3", b'{"state": "online", "flows": ' + b"9" * 300 + b"}"),
                      status("gw4", json.dumps({"state": "online", "flows": 2**52, "alerts": -2**52}).encode())])
    assert svc.rejections["schema"] == 2
    page = serve(db, ("127.0.0.1", 0))
    try:
        with urllib.request.urlopen(page.url + "/api/status", timeout=10) as r:
            body = r.read().decode()
        st = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in /api/status"))
        assert {c["gateway"] for c in st["clients"]} == {"gw1", "gw4"}
        with urllib.request.urlopen(page.url + "/metrics", timeout=10) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        flows = {s.labels["gateway"]: s.value for s in families["fedgate_agg_client_flows"].samples}
        assert flows == {"gw1": 12.0, "gw4": float(2**52)}
        assert families["fedgate_agg_store_up"].samples[0].value == 1.0
    finally:
        page.stop()
        svc.stop()


# ---------------------------------------------------------------- queues and QoS


def test_the_decode_queue_is_bounded(tmp_path):
    """Updates queued faster than the worker takes them start at most 2 x intake_batch
    decodes ahead; the rest wait undecoded (the worker validates them inline)."""
    svc = service(str(tmp_path / "agg.db"), intake_batch=4, decode_threads=2)
    payloads = [random_update("gw1", seed=i) for i in range(60)]
    for i, p in enumerate(payloads):  # the worker is not running: nothing is taken out
        svc.inbox.put(msg("gw1", p, i))
    from cloud_aggregator.service import _Arrived

    queued = list(svc.inbox.queue)
    assert len(queued) == 60 and sum(isinstance(q, _Arrived) for q in queued) == 2 * 4
    svc.stop()


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_qos0_updates_are_refused_and_counted(tmp_path):
    broker = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    svc = AggregatorService(AggregatorConfig(database=str(tmp_path / "agg.db"), tick_s=0.05,
                                             strategy_params={"rho": 1.0, "deadline_s": 3600},
                                             mqtt=MqttSettings(port=broker.port, client_id="agg-qos0")),
                            initial_weights=model()).start()
    gw = FakeGatewayClient("gw1", broker.port)
    try:
        assert svc.wait_connected(10)
        gw.start()
        for i in range(30):
            gw.link.publish(topics.gateway_update("gw1"), random_update("gw1", seed=i), qos=0).wait_for_publish(5)
        assert svc.wait_for(lambda s: s.rejections["qos0"] == 30, 15), dict(svc.rejections)
        assert svc.accepted == 0 and len(svc.pool) == 0
        gw.send(random_update("gw1", seed=99))  # QoS 1 is taken in
        assert svc.wait_for(lambda s: s.accepted == 1, 15)
        with svc.sessions() as s:
            assert store.rejection_counts(s)["qos0"] == 30
    finally:
        gw.stop()
        svc.stop()
        broker.stop()


# ---------------------------------------------------------------- the signing key


def test_an_aggregator_without_its_signing_key_file_refuses_to_start(tmp_path):
    missing = tmp_path / "keys" / "aggregator.key"
    with pytest.raises(SigningKeyMissing, match="keygen"):
        AggregatorService(AggregatorConfig(database=str(tmp_path / "agg.db"), signing_key=str(missing)),
                          initial_weights=tiny_model())
    assert not missing.exists() and not (tmp_path / "keys").exists()  # nothing made silently
    (tmp_path / "agg.toml").write_text(f'[aggregator]\ndatabase = "agg.db"\nsigning_key = "{missing}"\n')
    import safetensors.numpy as st_numpy

    st_numpy.save_file(tiny_model(), str(tmp_path / "init.safetensors"))
    with open(tmp_path / "agg.toml", "a") as f:
        f.write('initial_model = "init.safetensors"\n')
    out = subprocess.run([sys.executable, "-m", "cloud_aggregator.cli", "run", "--config", str(tmp_path / "agg.toml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "keygen" in out.stderr and "Traceback" not in out.stderr
    assert not missing.exists()
