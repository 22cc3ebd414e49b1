"""The flow model: prompt templates, tokenizer, OPT teacher/student, training, export.

The functions federated learning builds on::

    from gateway.model import (load_student, encode, train_epochs, evaluate,
                               state_to_numpy, load_numpy_state, save_model_dir)

    model, tokenizer, labels, metadata = load_student("models/default")
    data = encode(records, tokenizer, labels).dedupe()       # FlowDataset
    train_epochs(model, data, epochs=1, lr=1e-3, seed=1, on_step=cb)  # cb(step, norms, loss)
    metrics = evaluate(model, data, threshold=metadata["threshold"])  # accuracy, f1, macro_f1...
    arrays = state_to_numpy(model); load_numpy_state(model, arrays)
    save_model_dir(model, tokenizer, labels, out, version="g7", parent="g6")  # + ONNX

Heavy imports (torch, transformers) happen on first use of these names.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FlowDataset": "gateway.model.data",
    "encode": "gateway.model.data",
    "load_scenarios": "gateway.model.data",
    "paper_split": "gateway.model.data",
    "train_val_split": "gateway.model.data",
    "LabelSet": "gateway.model.labels",
    "record_label": "gateway.model.labels",
    "FlowTokenizer": "gateway.model.tokenizer",
    "TokenizerError": "gateway.model.tokenizer",
    "TokenizerVersionError": "gateway.model.tokenizer",
    "ModelDirError": "gateway.model.modeldir",
    "ModelInfo": "gateway.model.modeldir",
    "load_student": "gateway.model.modeldir",
    "save_model_dir": "gateway.model.modeldir",
    "validate_model_dir": "gateway.model.modeldir",
    "train_epochs": "gateway.model.train",
    "evaluate": "gateway.model.train",
    "predict_logits": "gateway.model.train",
    "state_to_numpy": "gateway.model.train",
    "load_numpy_state": "gateway.model.train",
    "grad_norms_by_layer": "gateway.model.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gateway.model' has no attribute {name!r}")
