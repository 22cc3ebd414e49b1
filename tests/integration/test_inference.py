"""The ONNX Runtime engine: classification, batching, provider choice, hot swap under
concurrent load (no flow dropped, none classified twice), bad swaps refused."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from gateway.flows.zeek import iter_records
from gateway.inference import InferenceEngine, ProviderError, choose_providers, cuda_available, load_classifier
from gateway.model.labels import LabelSet, record_label
from gateway.model.metrics import softmax
from gateway.model.modeldir import ModelDirError, save_model_dir
from gateway.model.opt import Preset, build_model
from gateway.model.prompt import COMPACT
from gateway.model.tokenizer import FlowTokenizer

pytestmark = pytest.mark.integration

TINY = Preset(hidden=16, layers=1, heads=2, ffn=32, dropout=0.0, epochs=1, lr=1e-3, batch_size=8)


@pytest.fixture(scope="module")
def records(iot23_dir):
    recs = list(itertools.islice(iter_records(iot23_dir / "CTU-Malware-Capture-34-1" / "conn.log.labeled"), 0, 3000, 3))
    return recs


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, records):
    """Two model directories (different weights, same tokenizer) and one of another size."""
    root = tmp_path_factory.mktemp("engine")
    tok = FlowTokenizer.build(records, COMPACT)
    labels = LabelSet.from_labels(record_label(r) for r in records)
    dirs = []
    for seed in (1, 2):
        m = build_model(TINY, tok, labels, seed=seed)
        dirs.append(save_model_dir(m, tok, labels, root / f"m{seed}", version=f"v{seed}", parent=None).path)
    return dirs


def test_classify_matches_the_session_and_labels(model_dirs, records):
    engine = load_classifier(model_dirs[0], provider="cpu")
    assert engine.model_version == "v1"
    assert engine.providers == ["CPUExecutionProvider"]
    verdicts = engine.classify(records)
    assert len(verdicts) == len(records)
    probs = softmax(engine.model.logits(engine.model.tokenizer.encode(records)).astype(np.float64))
    names, threshold = engine.model.labels, engine.model.threshold
    for (label, score), p in zip(verdicts, probs):
        # the stored label follows the verdict: Benign below the threshold, else the best malicious label
        assert score == pytest.approx(1 - p[0], abs=1e-9)
        assert label == (names[int(p[1:].argmax()) + 1] if score >= threshold else "Benign")
        assert 0.0 <= score <= 1.0
    assert engine.classify([]) == []
    # the cache of distinct prompts gives the same answers as no cache
    uncached = InferenceEngine(model_dirs[0], provider="cpu", cache_size=0)
    again = uncached.classify(records)
    assert [v[0] for v in again] == [v[0] for v in verdicts]
    assert [v[1] for v in again] == pytest.approx([v[1] for v in verdicts], abs=1e-5)
    assert uncached.model._verdicts == {}


def test_submit_batches_requests(model_dirs, records):
    with InferenceEngine(model_dirs[0], provider="cpu", max_batch=64, max_wait_ms=20) as engine:
        direct = engine.classify(records[:200])
        futures = [engine.submit(records[i : i + 5]) for i in range(0, 200, 5)]
        got = []
        for f in futures:
            version, verdicts = f.result(timeout=30)
            assert version == "v1" and len(verdicts) == 5
            got.extend(verdicts)
        assert [g[0] for g in got] == [d[0] for d in direct]
        assert [g[1] for g in got] == pytest.approx([d[1] for d in direct], abs=1e-5)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(records[:1])


def test_hot_swap_under_load_drops_and_doubles_nothing(model_dirs, records):
    """Threads classify numbered flows (sync and async) while the model is swapped back
    and forth; every flow comes back exactly once with the verdict of the version that
    answered it."""
    expected = {}
    for d in model_dirs:
        e = InferenceEngine(d, provider="cpu")
        expected[e.model_version] = e.classify(records)
    engine = InferenceEngine(model_dirs[0], provider="cpu", max_batch=128, max_wait_ms=1)
    results: dict[int, tuple[str, tuple[str, float]]] = {}
    lock = threading.Lock()
    errors = []
    stop = threading.Event()
    n = len(records)

    def client(worker: int) -> None:
        try:
            for start in range(worker * 7, n, 4 * 7):
                idx = list(range(start, min(start + 7, n)))
                chunk = [records[i] for i in idx]
                if worker % 2:
                    version, verdicts = engine.submit(chunk).result(timeout=60)
                else:
                    version, verdicts = engine.classify_versioned(chunk)
                with lock:
                    for i, v in zip(idx, verdicts, strict=True):
                        assert i not in results, f"flow {i} classified twice"
                        results[i] = (version, v)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    def swapper() -> None:
        for k in itertools.count():
            if stop.is_set() and k >= 2:
                return
            engine.swap(model_dirs[(k + 1) % 2])

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    sw = threading.Thread(target=swapper)
    sw.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sw.join()
    engine.close()
    assert not errors, errors
    assert sorted(results) == list(range(n))  # nothing dropped
    assert engine.swaps >= 2
    versions = {v for v, _ in results.values()}
    assert versions <= {"v1", "v2"}
    for i, (version, (label, score)) in results.items():
        # ORT's sums may differ in the last bits with the batch's shape
        assert label == expected[version][i][0]
        assert score == pytest.approx(expected[version][i][1], abs=1e-5)


def test_bad_swap_keeps_the_current_model(model_dirs, records, tmp_path):
    engine = InferenceEngine(model_dirs[0], provider="cpu")
    before = engine.classify(records[:20])
    with pytest.raises(ModelDirError, match="model directory does not exist"):
        engine.swap(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in model_dirs[1].iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "model.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelDirError, match=r"model\.onnx"):
        engine.swap(broken)
    assert engine.model_version == "v1"
    assert engine.classify(records[:20]) == before


def test_provider_choice():
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="unknown provider"):
        choose_providers("tpu")
    if cuda_available():
        assert choose_providers("auto")[0] == "CUDAExecutionProvider"
    else:
        assert choose_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(ProviderError, match="CUDA"):
            choose_providers("cuda")


def test_engine_options_are_validated(model_dirs):
    with pytest.raises(ValueError, match="max_batch"):
        InferenceEngine(model_dirs[0], max_batch=0)
    with pytest.raises(ValueError, match="threads"):
        InferenceEngine(model_dirs[0], threads=0)
