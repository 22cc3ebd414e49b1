"""Labelled flows as training data: loading, encoding, deduplication, splits, digests.

``FlowDataset`` holds what a model sees: token ids ``int64[N, L]``, class ids
``int64[N]`` and per-row weights ``float32[N]``.  IoT-23 is extremely repetitive (43k
flows are fewer than 1,000 distinct prompts), so :meth:`FlowDataset.dedupe` merges
identical (prompt, class) rows into one row whose weight is the number of flows it
stands for; training on the deduplicated set is the same objective at a fraction of
the cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.fl.split import stratified_split
from gateway.flows.record import ConnRecord
from gateway.model.labels import LabelSet, record_label
from gateway.model.tokenizer import FlowTokenizer

LOG_PATTERNS = ("conn.log.labeled", "conn.log.labeled.gz", "*.conn.log.labeled")
PAPER_FRACTIONS = (0.7, 0.2, 0.1)  # train, validation, test (the source paper's split)


class DataError(ValueError):
    """Training data could not be found or holds no labelled flows."""


@dataclass
class Scenario:
    """The labelled flows of one log file; ``name`` is its directory's name."""

    name: str
    path: Path
    records: list[ConnRecord]


def find_logs(paths: Sequence[str | Path]) -> list[Path]:
    """Every labelled conn log under ``paths`` (files are taken as they are), sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            hits = sorted({h for pat in LOG_PATTERNS for h in p.rglob(pat)})
            if not hits:
                raise DataError(f"{p}: no conn.log.labeled file under this directory")
            found.extend(hits)
        else:
            raise DataError(f"{p}: no such file or directory")
    return sorted(set(found))


def load_scenarios(paths: Sequence[str | Path]) -> list[Scenario]:
    """Read every labelled log under ``paths``; unlabelled records are dropped."""
    from gateway.flows.zeek import iter_records  # the project's one Zeek parser

    scenarios = []
    for log in find_logs(paths):
        records = [r for r in iter_records(log) if r.label is not None]
        if records:
            scenarios.append(Scenario(name=log.parent.name, path=log, records=records))
    if not scenarios:
        raise DataError(f"no labelled flows in {', '.join(map(str, paths))}")
    return scenarios


def data_digest(paths: Iterable[Path]) -> str:
    """sha256 over the logs' names and bytes: which data a model was trained on."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: (p.parent.name, p.name)):
        h.update(f"{p.parent.name}/{p.name}\0".encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class FlowDataset:
    """Encoded flows: ``ids`` int64[N, L], ``y`` int64[N], ``weight`` float32[N]."""

    ids: np.ndarray
    y: np.ndarray
    weight: np.ndarray

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        self.y = np.asarray(self.y, dtype=np.int64)
        self.weight = np.asarray(self.weight, dtype=np.float32)
        if self.ids.ndim != 2 or len(self.y) != len(self.ids) or len(self.weight) != len(self.ids):
            raise ValueError(f"inconsistent dataset shapes {self.ids.shape}, {self.y.shape}, {self.weight.shape}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def flows(self) -> float:
        """How many flows the rows stand for."""
        return float(self.weight.sum())

    def subset(self, index: np.ndarray) -> FlowDataset:
        return FlowDataset(self.ids[index], self.y[index], self.weight[index])

    def dedupe(self) -> FlowDataset:
        """Merge identical (ids, y) rows; a merged row's weight is the sum of its rows'."""
        if len(self) == 0:
            return self
        rows = np.concatenate([self.ids, self.y[:, None]], axis=1)
        uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        weight = np.bincount(inverse.ravel(), weights=self.weight, minlength=len(uniq))
        return FlowDataset(uniq[:, :-1], uniq[:, -1], weight.astype(np.float32))

    @staticmethod
    def concat(parts: Sequence[FlowDataset]) -> FlowDataset:
        return FlowDataset(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.weight for p in parts]),
        )


def encode(records: Sequence[ConnRecord], tokenizer: FlowTokenizer, labels: LabelSet) -> FlowDataset:
    """Encode labelled records (unit weights); a label the set lacks becomes Malicious."""
    names = [record_label(r) for r in records]
    if any(n is None for n in names):
        raise DataError("encode() needs labelled records; filter with r.label is not None")
    return FlowDataset(tokenizer.encode(records), labels.encode(names), np.ones(len(records), np.float32))


def paper_split(labels: Sequence[str], *, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 70/20/10 (train, validation, test) index split over pooled flows."""
    train, val, test = stratified_split(labels, PAPER_FRACTIONS, seed=seed)
    return train, val, test


def train_val_split(labels: Sequence[str], *, seed: int, val_fraction: float = 2 / 9) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/validation split (default 7:2, the paper's proportions)."""
    train, val = stratified_split(labels, (1 - val_fraction, val_fraction), seed=seed)
    return train, val
