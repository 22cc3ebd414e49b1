"""Stratified seeded split: partition, proportions per class, rare classes, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.fl.split import stratified_split


def test_proportions_per_class_and_partition():
    labels = ["Benign"] * 100 + ["C&C"] * 50 + ["DDoS"] * 10
    train, val, test = stratified_split(labels, [0.7, 0.2, 0.1], seed=1)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(160))
    count = lambda idx: Counter(labels[i] for i in idx)  # noqa: E731
    assert count(train) == {"Benign": 70, "C&C": 35, "DDoS": 7}
    assert count(val) == {"Benign": 20, "C&C": 10, "DDoS": 2}
    assert count(test) == {"Benign": 10, "C&C": 5, "DDoS": 1}


def test_rare_class_reaches_every_part():
    labels = ["Benign"] * 30 + ["FileDownload"] * 3
    parts = stratified_split(labels, [0.8, 0.1, 0.1], seed=0)
    for p in parts:
        assert any(labels[i] == "FileDownload" for i in p)


def test_single_member_class_goes_to_one_part():
    parts = stratified_split(["a", "b", "b", "b"], [0.5, 0.5], seed=3)
    assert sum("a" == ["a", "b", "b", "b"][i] for p in parts for i in p) == 1


def test_same_seed_same_split_other_seed_other_split():
    labels = [i % 3 for i in range(300)]
    a = stratified_split(labels, [0.8, 0.2], seed=7)
    b = stratified_split(labels, [0.8, 0.2], seed=7)
    c = stratified_split(labels, [0.8, 0.2], seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("fr", [[0.5, 0.6], [1.2, -0.2], [], [float("nan"), 1.0]])
def test_bad_fractions(fr):
    with pytest.raises(ValueError):
        stratified_split([1, 2, 3], fr, seed=0)


def test_empty_labels():
    parts = stratified_split([], [0.9, 0.1], seed=0)
    assert [p.size for p in parts] == [0, 0]


@settings(max_examples=80, deadline=None)
@given(
    labels=st.lists(st.sampled_from(["B", "M", "x", "y"]), max_size=200),
    cut=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_always_a_partition_with_classes_kept(labels, cut, seed):
    parts = stratified_split(labels, [1 - cut, cut], seed=seed)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(labels)))
    for cls, n in Counter(labels).items():
        got = sum(labels[i] == cls for i in parts[1])
        assert abs(got - n * cut) <= 1.0 + (1 if n >= 2 else 0)
