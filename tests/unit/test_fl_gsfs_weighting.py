"""GSFS server weights with the sample_weighted option the experiment uses (hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_aggregator.strategies.base import UpdateView
from cloud_aggregator.strategies.gsfs import GSFS


def view(sender, submissions, samples, base=3):
    return UpdateView(sender=sender, delta={}, num_samples=samples, base_version=base, submissions=submissions)


def test_default_is_pure_submission_frequency():
    w = GSFS().client_weights([view("a", 1, 300), view("b", 3, 100)], version=3)
    assert w == pytest.approx([0.25, 0.75])


def test_sample_weighted_multiplies_by_sample_count():
    # s = [1, 2], n = [300, 100] -> [300, 200] / 500
    w = GSFS(sample_weighted=True).client_weights([view("a", 1, 300), view("b", 2, 100)], version=3)
    assert w == pytest.approx([0.6, 0.4])


def test_sample_weighted_with_staleness_discount():
    # staleness [0, 3], a = 0.5 -> discount [1, 0.5]; s*n = [100, 100] -> [100, 50] / 150
    g = GSFS(sample_weighted=True, staleness_exponent=0.5)
    w = g.client_weights([view("a", 1, 100, base=5), view("b", 1, 100, base=2)], version=5)
    assert np.allclose(w, [2 / 3, 1 / 3])
