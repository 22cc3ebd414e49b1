"""Pure parts of the flow model: labels, datasets, metrics, weights, training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from gateway.flows.record import ConnRecord
from gateway.model.data import FlowDataset, encode, paper_split
from gateway.model.labels import BENIGN, MALICIOUS, LabelSet, record_label
from gateway.model.metrics import (
    binary_metrics, choose_threshold, classification_report, confusion_matrix, detailed_labels, malicious_score, softmax,
)
from gateway.model.train import layer_of, row_weights


def rec(label, detailed=None, **kw):
    base = dict(ts=1.0, uid="C", orig_h="10.0.0.2", orig_p=4000, resp_h="1.2.3.4", resp_p=80, proto="tcp",
                conn_state="S0", history="S", label=label, detailed_label=detailed)
    base.update(kw)
    return ConnRecord(**base)


def test_record_labels_and_label_set():
    assert record_label(rec("benign")) == BENIGN
    assert record_label(rec("Benign", "-")) == BENIGN
    assert record_label(rec("Malicious", "DDoS")) == "DDoS"
    assert record_label(rec("Malicious", "-")) == MALICIOUS
    assert record_label(rec("Malicious", None)) == MALICIOUS
    assert record_label(rec(None)) is None
    labels = LabelSet.from_labels(["DDoS", BENIGN, "C&C", None, MALICIOUS])
    assert labels.names == (BENIGN, MALICIOUS, "C&C", "DDoS")
    # a label never seen in training is learnt as the Malicious catch-all
    np.testing.assert_array_equal(labels.encode(["C&C", "Okiru", BENIGN]), [2, 1, 0])
    with pytest.raises(ValueError, match="unlabelled"):
        labels.encode([None])
    with pytest.raises(ValueError, match="start with"):
        LabelSet(["DDoS", BENIGN])
    with pytest.raises(ValueError, match="unique"):
        LabelSet([BENIGN, MALICIOUS, "x", "x"])


def test_dedupe_sums_weights_and_keeps_classes_apart():
    ids = np.array([[1, 2], [1, 2], [3, 4], [1, 2]])
    ds = FlowDataset(ids, np.array([0, 0, 1, 1]), np.ones(4))
    d = ds.dedupe()
    rows = {(tuple(i), int(y)): float(w) for i, y, w in zip(d.ids, d.y, d.weight)}
    assert rows == {((1, 2), 0): 2.0, ((3, 4), 1): 1.0, ((1, 2), 1): 1.0}
    assert d.flows == ds.flows == 4
    with pytest.raises(ValueError, match="inconsistent"):
        FlowDataset(ids, np.array([0]), np.ones(4))


def test_row_weights_give_each_class_its_mass():
    ds = FlowDataset(np.zeros((4, 2)), np.array([0, 0, 1, 2]), np.array([100.0, 300.0, 1.0, 16.0]))
    w = row_weights(ds, weight_power=1.0, class_power=1.0)
    np.testing.assert_allclose(w, ds.weight)  # plain empirical risk
    w = row_weights(ds, weight_power=0.5, class_power=0.5)
    np.testing.assert_allclose([w[0] + w[1], w[2], w[3]], [20.0, 1.0, 4.0])
    assert w[1] / w[0] == pytest.approx(math.sqrt(3))


def test_binary_metrics_and_confusion():
    truth = np.array([1, 1, 0, 0, 1], bool)
    pred = np.array([1, 0, 0, 1, 1], bool)
    m = binary_metrics(truth, pred)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    benign_only = binary_metrics(np.zeros(3, bool), np.zeros(3, bool))
    assert benign_only["accuracy"] == 1.0 and math.isnan(benign_only["f1"])
    cm = confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), 3, weight=np.array([1, 1, 2, 3]))
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 1], [0, 0, 5]])


def test_classification_report_macro_over_present_classes():
    names = [BENIGN, MALICIOUS, "C&C", "DDoS"]
    truth = np.array([0, 0, 2, 2, 3])
    pred = np.array([0, 2, 2, 2, 3])
    scores = np.array([0.1, 0.9, 0.95, 0.8, 0.99])
    r = classification_report(truth, pred, scores, names, threshold=0.5)
    assert [row["label"] for row in r["per_label"]] == [BENIGN, "C&C", "DDoS"]  # Malicious absent
    assert r["label_accuracy"] == pytest.approx(0.8)
    assert r["macro_f1"] == pytest.approx(np.mean([2 / 3, 0.8, 1.0]))
    assert r["accuracy"] == pytest.approx(0.8)


def test_threshold_choice():
    truth = np.array([0, 0, 0, 1, 1])
    assert choose_threshold(truth, np.array([0.1, 0.2, 0.3, 0.7, 0.9])) == 0.5  # separable: keep 0.5
    t = choose_threshold(truth, np.array([0.01, 0.02, 0.03, 0.05, 0.06]))  # low scores still separate
    assert 0.03 < t <= 0.05
    assert choose_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3])) == 0.5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=1, max_size=60))
@example([(False, 0.0), (True, 5e-324)])  # no float between the two scores (found by hypothesis)
def test_threshold_is_as_good_as_any_cut(pairs):
    truth = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs])
    assume(truth.any() and not truth.all())  # one class only: nothing to choose, 0.5 is kept
    t = choose_threshold(truth, scores)
    best = binary_metrics(truth, scores >= t)["f1"]
    for cut in np.unique(scores):
        f1 = binary_metrics(truth, scores >= cut)["f1"]
        if not math.isnan(f1) and not math.isnan(best):
            assert best >= f1 - 1e-12


def test_detailed_label_agrees_with_the_verdict():
    # Benign 0.45 is the argmax, but the malicious score 0.55 passes 0.5: the label is the
    # best malicious one (C&C), not Benign; under a 0.6 threshold the same flow is Benign
    probs = np.array([[0.45, 0.05, 0.30, 0.20], [0.90, 0.02, 0.05, 0.03], [0.10, 0.10, 0.20, 0.60]])
    np.testing.assert_array_equal(probs.argmax(-1), [0, 0, 3])
    np.testing.assert_array_equal(detailed_labels(probs, 0.5), [2, 0, 3])
    np.testing.assert_array_equal(detailed_labels(probs, 0.6), [0, 0, 3])
    np.testing.assert_array_equal(detailed_labels(probs, 0.95), [0, 0, 0])


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.lists(st.floats(-30, 30), min_size=3, max_size=3), min_size=1, max_size=20),
       threshold=st.floats(0.0, 1.0))
def test_detailed_label_is_malicious_exactly_when_the_score_passes(logits, threshold):
    probs = softmax(np.array(logits))
    labels = detailed_labels(probs, threshold)
    malicious = malicious_score(probs) >= threshold
    np.testing.assert_array_equal(labels != 0, malicious)
    np.testing.assert_array_equal(labels[malicious], probs[malicious, 1:].argmax(-1) + 1)
    agree = (probs.argmax(-1) != 0) == malicious  # where argmax and verdict agree, nothing changes
    np.testing.assert_array_equal(labels[agree], probs[agree].argmax(-1))


def test_paper_split_is_stratified_and_reproducible():
    names = ["Benign"] * 70 + ["DDoS"] * 27 + ["FileDownload"] * 3
    a = paper_split(names, seed=5)
    b = paper_split(names, seed=5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    assert [len(p) for p in a] == pytest.approx([70, 20, 10], abs=1)
    fd = {i for i, n in enumerate(names) if n == "FileDownload"}
    assert all(len(fd & set(p.tolist())) == 1 for p in a)


def test_layer_names():
    assert layer_of("model.decoder.layers.1.fc1.weight") == "layers.1"
    assert layer_of("model.decoder.embed_tokens.weight") == "embeddings"
    assert layer_of("model.decoder.embed_positions.weight") == "embeddings"
    assert layer_of("model.decoder.final_layer_norm.bias") == "final_layer_norm"
    assert layer_of("score.weight") == "score"


def test_encode_refuses_unlabelled():
    from gateway.model.data import DataError
    from gateway.model.prompt import COMPACT
    from gateway.model.tokenizer import FlowTokenizer

    recs = [rec("benign"), rec("Malicious", "DDoS", resp_p=23)]
    tok = FlowTokenizer.build(recs, COMPACT)
    labels = LabelSet.from_labels(record_label(r) for r in recs)
    ds = encode(recs, tok, labels)
    assert ds.y.tolist() == [0, 2] and ds.ids.shape == (2, COMPACT.length)
    with pytest.raises(DataError, match="labelled"):
        encode([rec(None)], tok, labels)
