"""The whole gateway with its real model: ONNX Runtime engine loaded from the config, the
FL client, and a real aggregator on a real mosquitto.  The aggregator's signed retained
global model reaches the gateway, is validated, exported to ONNX and hot-swapped in
while the live tail keeps detecting; later flows carry the new model version."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select

from aggregator_helpers import dev_config_text
from benchmarks.live_latency import write_at_rate
from brokers import Mosquitto, find_mosquitto
from gateway_helpers import gateway_config, store_counts, wait_until
from gateway.service import GatewayService
from gateway.store.db import open_store
from gateway.store.models import Detection

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, iot23_dir) -> Path:
    """A small student (random weights, vocabulary from IoT-23 flows) with its ONNX export."""
    from gateway.flows.zeek import iter_records
    from gateway.model.labels import LabelSet, record_label
    from gateway.model.modeldir import save_model_dir
    from gateway.model.opt import build_model
    from gateway.model.prompt import DEFAULT_TEMPLATE, get_template
    from gateway.model.tokenizer import FlowTokenizer

    records = list(iter_records(iot23_dir / "CTU-Honeypot-Capture-7-1" / "conn.log.labeled"))
    records += list(iter_records(iot23_dir / "CTU-Malware-Capture-8-1" / "conn.log.labeled"))[:400]
    tokenizer = FlowTokenizer.build(records, get_template(DEFAULT_TEMPLATE))
    labels = LabelSet.from_labels(record_label(r) for r in records)
    out = tmp_path_factory.mktemp("model") / "student"
    save_model_dir(build_model("student", tokenizer, labels, seed=0), tokenizer, labels, out,
                   version="student-seed0", extra={"preset": "student"})
    return out


def detections_by_version(url: str) -> dict[str, int]:
    engine, sessions = open_store(url)
    try:
        with sessions() as s:
            rows = s.execute(select(Detection.model_version, func.count()).group_by(Detection.model_version)).all()
        return {v: int(n) for v, n in rows}
    finally:
        engine.dispose()


def test_global_model_is_validated_exported_and_hot_swapped_while_detecting(tmp_path, model_dir):
    from cloud_aggregator.service import AggregatorConfig, AggregatorService
    from gateway.mqtt import MqttSettings

    broker = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    from gateway.protocol import signing

    key = tmp_path / "keys" / "aggregator.key"
    made = signing.generate_private_key()
    signing.save_private_key(made, key)
    signing.save_public_key(made, str(key) + ".pub")
    aggregator = AggregatorService(AggregatorConfig(
        database=str(tmp_path / "agg.db"), signing_key=str(key), initial_model=str(model_dir / "model.safetensors"),
        mqtt=MqttSettings(port=broker.port, client_id="agg")))
    log = tmp_path / "conn.log"
    log.touch()
    cfg = gateway_config(tmp_path, broker_port=broker.port, model=str(model_dir), http="127.0.0.1:0",
                         gateway={"global_model_public_key": str(key) + ".pub", "state_dir": str(tmp_path / "state")},
                         fl={"max_local_steps": 3, "batch_size": 16, "threads": 1})
    service = GatewayService(cfg).start()
    try:
        assert service.classifier.model_version == "student-seed0"
        assert service.fl_client is not None
        write_at_rate(log, rate=5000, count=300, uid_offset=5000)
        assert wait_until(lambda: store_counts(cfg.database_url)[2] == 300, 30)
        aggregator.start()  # publishes the signed retained global model, version 0
        assert wait_until(lambda: service.classifier.model_version.startswith("global-"), 90), \
            service.status()["errors"]
        assert (tmp_path / "state" / "models" / "global-0" / "model.onnx").exists()
        write_at_rate(log, rate=5000, count=200, uid_offset=5300)
        assert wait_until(lambda: store_counts(cfg.database_url)[0] == 500, 30)
        # the gateway may go on: train, upload, the aggregator aggregates (one live client),
        # and version 1 is swapped in too; either way each flow has one detection
        by_version = detections_by_version(cfg.database_url)
        assert by_version.pop("student-seed0") == 300
        assert set(by_version) <= {"global-0", "global-1", "global-2"} and sum(by_version.values()) == 200

        def settled() -> dict | None:
            with urllib.request.urlopen(service.http.url + "/api/status", timeout=5) as r:
                st = json.loads(r.read())
            return st if st["model_version"] == f"global-{st['fl']['version']}" else None

        assert wait_until(lambda: settled() is not None, 60)
        version = settled()["fl"]["version"]
        with urllib.request.urlopen(service.http.url + "/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert f'fedgate_gw_model_info{{version="global-{version}"}} 1.0' in metrics
        assert f"fedgate_gw_fl_global_version {float(version)}" in metrics
        loaded = re.search(r"^fedgate_gw_fl_globals_loaded_total (\S+)$", metrics, re.M)
        assert loaded and float(loaded.group(1)) >= 1
    finally:
        service.stop()
        aggregator.stop()
        broker.stop()
