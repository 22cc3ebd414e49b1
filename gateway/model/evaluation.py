"""Evaluation of model directories: paper split and leave-one-scenario-out.

``evaluate_paper`` scores each model directory on the test part of the paper split
(recomputed with the seed the model was trained with, so no test flow was seen in
training), as ONNX (float and int8 when present) and torch, plus a RandomForest
trained on the same train part; it also measures single-flow latency and batch
throughput of the ONNX session.  ``evaluate_scenarios`` trains a fresh student (the
model's preset, cross-entropy) and a forest on all scenarios but one and tests on the
one left out, for each scenario.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gateway.model.baseline import ForestBaseline
from gateway.model.data import encode, train_val_split
from gateway.model.labels import LabelSet
from gateway.model.metrics import (
    classification_report, choose_threshold, detailed_labels, latency_summary, malicious_score, softmax,
)
from gateway.model.modeldir import load_student, validate_model_dir
from gateway.model.pipeline import DEFAULT_SEED, PreparedData, prepare, train_model
from gateway.model.train import predict_logits

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("accuracy", "precision", "recall", "f1", "label_accuracy", "macro_f1")


def measure_latency(run: Callable[[np.ndarray], object], ids: np.ndarray, *, n: int = 300) -> dict[str, float]:
    """p50/p99 (ms) of ``run`` on single rows taken in turn from ``ids`` (after warm-up)."""
    for i in range(min(20, len(ids))):
        run(ids[i : i + 1])
    times = []
    for i in range(n):
        row = ids[i % len(ids)][None, :]
        t = time.perf_counter()
        run(row)
        times.append(time.perf_counter() - t)
    return latency_summary(times)


def measure_throughput(run: Callable[[np.ndarray], object], ids: np.ndarray, *, batch: int = 256, min_seconds: float = 1.0) -> float:
    """Flows per second of ``run`` on batches of ``batch`` rows (best of 3 timed passes)."""
    if len(ids) < batch:
        ids = np.resize(ids, (batch, ids.shape[1]))
    batches = [ids[i : i + batch] for i in range(0, len(ids) - batch + 1, batch)]
    run(batches[0])
    best = 0.0
    for _ in range(3):
        done, t = 0, time.perf_counter()
        while time.perf_counter() - t < min_seconds / 3:
            run(batches[done % len(batches)])
            done += 1
        best = max(best, done * batch / (time.perf_counter() - t))
    return best


def finite_or_none(value):
    """NaN (an undefined metric, e.g. F1 of a benign-only scenario) becomes None, so the
    JSON output stays valid JSON and tables print '-'."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _row(name: str, report: dict, **extra) -> dict:
    return {"model": name, **{k: report[k] for k in SUMMARY_KEYS}, **extra}


def _speed(run: Callable[[np.ndarray], object], ids: np.ndarray) -> dict:
    lat = measure_latency(run, ids)
    return {"p50_ms": round(lat["p50_ms"], 3), "p99_ms": round(lat["p99_ms"], 3),
            "flows_per_s": int(measure_throughput(run, ids))}


def _report_from_probs(probs: np.ndarray, y: np.ndarray, labels: LabelSet, threshold: float) -> dict:
    return classification_report(y, detailed_labels(probs, threshold), malicious_score(probs), labels.names,
                                 threshold=threshold)


def forest_report(prepared: PreparedData, train_idx, val_idx, test_idx, labels: LabelSet, *, seed: int) -> dict:
    recs = prepared.records
    y_train = labels.encode([prepared.names[i] for i in train_idx])
    forest = ForestBaseline(seed=seed).fit([recs[i] for i in train_idx], y_train, n_classes=len(labels))
    val_probs = forest.predict_proba([recs[i] for i in val_idx])
    y_val = labels.encode([prepared.names[i] for i in val_idx])
    threshold = choose_threshold(y_val != 0, malicious_score(val_probs)) if len(val_idx) else 0.5
    test_probs = forest.predict_proba([recs[i] for i in test_idx])
    y_test = labels.encode([prepared.names[i] for i in test_idx])
    return _report_from_probs(test_probs, y_test, labels, threshold)


