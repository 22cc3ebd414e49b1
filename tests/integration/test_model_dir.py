"""Model directories end to end on small real data: train, distil, export (ONNX, int8),
validation errors naming the file, ONNX/torch agreement, --base-model, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gateway.model.modeldir import ModelDirError, load_student, validate_model_dir
from gateway.model.prompt import DEFAULT_TEMPLATE, get_template

pytestmark = pytest.mark.integration

SCENARIOS = {"CTU-Malware-Capture-34-1": 160, "CTU-Malware-Capture-8-1": 80, "CTU-Honeypot-Capture-4-1": 60}


def small_data(iot23_dir: Path, out: Path) -> Path:
    """A few hundred real IoT-23 flows: every k-th line of three scenarios."""
    for name, n in SCENARIOS.items():
        lines = (iot23_dir / name / "conn.log.labeled").read_text().splitlines(keepends=True)
        head = [ln for ln in lines if ln.startswith("#fields") or ln.startswith("#types") or ln.startswith("#sep")
                or ln.startswith("#set") or ln.startswith("#empty") or ln.startswith("#unset") or ln.startswith("#path")]
        body = [ln for ln in lines if not ln.startswith("#")]
        step = max(1, len(body) // n)
        (out / name).mkdir(parents=True)
        (out / name / "conn.log.labeled").write_text("".join(head + body[::step][:n]))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, iot23_dir):
    return small_data(iot23_dir, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A teacher (3 epochs) and a distilled student with int8 (5 epochs)."""
    from gateway.model.pipeline import distill_model, train_model

    root = tmp_path_factory.mktemp("models")
    teacher = train_model([data_dir], root / "teacher", preset="teacher", epochs=3, seed=1)
    student = distill_model(teacher.path, [data_dir], root / "student", epochs=5, int8=True)
    return teacher, student


def test_directory_contents_and_metadata(trained):
    teacher, student = trained
    files = {p.name for p in student.path.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "model.onnx", "model.int8.onnx",
            "labels.json", "metadata.json"} <= files
    meta = student.metadata
    assert meta["parent"] == teacher.version and meta["version"].startswith("student-")
    assert meta["template"] == {"name": "edge-compact", "version": get_template(DEFAULT_TEMPLATE).version}
    assert meta["data_digest"] == teacher.metadata["data_digest"] and len(meta["data_digest"]) == 64
    assert 0.0 < meta["threshold"] < 1.0
    assert {"accuracy", "f1", "macro_f1"} <= set(meta["metrics"]["validation"])
    assert meta["training"]["loss"] == "distillation"
    assert student.labels.names[:2] == ("Benign", "Malicious")
    assert meta["parameters"] * 10 <= teacher.metadata["parameters"]


def test_a_named_template_is_trained_saved_and_read_back(data_dir, tmp_path):
    from gateway.model.pipeline import train_model

    info = train_model([data_dir], tmp_path / "v3", epochs=1, seed=1, template="edge-compact/v3")
    assert info.metadata["template"] == {"name": "edge-compact", "version": 3}
    _, tokenizer, _, _ = load_student(info.path)
    assert tokenizer.template is get_template("edge-compact/v3")
    with pytest.raises(ValueError, match="unknown prompt template 'edge-compact/v42'"):
        train_model([data_dir], tmp_path / "bad", epochs=1, template="edge-compact/v42")
    assert not (tmp_path / "bad").exists()


def test_onnx_and_torch_logits_agree(trained):
    from gateway.inference import EngineOptions, LoadedModel
    from gateway.model.train import predict_logits

    for info in trained:
        model, tok, labels, _ = load_student(info.path)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, tok.vocab_size, size=(300, tok.length))
        onnx = LoadedModel(info.path, EngineOptions(provider="cpu")).logits(ids)
        np.testing.assert_allclose(onnx, predict_logits(model, ids), atol=1e-4, rtol=0)


def test_int8_export_loads_and_mostly_agrees(trained):
    from gateway.inference import EngineOptions, LoadedModel

    _, student = trained
    f32 = LoadedModel(student.path, EngineOptions(provider="cpu"))
    q = LoadedModel(student.path, EngineOptions(provider="cpu", precision="int8"))
    ids = np.random.default_rng(1).integers(0, student.tokenizer.vocab_size, size=(200, student.tokenizer.length))
    a, b = f32.logits(ids), q.logits(ids)
    assert b.shape == a.shape and np.isfinite(b).all()
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.8
    assert q.session.get_inputs()[0].name == "input_ids"


