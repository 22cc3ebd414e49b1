"""Experiment: an ONNX graph that computes the last prompt position only in the last layer.

The classifier reads one hidden state (the ``[END]`` token's), yet the exported OPT
graph runs the last decoder layer's query projection, attention output, feed-forward,
final layer norm and score head on all 24 positions.  This script rebuilds the same
forward pass in plain torch with the last layer restricted to the last position
(keys and values still come from every position; causal masking is then a no-op),
checks its logits against ``OPTForSequenceClassification`` and exports it with
``torch.onnx.export``, then times four runs at batch 256 and 1 thread: torch eager
(the HF model, as ``benchmarks.inference`` does), the same pruned forward in torch,
the model directory's ``model.onnx`` (optimum export) and the pruned ONNX graph.

It is not used by the gateway yet (``gateway/model/export.py`` still exports through
optimum); it measures what that change would buy.

    python -m benchmarks.last_position                 # models/default
    python -m benchmarks.last_position --model build/student --json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def last_position_module(hf):
    """The OPT classifier forward for unpadded prompts, last layer on the last position."""
    import torch
    from torch import nn

    dec = hf.model.decoder
    hidden, heads = hf.config.hidden_size, hf.config.num_attention_heads
    head_dim = hidden // heads

    class LastPosition(nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, ids):
            batch, length = ids.shape
            positions = torch.arange(length) + 2  # OPT's learned positions are offset by 2
            h = dec.embed_tokens(ids) + dec.embed_positions.weight[positions]
            causal = torch.full((length, length), float("-inf")).triu(1)
            for i, layer in enumerate(dec.layers):
                last = i == len(dec.layers) - 1
                attn = layer.self_attn
                x = layer.self_attn_layer_norm(h)
                q = attn.q_proj(x[:, -1:, :] if last else x) * attn.scaling
                q = q.view(batch, -1, heads, head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(batch, length, heads, head_dim).transpose(1, 2)
                v = attn.v_proj(x).view(batch, length, heads, head_dim).transpose(1, 2)
                w = q @ k.transpose(-1, -2)
                if not last:  # the last position may see every position
                    w = w + causal
                o = (w.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, hidden)
                h = (h[:, -1:, :] if last else h) + attn.out_proj(o)
                h = h + layer.fc2(torch.relu(layer.fc1(layer.final_layer_norm(h))))
            return hf.score(dec.final_layer_norm(h)[:, -1, :])

    return LastPosition().eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "default")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per figure (best of 3 thirds)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("COLUMNS", "140")

    import onnxruntime as ort
    import torch

    from gateway.model.modeldir import load_student
    from gateway.output import emit_json, emit_rows

    hf, tokenizer, _, meta = load_student(args.model)
    pruned = last_position_module(hf)
    rng = np.random.default_rng(0)
    x = rng.integers(3, tokenizer.vocab_size, size=(args.batch, tokenizer.length)).astype(np.int64)
    ids = torch.from_numpy(x)
    torch.set_num_threads(1)

    def session(path: Path):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def flows_per_s(run) -> int:
        run()
        best = 0.0
        for _ in range(3):
            t, done = time.perf_counter(), 0
            while time.perf_counter() - t < args.seconds / 3:
                run()
                done += 1
            best = max(best, done * args.batch / (time.perf_counter() - t))
        return round(best)

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        onnx_path = Path(tmp) / "last_position.onnx"
        torch.onnx.export(pruned, (ids,), str(onnx_path), input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        reference = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
        sess_pruned, sess_default = session(onnx_path), session(args.model / "model.onnx")
        mask = torch.ones_like(ids)
        rows = [
            {"what": "torch eager (HF OPT, as benchmarks.inference)",
             "flows_per_s": flows_per_s(lambda: hf(input_ids=ids, attention_mask=mask)), "max_logit_diff": 0.0},
            {"what": "torch eager, last position only",
             "flows_per_s": flows_per_s(lambda: pruned(ids)),
             "max_logit_diff": float(np.abs(pruned(ids).numpy() - reference).max())},
            {"what": "onnx fp32 (model.onnx, optimum export)",
             "flows_per_s": flows_per_s(lambda: sess_default.run(None, {"input_ids": x})),
             "max_logit_diff": float(np.abs(sess_default.run(None, {"input_ids": x})[0] - reference).max())},
            {"what": "onnx fp32, last position only",
             "flows_per_s": flows_per_s(lambda: sess_pruned.run(None, {"input_ids": x})),
             "max_logit_diff": float(np.abs(sess_pruned.run(None, {"input_ids": x})[0] - reference).max())},
        ]
    base = rows[0]["flows_per_s"]
    for row in rows:
        row["vs_torch_eager"] = round(row["flows_per_s"] / max(1, base), 2)
        row["max_logit_diff"] = f"{row['max_logit_diff']:.1e}"
    summary = {"model": str(args.model), "version": meta["version"], "batch": args.batch, "threads": 1,
               "load_avg_1m_start": round(load_start, 2), "load_avg_1m_end": round(os.getloadavg()[0], 2)}
    if args.json:
        emit_json({"summary": summary, "rows": rows})
    else:
        emit_rows(rows, ["what", "flows_per_s", "vs_torch_eager", "max_logit_diff"],
                  title=f"last-position-only graph, batch {args.batch}, 1 thread (load {summary['load_avg_1m_start']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
