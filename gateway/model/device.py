"""Where torch work runs: device choice, mixed precision and device-sized batches.

One home for the rules every torch caller follows (``fedgate model train|distill``,
federated local training, the cloud teacher, the benchmarks):

* ``auto`` means CUDA when torch sees a usable GPU, else the CPU; ``cuda`` on a machine
  without one is an error that says so, never a silent fall-back;
* on CUDA, forward passes run under autocast: bfloat16 where the GPU supports it (no
  loss scaling needed), else float16 with a gradient scaler; weights, optimiser state
  and the loss stay float32.  On the CPU nothing changes (float32 throughout: CPU
  autocast is slower than float32 on AVX2 hosts for these small matrices);
* training batch sizes are a hyper-parameter and stay the preset's on every device, so
  a model's quality does not depend on where it was trained; prediction batches (teacher
  logits, thresholds, evaluation) do not change results and are sized for the device;
* seeds: the order of rows is drawn on the CPU from a seeded generator on every
  device, and CUDA runs with deterministic kernels where torch has them, so the same
  seed on the same device gives the same weights.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: config validation must not load it
    import torch

DEVICES = ("auto", "cpu", "cuda")
PREDICT_BATCH = {"cpu": 1024, "cuda": 16384}
"""Rows per forward pass when only predicting (results do not depend on it)."""


class DeviceError(RuntimeError):
    """The requested torch device cannot be used on this machine."""


def check_device_name(name: str) -> str:
    """``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ValueError otherwise."""
    if name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError(f"unknown device {name!r}; choose one of auto, cpu, cuda, cuda:N")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device ``name`` stands for on this machine (``auto``: CUDA if usable)."""
    import torch

    if isinstance(name, torch.device):
        return name
    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    usable = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda") if usable else torch.device("cpu")
    if not usable:
        raise DeviceError(f"device {name!r} was asked for, but torch sees no usable CUDA GPU here "
                          f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
    dev = torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training and prediction on ``device`` (None: float32)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class Precision:
    """Mixed-precision context of one device: ``autocast()`` around forward passes and
    ``scaler`` (float16 only) around backward and optimiser steps."""

    device: torch.device
    dtype: torch.dtype | None

    @classmethod
    def for_device(cls, device: torch.device, *, amp: bool = True) -> Precision:
        return cls(device, autocast_dtype(device) if amp else None)

    @property
    def name(self) -> str:
        import torch

        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]

    def autocast(self):
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scaler(self):
        """A gradient scaler for float16 (None for bfloat16 and float32)."""
        import torch

        if self.dtype is torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None


def deterministic(device: torch.device) -> None:
    """Ask for reproducible kernels on ``device`` (CUDA: cuBLAS workspace and torch's
    deterministic algorithms; ops without a deterministic kernel only warn)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def predict_batch(device: torch.device) -> int:
    return PREDICT_BATCH["cuda" if device.type == "cuda" else "cpu"]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on (CPU for a model without any)."""
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def describe(device: torch.device) -> str:
    """A short human name: ``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    import torch

    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
