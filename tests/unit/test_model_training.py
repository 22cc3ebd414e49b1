"""The torch training loop on a tiny OPT: seeds, per-layer gradient norms, state values."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.flows.record import ConnRecord
from gateway.model.data import FlowDataset, encode
from gateway.model.labels import LabelSet, record_label
from gateway.model.opt import PRESETS, Preset, build_model, parameter_count
from gateway.model.prompt import COMPACT
from gateway.model.tokenizer import FlowTokenizer
from gateway.model.metrics import softmax
from gateway.model.train import evaluate, load_numpy_state, predict_logits, state_to_numpy, train_epochs

TINY = Preset(hidden=16, layers=1, heads=2, ffn=32, dropout=0.0, epochs=3, lr=1e-2, batch_size=16)


def _records():
    out = []
    for i in range(40):
        out.append(ConnRecord(ts=i, uid=f"B{i}", orig_h="192.168.1.2", orig_p=40000 + i, resp_h="8.8.8.8", resp_p=53,
                              proto="udp", service="dns", duration=0.01 * (i % 5), orig_bytes=40 + i % 3, resp_bytes=90,
                              conn_state="SF", history="Dd", orig_pkts=1, resp_pkts=1, label="benign"))
        out.append(ConnRecord(ts=i, uid=f"M{i}", orig_h="192.168.1.2", orig_p=40000 + i, resp_h="1.2.3.4", resp_p=23,
                              proto="tcp", conn_state="S0", history="S", orig_pkts=1 + i % 2, resp_pkts=0,
                              label="Malicious", detailed_label="DDoS" if i % 4 else "C&C"))
    return out


@pytest.fixture(scope="module")
def setup():
    recs = _records()
    tok = FlowTokenizer.build(recs, COMPACT)
    labels = LabelSet.from_labels(record_label(r) for r in recs)
    return tok, labels, encode(recs, tok, labels).dedupe()


def test_same_seed_same_weights_and_it_learns(setup):
    tok, labels, ds = setup
    states = []
    for _ in range(2):
        m = build_model(TINY, tok, labels, seed=7)
        res = train_epochs(m, ds, epochs=15, lr=1e-2, seed=7, batch_size=16)
        states.append(state_to_numpy(m))
    assert all(np.array_equal(states[0][k], states[1][k]) for k in states[0])
    assert res.epoch_losses[-1] < res.epoch_losses[0]
    metrics = evaluate(m, ds)
    assert metrics["accuracy"] == 1.0  # separable toy data
    other = build_model(TINY, tok, labels, seed=8)
    train_epochs(other, ds, epochs=1, lr=1e-2, seed=8)
    assert not all(np.array_equal(states[0][k], v) for k, v in state_to_numpy(other).items())


def test_on_step_gets_per_layer_gradient_norms(setup):
    tok, labels, ds = setup
    m = build_model(TINY, tok, labels, seed=1)
    seen = []
    res = train_epochs(m, ds, epochs=2, lr=1e-2, seed=1, batch_size=8, on_step=lambda s, n, l: seen.append((s, n, l)))
    assert [s for s, _, _ in seen] == list(range(1, res.steps + 1))
    norms = seen[0][1]
    assert set(norms) == {"embeddings", "layers.0", "final_layer_norm", "score"}
    assert all(v >= 0 and np.isfinite(v) for v in norms.values())


def test_distillation_loss_runs_and_validates(setup):
    tok, labels, ds = setup
    teacher = build_model(TINY, tok, labels, seed=3)
    train_epochs(teacher, ds, epochs=10, lr=1e-2, seed=3)
    t_logits = predict_logits(teacher, ds.ids)
    student = build_model(TINY, tok, labels, seed=4)
    res = train_epochs(student, ds, epochs=10, lr=1e-2, seed=4, teacher_logits=t_logits, temperature=2.0, alpha=0.5)
    assert res.epoch_losses[-1] < res.epoch_losses[0]
    with pytest.raises(ValueError, match="one row per"):
        train_epochs(student, ds, epochs=1, lr=1e-2, seed=4, teacher_logits=t_logits[:1])
    with pytest.raises(ValueError, match="alpha"):
        train_epochs(student, ds, epochs=1, lr=1e-2, seed=4, alpha=2.0)


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_proximal_term_keeps_local_training_near_its_start(setup):
    tok, labels, ds = setup
    start = state_to_numpy(build_model(TINY, tok, labels, seed=5))
    moved = {}
    for mu in (0.0, 1.0, 100.0):
        m = build_model(TINY, tok, labels, seed=5)
        train_epochs(m, ds, epochs=5, lr=1e-2, seed=5, batch_size=16, prox_mu=mu)
        moved[mu] = _distance(state_to_numpy(m), start)
    # FedProx: the stronger the pull towards the starting (global) weights, the less
    # local training moves them; mu = 0 is plain training
    assert moved[0.0] > moved[1.0] > moved[100.0] > 0
    plain = build_model(TINY, tok, labels, seed=5)
    train_epochs(plain, ds, epochs=5, lr=1e-2, seed=5, batch_size=16)
    assert _distance(state_to_numpy(plain), start) == moved[0.0]
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="prox_mu"):
            train_epochs(plain, ds, epochs=1, lr=1e-2, seed=5, prox_mu=bad)


def test_missing_class_scale_restricts_the_softmax_to_the_classes_a_gateway_has(setup):
    tok, labels, ds = setup
    benign_only = ds.subset(np.flatnonzero(ds.y == 0))  # a honeypot-like gateway
    attacks = ds.subset(np.flatnonzero(ds.y != 0))
    start = state_to_numpy(build_model(TINY, tok, labels, seed=3))
    trained = {}
    for scale in (1.0, 0.0):
        m = build_model(TINY, tok, labels, seed=3)
        train_epochs(m, benign_only, epochs=5, lr=1e-2, seed=3, batch_size=16, weight_decay=0.0,
                     missing_class_scale=scale)
        trained[scale] = m
    absent = np.unique(attacks.y)
    head = "score.weight"
    # FedRS with scale 0: the classifier rows of classes the gateway never saw get no
    # gradient at all; plain softmax pushes them away
    np.testing.assert_array_equal(state_to_numpy(trained[0.0])[head][absent], start[head][absent])
    assert not np.allclose(state_to_numpy(trained[1.0])[head][absent], start[head][absent])
    # so benign-only training leaves the attacks it never saw less sure to be benign
    p_benign = {s: softmax(predict_logits(m, attacks.ids).astype(np.float64))[:, 0].mean() for s, m in trained.items()}
    assert p_benign[1.0] > p_benign[0.0]
    # with every class present (the Malicious catch-all too) nothing is restricted: bit
    # for bit plain training
    extra = np.flatnonzero(ds.y != 0)[:1]
    every_class = FlowDataset(np.concatenate([ds.ids, ds.ids[extra]]),
                              np.concatenate([ds.y, [labels.index["Malicious"]]]),
                              np.concatenate([ds.weight, [1.0]]))
    assert set(every_class.y) == set(range(len(labels)))
    a, b = build_model(TINY, tok, labels, seed=3), build_model(TINY, tok, labels, seed=3)
    train_epochs(a, every_class, epochs=2, lr=1e-2, seed=3, batch_size=16)
    train_epochs(b, every_class, epochs=2, lr=1e-2, seed=3, batch_size=16, missing_class_scale=0.5)
    assert _distance(state_to_numpy(a), state_to_numpy(b)) == 0.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="missing_class_scale"):
            train_epochs(a, ds, epochs=1, lr=1e-2, seed=3, missing_class_scale=bad)


def test_label_smoothing_stops_rewarding_ever_larger_logits(setup):
    tok, labels, ds = setup
    spread = {}
    for ls in (0.0, 0.2):
        m = build_model(TINY, tok, labels, seed=4)
        train_epochs(m, ds, epochs=30, lr=1e-2, seed=4, batch_size=16, label_smoothing=ls)
        logits = predict_logits(m, ds.ids)
        assert ((logits.argmax(-1) == 0) == (ds.y == 0)).all()  # both still separate benign from attacks
        spread[ls] = float((logits.max(-1) - logits.min(-1)).mean())
    # a smoothed target is met at a finite logit gap: local training stops pushing
    assert spread[0.2] < spread[0.0]
    a, b = build_model(TINY, tok, labels, seed=4), build_model(TINY, tok, labels, seed=4)
    train_epochs(a, ds, epochs=2, lr=1e-2, seed=4, batch_size=16)
    train_epochs(b, ds, epochs=2, lr=1e-2, seed=4, batch_size=16, label_smoothing=0.0)
    assert _distance(state_to_numpy(a), state_to_numpy(b)) == 0.0  # 0 is plain cross-entropy
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            train_epochs(a, ds, epochs=1, lr=1e-2, seed=4, label_smoothing=bad)


def test_numpy_state_round_trip_and_mismatches(setup):
    tok, labels, ds = setup
    a = build_model(TINY, tok, labels, seed=1)
    b = build_model(TINY, tok, labels, seed=2)
    load_numpy_state(b, state_to_numpy(a))
    np.testing.assert_array_equal(predict_logits(a, ds.ids), predict_logits(b, ds.ids))
    arrays = state_to_numpy(a)
    with pytest.raises(ValueError, match="missing"):
        load_numpy_state(b, {k: v for k, v in list(arrays.items())[1:]})
    bad = dict(arrays)
    key = next(iter(bad))
    bad[key] = np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match="shape"):
        load_numpy_state(b, bad)
    bad[key] = np.full_like(arrays[key], np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        load_numpy_state(b, bad)


def test_presets_respect_the_size_ratio(setup):
    tok, labels, _ = setup
    teacher = parameter_count(build_model(PRESETS["teacher"], tok, labels, seed=0))
    student = parameter_count(build_model(PRESETS["student"], tok, labels, seed=0))
    assert student * 10 <= teacher
