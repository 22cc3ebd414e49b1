"""The inference engine: ONNX Runtime sessions over model directories.

``load_classifier(model_dir)`` gives what ``fedgate replay`` and the gateway need (a
``FlowClassifier``: ``model_version`` and ``classify(records)``).  The engine

* validates the whole model directory before anything is classified
  (:func:`gateway.model.modeldir.validate_model_dir`);
* picks the CUDA execution provider only when a session really runs on it, else the
  CPU one (``provider=`` overrides);
* classifies each distinct prompt once: flows repeat, so a batch is reduced to its
  distinct token rows and verdicts are cached per model (the cache dies with the model,
  so a swap can never serve an old model's verdict);
* batches asynchronous requests (``submit``) in a background thread, up to
  ``max_batch`` flows or ``max_wait_ms`` after the first request;
* swaps in a new model directory while running (``swap``): the new model is loaded and
  validated aside, then one reference is replaced.  Every batch reads that reference
  once, so each flow is classified exactly once, by exactly one model version, and
  :meth:`InferenceEngine.classify_versioned` says which.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.flows.record import ConnRecord
from gateway.model.modeldir import ModelDirError, ModelInfo, validate_model_dir
from gateway.model.metrics import detailed_labels, malicious_score, softmax

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda")
Verdict = tuple[str, float]


class ProviderError(RuntimeError):
    """The requested execution provider cannot run here."""


_cuda_ok: bool | None = None


def cuda_available() -> bool:
    """True only if ONNX Runtime can really run a session on CUDA (probed once)."""
    global _cuda_ok
    if _cuda_ok is None:
        _cuda_ok = _probe_cuda()
    return _cuda_ok


def _probe_cuda() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        from onnx import TensorProto, helper

        node = helper.make_node("Identity", ["x"], ["y"])
        graph = helper.make_graph(
            [node], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        so = ort.SessionOptions()
        so.log_severity_level = 4  # the failed CUDA load is expected on CPU boxes
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return sess.get_providers()[0] == "CUDAExecutionProvider"
    except Exception as exc:  # any load failure means: no usable CUDA
        log.debug("CUDA provider probe failed: %s", exc)
        return False


def choose_providers(provider: str = "auto") -> list[str]:
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if not cuda_available():
            raise ProviderError("the CUDA execution provider does not load on this machine (no GPU or CUDA libraries)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_available() else ["CPUExecutionProvider"]


@dataclass(frozen=True)
class EngineOptions:
    provider: str = "auto"
    int8: bool = False
    # ORT intra-op threads.  1 by default: for this tiny model one thread gives the best
    # single-flow latency on a small shared CPU (p99 1.6 ms vs 4.2 ms with 2 threads
    # under load, benchmarks/inference.py) and leaves a core to parsing and storing.
    # None: ORT's default, one per core.
    threads: int | None = 1
    cache_size: int = 100_000  # distinct prompts whose verdicts are kept per model

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.cache_size < 0:
            raise ValueError("cache_size must be >= 0")


class LoadedModel:
    """One model directory in an ONNX Runtime session, with its tokenizer and labels."""

    def __init__(self, model_dir: str | Path, options: EngineOptions = EngineOptions()):
        import onnxruntime as ort

        self.info: ModelInfo = validate_model_dir(model_dir, need_onnx=True, int8=options.int8)
        self.options = options
        self.version = self.info.version
        self.tokenizer = self.info.tokenizer
        self.labels = self.info.labels.names
        self.threshold = self.info.threshold
        path = self.info.onnx_path(int8=options.int8)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if options.threads is not None:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), so, providers=choose_providers(options.provider))
        except ProviderError:
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ModelDirError(path, f"ONNX Runtime cannot load it ({exc})") from None
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._verdicts: dict[tuple[int, ...], Verdict] = {}
        # check the graph against the tokenizer once, before any flow
        probe = np.full((1, self.tokenizer.length), self.tokenizer.unk_id, dtype=np.int64)
        try:
            out = self.logits(probe)
        except Exception as exc:
            raise ModelDirError(path, f"does not run on a {probe.shape} prompt ({exc})") from None
        if out.shape != (1, len(self.labels)):
            raise ModelDirError(path, f"logits shape {out.shape} != (1, {len(self.labels)})")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones_like(ids)
        return self.session.run(["logits"], feeds)[0]

    def verdicts_for_ids(self, ids: np.ndarray, *, max_batch: int = 256) -> list[Verdict]:
        """Verdicts for id rows; distinct rows are run once and cached.

        Safe under concurrent calls: answers are gathered in a local dict, so another
        call clearing the shared cache cannot lose them.
        """
        return self.verdicts_for_rows([tuple(r) for r in ids.tolist()], max_batch=max_batch)

    def verdicts_for_rows(self, rows: list[tuple[int, ...]], *, max_batch: int = 256) -> list[Verdict]:
        """:meth:`verdicts_for_ids` for rows already as tuples (the tokenizer's own)."""
        cache = self._verdicts
        local: dict[tuple[int, ...], Verdict] = {}
        missing: list[tuple[int, ...]] = []
        for key in dict.fromkeys(rows):
            hit = cache.get(key)
            if hit is None:
                missing.append(key)
            else:
                local[key] = hit
        for start in range(0, len(missing), max_batch):
            keys = missing[start : start + max_batch]
            logits = self.logits(np.array(keys, dtype=np.int64)).astype(np.float64)
            probs = softmax(logits)
            labels = detailed_labels(probs, self.threshold).tolist()
            for key, best, score in zip(keys, labels, malicious_score(probs).tolist()):
                local[key] = (self.labels[best], score)
        limit = self.options.cache_size
        if missing and limit:
            if len(cache) + len(missing) > limit:
                cache.clear()  # cheap bound: shapes repeat, so it refills quickly
            for key in missing[:limit]:
                cache[key] = local[key]
        return [local[r] for r in rows]

    def classify(self, records: Sequence[ConnRecord], *, max_batch: int = 256) -> list[Verdict]:
        if not records:
            return []
        encode = self.tokenizer.encode_record  # tuples: no array round trip on the hot path
        return self.verdicts_for_rows([encode(r) for r in records], max_batch=max_batch)


class _Request:
    __slots__ = ("records", "future")

    def __init__(self, records: Sequence[ConnRecord]):
        self.records = records
        self.future: Future = Future()


class InferenceEngine:
    """A hot-swappable ``FlowClassifier`` with synchronous and batched asynchronous calls."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        provider: str = "auto",
        int8: bool = False,
        threads: int | None = 1,
        max_batch: int = 256,
        max_wait_ms: float = 2.0,
        cache_size: int = 100_000,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.options = EngineOptions(provider=provider, int8=int8, threads=threads, cache_size=cache_size)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._model = LoadedModel(model_dir, self.options)
        self._swap_lock = threading.Lock()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.classified = 0  # flows classified (all paths), for metrics
        self.swaps = 0

    # -- FlowClassifier ----------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self._model.version

    @property
    def model(self) -> LoadedModel:
        return self._model

    @property
    def threshold(self) -> float:
        return self._model.threshold

    @property
    def providers(self) -> list[str]:
        return self._model.providers

    def classify(self, records: Sequence[ConnRecord]) -> list[Verdict]:
        """One ``(detailed label, malicious score)`` per record, in order."""
        return self.classify_versioned(records)[1]

    def classify_versioned(self, records: Sequence[ConnRecord]) -> tuple[str, list[Verdict]]:
        """``(model version, verdicts)``: the version that really classified them."""
        model = self._model  # one read: a concurrent swap affects the next call only
        verdicts = model.classify(records, max_batch=self.max_batch)
        self.classified += len(records)
        return model.version, verdicts

    # -- batched asynchronous requests ----------------------------------------------------
    def submit(self, records: Sequence[ConnRecord]) -> Future:
        """A future of ``(model version, verdicts)``; requests are batched together."""
        if self._closed:
            raise RuntimeError("engine is closed")
        self._ensure_worker()
        req = _Request(list(records))
        self._queue.put(req)
        return req.future

    def _ensure_worker(self) -> None:
        if self._worker is None:
            with self._swap_lock:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._run, name="fedgate-inference", daemon=True)
                    self._worker.start()

    def _run(self) -> None:
        q = self._queue
        while True:
            first = q.get()
            if first is None:
                return
            batch = [first]
            size = len(first.records)
            deadline = time.monotonic() + self.max_wait
            stop = False
            while size < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    nxt = q.get(timeout=timeout) if timeout > 0 else q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                size += len(nxt.records)
            self._serve(batch)
            if stop:
                return

    def _serve(self, batch: list[_Request]) -> None:
        records = [r for req in batch for r in req.records]
        try:
            version, verdicts = self.classify_versioned(records)
        except Exception as exc:  # hand the failure to every waiter; keep serving
            log.exception("inference batch of %d flows failed", len(records))
            for req in batch:
                req.future.set_exception(exc)
            return
        start = 0
        for req in batch:
            n = len(req.records)
            req.future.set_result((version, verdicts[start : start + n]))
            start += n

    # -- hot swap ------------------------------------------------------------------------
    def swap(self, model_dir: str | Path) -> str:
        """Load and validate ``model_dir`` aside, then make it current; returns its version.

        A bad directory raises (``ModelDirError``) and leaves the current model serving.
        """
        new = LoadedModel(model_dir, self.options)
        with self._swap_lock:
            old, self._model = self._model, new
            self.swaps += 1
        log.info("inference model %s -> %s", old.version, new.version)
        return new.version

    def close(self) -> None:
        """Finish queued requests, then stop the worker."""
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_classifier(
    model_dir: str | Path,
    *,
    provider: str | None = None,
    int8: bool = False,
    threads: int | None = 1,
    max_batch: int = 256,
    max_wait_ms: float = 2.0,
    cache_size: int = 100_000,
) -> InferenceEngine:
    """The classifier ``fedgate replay --model DIR`` and the gateway use (validated
    before use).  ``provider`` defaults to ``$FEDGATE_PROVIDER`` or ``auto``."""
    return InferenceEngine(
        model_dir,
        provider=provider or os.environ.get("FEDGATE_PROVIDER", "auto"),
        int8=int8,
        threads=threads,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        cache_size=cache_size,
    )
