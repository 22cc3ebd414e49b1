"""--base-model with a pretrained checkpoint the test makes itself (a tiny OPT and a
byte-level BPE tokenizer trained here; nothing from a model hub): the fine-tune starts
from the checkpoint's embeddings and layers (its logits are the checkpoint's own), flows
are read as text by the checkpoint's tokenizer, LoRA trains and merges, the model
directory runs in the engine, and distillation gives the small edge student."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import OPTForCausalLM

from benchmarks.pretrained_loso import corpus, make_tiny_checkpoint
from gateway.inference import load_classifier
from gateway.model.data import load_scenarios
from gateway.model.modeldir import load_student, validate_model_dir
from gateway.model.text import FLOW_TEXT, TextTokenizer, flow_sentence
from test_model_dir import small_data

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, iot23_dir):
    return small_data(iot23_dir, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-opt", corpus(), vocab=600, hidden=32,
                                layers=2, heads=2, ffn=64, steps=40)


@pytest.fixture(scope="module")
def initial(tmp_path_factory, checkpoint, data_dir):
    """A teacher from the checkpoint with no training step: what fine-tuning starts from."""
    from gateway.model.pipeline import train_model

    return train_model([data_dir], tmp_path_factory.mktemp("m") / "t0", preset="teacher", base_model=checkpoint,
                       epochs=0, device="cpu")


def test_flow_sentences_name_facts_not_addresses(data_dir):
    r = load_scenarios([data_dir])[0].records[0]
    text = flow_sentence(r)
    assert r.orig_h not in text and r.resp_h not in text and (r.label or "x") not in text
    assert text.startswith(r.proto.upper()) and "packet" in text


def test_fine_tune_starts_from_the_checkpoints_embeddings_and_logits(initial, checkpoint, data_dir):
    info = validate_model_dir(initial.path)
    assert isinstance(info.tokenizer, TextTokenizer) and info.tokenizer.template is FLOW_TEXT
    base = OPTForCausalLM.from_pretrained(checkpoint).eval()
    # no vocabulary resize: the checkpoint's rows, all of them, in their order
    assert info.config["vocab_size"] == base.config.vocab_size
    model, tok, _, meta = load_student(initial.path)
    emb = model.model.decoder.embed_tokens.weight.detach()
    assert torch.equal(emb, base.model.decoder.embed_tokens.weight.detach())
    # the checkpoint's own next-token logits, through the classifier's (tied) embeddings
    records = load_scenarios([data_dir])[0].records[:20]
    ids = torch.from_numpy(tok.encode(records))
    with torch.inference_mode():
        want = base(input_ids=ids).logits
        hidden = model.model.decoder(input_ids=ids).last_hidden_state
        got = hidden @ emb.t()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the prompts are the checkpoint tokenizer's encoding of the sentences
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(checkpoint)(flow_sentence(records[0]))["input_ids"]
    assert list(ids[0, : len(theirs)].tolist()) == theirs[: tok.length]
    assert meta["base_model"] == str(checkpoint) and meta["template"]["name"] == "flow-text"


def test_text_model_runs_in_the_engine(initial, data_dir):
    records = load_scenarios([data_dir])[1].records[:50]
    engine = load_classifier(initial.path, provider="cpu")
    try:
        verdicts = engine.classify(records)
        assert len(verdicts) == 50 and all(0.0 <= s <= 1.0 for _, s in verdicts)
        model, tok, *_ = load_student(initial.path)
        from gateway.model.train import predict_logits

        torch_logits = predict_logits(model, tok.encode(records))
        onnx_logits = engine.model.logits(tok.encode(records))
        np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    finally:
        engine.close()


def test_cli_fine_tune_lora_and_distil_to_the_edge_student(checkpoint, data_dir, tmp_path):
    from gateway.cli import main
    from gateway.model.opt import PRESETS

    out = tmp_path / "ft"
    result = CliRunner().invoke(main, ["model", "train", "--data", str(data_dir), "--out", str(out), "--preset",
                                       "teacher", "--base-model", str(checkpoint), "--epochs", "2", "--device", "cpu",
                                       "--warmup", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    meta = validate_model_dir(out).metadata
    assert meta["training"]["lr"] == 5e-5 and meta["training"]["warmup"] == 0.2
    lora = tmp_path / "lora"
    result = CliRunner().invoke(main, ["model", "train", "--data", str(data_dir), "--out", str(lora), "--preset",
                                       "teacher", "--base-model", str(checkpoint), "--epochs", "2", "--lora-rank", "4",
                                       "--json"])
    assert result.exit_code == 0, result.output
    info = validate_model_dir(lora)
    assert info.metadata["training"]["lora_rank"] == 4 and info.metadata["training"]["lr"] == 5e-4
    model, *_ = load_student(lora)  # merged: a plain OPT classifier, no adapter weights left
    assert not any("lora" in k for k in model.state_dict())
    base = OPTForCausalLM.from_pretrained(checkpoint)
    # LoRA touched only the query/value projections (and the new head)
    assert torch.equal(model.model.decoder.layers[0].fc1.weight, base.model.decoder.layers[0].fc1.weight)
    assert not torch.equal(model.model.decoder.layers[0].self_attn.q_proj.weight,
                           base.model.decoder.layers[0].self_attn.q_proj.weight)
    # distilled to the edge student: flow words, the student preset's size
    student = tmp_path / "student"
    result = CliRunner().invoke(main, ["model", "distill", "--teacher", str(out), "--data", str(data_dir), "--out",
                                       str(student), "--epochs", "2", "--no-int8", "--json"])
    assert result.exit_code == 0, result.output
    s = validate_model_dir(student)
    assert s.metadata["template"]["name"] == "edge-compact" and s.config["hidden_size"] == PRESETS["student"].hidden
    assert json.loads(result.stdout)["parent"] == meta["version"]


def test_wrong_combinations_are_refused(checkpoint, data_dir, tmp_path):
    from gateway.cli import main

    def run(*extra):
        return CliRunner().invoke(main, ["model", "train", "--data", str(data_dir), "--out", str(tmp_path / "x"),
                                         *extra])

    bad = run("--base-model", str(checkpoint), "--template", "edge-compact/v2")
    assert bad.exit_code != 0 and "flow-text" in bad.output
    bad = run("--template", "flow-text")
    assert bad.exit_code != 0 and "--base-model" in bad.output
    bad = run("--lora-rank", "4")
    assert bad.exit_code != 0 and "--base-model" in bad.output
    no_tokenizer = tmp_path / "bare"
    OPTForCausalLM.from_pretrained(checkpoint).save_pretrained(no_tokenizer)
    bad = run("--base-model", str(no_tokenizer))
    assert bad.exit_code != 0 and "tokenizer" in bad.output
    bad = run("--base-model", str(tmp_path))
    assert bad.exit_code != 0 and "config.json" in bad.output
