"""Local labelled data: log labels, analyst feedback overriding them, unlabelled flows skipped."""

from __future__ import annotations

from gateway.fl.localdata import feedback_class, merge_labels
from gateway.flows.record import ConnRecord


def rec(uid, ts=1.0, label=None, detailed=None):
    return ConnRecord(ts=ts, uid=uid, orig_h="10.0.0.1", orig_p=1, resp_h="10.0.0.2", resp_p=80,
                      proto="tcp", label=label, detailed_label=detailed)


def test_feedback_class():
    assert feedback_class(" BENIGN ") == "Benign"
    assert feedback_class("malicious") == "Malicious"
    assert feedback_class("C&C") == "C&C"


def test_merge_log_labels_and_feedback():
    a = rec("a", label="Malicious", detailed="C&C")
    b = rec("b", label="benign")
    c = rec("c")  # unlabelled, no feedback: not training data
    d = rec("d")  # unlabelled, analyst said benign
    e = rec("e", ts=5.0, label="Malicious", detailed="DDoS")  # false positive per analyst
    records, labels = merge_labels([a, b, c, d, e], [(d, "benign"), (e, "Benign")])
    assert [r.uid for r in records] == ["a", "b", "d", "e"]
    assert labels == ["C&C", "Benign", "Benign", "Benign"]


def test_feedback_on_flows_outside_the_loaded_records_is_added_once():
    x = rec("x")
    records, labels = merge_labels([], [(x, "DDoS"), (x, "DDoS")])
    assert [r.uid for r in records] == ["x"] and labels == ["DDoS"]
