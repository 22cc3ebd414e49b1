"""The torch side of a gateway's FL client: the student model as arrays in and out.

Thin glue over :mod:`gateway.model` (``load_student``, ``train_epochs``, ``evaluate``,
``state_to_numpy``/``load_numpy_state``); the FL client talks to it only through
weights (dicts of numpy arrays), datasets and metric dicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from gateway.flows.record import ConnRecord
from gateway.model.data import FlowDataset
from gateway.model.device import resolve_device
from gateway.model.modeldir import load_student
from gateway.model.metrics import binary_likelihood, softmax
from gateway.model.train import evaluate, load_numpy_state, predict_logits, state_to_numpy, train_epochs

StepFn = Callable[[int, dict[str, float], float], None]


class TorchLearner:
    """The student of a model directory, trainable and evaluable as values.

    threads: torch intra-op threads for this process (several gateways share a box in
    the experiment; 1 keeps them from fighting over cores).
    device: where local training and evaluation run (auto: CUDA when torch sees a GPU);
    weights go in and out as CPU numpy arrays whatever the device.
    """

    def __init__(self, model_dir: str | Path, *, threads: int | None = None, device: str = "auto"):
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.device = resolve_device(device)
        self.model, self.tokenizer, self.labels, self.metadata = load_student(model_dir)
        self.model.to(self.device)
        self.model_dir = Path(model_dir)

    def weights(self) -> dict[str, np.ndarray]:
        return state_to_numpy(self.model)

    def load(self, weights: dict[str, np.ndarray]) -> None:
        """Load weights; ValueError on names/shapes/non-finite values (model unchanged)."""
        load_numpy_state(self.model, weights)

    def encode(self, records: Sequence[ConnRecord], classes: Sequence[str]) -> FlowDataset:
        """Encoded, deduplicated rows (a row's weight = the flows it stands for)."""
        if not records:
            return FlowDataset(np.zeros((0, self.tokenizer.length), np.int64), np.zeros(0, np.int64),
                               np.zeros(0, np.float32))
        ds = FlowDataset(self.tokenizer.encode(records), self.labels.encode(list(classes)),
                         np.ones(len(records), np.float32))
        return ds.dedupe()

    def train(self, data: FlowDataset, *, epochs: int, lr: float, seed: int, batch_size: int,
              prox_mu: float = 0.0, missing_class_scale: float = 1.0, label_smoothing: float = 0.0,
              on_step: StepFn | None = None) -> int:
        """Local training in place (``prox_mu``: FedProx's proximal term towards the
        weights training starts from; ``missing_class_scale``: FedRS's factor on the
        logits of classes this gateway has no flow of; ``label_smoothing``: of the
        cross-entropy target); returns the number of optimiser steps."""
        return train_epochs(self.model, data, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size,
                            prox_mu=prox_mu, missing_class_scale=missing_class_scale,
                            label_smoothing=label_smoothing, on_step=on_step).steps

    def evaluate(self, data: FlowDataset) -> dict[str, float]:
        """Binary accuracy/precision/recall/F1 (malicious = positive) and macro-F1."""
        if len(data) == 0:
            return {}
        was_training = self.model.training
        try:
            rep = evaluate(self.model, data)
        finally:
            self.model.train(was_training)
        return {k: float(rep[k]) for k in ("accuracy", "precision", "recall", "f1", "macro_f1") if k in rep}

    def likelihood(self, data: FlowDataset) -> float:
        """:func:`binary_likelihood` of the model on ``data`` (the GSFS "likelihood" P)."""
        if len(data) == 0:
            return float("nan")
        was_training = self.model.training
        try:
            probs = softmax(predict_logits(self.model, data.ids).astype(np.float64))
        finally:
            self.model.train(was_training)
        return binary_likelihood(probs, data.y, data.weight)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return max(1, math.ceil(rows / batch_size))
