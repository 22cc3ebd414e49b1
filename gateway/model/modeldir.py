"""The model directory: what a trained flow classifier is on disk, and its checks.

::

    config.json        OPTConfig (architecture, id2label)
    model.safetensors  torch weights (what federated learning trains)
    tokenizer.json     Hugging Face tokenizer with the prompt template marker
    labels.json        the class names, in class-id order
    metadata.json      version, parent, data digest, template, threshold, metrics
    model.onnx         ONNX export (optimum), what gateways run
    model.int8.onnx    optional dynamic int8 quantisation of model.onnx (CPUs)
    model.fp16.onnx    optional float16 graph with float32 logits (GPUs)

:func:`validate_model_dir` checks every file and their agreement and raises
:class:`ModelDirError` naming the offending file; loaders call it before anything is
classified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.model.labels import LabelSet
from gateway.model.tokenizer import FlowTokenizer, TokenizerError

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
LABELS = "labels.json"
METADATA = "metadata.json"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
ONNX_FP16 = "model.fp16.onnx"
ONNX_FILES = {"fp32": ONNX, "fp16": ONNX_FP16, "int8": ONNX_INT8}
PRECISIONS = tuple(ONNX_FILES)
"""The graphs a model directory may hold; the gateway's ``inference.precision`` picks one."""
REQUIRED = (CONFIG, WEIGHTS, TOKENIZER, LABELS, METADATA)
METADATA_SCHEMA = 1


# The default model ships inside the package (gateway/model/default, package data), so
# every install -- wheel, container, editable checkout -- classifies out of the box.  In a
# checkout, models/default is a symlink to it and `make model` rebuilds it in place.
BUNDLED_PACKAGE = "gateway.model"
BUNDLED_NAME = "default"


def bundled_model_dir() -> Path:
    """The directory of the default model shipped with the package (``gateway/model/default``),
    found with :mod:`importlib.resources`; ONNX Runtime needs real files, so an install
    that does not unpack the package onto the file system (a zip import) is refused."""
    import importlib.resources

    found = importlib.resources.files(BUNDLED_PACKAGE) / BUNDLED_NAME
    if not isinstance(found, Path):
        raise ModelDirError(str(found), "the bundled model is not on the file system (install fedgate unzipped)")
    return found


def bundled_model_version() -> str | None:
    """The bundled model's version (metadata.json), or None when it is missing or unreadable."""
    try:
        metadata = _read_json(bundled_model_dir() / METADATA)
    except ModelDirError:
        return None
    return str(metadata["version"]) if isinstance(metadata, dict) and "version" in metadata else None


class ModelDirError(ValueError):
    """A model directory is incomplete or inconsistent; ``path`` names the file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


@dataclass
class ModelInfo:
    """A validated model directory's parsed small files."""

    path: Path
    config: dict[str, Any]
    tokenizer: FlowTokenizer
    labels: LabelSet
    metadata: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", 0.5))

    def onnx_path(self, precision: str = "fp32", *, int8: bool = False) -> Path:
        return self.path / ONNX_FILES["int8" if int8 else check_precision(precision)]