def test_same_seed_reproduces_the_same_weights(trained, data_dir, tmp_path):
    from gateway.model.pipeline import train_model

    teacher, _ = trained
    again = train_model([data_dir], tmp_path / "t2", preset="teacher", epochs=3, seed=1)
    assert again.metadata["weights_digest"] == teacher.metadata["weights_digest"]
    assert again.version == teacher.version


def _copy(info, tmp_path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(info.path, dst)
    return dst


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors", "model.onnx",
                                  "labels.json", "metadata.json"])
def test_missing_file_is_named(trained, tmp_path, name):
    d = _copy(trained[1], tmp_path)
    (d / name).unlink()
    with pytest.raises(ModelDirError, match=rf"{name}: file is missing"):
        validate_model_dir(d)


def test_mismatches_are_named(trained, tmp_path):
    teacher, student = trained
    d = _copy(student, tmp_path)
    text = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(text.replace(f"[TEMPLATE:edge-compact:v{get_template(DEFAULT_TEMPLATE).version}]", "[TEMPLATE:edge-compact:v7]"))
    with pytest.raises(ModelDirError, match=r"tokenizer\.json: .*v7"):
        validate_model_dir(d)
    (d / "tokenizer.json").write_text(text)
    labels = json.loads((d / "labels.json").read_text())
    (d / "labels.json").write_text(json.dumps(labels + ["Okiru"]))
    with pytest.raises(ModelDirError, match=r"labels\.json: .*differ"):
        validate_model_dir(d)
    (d / "labels.json").write_text(json.dumps(labels))
    (d / "config.json").write_text("{broken")
    with pytest.raises(ModelDirError, match=r"config\.json: unreadable JSON"):
        validate_model_dir(d)
    shutil.copy(student.path / "config.json", d / "config.json")
    (d / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelDirError, match=r"model\.onnx: not a readable ONNX"):
        validate_model_dir(d)


@pytest.mark.parametrize("file,edit,message", [
    ("metadata.json", lambda d: {**d, "template": "edge-compact"}, "template"),
    ("metadata.json", lambda d: [d], "version"),
    ("config.json", lambda d: {**d, "id2label": ["Benign"]}, "id2label"),
    ("config.json", lambda d: {**d, "vocab_size": "many"}, "vocab_size must be a positive integer"),
    ("config.json", lambda d: {**d, "model_type": "bert"}, "OPT"),
    ("labels.json", lambda d: {"Benign": 0}, "label"),
])
def test_hostile_small_files_are_named(trained, tmp_path, file, edit, message):
    d = _copy(trained[1], tmp_path)
    data = json.loads((d / file).read_text())
    (d / file).write_text(json.dumps(edit(data)))
    with pytest.raises(ModelDirError, match=rf"{file.replace('.', '[.]')}: .*{message}"):
        validate_model_dir(d)


def test_onnx_of_another_label_set_is_refused(trained, tmp_path, data_dir):
    """An ONNX file whose logits do not match config.json's labels."""
    from gateway.model.data import encode, load_scenarios
    from gateway.model.labels import LabelSet
    from gateway.model.modeldir import save_model_dir
    from gateway.model.opt import Preset, build_model

    _, student = trained
    labels = LabelSet(["Benign", "Malicious", "Only"])
    other = build_model(Preset(16, 1, 2, 32, 0.0, 1, 1e-3, 8), student.tokenizer, labels, seed=0)
    alien = save_model_dir(other, student.tokenizer, labels, tmp_path / "alien")
    d = _copy(student, tmp_path)
    shutil.copy(alien.path / "model.onnx", d / "model.onnx")
    with pytest.raises(ModelDirError, match=r"model\.onnx: logits have 3 classes, config.json has"):
        validate_model_dir(d)
    assert len(encode(load_scenarios([data_dir])[0].records[:5], student.tokenizer, student.labels)) == 5


def test_base_model_needs_the_checkpoints_tokenizer(tmp_path, data_dir):
    """--base-model keeps the checkpoint's vocabulary, so it needs the checkpoint's own
    tokenizer (tests/integration/test_pretrained.py fine-tunes one that has it)."""
    from transformers import OPTConfig, OPTForCausalLM

    from gateway.cli import main

    base = tmp_path / "tiny-opt"
    OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             ffn_dim=32, max_position_embeddings=128, word_embed_proj_dim=16)).save_pretrained(base)
    result = CliRunner().invoke(main, ["model", "train", "--data", str(data_dir), "--out", str(tmp_path / "o"),
                                       "--base-model", str(base), "--epochs", "2", "--json"])
    assert result.exit_code != 0 and "no tokenizer files" in result.output
    bad = CliRunner().invoke(main, ["model", "train", "--data", str(data_dir), "--out", str(tmp_path / "x"),
                                    "--base-model", str(tmp_path)])
    assert bad.exit_code != 0 and "config.json" in bad.output


