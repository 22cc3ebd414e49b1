"""The aggregator's defences through its own intake and store (SQLite file; PostgreSQL
when it runs): a candidate that fails the aggregate check or the deployment gate is
never signed or published, is recorded with why, and its window is dropped; scores
travel in the published header; a restart remembers all of it.  The gate scores with
the real model code (models/default) on real IoT-23 flows."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st_numpy

from aggregator_helpers import tiny_delta, tiny_model
from cloud_aggregator import gate, store
from cloud_aggregator.safety import GateSettings
from cloud_aggregator.service import AggregatorConfig, AggregatorService
from gateway.fl.control import parse_control
from gateway.mqtt import Inbound, MqttSettings
from gateway.protocol import topics
from gateway.protocol.envelope import decode_header, encode_update

from store_backends import store_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "default"


def msg(sender: str, payload: bytes, mid: int = 1) -> Inbound:
    return Inbound(topics.gateway_update(sender), payload, 1, False, mid)


def update(sender: str, delta, *, base: int = 0, samples: int = 10) -> Inbound:
    return msg(sender, encode_update(delta, sender=sender, base_version=base, num_samples=samples).data)


def test_a_1e30_delta_never_becomes_a_signed_global(store_url, caplog):  # noqa: F811
    """The issue's drill: a 1e30 delta, alone in its window, became a signed global.
    Now intake refuses it (its norm is beyond 100 x the model's); a long delta that
    passes intake, alone in its window (no median to clip it against), is refused by the
    aggregate check: not signed, not published, counted, logged, its window dropped;
    the next honest window publishes version 1."""
    cfg = AggregatorConfig(database=store_url, mqtt=MqttSettings(client_id="agg-defence"),
                           strategy_params={"rho": 1.0, "deadline_s": 3600})
    svc = AggregatorService(cfg, initial_weights=tiny_model())
    before = svc.global_envelope
    svc.handle_batch([update("gw1", tiny_delta(1e30))])
    assert svc.rejections["norm"] == 1 and len(svc.pool) == 0
    svc.handle_batch([update("gw1", tiny_delta(10.0))])  # norm ~10 x the model's: in, but a step too long
    with caplog.at_level(logging.WARNING, logger="cloud_aggregator.service"):
        assert not svc.aggregate_now()
    assert svc.version == 0 and svc.global_envelope == before and len(svc.pool) == 0
    assert svc.refused == {gate.STEP_NORM: 1}
    assert "NOT published" in caplog.text
    assert parse_control(svc._control_bytes()).refused == 1  # GSFS gateways train again
    with svc.sessions() as s:
        (row,) = store.refusals(s)
        assert row.reason == gate.STEP_NORM and row.senders == ["gw1"] and row.base_version == 0
        assert store.status_summary(s).refused == {gate.STEP_NORM: 1}
    svc.handle_batch([update("gw1", tiny_delta(0.01)), update("gw2", tiny_delta(0.02))])
    assert svc.aggregate_now() and svc.version == 1
    np.testing.assert_allclose(svc.weights["encoder.bias"], 0.015, rtol=1e-5)
    svc.stop()
    again = AggregatorService(cfg, initial_weights=tiny_model())  # a restart remembers the refusal
    assert again.refused == {gate.STEP_NORM: 1} and len(again._recent_steps) == 1
    again.stop()


def test_non_finite_candidates_are_refused_even_with_the_defences_off(tmp_path):
    """A server step can overflow float32 (here a server rate of 1e38); that is never signed."""
    cfg = AggregatorConfig(database=str(tmp_path / "agg.db"), mqtt=MqttSettings(client_id="agg-defence"),
                           strategy_params={"rho": 1.0, "deadline_s": 3600, "eta": 1e38}, robust={"enabled": False})
    svc = AggregatorService(cfg, initial_weights=tiny_model())
    svc.handle_batch([update("gw1", tiny_delta(10.0)), update("gw2", tiny_delta(10.0))])
    assert not svc.aggregate_now() and svc.refused == {gate.NOT_FINITE: 1} and svc.version == 0
    svc.stop()


def validation_log(tmp_path: Path, lines: int = 400) -> Path:
    """Every 20th flow of CTU-Malware-Capture-8-1 (C&C and benign), header kept."""
    src = REPO / "data" / "iot23" / "CTU-Malware-Capture-8-1" / "conn.log.labeled"
    rows = src.read_text().splitlines()
    head = [r for r in rows if r.startswith("#")]
    body = [r for r in rows if not r.startswith("#")][::20][:lines]
    out = tmp_path / "val.conn.log.labeled"
    out.write_text("\n".join(head + body) + "\n")
    return out


@pytest.mark.slow
def test_the_gate_keeps_a_worse_candidate_back_and_scores_travel_in_the_header(tmp_path):
    """[gate] validation_log + model_dir score each candidate with the gateways' own
    model code; a candidate worse than the current global by more than the margin is
    not published (reason "gate"), a good one is, with its scores in the header."""
    weights = {k: np.asarray(v) for k, v in st_numpy.load_file(str(MODEL / "model.safetensors")).items()}
    cfg = AggregatorConfig(database=str(tmp_path / "agg.db"), mqtt=MqttSettings(client_id="agg-gate"),
                           strategy_params={"rho": 1.0, "deadline_s": 3600},
                           gate=GateSettings(validation_log=str(validation_log(tmp_path)), model_dir=str(MODEL),
                                             margin=0.02))
    svc = AggregatorService(cfg, initial_weights=weights)
    assert svc._current_scores["accuracy"] > 0.9  # the shipped model on C&C and benign flows
    zero = {k: np.zeros_like(v) for k, v in weights.items() if v.dtype == np.float32}
    flip = {**zero, "score.weight": -2.0 * weights["score.weight"]}  # a short step that inverts the verdicts
    svc.handle_batch([update("gw1", flip)])
    assert not svc.aggregate_now()
    assert svc.refused == {gate.GATE: 1} and svc.version == 0
    with svc.sessions() as s:
        (row,) = store.refusals(s)
    assert row.figures["gate_accuracy"] < row.figures["gate_current_accuracy"] - 0.02
    nudge = {**zero, "score.weight": 0.01 * weights["score.weight"]}
    svc.handle_batch([update("gw1", nudge)])
    assert svc.aggregate_now() and svc.version == 1 and svc.gate_passed == 1
    header, _ = decode_header(svc.global_envelope)
    assert header.metrics["gate_accuracy"] == pytest.approx(svc._current_scores["accuracy"])
    assert header.metrics["gate_accuracy"] > row.figures["gate_accuracy"]
    with svc.sessions() as s:
        summary = store.status_summary(s)
    assert summary.state["gate_passed"] == 1 and summary.rounds[-1]["gate_accuracy"] > 0.9
    from cloud_aggregator import metrics

    text = metrics.exposition(metrics.make_registry(svc.sessions)).decode()
    assert 'fedgate_agg_candidates_refused_total{reason="gate"} 1.0' in text
    assert "fedgate_agg_gate_passed_total 1.0" in text and 'fedgate_agg_gate_score{metric="accuracy"}' in text
    svc.stop()


def test_a_gate_that_cannot_score_keeps_candidates_back(tmp_path):
    """Fail closed: a scorer that breaks refuses (reason scorer_failed), never publishes unscored."""
    calls = []

    def scorer(w):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("validation flows unreadable")
        return {"accuracy": 0.9}

    cfg = AggregatorConfig(database=str(tmp_path / "agg.db"), mqtt=MqttSettings(client_id="agg-gate"),
                           strategy_params={"rho": 1.0, "deadline_s": 3600})
    svc = AggregatorService(cfg, initial_weights=tiny_model(), gate_scorer=scorer)
    svc.handle_batch([update("gw1", tiny_delta(0.01))])
    assert not svc.aggregate_now() and svc.refused == {gate.SCORER_FAILED: 1}
    svc.stop()
