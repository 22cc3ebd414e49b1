"""Stratified, seeded splits of labelled flows. PURE (numpy).

Used by the gateway (train / validation split of its local flows) and by the experiment
harness (the test part of every scenario that no training ever sees). Each class is
shuffled with the seed and cut in the given proportions, so every part keeps the class
mix; a class with at least as many members as parts gets at least one member in every
part with a non-zero fraction (rare IoT-23 labels such as FileDownload have 3 flows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(labels: Sequence, fractions: Sequence[float], *, seed: int) -> list[np.ndarray]:
    """Split indices ``0..len(labels)-1`` into ``len(fractions)`` parts by class.

    ``fractions`` must be non-negative and sum to 1 (within 1e-9). Returns sorted int64
    index arrays, one per fraction; together they are a partition of the indices.
    The same labels, fractions and seed always give the same split.
    """
    fr = np.asarray(list(fractions), dtype=np.float64)
    if fr.ndim != 1 or fr.size < 1:
        raise ValueError("fractions must be a non-empty sequence")
    if not np.all(np.isfinite(fr)) or np.any(fr < 0) or abs(fr.sum() - 1.0) > 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fr)}")
    labels = np.asarray(list(labels), dtype=object)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    # sorted by str: a stable class order whatever the label type
    for cls in sorted(set(labels.tolist()), key=str):
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(members.size)]
        counts = _allocate(members.size, fr)
        start = 0
        for p, c in enumerate(counts):
            parts[p].append(members[start:start + c])
            start += c
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def _allocate(n: int, fr: np.ndarray) -> list[int]:
    """Split n items by fractions (largest remainders), giving every part with a
    non-zero fraction at least one item when there are enough items; the first
    part (training, by convention) absorbs the rounding."""
    raw = fr * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    nonzero = np.flatnonzero(fr > 0)
    if n >= nonzero.size:
        for i in nonzero:
            if counts[i] == 0:
                donor = int(np.argmax(counts))
                counts[donor] -= 1
                counts[i] += 1
    return counts.tolist()