def test_cli_export_and_evaluate(trained, data_dir, tmp_path):
    from gateway.cli import main

    teacher, student = trained
    d = _copy(student, tmp_path)
    (d / "model.onnx").unlink()
    (d / "model.int8.onnx").unlink()
    runner = CliRunner()
    res = runner.invoke(main, ["model", "export", str(d), "--int8", "--json"])
    assert res.exit_code == 0, res.output
    assert {Path(r["file"]).name for r in json.loads(res.output)} == {"model.onnx", "model.int8.onnx"}
    res = runner.invoke(main, ["model", "evaluate", "--model", str(d), "--model", str(teacher.path),
                               "--data", str(data_dir), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    names = [r["model"] for r in report["rows"]]
    assert names[-1] == "random forest" and any("int8" in n for n in names) and any("torch" in n for n in names)
    for row in report["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0
    torch_rows = [r for r in report["rows"] if "torch" in r["model"]]
    assert all(r["max_logit_diff"] < 1e-4 for r in torch_rows)
    assert report["rows"][0]["flows_per_s"] > 0 and report["rows"][0]["p99_ms"] > 0
    assert report["flows"]["test"] > 0 and report["detail"]["confusion"]
    res = runner.invoke(main, ["model", "evaluate", "--model", str(tmp_path / "nope"), "--data", str(data_dir)])
    assert res.exit_code != 0


def test_cli_scenario_split(trained, data_dir):
    from gateway.cli import main

    _, student = trained
    res = CliRunner().invoke(main, ["model", "evaluate", "--model", str(student.path), "--data", str(data_dir),
                                    "--split", "scenario", "--epochs", "2", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["rows"]
    assert sorted(r["held_out"] for r in rows) == sorted(SCENARIOS)
    assert all(0 <= r["student_accuracy"] <= 1 and 0 <= r["rf_accuracy"] <= 1 for r in rows)


def test_distill_keeps_the_best_of_several_candidates_on_validation(trained, tmp_path, data_dir):
    """``candidates=2`` trains seeds s and s+1 and keeps the one with the higher
    validation macro-F1 (then F1); the metadata lists both and names the kept seed."""
    from gateway.model.pipeline import distill_model

    teacher, _ = trained
    info = distill_model(teacher.path, [data_dir], tmp_path / "best", epochs=2, seed=5, candidates=2, int8=False)
    tried = info.metadata["training"]["candidates"]
    assert [c["seed"] for c in tried] == [5, 6]
    best = max(tried, key=lambda c: (c["val_macro_f1"], c["val_f1"]))
    assert info.metadata["training"]["seed"] == best["seed"]
    assert info.metadata["metrics"]["validation"]["macro_f1"] == best["val_macro_f1"]
    # the kept candidate is exactly the single run of its seed (reproducible)
    single = distill_model(teacher.path, [data_dir], tmp_path / "single", epochs=2, seed=best["seed"], int8=False)
    assert single.metadata["version"] == info.metadata["version"]
    with pytest.raises(ValueError, match="candidates"):
        distill_model(teacher.path, [data_dir], tmp_path / "none", epochs=1, candidates=0, int8=False)


def test_the_bundled_model_is_package_data_and_valid():
    """The default model ships inside the package (importlib.resources finds it in any
    install); in a checkout, models/default is a link to the same files."""
    from gateway.model.modeldir import bundled_model_dir, bundled_model_version

    bundled = bundled_model_dir()
    assert bundled.parts[-3:] == ("gateway", "model", "default")
    info = validate_model_dir(bundled, need_onnx=True, int8=True)
    assert bundled_model_version() == info.version
    repo_link = Path(__file__).resolve().parents[2] / "models" / "default"
    if repo_link.exists():
        assert repo_link.resolve() == bundled.resolve()


def test_saving_through_a_link_replaces_the_files_behind_it(trained, tmp_path):
    """`make model` / `--out models/default` write through the link: the directory the
    link points at is replaced, and the link stays a link."""
    from gateway.model.modeldir import save_model_dir

    _, student = trained
    model, tokenizer, labels, _ = load_student(student.path)
    real = tmp_path / "pkg" / "default"
    shutil.copytree(student.path, real)
    link = tmp_path / "models" / "default"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "pkg" / "default")
    info = save_model_dir(model, tokenizer, labels, link, version="via-link", onnx=False)
    assert link.is_symlink() and info.path == link
    assert json.loads((real / "metadata.json").read_text())["version"] == "via-link"
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["default"]  # no stray temp dirs
