"""ONNX export: the prompt forward that optimum traces equals the Hugging Face OPT
classifier (every OPT variant the gateway can meet, any token ids), and the exported
graph is the portable last-position graph it is meant to be."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers import OPTConfig, OPTForSequenceClassification

from gateway.model.export import EXPORT_ATOL, export_onnx, prompt_logits
from gateway.model.labels import LabelSet
from gateway.model.modeldir import save_model_dir
from gateway.model.prompt import get_template
from gateway.model.tokenizer import FlowTokenizer
from test_tokenizer import TRAIN

TOKENIZER = FlowTokenizer.build(TRAIN, get_template("edge-compact"))
LENGTH = TOKENIZER.length
VOCAB = TOKENIZER.vocab_size

# the student as trained here, plus the OPT variants a --base-model checkpoint may bring
VARIANTS = {
    "student": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64),
    "one-layer": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32),
    "post-norm": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, ffn_dim=32,
                      do_layer_norm_before=False),
    "projected-embeddings": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                                 word_embed_proj_dim=16),
    "gelu-no-bias": dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=1, ffn_dim=32,
                         activation_function="gelu", enable_bias=False),
    "longer-positions": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                             max_position_embeddings=64),
}


def opt(seed: int = 0, **kw) -> OPTForSequenceClassification:
    kw.setdefault("max_position_embeddings", LENGTH)
    kw.setdefault("word_embed_proj_dim", kw["hidden_size"])
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=VOCAB, pad_token_id=TOKENIZER.pad_id, num_labels=5, dropout=0.0, attention_dropout=0.0, **kw)
    model = OPTForSequenceClassification(config).eval()
    with torch.no_grad():  # untrained layer norms are identities: perturb them so they matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        t = torch.from_numpy(ids)
        return model(input_ids=t, attention_mask=torch.ones_like(t)).logits.numpy()


def prompt_ids(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(TOKENIZER.pad_id + 1, VOCAB, size=(rows, LENGTH), dtype=np.int64)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prompt_forward_equals_the_hf_model(variant):
    model = opt(**VARIANTS[variant])
    ids = prompt_ids(32)
    with torch.inference_mode():
        got = prompt_logits(model, length=LENGTH)(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, hf_logits(model, ids), atol=1e-5, rtol=0)


_STUDENT = opt(**VARIANTS["student"])
_STUDENT_FORWARD = prompt_logits(_STUDENT, length=LENGTH)


@settings(max_examples=80, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 5), st.just(LENGTH)),
              elements=st.one_of(st.just(TOKENIZER.pad_id), st.integers(0, VOCAB - 1))))
def test_prompt_forward_equals_hf_on_any_ids(ids):
    """Hostile rows too: pads anywhere, a pad last, all pads.  The classifier then reads
    the rightmost non-pad position (position 0 for an all-pad row), as HF does."""
    with torch.inference_mode():
        got = _STUDENT_FORWARD(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, hf_logits(_STUDENT, ids), atol=1e-5, rtol=0)


def test_prompt_longer_than_the_positions_is_refused():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        prompt_logits(opt(**VARIANTS["one-layer"]), length=LENGTH + 1)


@pytest.mark.parametrize("variant", ["student", "post-norm"])
def test_export_writes_the_portable_last_position_graph(variant, tmp_path):
    import onnxruntime as ort

    model = opt(**{**VARIANTS[variant], "max_position_embeddings": 32})
    labels = LabelSet(("Benign", "Malicious", "C&C", "DDoS", "FileDownload"))
    info = save_model_dir(model, TOKENIZER, labels, tmp_path / "m", int8=True)  # exports and validates
    graph = onnx.load(str(info.path / "model.onnx")).graph
    # input_ids only, batch axis dynamic, prompt length fixed
    assert [i.name for i in graph.input] == ["input_ids"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == LENGTH
    # standard ONNX ops only: provider-specific fusions happen per session at load
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    # the last layer runs its queries, attention output and feed-forward on one row per
    # prompt; every other projection (and the last layer's keys/values) on every position
    cfg, batch = model.config, 3
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph), data_prop=True).graph
    rows = {v.name: v.type.tensor_type.shape.dim[0].dim_value for v in inferred.value_info
            if v.type.tensor_type.shape.dim}
    gemm_rows = sorted(rows[n.output[0]] for n in graph.node if n.op_type == "Gemm")
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    assert gemm_rows == ([batch] * (heads + 3)
                         + [batch * LENGTH] * ((layers - 1) * (3 * heads + 3) + 2 * heads))
    ids = np.random.default_rng(1).integers(TOKENIZER.pad_id + 1, VOCAB, size=(64, LENGTH), dtype=np.int64)
    sess = ort.InferenceSession(str(info.path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids[:4, -3:] = TOKENIZER.pad_id  # rows whose last tokens are pads pool an earlier position
    ids[4] = TOKENIZER.pad_id
    np.testing.assert_allclose(sess.run(["logits"], {"input_ids": ids})[0], hf_logits(model, ids),
                               atol=EXPORT_ATOL, rtol=0)
    # re-exporting an exported directory gives the same graph
    before = (info.path / "model.onnx").read_bytes()
    export_onnx(info.path)
    assert (info.path / "model.onnx").read_bytes() == before


def test_export_refuses_a_graph_that_disagrees_with_torch(tmp_path, monkeypatch):
    """The export compares its graph with the torch model before writing anything."""
    from gateway.model import export

    model = opt(**{**VARIANTS["one-layer"], "max_position_embeddings": 32})
    labels = LabelSet(("Benign", "Malicious", "C&C", "DDoS", "FileDownload"))
    info = save_model_dir(model, TOKENIZER, labels, tmp_path / "m", onnx=False)
    real = export.prompt_logits

    def skewed(model, *, length):
        forward = real(model, length=length)
        return lambda ids: forward(ids) + 1e-3

    monkeypatch.setattr(export, "prompt_logits", skewed)
    with pytest.raises(ValueError, match="differ from the torch model"):
        export_onnx(info.path)
    assert not (info.path / "model.onnx").exists()
