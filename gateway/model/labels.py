"""The class labels: IoT-23 detailed labels, with Benign and a catch-all Malicious.

A model's label list always starts ``("Benign", "Malicious", ...)``: ``Malicious`` is the
class of malicious flows whose detailed label is missing or was never seen in training
(IoT-23 has more labels than any one data set shows), so a new label at training or
federated time is learnt as "malicious, kind unknown" instead of crashing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from gateway.flows.record import ConnRecord

BENIGN = "Benign"
MALICIOUS = "Malicious"
BASE_LABELS: tuple[str, str] = (BENIGN, MALICIOUS)


def record_label(record: ConnRecord) -> str | None:
    """The detailed class of a labelled record (``None`` if the record has no label)."""
    if record.label is None:
        return None
    if record.label.strip().lower() == "benign":
        return BENIGN
    detailed = (record.detailed_label or "").strip()
    return detailed if detailed and detailed != "-" else MALICIOUS


class LabelSet:
    """An ordered list of class names; index 0 is Benign, index 1 the Malicious catch-all."""

    def __init__(self, names: Sequence[str]):
        names = tuple(names)
        if names[:2] != BASE_LABELS:
            raise ValueError(f"labels must start with {BASE_LABELS}, got {names[:2]}")
        if len(set(names)) != len(names):
            raise ValueError("labels must be unique")
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}

    @classmethod
    def from_labels(cls, labels: Iterable[str | None]) -> LabelSet:
        seen = sorted({lab for lab in labels if lab is not None} - set(BASE_LABELS))
        return cls((*BASE_LABELS, *seen))

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and other.names == self.names

    def __repr__(self) -> str:
        return f"LabelSet({list(self.names)!r})"

    def encode(self, labels: Sequence[str | None]) -> np.ndarray:
        """Class ids; unknown malicious labels map to Malicious; ``None`` raises."""
        out = np.empty(len(labels), dtype=np.int64)
        idx, mal = self.index, self.index[MALICIOUS]
        for i, lab in enumerate(labels):
            if lab is None:
                raise ValueError("cannot encode an unlabelled flow")
            out[i] = idx.get(lab, mal)
        return out

    def is_malicious(self, class_ids: np.ndarray) -> np.ndarray:
        return np.asarray(class_ids) != 0
