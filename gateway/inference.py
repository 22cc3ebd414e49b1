"""The inference engine: ONNX Runtime sessions over model directories.

``load_classifier(model_dir)`` gives what ``fedgate replay`` and the gateway need (a
``FlowClassifier``: ``model_version`` and ``classify(records)``).  The engine

* validates the whole model directory before anything is classified
  (:func:`gateway.model.modeldir.validate_model_dir`);
* picks the CUDA execution provider only when a session really runs on it, else the
  CPU one (``provider=`` overrides; ``tensorrt`` asks for TensorRT, then CUDA), with
  provider options (device id, a memory arena limit) and, on a GPU, IO binding;
  :attr:`LoadedModel.ran_on` says which provider really ran the graph's nodes (from
  ONNX Runtime's own profile of the first run), not merely which were asked for;
* runs the graph of the configured precision: ``fp32`` (``model.onnx``), ``fp16``
  (``model.fp16.onnx``, for GPUs) or ``int8`` (``model.int8.onnx``, for CPUs);
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

import json
import logging
import os
import queue
import shutil
import tempfile
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

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
Verdict = tuple[str, float]
DEVICE_BATCH = {"cpu": 256, "gpu": 8192}
"""Most distinct prompts per session run when ``max_batch`` is not given: on a CPU a
bigger batch only adds latency; a GPU needs thousands of rows to fill its cores."""
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


class ProviderError(RuntimeError):
    """The requested execution provider cannot run here."""


_usable: dict[str, bool] = {}


def cuda_available() -> bool:
    """True only if ONNX Runtime can really run a session on CUDA (probed once)."""
    return provider_usable(CUDA)


def tensorrt_available() -> bool:
    """True only if ONNX Runtime can really run a session on TensorRT (probed once)."""
    return provider_usable(TENSORRT)


def provider_usable(name: str) -> bool:
    if name not in _usable:
        _usable[name] = _probe(name)
    return _usable[name]


def _probe(name: str) -> bool:
    """Load a one-node graph with ``name`` first; usable if the session keeps it first
    (ONNX Runtime silently drops a provider whose libraries do not load)."""
    import onnxruntime as ort

    if name not in ort.get_available_providers():
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
        so.log_severity_level = 4  # the failed GPU load is expected on CPU boxes
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=[name, CPU])
        return sess.get_providers()[0] == name
    except Exception as exc:  # any load failure means: not usable
        log.debug("%s probe failed: %s", name, exc)
        return False


def choose_providers(provider: str = "auto") -> list[str]:
    """Execution providers in order of preference for ``provider`` (CPU always last, for
    the shape nodes a GPU provider leaves to it); ProviderError if it cannot load here."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return [CPU]
    if provider == "tensorrt":
        if not tensorrt_available():
            raise ProviderError("the TensorRT execution provider does not load on this machine "
                                "(no GPU, or no TensorRT libraries)")
        return [TENSORRT, CUDA, CPU]
    if provider == "cuda":
        if not cuda_available():
            raise ProviderError("the CUDA execution provider does not load on this machine (no GPU or CUDA libraries)")
        return [CUDA, CPU]
    return [CUDA, CPU] if cuda_available() else [CPU]


