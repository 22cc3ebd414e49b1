"""ONNX export of a model directory: optimum export of a prompt graph, int8.

``model.onnx`` is produced by optimum's exporter (task ``text-classification``, OPT's
ONNX config with ``input_ids`` as the only input and a fixed prompt length) from the
directory's ``config.json`` + ``model.safetensors``.  Its model patcher replaces OPT's
forward, while tracing, by :func:`prompt_logits`: the same maths written for
fixed-length prompts, whose classifier reads the hidden state of one position (the last,
``[END]``, in a flow prompt).  That lets the graph

* compute the last decoder layer at that position only (its keys and values still come
  from every position): about 40 % fewer multiply-adds;
* run each attention head on its own contiguous ``(batch, length, head_dim)`` arrays
  from its own projection, so no transposes of ``(batch, length, heads, head_dim)``
  tensors (for a 16-wide head they cost more than the matrix products);
* do every projection on 2-D ``(batch * length, hidden)`` rows, as one ``Gemm`` each
  (bias included);
* drop the attention-mask subgraph (prompts are never padded); the choice of the
  pooled position (HF's rightmost non-pad token) stays, a few ops on ``(batch, length)``.

The written graph holds standard ONNX ops only (ONNX Runtime's *basic*, provider
independent optimisations, applied offline): each session adds the fusions of its own
execution provider when it loads (``ORT_ENABLE_ALL``: ``FusedMatMul``, ``FusedGemm``
on CPU), so one file serves CPU and CUDA.  The export checks its logits against the
Hugging Face model before writing.  ``model.int8.onnx`` is a dynamic int8 quantisation
of that graph (``onnxruntime.quantization``), for CPUs.  ``model.fp16.onnx`` is the same
graph with float16 weights and activations but float32 logits (``keep_io_types``), for
GPUs (tensor cores, half the memory traffic); it is checked against the float32 graph
within :data:`FP16_ATOL` + :data:`FP16_RTOL` x |logit| before it is written.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_ATOL = 1e-4
"""Largest logit difference allowed between the exported graph and the torch model."""
FP16_ATOL = 0.05
FP16_RTOL = 0.01
"""fp16 graph vs fp32 graph: |a - b| <= FP16_ATOL + FP16_RTOL * |a| for every logit.
float16 keeps 11 significant bits (relative step 2^-11 = 4.9e-4); a handful of layers of
sums over a few hundred terms grow that to a few 1e-3 relative.  The committed default
student differs by at most 0.009 on logits up to 4.3 (docs/gpu-and-pretrained.md)."""


def _not_quantiser_advice(record: logging.LogRecord) -> bool:
    # the quantiser logs through the root logger that shape "pre-processing" may help;
    # the graph it gets is already ORT-optimised, with fixed shapes
    return not (record.levelno < logging.ERROR and "onnxruntime" in record.pathname
                and "quantization" in record.pathname)


@contextlib.contextmanager
def _quiet():
    """The exporters print tracer warnings that mean nothing for fixed-shape prompts."""
    root = logging.getLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("optimum", "transformers", "torch.onnx"):
            logging.getLogger(name).setLevel(logging.ERROR)
        root.addFilter(_not_quantiser_advice)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            root.removeFilter(_not_quantiser_advice)


# optimum's patcher swaps module-level functions while it traces: one export at a time
_export_lock = threading.Lock()


def export_onnx(model_dir: Path, *, int8: bool = False, fp16: bool = False) -> list[Path]:
    from optimum.exporters.onnx import main_export

    from gateway.model.tokenizer import FlowTokenizer

    model_dir = Path(model_dir)
    length = FlowTokenizer.load(model_dir / "tokenizer.json").length
    written = []
    with tempfile.TemporaryDirectory(prefix="fedgate-onnx-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        # optimum needs only the torch side; the tokenizer files it would copy are ours.
        for name in ("config.json", "model.safetensors"):
            shutil.copy2(model_dir / name, src / name)
        raw = Path(tmp) / "onnx"
        with _export_lock, _quiet():
            main_export(
                str(src), output=str(raw), task="text-classification", opset=OPSET,
                do_validation=False, device="cpu", batch_size=2, sequence_length=length,
                custom_onnx_configs={"model": _prompt_onnx_config(src, length)},
            )
        graph = optimise(raw / "model.onnx", Path(tmp) / "model.onnx")
        check_against_torch(graph, src, length)
        os.replace(shutil.copyfile(graph, model_dir / "model.onnx.tmp"), model_dir / "model.onnx")
        written.append(model_dir / "model.onnx")
        if int8:
            written.append(quantize_int8(graph, model_dir / "model.int8.onnx"))
        if fp16:
            written.append(convert_fp16(graph, model_dir / "model.fp16.onnx"))
    return written


def _prompt_onnx_config(src: Path, length: int):
    """optimum's OPT ONNX config for fixed-length unpadded prompts.

    ``input_ids`` is the only input (the attention mask of an unpadded prompt is all
    ones) and only its batch axis is dynamic, so every reshape in the graph has constant
    sizes; tracing goes through :class:`_PromptPatcher`.
    """
    from optimum.exporters.onnx.model_configs import OPTOnnxConfig
    from transformers import AutoConfig

    class PromptOnnxConfig(OPTOnnxConfig):
        _MODEL_PATCHER = functools.partial(_PromptPatcher, length=length)

        @property
        def inputs(self):
            return {"input_ids": {0: "batch_size"}}

    return PromptOnnxConfig(AutoConfig.from_pretrained(src), task="text-classification")


def _PromptPatcher(config, model, model_kwargs=None, *, length: int):
    """optimum's model patcher with OPT's forward replaced by :func:`prompt_logits`
    (a factory: optimum is imported only when exporting)."""
    from optimum.exporters.onnx.model_patcher import ModelPatcher

    patcher = ModelPatcher(config, model, model_kwargs=model_kwargs)
    logits = prompt_logits(model, length=length)

    # optimum reads the input names from the wrapped signature, and the tracer then
    # passes every parameter of it positionally (None for all but input_ids)
    @functools.wraps(patcher.orig_forward)
    def forward(input_ids, *_unused, **_unused_kw):
        return {"logits": logits(input_ids)}

    patcher.patched_forward = forward
    return patcher


def prompt_logits(model, *, length: int):
    """``ids -> logits`` of an ``OPTForSequenceClassification`` for prompts of ``length``
    tokens, written for a small fast ONNX graph (see the module docstring).

    Equal to ``model(input_ids=ids, attention_mask=ones).logits`` for any ids: the
    classifier reads one position, the rightmost non-pad token (the last position of a
    flow prompt, which ends with ``[END]``), so the last layer computes its query,
    attention output and feed-forward at that position only, attending to it and the
    positions before it.  Weights are re-arranged once (per-head slices, the query
    scaling folded in); they are constants of the traced graph.
    """
    import torch

    dec = model.model.decoder
    cfg = model.config
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = hidden // heads
    if length > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {length} > max_position_embeddings {cfg.max_position_embeddings}")
    pre_norm = cfg.do_layer_norm_before
    pad = cfg.pad_token_id
    steps = torch.arange(length)
    masked = torch.finfo(torch.float32).min

    def t(w):  # (out, in) Linear weight -> (in, out) for x @ w
        return w.detach().t().contiguous()

    with torch.no_grad():
        # OPT's learned positions are offset by 2; an unpadded prompt uses 0..length-1
        positions = dec.embed_positions.weight[2 : 2 + length].detach().clone()
        causal = torch.full((length, length), masked).triu(1)
        layers = []
        for layer in dec.layers:
            a = layer.self_attn
            s = a.scaling

            def bias(lin, scale=1.0):
                return (lin.bias.detach() * scale) if lin.bias is not None else torch.zeros(lin.out_features)

            per_head = []
            for h in range(heads):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                per_head.append({
                    "q": (t(a.q_proj.weight[rows] * s), bias(a.q_proj, s)[rows].clone()),
                    "k": (t(a.k_proj.weight[rows]), bias(a.k_proj)[rows].clone()),
                    "v": (t(a.v_proj.weight[rows]), bias(a.v_proj)[rows].clone()),
                })
            layers.append({
                "heads": per_head,
                "out": (t(a.out_proj.weight), bias(a.out_proj)),
                "fc1": (t(layer.fc1.weight), bias(layer.fc1)),
                "fc2": (t(layer.fc2.weight), bias(layer.fc2)),
                "attn_norm": layer.self_attn_layer_norm,
                "ffn_norm": layer.final_layer_norm,
                "act": layer.activation_fn,
            })

    def linear(x, wb):
        # on 2-D rows MatMul + Add becomes one Gemm (bias included) in :func:`optimise`;
        # on 3-D tensors ORT keeps a separate Add pass over the output
        return x @ wb[0] + wb[1]

    def attention(x_all, x_query, p, mask):
        """Per-head attention of ``x_query`` rows (every position, or one per prompt)
        over all positions of ``x_all``; ``mask`` hides the later positions."""
        n_query = length if x_query is x_all else 1
        outs = []
        for hp in p["heads"]:
            q = linear(x_query, hp["q"]).reshape(-1, n_query, head_dim)
            k = linear(x_all, hp["k"]).reshape(-1, length, head_dim)
            v = linear(x_all, hp["v"]).reshape(-1, length, head_dim)
            w = q @ k.transpose(1, 2) + mask
            outs.append((w.softmax(-1) @ v).reshape(-1, head_dim))
        return linear(torch.cat(outs, dim=1), p["out"])

    def pooled(ids):
        """The row (of the ``batch * length`` rows) the classifier reads in each prompt,
        as Hugging Face picks it (rightmost non-pad token), and the additive mask of the
        positions after it."""
        if pad is None:
            at = torch.full_like(ids[:, 0], length - 1)
        else:
            # ArgMax over float32 (exact for these small integers): CUDA has no int64 ArgMax
            at = (steps.float() * (ids != pad).float()).argmax(-1)
        rows = torch.arange(ids.shape[0]) * length + at
        later = torch.where(steps > at[:, None], masked, 0.0).unsqueeze(1)  # (batch, 1, length)
        return rows, later

    def forward(ids):
        h = dec.embed_tokens(ids)
        if dec.project_in is not None:
            h = dec.project_in(h)
        h = (h + positions).reshape(-1, hidden)  # (batch * length, hidden)
        rows, later = pooled(ids)
        for i, p in enumerate(layers):
            x = p["attn_norm"](h) if pre_norm else h
            if i == len(layers) - 1:
                h = h.index_select(0, rows)
                o = attention(x, x.index_select(0, rows), p, later)
            else:
                o = attention(x, x, p, causal)
            h = h + o
            if not pre_norm:
                h = p["attn_norm"](h)
            y = p["ffn_norm"](h) if pre_norm else h
            h = h + linear(p["act"](linear(y, p["fc1"])), p["fc2"])
            if not pre_norm:
                h = p["ffn_norm"](h)
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = dec.project_out(h)
        return model.score(h)

    return forward


def check_against_torch(onnx_path: Path, src: Path, length: int, *, rows: int = 64, seed: int = 0) -> float:
    """Largest logit difference between ``onnx_path`` and the Hugging Face model on
    random prompts (pads included); raises ``ValueError`` above :data:`EXPORT_ATOL`.  Guards the
    rewritten forward against any OPT variant or library version it does not match."""
    import onnxruntime as ort
    import torch
    from transformers import OPTForSequenceClassification

    model = OPTForSequenceClassification.from_pretrained(src).eval()
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=(rows, length), dtype=np.int64)
    with torch.inference_mode():
        t_ids = torch.from_numpy(ids)
        want = model(input_ids=t_ids, attention_mask=torch.ones_like(t_ids)).logits.numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": ids})[0]
    diff = float(np.abs(got - want).max())
    if not diff <= EXPORT_ATOL:
        raise ValueError(f"exported ONNX logits differ from the torch model by {diff:.2e} (> {EXPORT_ATOL})")
    return diff


def optimise(src: Path, dst: Path) -> Path:
    """ONNX Runtime's basic graph optimisations of ``src`` into ``dst``: constant folding
    (the traced weights become initializers, which the int8 quantiser needs), redundant
    node removal, MatMul + Add -> Gemm.  They run before ORT assigns nodes to execution
    providers and write standard ONNX ops only, so the file stays portable; the
    provider-specific fusions happen when a session loads it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
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


