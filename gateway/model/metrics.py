"""Classification metrics and threshold choice. PURE numpy: arrays in, numbers out."""

from __future__ import annotations

from collections.abc import Sequence

import math

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def malicious_score(probs: np.ndarray) -> np.ndarray:
    """P(not Benign): class 0 is Benign in every fedgate label set."""
    return 1.0 - probs[:, 0]


def detailed_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    """The detailed label of each row that agrees with its verdict: the most probable
    malicious label where the malicious score reaches ``threshold``, else Benign (0).

    A plain argmax can say Benign for a flow the threshold calls malicious (P(Benign)
    0.45, the rest spread over C&C and DDoS), or the reverse under a threshold above
    0.5; an analyst would then read an alert labelled Benign."""
    probs = np.asarray(probs)
    best_malicious = probs[:, 1:].argmax(axis=-1) + 1
    return np.where(malicious_score(probs) >= threshold, best_malicious, 0)


def _weights(n: int, weight: np.ndarray | None) -> np.ndarray:
    return np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64)


def binary_metrics(truth: np.ndarray, pred: np.ndarray, weight: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of malicious (True) vs benign (False).

    Precision (recall) is NaN when nothing is predicted (is truly) malicious; F1 is NaN
    only when both are empty (a benign-only set classified without false alarms)."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    w = _weights(len(truth), weight)
    tp = float(w[truth & pred].sum())
    fp = float(w[~truth & pred].sum())
    fn = float(w[truth & ~pred].sum())
    total = float(w.sum())
    correct = float(w[truth == pred].sum())
    # undefined (no predicted / no true malicious flows) is NaN, not a misleading 0
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return {
        "accuracy": correct / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int, weight: np.ndarray | None = None) -> np.ndarray:
    """``m[i, j]`` = (weighted) number of flows of class i predicted as j."""
    m = np.zeros((n_classes, n_classes), dtype=np.float64)
    np.add.at(m, (np.asarray(truth, np.int64), np.asarray(pred, np.int64)), _weights(len(truth), weight))
    return m


def per_class_metrics(confusion: np.ndarray, names: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support of every class present in truth or predictions."""
    rows = []
    for i, name in enumerate(names):
        tp = confusion[i, i]
        support = confusion[i].sum()
        predicted = confusion[:, i].sum()
        if support == 0 and predicted == 0:
            continue
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"label": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    return rows


def classification_report(
    truth: np.ndarray,
    pred: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    *,
    threshold: float = 0.5,
    weight: np.ndarray | None = None,
) -> dict:
    """Everything evaluate prints: binary metrics (verdict = score >= threshold),
    detailed-label accuracy, per-label metrics, macro F1 and the confusion matrix."""
    truth = np.asarray(truth, np.int64)
    pred = np.asarray(pred, np.int64)
    cm = confusion_matrix(truth, pred, len(names), weight)
    per_class = per_class_metrics(cm, names)
    binary = binary_metrics(truth != 0, np.asarray(scores) >= threshold, weight)
    total = cm.sum()
    return {
        **binary,
        "label_accuracy": float(np.trace(cm) / total) if total else 0.0,
        "macro_f1": float(np.mean([r["f1"] for r in per_class])) if per_class else 0.0,
        "per_label": per_class,
        "confusion": cm.tolist(),
        "labels": list(names),
        "threshold": threshold,
        "flows": float(total),
    }


def choose_threshold(truth: np.ndarray, scores: np.ndarray, weight: np.ndarray | None = None) -> float:
    """The alert threshold with the best binary F1 on (validation) data.

    Candidates are midpoints between consecutive distinct scores (plus 0.5); ties go to
    the candidate nearest 0.5, so a perfectly separated set keeps the natural 0.5-ish cut.
    """
    truth = np.asarray(truth, bool)
    scores = np.asarray(scores, np.float64)
    if truth.all() or not truth.any():
        return 0.5
    uniq = np.unique(scores)
    # cuts between distinct scores, 0.5, and the lowest score (everything malicious)
    mid = (uniq[:-1] + uniq[1:]) / 2
    # two adjacent subnormal scores have no float between them: cut at the upper one
    mid = np.where(mid > uniq[:-1], mid, uniq[1:])
    candidates = np.unique(np.concatenate([[0.5, uniq[0]], mid]))
    w = _weights(len(truth), weight)
    order = np.argsort(scores)
    s_sorted, t_sorted, w_sorted = scores[order], truth[order], w[order]
    # flows at or above a cut are called malicious: suffix sums give tp/fp per cut
    pos_suffix = np.concatenate([np.cumsum((w_sorted * t_sorted)[::-1])[::-1], [0.0]])
    neg_suffix = np.concatenate([np.cumsum((w_sorted * ~t_sorted)[::-1])[::-1], [0.0]])
    first = np.searchsorted(s_sorted, candidates, side="left")
    tp, fp = pos_suffix[first], neg_suffix[first]
    fn = pos_suffix[0] - tp
    f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    best = f1.max()
    tied = candidates[np.isclose(f1, best, rtol=0, atol=1e-12)]
    return float(tied[np.argmin(np.abs(tied - 0.5))])


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


# a probability below this counts as this (log 1e-6 = -13.8): one hopeless flow cannot
# outweigh thousands of good ones, and the result stays finite
LIKELIHOOD_FLOOR = 1e-6


def binary_likelihood(probs: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> float:
    """exp(weighted mean log p_i): the geometric mean of the probability given to each
    row's true side, p_i = P(Benign) for benign rows (class 0), 1 - P(Benign) for the
    others; rows weighted by the flows they stand for. In (0, 1]; 1 = certain and right.

    PURE. The GSFS trigger's smooth alternative to F1 (see :mod:`gateway.fl.trigger`):
    it moves with the decision margin, not only when a flow crosses it.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    if probs.ndim != 2 or len(probs) != len(y) or len(y) == 0:
        raise ValueError("need one row of class probabilities per label")
    w = np.ones(len(y)) if weight is None else np.asarray(weight, dtype=np.float64)
    if w.shape != y.shape or (w < 0).any() or not w.sum() > 0:
        raise ValueError("weights must be non-negative, one per row, not all zero")
    benign = np.clip(probs[:, 0], 0.0, 1.0)
    p_true = np.where(y == 0, benign, 1.0 - benign)
    logp = np.log(np.clip(p_true, LIKELIHOOD_FLOOR, 1.0))
    return float(math.exp(float(np.dot(w, logp) / w.sum())))
