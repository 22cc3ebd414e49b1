"""ONNX export of a model directory: optimum export, graph optimisation, int8.

``model.onnx`` is produced by optimum's exporter (task ``text-classification``, OPT's
ONNX config with ``input_ids`` as the only input: see ``_prompt_onnx_config``) from the
directory's ``config.json`` + ``model.safetensors``, then optimised offline by ONNX
Runtime at the portable ``EXTENDED`` level (constant folding, redundant node removal,
fusions that do not depend on the CPU it runs on).  ``model.int8.onnx`` is a dynamic
int8 quantisation of the exported float model (``onnxruntime.quantization``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

OPSET = 17


@contextlib.contextmanager
def _quiet():
    """The exporters print tracer warnings that mean nothing for fixed-shape prompts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("optimum", "transformers", "torch.onnx"):
            logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def export_onnx(model_dir: Path, *, int8: bool = False) -> list[Path]:
    from optimum.exporters.onnx import main_export

    model_dir = Path(model_dir)
    written = []
    with tempfile.TemporaryDirectory(prefix="fedgate-onnx-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        # optimum needs only the torch side; the tokenizer files it would copy are ours.
        for name in ("config.json", "model.safetensors"):
            shutil.copy2(model_dir / name, src / name)
        raw = Path(tmp) / "onnx"
        with _quiet(), _causal_only():
            main_export(
                str(src), output=str(raw), task="text-classification", opset=OPSET,
                do_validation=False, device="cpu",
                custom_onnx_configs={"model": _prompt_onnx_config(src)},
            )
        optimise(raw / "model.onnx", model_dir / "model.onnx")
        written.append(model_dir / "model.onnx")
        if int8:
            # quantise the exporter's graph: the quantiser's shape inference does not
            # know the contrib ops that optimisation introduces
            written.append(quantize_int8(raw / "model.onnx", model_dir / "model.int8.onnx"))
    return written


def _prompt_onnx_config(src: Path):
    """optimum's OPT ONNX config with ``input_ids`` as the only input.

    Flow prompts have a fixed length and are never padded, so the attention mask is
    always all ones: dropping it removes the mask-building subgraph (about a third of
    the exported nodes, and the slowest ones) from every inference.
    """
    from optimum.exporters.onnx.model_configs import OPTOnnxConfig
    from transformers import AutoConfig

    class PromptOnnxConfig(OPTOnnxConfig):
        @property
        def inputs(self):
            return {"input_ids": {0: "batch_size", 1: "sequence_length"}}

    return PromptOnnxConfig(AutoConfig.from_pretrained(src), task="text-classification")


_export_lock = threading.Lock()


@contextlib.contextmanager
def _causal_only():
    """While tracing, let OPT's decoder skip building a 4-D mask from the all-ones
    attention mask: with no mask, attention is plain causal (``is_causal``), which is
    exactly what an unpadded prompt needs.  Torch results are unchanged (same maths)."""
    from transformers.models.opt import modeling_opt

    with _export_lock:
        original = modeling_opt.OPTDecoder._update_causal_mask
        modeling_opt.OPTDecoder._update_causal_mask = lambda self, *args, **kwargs: None
        try:
            yield
        finally:
            modeling_opt.OPTDecoder._update_causal_mask = original


def optimise(src: Path, dst: Path) -> Path:
    """Offline ORT graph optimisation (portable level) of ``src`` into ``dst``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation of the weights of ``src`` (activations stay float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(dst.name + ".tmp")
    with _quiet():
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
    os.replace(tmp, dst)
    return dst