def convert_fp16(src: Path, dst: Path, *, rows: int = 256, seed: int = 0) -> Path:
    """``src`` with float16 weights and activations and float32 ``logits`` output (the
    ``input_ids`` input stays int64), checked against ``src`` on random prompts with
    :func:`fp16_agreement`; raises ``ValueError`` beyond the tolerance."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model16 = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(model16, str(tmp))
    try:
        worst = fp16_agreement(src, tmp, rows=rows, seed=seed)
        if worst > 1.0:
            raise ValueError(f"fp16 logits differ from fp32 by {worst:.2f}x the tolerance "
                             f"({FP16_ATOL} + {FP16_RTOL} x |logit|)")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)
    return dst


def fp16_agreement(fp32_path: Path, fp16_path: Path, *, rows: int = 256, seed: int = 0,
                   provider: str = "CPUExecutionProvider", ids: np.ndarray | None = None) -> float:
    """The worst ratio ``|a - b| / (FP16_ATOL + FP16_RTOL * |a|)`` over the logits of the
    two graphs on ``ids`` (default: random prompts of every vocabulary id); <= 1 is within
    tolerance."""
    a, b = logits_pair(fp32_path, fp16_path, rows=rows, seed=seed, provider=provider, ids=ids)
    return float((np.abs(a - b) / (FP16_ATOL + FP16_RTOL * np.abs(a))).max()) if a.size else 0.0


def logits_pair(path_a: Path, path_b: Path, *, rows: int = 256, seed: int = 0,
                provider: str = "CPUExecutionProvider", ids: np.ndarray | None = None):
    """Logits of two graphs of one model on the same prompts (for comparisons)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess_a = ort.InferenceSession(str(path_a), so, providers=[provider])
    sess_b = ort.InferenceSession(str(path_b), so, providers=[provider])
    if ids is None:
        shape = sess_a.get_inputs()[0].shape
        length = shape[1] if isinstance(shape[1], int) else 24
        vocab = _vocab_size(path_a)
        ids = np.random.default_rng(seed).integers(0, vocab, size=(rows, length), dtype=np.int64)
    return sess_a.run(["logits"], {"input_ids": ids})[0], sess_b.run(["logits"], {"input_ids": ids})[0]


def _vocab_size(path: Path) -> int:
    """Rows of the graph's token embedding (the first Gather's data initializer)."""
    import onnx

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and "input_ids" in node.input and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    raise ValueError(f"{path}: no token embedding found")
