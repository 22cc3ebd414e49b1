"""Where torch trains: device names, mixed precision, reproducible seeds per device.

The CPU tests run everywhere; the CUDA ones run only where torch sees a GPU (they are
skipped, not faked, elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gateway.config import ConfigError, FlSection
from gateway.flows.record import ConnRecord
from gateway.model.data import encode
from gateway.model.device import (
    DeviceError, Precision, check_device_name, model_device, predict_batch, resolve_device,
)
from gateway.model.labels import LabelSet, record_label
from gateway.model.opt import Preset, build_model
from gateway.model.prompt import COMPACT
from gateway.model.tokenizer import FlowTokenizer
from gateway.model.train import predict_logits, state_to_numpy, train_epochs

TINY = Preset(hidden=16, layers=1, heads=2, ffn=32, dropout=0.1, epochs=3, lr=1e-2, batch_size=16)
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")


def _records():
    out = []
    for i in range(30):
        out.append(ConnRecord(ts=i, uid=f"B{i}", orig_h="192.168.1.2", orig_p=40000 + i, resp_h="8.8.8.8",
                              resp_p=53, proto="udp", service="dns", duration=0.01 * (i % 5),
                              orig_bytes=40 + i % 3, resp_bytes=90, conn_state="SF", history="Dd", orig_pkts=1,
                              resp_pkts=1, label="benign"))
        out.append(ConnRecord(ts=i, uid=f"M{i}", orig_h="192.168.1.2", orig_p=40000 + i, resp_h="1.2.3.4",
                              resp_p=23, proto="tcp", conn_state="S0", history="S", orig_pkts=1 + i % 2,
                              resp_pkts=0, label="Malicious", detailed_label="DDoS"))
    return out


@pytest.fixture(scope="module")
def setup():
    recs = _records()
    tok = FlowTokenizer.build(recs, COMPACT)
    labels = LabelSet.from_labels(record_label(r) for r in recs)
    return tok, labels, encode(recs, tok, labels).dedupe()


def _trained(setup, device, seed=5):
    tok, labels, ds = setup
    m = build_model(TINY, tok, labels, seed=seed)
    train_epochs(m, ds, epochs=4, lr=1e-2, seed=seed, batch_size=8, device=device)
    return m


def test_device_names():
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert check_device_name(ok) == ok
    for bad in ("gpu", "CUDA", "cuda:", "cuda:x", ""):
        with pytest.raises(ValueError, match="unknown device"):
            check_device_name(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_asked_for_without_a_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="no usable CUDA GPU"):
        resolve_device("cuda")


def test_cpu_runs_float32_without_autocast():
    p = Precision.for_device(torch.device("cpu"))
    assert p.dtype is None and p.name == "float32" and p.scaler() is None
    with p.autocast():
        assert not torch.is_autocast_enabled()
    assert predict_batch(torch.device("cpu")) < predict_batch(torch.device("cuda"))


def test_same_seed_same_device_same_weights_and_auto_is_the_cpu_here(setup):
    a = state_to_numpy(_trained(setup, "cpu"))
    b = state_to_numpy(_trained(setup, "cpu"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    if not HAS_CUDA:
        auto = state_to_numpy(_trained(setup, "auto"))
        assert all(np.array_equal(a[k], auto[k]) for k in a)
    c = state_to_numpy(_trained(setup, "cpu", seed=6))
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_fl_section_validates_the_device():
    assert FlSection().device == "auto"
    assert FlSection(device="cuda:0").device == "cuda:0"
    with pytest.raises(ConfigError, match="fl.device"):
        FlSection(device="gpu")


@needs_cuda
def test_cuda_training_reproduces_and_leaves_the_model_on_the_gpu(setup):
    m1, m2 = _trained(setup, "cuda"), _trained(setup, "cuda")
    assert model_device(m1).type == "cuda"
    a, b = state_to_numpy(m1), state_to_numpy(m2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert Precision.for_device(model_device(m1)).dtype in (torch.bfloat16, torch.float16)


@needs_cuda
def test_cuda_predictions_match_the_cpu_in_float32(setup):
    tok, labels, ds = setup
    m = _trained(setup, "cpu")
    on_cpu = predict_logits(m, ds.ids)
    on_gpu = predict_logits(m.to("cuda"), ds.ids)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4)