@dataclass(frozen=True)
class EngineOptions:
    """How a model directory is run.

    provider: auto (CUDA when a session really runs there, else CPU), cpu, cuda or
      tensorrt (TensorRT, CUDA for what it leaves, CPU for shape nodes).
    precision: fp32, fp16 or int8: which graph of the directory runs.
    threads: ORT intra-op threads (CPU).
    cache_size: distinct prompts whose verdicts are kept per model.
    device_id: the GPU (CUDA / TensorRT).
    gpu_mem_limit_mb: cap of the CUDA memory arena (None: ORT's default, no cap).
    io_binding: bind inputs and outputs to the device (None: on a GPU provider only).
    trt_cache_dir: where TensorRT keeps built engines (None: a directory beside the
      model is not written; engines are rebuilt at each load).
    """

    provider: str = "auto"
    precision: str = "fp32"
    # ORT intra-op threads.  1 by default: for this tiny model one thread gives the best
    # single-flow latency on a small shared CPU (p99 1.6 ms vs 4.2 ms with 2 threads
    # under load, benchmarks/inference.py) and leaves a core to parsing and storing.
    # None: ORT's default, one per core.
    threads: int | None = 1
    cache_size: int = 100_000
    device_id: int = 0
    gpu_mem_limit_mb: int | None = None
    io_binding: bool | None = None
    trt_cache_dir: str | None = None
    max_batch: int | None = None  # only TensorRT's optimisation profile reads it here

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if self.device_id < 0:
            raise ValueError("device_id must be >= 0")
        if self.gpu_mem_limit_mb is not None and self.gpu_mem_limit_mb < 1:
            raise ValueError("gpu_mem_limit_mb must be >= 1")

    def provider_options(self, names: list[str], *, length: int) -> list[dict]:
        """ONNX Runtime's options for each provider of ``names``."""
        out = []
        for name in names:
            opts: dict[str, str] = {}
            if name in (CUDA, TENSORRT):
                opts["device_id"] = str(self.device_id)
            if name == CUDA:
                # grow the arena by what a request needs, not by doubling: a bounded
                # gateway process must not reserve twice its working set
                opts["arena_extend_strategy"] = "kSameAsRequested"
                if self.gpu_mem_limit_mb is not None:
                    opts["gpu_mem_limit"] = str(self.gpu_mem_limit_mb * 1024 * 1024)
            if name == TENSORRT:
                batch = self.max_batch or DEVICE_BATCH["gpu"]
                opts.update({
                    "trt_fp16_enable": "True" if self.precision == "fp16" else "False",
                    # one engine for every batch size up to max_batch (no rebuild per shape)
                    "trt_profile_min_shapes": f"input_ids:1x{length}",
                    "trt_profile_opt_shapes": f"input_ids:{batch}x{length}",
                    "trt_profile_max_shapes": f"input_ids:{batch}x{length}",
                })
                if self.trt_cache_dir:
                    opts.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": self.trt_cache_dir})
            out.append(opts)
        return out


class LoadedModel:
    """One model directory in an ONNX Runtime session, with its tokenizer and labels."""

    def __init__(self, model_dir: str | Path, options: EngineOptions = EngineOptions()):
        import onnxruntime as ort

        self.info: ModelInfo = validate_model_dir(model_dir, need_onnx=True, precision=options.precision)
        self.options = options
        self.version = self.info.version
        self.tokenizer = self.info.tokenizer
        self.labels = self.info.labels.names
        self.threshold = self.info.threshold
        path = self.info.onnx_path(options.precision)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if options.threads is not None:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        # ORT's profile of the first run says which provider really ran each node
        profile_dir = tempfile.mkdtemp(prefix="fedgate-ort-")
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "probe")
        names = choose_providers(options.provider)
        try:
            self.session = ort.InferenceSession(
                str(path), so, providers=names,
                provider_options=options.provider_options(names, length=self.tokenizer.length))
        except ProviderError:
            shutil.rmtree(profile_dir, ignore_errors=True)
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            shutil.rmtree(profile_dir, ignore_errors=True)
            raise ModelDirError(path, f"ONNX Runtime cannot load it ({exc})") from None
        self.providers = self.session.get_providers()
        self.on_gpu = self.providers[0] in (CUDA, TENSORRT)
        self.io_binding = self.on_gpu if options.io_binding is None else options.io_binding
        self.max_batch = options.max_batch or DEVICE_BATCH["gpu" if self.on_gpu else "cpu"]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._verdicts: dict[tuple[int, ...], Verdict] = {}
        # check the graph against the tokenizer once, before any flow
        probe = np.full((1, self.tokenizer.length), self.tokenizer.unk_id, dtype=np.int64)
        try:
            out = self.logits(probe)
        except Exception as exc:
            raise ModelDirError(path, f"does not run on a {probe.shape} prompt ({exc})") from None
        finally:
            self.ran_on = _providers_that_ran(self.session, profile_dir)
        if out.shape != (1, len(self.labels)):
            raise ModelDirError(path, f"logits shape {out.shape} != (1, {len(self.labels)})")
        if self.on_gpu and self.provider_ran == CPU:
            log.warning("%s: %s was asked for, but ONNX Runtime ran every compute node on the CPU",
                        path, self.providers[0])

    @property
    def provider_ran(self) -> str:
        """The execution provider that really ran the graph's compute (its matrix
        products), from ONNX Runtime's profile of the first run."""
        return _main_provider(self.ran_on) or self.providers[0]

    def describe(self) -> dict:
        """What runs: directory, version, precision, providers asked for and really used."""
        return {"model": str(self.info.path), "version": self.version, "precision": self.options.precision,
                "providers": list(self.providers), "provider_ran": self.provider_ran,
                "nodes_by_provider": {k: v["nodes"] for k, v in self.ran_on.items()},
                "io_binding": self.io_binding, "max_batch": self.max_batch}

    def logits(self, ids: np.ndarray) -> np.ndarray:
        if self.io_binding:
            return self._logits_bound(ids)
        feeds = {"input_ids": ids}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones_like(ids)
        return self.session.run(["logits"], feeds)[0]

    def _logits_bound(self, ids: np.ndarray) -> np.ndarray:
        """One run with IO binding: the ids are copied to the device once, and the logits
        are written into device memory ORT allocates there, then copied back once (no
        staging through ORT's own per-run host buffers)."""
        import onnxruntime as ort

        where = "cuda" if self.on_gpu else "cpu"
        binding = self.session.io_binding()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids, where, self.options.device_id))
        if "attention_mask" in self.input_names:
            mask = np.ones_like(ids)
            binding.bind_ortvalue_input("attention_mask",
                                        ort.OrtValue.ortvalue_from_numpy(mask, where, self.options.device_id))
        binding.bind_output("logits", where, self.options.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def verdicts_for_ids(self, ids: np.ndarray, *, max_batch: int | None = None) -> list[Verdict]:
        """Verdicts for id rows; distinct rows are run once and cached.

        Safe under concurrent calls: answers are gathered in a local dict, so another
        call clearing the shared cache cannot lose them.
        """
        return self.verdicts_for_rows([tuple(r) for r in ids.tolist()], max_batch=max_batch)

    def verdicts_for_rows(self, rows: list[tuple[int, ...]], *, max_batch: int | None = None) -> list[Verdict]:
        """:meth:`verdicts_for_ids` for rows already as tuples (the tokenizer's own)."""
        max_batch = max_batch or self.max_batch
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

    def classify(self, records: Sequence[ConnRecord], *, max_batch: int | None = None) -> list[Verdict]:
        if not records:
            return []
        encode = self.tokenizer.encode_record  # tuples: no array round trip on the hot path
        return self.verdicts_for_rows([encode(r) for r in records], max_batch=max_batch)


COMPUTE_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulInteger",
                         "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Attention"})


