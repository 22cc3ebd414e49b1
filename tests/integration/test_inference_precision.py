"""Precisions and providers of the inference engine on real ONNX Runtime sessions.

fp16 export against fp32 (within the stated tolerance, on the CPU), the gateway running
the int8 graph when configured, the provider that really ran (from ORT's profile), IO
binding, provider options and refusals.  CUDA tests run only where a GPU is present.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import onnxruntime as ort
import pytest

from gateway.inference import (
    CPU, CUDA, TENSORRT, EngineOptions, LoadedModel, ProviderError, choose_providers, cuda_available,
    load_classifier, tensorrt_available,
)
from gateway.model import export as export_mod
from gateway.model.data import load_scenarios
from gateway.model.modeldir import ModelDirError, export_onnx, validate_model_dir
from gateway_helpers import DEFAULT_MODEL, gateway_config, store_counts, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A copy of the committed default student with all three graphs."""
    d = tmp_path_factory.mktemp("prec") / "model"
    shutil.copytree(DEFAULT_MODEL, d)
    export_onnx(d, int8=True, fp16=True)
    return d


@pytest.fixture(scope="module")
def real_ids(model_dir, iot23_dir):
    info = validate_model_dir(model_dir)
    records = [r for s in load_scenarios([iot23_dir]) for r in s.records[:400]]
    return np.unique(info.tokenizer.encode(records), axis=0)


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=[CPU])


def test_fp16_export_agrees_with_fp32_within_the_stated_tolerance_on_the_cpu(model_dir, real_ids):
    fp16 = model_dir / "model.fp16.onnx"
    assert fp16.is_file()
    sess = _session(fp16)
    # integer ids in, float32 logits out: callers see no difference in types
    assert sess.get_inputs()[0].type == "tensor(int64)" and sess.get_outputs()[0].type == "tensor(float)"
    for ids in (real_ids, None):  # the data's distinct prompts, then random ids over the whole vocabulary
        worst = export_mod.fp16_agreement(model_dir / "model.onnx", fp16, ids=ids, rows=512)
        assert worst <= 1.0, worst
    a, b = export_mod.logits_pair(model_dir / "model.onnx", fp16, ids=real_ids)
    assert np.abs(a - b).max() <= export_mod.FP16_ATOL + export_mod.FP16_RTOL * np.abs(a).max()
    assert np.abs(a - b).max() > 0  # really a float16 graph, not a copy
    # the verdicts (arg-max class) agree on the data's prompts
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99


def test_fp16_beyond_the_tolerance_is_refused_and_nothing_written(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "FP16_ATOL", 1e-9)
    monkeypatch.setattr(export_mod, "FP16_RTOL", 0.0)
    with pytest.raises(ValueError, match="fp16 logits differ"):
        export_mod.convert_fp16(model_dir / "model.onnx", tmp_path / "model.fp16.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision,file", [("fp32", "model.onnx"), ("fp16", "model.fp16.onnx"),
                                            ("int8", "model.int8.onnx")])
def test_engine_runs_the_graph_of_its_precision(model_dir, real_ids, precision, file):
    engine = load_classifier(model_dir, provider="cpu", precision=precision, cache_size=0)
    try:
        want = _session(model_dir / file).run(["logits"], {"input_ids": real_ids})[0]
        np.testing.assert_array_equal(engine.model.logits(real_ids), want)
        assert engine.describe()["precision"] == precision
    finally:
        engine.close()


def test_missing_graph_of_the_configured_precision_is_named(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "model.fp16.onnx").unlink()
    with pytest.raises(ModelDirError, match="model.fp16.onnx: file is missing"):
        LoadedModel(d, EngineOptions(provider="cpu", precision="fp16"))
    LoadedModel(d, EngineOptions(provider="cpu", precision="int8"))  # the others still load


def test_engine_reports_the_provider_that_really_ran(model_dir):
    import tempfile
    from pathlib import Path

    before = set(Path(tempfile.gettempdir()).glob("fedgate-ort-*"))
    m = LoadedModel(model_dir, EngineOptions(provider="cpu"))
    assert m.provider_ran == CPU
    d = m.describe()
    assert set(d["nodes_by_provider"]) == {CPU} and d["nodes_by_provider"][CPU] > 10
    assert d["io_binding"] is False and d["max_batch"] == 256  # a CPU session's defaults
    m.logits(np.zeros((3, m.tokenizer.length), np.int64))
    # profiling ended with the probe run, and its file and directory are gone
    assert set(Path(tempfile.gettempdir()).glob("fedgate-ort-*")) <= before