def evaluate_paper(
    model_dirs: Sequence[str | Path],
    data: Sequence[str | Path],
    *,
    latency: bool = True,
    forest: bool = True,
    progress=None,
) -> dict:
    """Rows (one per model variant + the forest), and the first model's per-label
    metrics and confusion matrix, on the paper split's test part."""
    from gateway.inference import EngineOptions, LoadedModel

    first = validate_model_dir(model_dirs[0], need_onnx=True)
    seed = int(first.metadata.get("training", {}).get("split_seed", DEFAULT_SEED))
    prepared = prepare(data, seed=seed)
    train_idx, val_idx, test_idx = prepared.split
    test_records = [prepared.records[i] for i in test_idx]
    rows, detail, notes = [], None, []
    task = progress.add_task("evaluate", total=len(model_dirs) + int(forest)) if progress else None
    for model_dir in model_dirs:
        info = validate_model_dir(model_dir, need_onnx=True)
        name = info.version
        if info.metadata.get("data_digest") != prepared.digest:
            notes.append(f"{model_dir}: trained on other data than given (digest differs); test flows may have been seen")
        if int(info.metadata.get("training", {}).get("split_seed", DEFAULT_SEED)) != seed:
            notes.append(f"{model_dir}: trained with another split seed; its test part differs")
        ds = encode(test_records, info.tokenizer, info.labels)
        loaded = LoadedModel(model_dir, EngineOptions(provider="cpu", cache_size=0))
        onnx_logits = loaded.logits(ds.ids)
        report = _report_from_probs(softmax(onnx_logits.astype(np.float64)), ds.y, info.labels, info.threshold)
        speed = {}
        if latency:
            speed = _speed(loaded.logits, ds.ids)
        rows.append(_row(f"{name} (onnx)", report, **speed))
        if detail is None:
            detail = {"model": name, "per_label": report["per_label"], "confusion": report["confusion"], "labels": report["labels"]}
        torch_model, *_ = load_student(model_dir)
        torch_logits = predict_logits(torch_model, ds.ids)
        torch_report = _report_from_probs(softmax(torch_logits.astype(np.float64)), ds.y, info.labels, info.threshold)
        rows.append(_row(f"{name} (torch)", torch_report, max_logit_diff=float(np.abs(torch_logits - onnx_logits).max()) if len(ds) else 0.0))
        if info.onnx_path(int8=True).exists():
            q = LoadedModel(model_dir, EngineOptions(provider="cpu", precision="int8", cache_size=0))
            q_report = _report_from_probs(softmax(q.logits(ds.ids).astype(np.float64)), ds.y, info.labels, info.threshold)
            q_speed = {}
            if latency:
                q_speed = _speed(q.logits, ds.ids)
            rows.append(_row(f"{name} (onnx int8)", q_report, **q_speed))
        if progress:
            progress.advance(task)
    if forest:
        labels = validate_model_dir(model_dirs[0], need_onnx=True).labels
        rows.append(_row("random forest", forest_report(prepared, train_idx, val_idx, test_idx, labels, seed=seed)))
        if progress:
            progress.advance(task)
    return finite_or_none({
        "split": "paper",
        "seed": seed,
        "flows": {"train": len(train_idx), "validation": len(val_idx), "test": len(test_idx)},
        "rows": rows,
        "detail": detail,
        "notes": notes,
    })


def evaluate_scenarios(
    model_dir: str | Path,
    data: Sequence[str | Path],
    *,
    epochs: int | None = None,
    seed: int | None = None,
    progress=None,
) -> dict:
    """Leave one scenario out: for each, train a fresh student of ``model_dir``'s preset
    and a forest on the others (7:2 train/validation), test on the one left out."""
    from gateway.inference import EngineOptions, LoadedModel

    info = validate_model_dir(model_dir, need_onnx=False)
    preset = info.metadata.get("preset", "student")
    seed = int(info.metadata.get("training", {}).get("seed", DEFAULT_SEED)) if seed is None else seed
    prepared = prepare(data, seed=seed)
    scenarios = sorted(set(prepared.scenario_of.tolist()))
    # each fold is built the way the model was: its template, and a fine-tuned
    # checkpoint from the same checkpoint with the same rate and adapters
    training = info.metadata.get("training", {})
    rebuild = {"template": f"{info.metadata['template']['name']}/v{info.metadata['template']['version']}"}
    if info.metadata.get("base_model"):
        rebuild.update(base_model=info.metadata["base_model"], lr=training.get("lr"),
                       lora_rank=training.get("lora_rank"), warmup=training.get("warmup", 0.1))
    if len(scenarios) < 2:
        raise ValueError("the scenario split needs at least two data directories (scenarios)")
    rows = []
    task = progress.add_task("leave-one-scenario-out", total=len(scenarios)) if progress else None
    with tempfile.TemporaryDirectory(prefix="fedgate-loso-") as tmp:
        for held_out in scenarios:
            test_idx = np.flatnonzero(prepared.scenario_of == held_out)
            rest = np.flatnonzero(prepared.scenario_of != held_out)
            tr, va = train_val_split([prepared.names[i] for i in rest], seed=seed)
            train_idx, val_idx = rest[tr], rest[va]
            fold = train_model(
                prepared, Path(tmp) / held_out, preset=preset, epochs=epochs, seed=seed,
                train_index=train_idx, val_index=val_idx, **rebuild,
            )
            test_records = [prepared.records[i] for i in test_idx]
            ds = encode(test_records, fold.tokenizer, fold.labels)
            loaded = LoadedModel(fold.path, EngineOptions(provider="cpu", cache_size=0))
            rep = _report_from_probs(softmax(loaded.logits(ds.ids).astype(np.float64)), ds.y, fold.labels, fold.threshold)
            rf = forest_report(prepared, train_idx, val_idx, test_idx, fold.labels, seed=seed)
            rows.append({
                "held_out": held_out,
                "flows": len(test_idx),
                "malicious": int((ds.y != 0).sum()),
                **{f"student_{k}": rep[k] for k in ("accuracy", "f1", "macro_f1")},
                **{f"rf_{k}": rf[k] for k in ("accuracy", "f1", "macro_f1")},
            })
            if progress:
                progress.advance(task)
    return finite_or_none({"split": "scenario", "preset": preset, "seed": seed, "rows": rows})