def check_precision(precision: str) -> str:
    if precision not in ONNX_FILES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ModelDirError(path, "file is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(path, f"unreadable JSON ({exc})") from None


def validate_model_dir(model_dir: str | Path, *, need_onnx: bool = True, int8: bool = False,
                       precision: str = "fp32") -> ModelInfo:
    """Check every file of ``model_dir`` and that they agree; return the parsed parts.
    ``need_onnx``: the graph of ``precision`` (``int8=True``: of int8) must be there too."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(d, "model directory does not exist")
    wanted = ONNX_FILES["int8" if int8 else check_precision(precision)]
    for name in REQUIRED + ((ONNX, wanted) if need_onnx else ()):
        if not (d / name).is_file():
            raise ModelDirError(d / name, "file is missing")
    config = _read_json(d / CONFIG)
    if not isinstance(config, dict) or config.get("model_type") != "opt":
        raise ModelDirError(d / CONFIG, "not an OPT config (model_type must be 'opt')")
    for key in ("vocab_size", "hidden_size", "num_labels", "id2label", "pad_token_id"):
        if key not in config and not (key == "num_labels" and "id2label" in config):
            raise ModelDirError(d / CONFIG, f"lacks {key!r}")
    for key in ("vocab_size", "hidden_size"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
            raise ModelDirError(d / CONFIG, f"{key} must be a positive integer, got {config[key]!r}")
    metadata = _read_json(d / METADATA)
    if not isinstance(metadata, dict) or "version" not in metadata or not isinstance(metadata.get("template"), dict):
        raise ModelDirError(d / METADATA, "lacks 'version' or a 'template' object")
    try:
        tokenizer = FlowTokenizer.load(d / TOKENIZER)
    except TokenizerError as exc:
        raise ModelDirError(d / TOKENIZER, str(exc).split(": ", 1)[-1]) from None
    meta_t = metadata["template"]
    if (meta_t.get("name"), meta_t.get("version")) != (tokenizer.template.name, tokenizer.template.version):
        raise ModelDirError(
            d / TOKENIZER,
            f"template {tokenizer.template.ident} does not match metadata.json's "
            f"{meta_t.get('name')}/v{meta_t.get('version')}",
        )
    # a checkpoint's BPE tokenizer may have fewer entries than its embedding has rows
    # (OPT pads its 50265 tokens to 50272 rows); the flow vocabulary is exact
    exact = type(tokenizer) is FlowTokenizer
    if tokenizer.vocab_size > config["vocab_size"] or (exact and tokenizer.vocab_size != config["vocab_size"]):
        raise ModelDirError(d / TOKENIZER, f"vocabulary of {tokenizer.vocab_size} words, config.json says {config['vocab_size']}")
    raw_labels = _read_json(d / LABELS)
    try:
        labels = LabelSet(raw_labels)
    except (TypeError, ValueError) as exc:
        raise ModelDirError(d / LABELS, f"bad label list ({exc})") from None
    try:
        id2label = [config["id2label"][k] for k in sorted(config["id2label"], key=int)]
    except (TypeError, ValueError, AttributeError):
        raise ModelDirError(d / CONFIG, "id2label is not a mapping of class ids to names") from None
    if id2label != list(labels.names):
        raise ModelDirError(d / LABELS, f"labels {list(labels.names)} differ from config.json's id2label {id2label}")
    _check_weights(d / WEIGHTS, config)
    for name in ONNX_FILES.values():  # every graph that is there (the wanted one is)
        if (d / name).exists() or (need_onnx and name == wanted):
            _check_onnx(d / name, config, tokenizer)
    return ModelInfo(d, config, tokenizer, labels, metadata)


def _check_weights(path: Path, config: dict) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            keys = set(f.keys())
            emb = next((k for k in keys if k.endswith("embed_tokens.weight")), None)
            if emb is None:
                raise ModelDirError(path, "no embed_tokens.weight tensor")
            shape = f.get_slice(emb).get_shape()
    except ModelDirError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise ModelDirError(path, f"unreadable safetensors file ({exc})") from None
    expect = [config["vocab_size"], config.get("word_embed_proj_dim") or config["hidden_size"]]
    if list(shape) != expect:
        raise ModelDirError(path, f"embedding shape {list(shape)} does not match config.json {expect}")


def _check_onnx(path: Path, config: dict, tokenizer: FlowTokenizer) -> None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelDirError(path, f"not a readable ONNX model ({exc})") from None
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    if "input_ids" not in inputs or not inputs <= {"input_ids", "attention_mask"}:
        raise ModelDirError(path, f"inputs {sorted(inputs)} are not input_ids[, attention_mask]")
    outputs = {o.name: o for o in model.graph.output}
    if "logits" not in outputs:
        raise ModelDirError(path, f"outputs {sorted(outputs)} lack 'logits'")
    dims = outputs["logits"].type.tensor_type.shape.dim
    n_labels = len(config["id2label"])
    if not dims or dims[-1].dim_value != n_labels:
        got = dims[-1].dim_value if dims else None
        raise ModelDirError(path, f"logits have {got} classes, config.json has {n_labels} labels")


def weights_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k], dtype=np.float32)
        h.update(k.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def export_onnx(model_dir: str | Path, *, int8: bool = False, fp16: bool = False) -> list[Path]:
    """Export ``model.onnx`` (optimum, text-classification) and optionally the int8 and
    fp16 files."""
    from gateway.model.export import export_onnx as _export

    return _export(Path(model_dir), int8=int8, fp16=fp16)


def save_model_dir(
    model,
    tokenizer: FlowTokenizer,
    labels: LabelSet,
    out: str | Path,
    *,
    version: str | None = None,
    parent: str | None = None,
    threshold: float = 0.5,
    metrics: dict | None = None,
    data_digest: str | None = None,
    extra: dict | None = None,
    int8: bool = False,
    fp16: bool = False,
    onnx: bool = True,
) -> ModelInfo:
    """Write a complete model directory (torch weights, tokenizer, labels, metadata,
    ONNX export) and validate it.  Files are written into a temporary sibling and
    renamed into place, so a reader never sees a half-written model.

    ``version`` defaults to ``<name>-<weights sha256[:12]>``, so the same training
    gives the same version.
    """
    from gateway.model.train import state_to_numpy

    # resolve links first: models/default is a symlink to the bundled model, and the
    # directory is replaced by a rename, which must happen where the files really are
    given = Path(out)
    out = given.resolve()
    arrays = state_to_numpy(model)
    if version is None:
        version = f"{(extra or {}).get('preset', 'model')}-{weights_digest(arrays)[:12]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.config.id2label = dict(enumerate(labels.names))
        model.config.label2id = {n: i for i, n in enumerate(labels.names)}
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "generation_config.json").unlink(missing_ok=True)
        tokenizer.save(tmp / TOKENIZER)
        (tmp / LABELS).write_text(json.dumps(list(labels.names), indent=1) + "\n")
        metadata = {
            "schema": METADATA_SCHEMA,
            "version": version,
            "parent": parent,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "template": {"name": tokenizer.template.name, "version": tokenizer.template.version},
            "threshold": float(threshold),
            "data_digest": data_digest,
            "weights_digest": weights_digest(arrays),
            "parameters": int(sum(a.size for a in arrays.values())),
            "metrics": metrics or {},
            **(extra or {}),
        }
        (tmp / METADATA).write_text(json.dumps(metadata, indent=1, sort_keys=True, default=float) + "\n")
        if onnx:
            export_onnx(tmp, int8=int8, fp16=fp16)
        info = validate_model_dir(tmp, need_onnx=onnx, int8=int8)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info.path = given
    return info


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def update_metadata(model_dir: str | Path, **fields: Any) -> None:
    """Merge ``fields`` into metadata.json (atomic rewrite)."""
    path = Path(model_dir) / METADATA
    data = _read_json(path)
    data.update(fields)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def load_student(model_dir: str | Path):
    """``(torch model, tokenizer, labels, metadata)`` of a validated model directory.

    The torch model is an ``OPTForSequenceClassification`` in eval mode with the same
    weights as the directory's ONNX file; train it with
    :func:`gateway.model.train.train_epochs` and save with :func:`save_model_dir`.
    """
    from transformers import OPTForSequenceClassification

    info = validate_model_dir(model_dir, need_onnx=False)
    try:
        model = OPTForSequenceClassification.from_pretrained(info.path)
    except Exception as exc:
        raise ModelDirError(info.path / WEIGHTS, f"cannot load weights ({exc})") from None
    model.eval()
    return model, info.tokenizer, info.labels, info.metadata