def test_io_binding_gives_the_same_logits(model_dir, real_ids):
    plain = LoadedModel(model_dir, EngineOptions(provider="cpu", io_binding=False))
    bound = LoadedModel(model_dir, EngineOptions(provider="cpu", io_binding=True))
    assert bound.io_binding
    np.testing.assert_array_equal(bound.logits(real_ids), plain.logits(real_ids))
    assert bound.verdicts_for_ids(real_ids[:50]) == plain.verdicts_for_ids(real_ids[:50])


def test_provider_options_carry_device_and_arena_limit():
    opts = EngineOptions(provider="cuda", device_id=1, gpu_mem_limit_mb=512, precision="fp16", max_batch=1024)
    cuda, trt, cpu = opts.provider_options([CUDA, TENSORRT, CPU], length=24)
    assert cuda == {"device_id": "1", "arena_extend_strategy": "kSameAsRequested",
                    "gpu_mem_limit": str(512 * 1024 * 1024)}
    assert trt["device_id"] == "1" and trt["trt_fp16_enable"] == "True"
    assert trt["trt_profile_max_shapes"] == "input_ids:1024x24" and cpu == {}
    with pytest.raises(ValueError, match="precision"):
        EngineOptions(precision="bf16")
    with pytest.raises(ValueError, match="gpu_mem_limit_mb"):
        EngineOptions(gpu_mem_limit_mb=0)


@pytest.mark.skipif(cuda_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_providers_asked_for_without_a_gpu_are_refused(model_dir):
    for name in ("cuda", "tensorrt"):
        with pytest.raises(ProviderError, match="does not load on this machine"):
            choose_providers(name)
    assert choose_providers("auto") == [CPU]
    assert load_classifier(model_dir, provider="auto").provider_ran == CPU


def test_the_gateway_runs_the_int8_model_when_configured(model_dir, tmp_path):
    from benchmarks.live_latency import write_at_rate
    from gateway.service import GatewayService

    (tmp_path / "conn.log").touch()
    cfg = gateway_config(tmp_path, model=str(model_dir), inference={"precision": "int8", "provider": "cpu"},
                         fl={"enabled": False})
    service = GatewayService(cfg).start()
    try:
        engine = service.classifier.inner
        assert service.status()["inference"]["precision"] == "int8"
        assert service.status()["inference"]["provider_ran"] == CPU
        write_at_rate(tmp_path / "conn.log", rate=2000, count=300)
        assert wait_until(lambda: store_counts(cfg.database_url)[2] == 300, 30)
        # the stored verdicts are the int8 graph's, not the float one's
        from gateway.flows.zeek import iter_records

        records = list(iter_records(tmp_path / "conn.log"))
        ids = engine.model.tokenizer.encode(records)
        q = _session(model_dir / "model.int8.onnx").run(["logits"], {"input_ids": ids})[0]
        f = _session(model_dir / "model.onnx").run(["logits"], {"input_ids": ids})[0]
        assert not np.array_equal(q, f)
        np.testing.assert_array_equal(engine.model.logits(ids), q)
    finally:
        service.stop()


needs_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA execution provider on this machine")


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_session_really_runs_on_the_gpu_with_io_binding(model_dir, real_ids, precision):
    m = LoadedModel(model_dir, EngineOptions(provider="cuda", precision=precision))
    assert m.provider_ran == CUDA and m.io_binding and m.max_batch == 8192
    cpu = LoadedModel(model_dir, EngineOptions(provider="cpu"))
    worst = np.abs(m.logits(real_ids) - cpu.logits(real_ids)).max()
    assert worst <= export_mod.FP16_ATOL + export_mod.FP16_RTOL * np.abs(cpu.logits(real_ids)).max()


@pytest.mark.skipif(not tensorrt_available(), reason="no TensorRT execution provider on this machine")
def test_tensorrt_session_runs_when_present(model_dir, real_ids, tmp_path):
    started = time.monotonic()
    m = LoadedModel(model_dir, EngineOptions(provider="tensorrt", max_batch=512, trt_cache_dir=str(tmp_path)))
    assert m.provider_ran == TENSORRT, (m.ran_on, time.monotonic() - started)
    assert m.logits(real_ids[:512]).shape[0] == min(512, len(real_ids))