def _providers_that_ran(session, profile_dir: str) -> dict[str, dict[str, int]]:
    """``{provider: {"nodes": n, "compute": m}}`` from the session's profile of the runs so
    far (then profiling ends and the file is removed)."""
    try:
        path = session.end_profiling()
        with open(path, encoding="utf-8") as fh:
            events = json.load(fh)
    except (OSError, ValueError) as exc:
        log.debug("no ORT profile to read: %s", exc)
        return {}
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    out: dict[str, dict[str, int]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") != "Node" or "provider" not in args:
            continue
        row = out.setdefault(args["provider"], {"nodes": 0, "compute": 0})
        row["nodes"] += 1
        op = args.get("op_name", "")
        if op in COMPUTE_OPS or op.startswith("TRTKernel"):
            row["compute"] += 1
    return out


def _main_provider(ran_on: dict[str, dict[str, int]]) -> str | None:
    if not ran_on:
        return None
    return max(ran_on, key=lambda p: (ran_on[p]["compute"], ran_on[p]["nodes"]))


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
        precision: str = "fp32",
        threads: int | None = 1,
        max_batch: int | None = None,
        max_wait_ms: float = 2.0,
        cache_size: int = 100_000,
        device_id: int = 0,
        gpu_mem_limit_mb: int | None = None,
        io_binding: bool | None = None,
        trt_cache_dir: str | None = None,
    ):
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.options = EngineOptions(provider=provider, precision=precision, threads=threads, cache_size=cache_size,
                                     device_id=device_id, gpu_mem_limit_mb=gpu_mem_limit_mb, io_binding=io_binding,
                                     trt_cache_dir=trt_cache_dir, max_batch=max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self._model = LoadedModel(model_dir, self.options)
        # None: sized for the device the first model really loaded on (DEVICE_BATCH)
        self.max_batch = self._model.max_batch
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

    @property
    def provider_ran(self) -> str:
        """The execution provider that really ran the current model's compute."""
        return self._model.provider_ran

    @property
    def precision(self) -> str:
        return self.options.precision

    def describe(self) -> dict:
        return self._model.describe()

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
    precision: str = "fp32",
    threads: int | None = 1,
    max_batch: int | None = None,
    max_wait_ms: float = 2.0,
    cache_size: int = 100_000,
    **gpu_options,
) -> InferenceEngine:
    """The classifier ``fedgate replay --model DIR`` and the gateway use (validated
    before use).  ``provider`` defaults to ``$FEDGATE_PROVIDER`` or ``auto``;
    ``gpu_options``: device_id, gpu_mem_limit_mb, io_binding, trt_cache_dir."""
    return InferenceEngine(
        model_dir,
        provider=provider or os.environ.get("FEDGATE_PROVIDER", "auto"),
        precision=precision,
        threads=threads,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        cache_size=cache_size,
        **gpu_options,
    )
