"""The reference model: a scikit-learn RandomForest over the raw conn fields.

The source paper's figures are a floor (a RandomForest on the same fields reaches about
0.999 on a random split); ``evaluate`` prints this row beside the student's so that
"as good as a forest" is checked, not assumed.  Categorical fields are coded by the
order they were first seen in the training flows (unseen values get -1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gateway.flows.record import ConnRecord
from gateway.model.prompt import host_class

CATEGORICAL = ("proto", "service", "conn_state", "history")
NUMERIC = (
    "orig_p", "resp_p", "duration", "orig_bytes", "resp_bytes", "missed_bytes",
    "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes",
)


class ForestBaseline:
    """``fit(records, y)`` / ``predict_proba(records)`` over conn fields."""

    def __init__(self, *, n_estimators: int = 100, seed: int = 0, n_jobs: int = 1):
        from sklearn.ensemble import RandomForestClassifier

        self.codes: dict[str, dict[str | None, int]] = {}
        self.forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs)
        self.n_classes = 0

    def features(self, records: Sequence[ConnRecord], *, fit: bool = False) -> np.ndarray:
        cols = []
        for name in CATEGORICAL:
            values = [getattr(r, name) for r in records]
            if fit:
                table: dict = {}
                for v in values:
                    table.setdefault(v, len(table))
                self.codes[name] = table
            table = self.codes[name]
            cols.append([table.get(v, -1) for v in values])
        for name in NUMERIC:
            cols.append([-1.0 if (v := getattr(r, name)) is None else float(v) for r in records])
        hosts = {"-": 0, "bad": 1, "bcast": 2, "mcast": 3, "unspec": 4, "loop": 5, "ll": 6, "priv": 7, "pub": 8}
        cols.append([hosts[host_class(r.resp_h)] for r in records])
        cols.append([hosts[host_class(r.orig_h)] for r in records])
        return np.array(cols, dtype=np.float64).T.reshape(len(records), -1)

    def fit(self, records: Sequence[ConnRecord], y: np.ndarray, *, n_classes: int) -> ForestBaseline:
        self.n_classes = n_classes
        self.forest.fit(self.features(records, fit=True), y)
        return self

    def predict_proba(self, records: Sequence[ConnRecord]) -> np.ndarray:
        """``float[N, n_classes]`` (classes absent from training get probability 0)."""
        part = self.forest.predict_proba(self.features(records))
        out = np.zeros((len(records), self.n_classes))
        out[:, self.forest.classes_] = part
        return out
