"""Leave-one-scenario-out: a teacher fine-tuned from a small pretrained checkpoint next
to the same architecture trained from scratch, on the CPU.

No checkpoint can be downloaded here, so one is made: a byte-level BPE tokenizer and a
small OPT causal language model pretrained (next-token prediction, no labels) on a
corpus that holds no IoT-23 flow: the Zeek sample traces of ``tests/fixtures`` written
as flow sentences (:func:`gateway.model.text.flow_sentence`) and the English of the
repository's own documentation.  The "scratch" checkpoint is the same directory with
every weight re-initialised (same tokenizer, same architecture), so the two rows differ
only in what pretraining put into the weights.  Both go through the same
``fedgate model train --base-model DIR`` path (text template, the checkpoint's own
tokenizer, learning rate and warm-up) and are scored by ``fedgate model evaluate
--split scenario`` (each fold retrained the way the model was built).

    python -m benchmarks.pretrained_loso --out build/pretrained-loso
    python -m benchmarks.pretrained_loso --out build/pl --epochs 3 --pretrain-steps 600 --json

A real box runs the same commands with opt-125m / opt-350m / opt-1.3b checkpoints:
``fedgate model train --base-model ~/opt-125m --preset teacher ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3


def corpus(repo: Path = REPO_ROOT) -> list[str]:
    """Pretraining text without IoT-23 flows: Zeek sample flows as sentences, and the
    paragraphs of the repository's Markdown documents."""
    from gateway.flows.zeek import iter_records
    from gateway.model.text import flow_sentence

    texts = []
    for log in sorted((repo / "tests" / "fixtures" / "zeek-samples").glob("*/conn.log")):
        texts += [flow_sentence(r) for r in iter_records(log)]
    for md in sorted(repo.glob("*.md")) + sorted((repo / "docs").glob("*.md")) + sorted(repo.glob("*/README.md")):
        for para in md.read_text(errors="replace").split("\n\n"):
            para = " ".join(para.split())
            if len(para) > 40 and not para.startswith(("|", "```", "    ")):
                texts.append(para[:600])
    return texts


def make_tiny_checkpoint(out: Path, texts: list[str], *, vocab: int = 800, hidden: int = 64, layers: int = 2,
                         heads: int = 4, ffn: int = 256, steps: int = 300, seed: int = 0,
                         pretrained: bool = True) -> Path:
    """An OPT checkpoint directory (config.json, model.safetensors, tokenizer.json and
    its config) with a byte-level BPE tokenizer trained on ``texts`` and, with
    ``pretrained``, ``steps`` steps of next-token training on them."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(out)
    size = tok.get_vocab_size()
    rows = 8 * math.ceil((size + 1) / 8)  # spare rows, as OPT pads 50265 tokens to 50272
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=rows, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       ffn_dim=ffn, word_embed_proj_dim=hidden, max_position_embeddings=128, dropout=0.0,
                       attention_dropout=0.0, do_layer_norm_before=True, pad_token_id=1, bos_token_id=2,
                       eos_token_id=2)
    model = OPTForCausalLM(config)
    torch.set_num_threads(1)  # tiny matrices: more threads than free cores only slow them down
    if pretrained:
        enc = [e.ids[:128] for e in tok.encode_batch(texts)]
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        model.train()
        for _ in range(steps):
            pick = torch.randint(len(enc), (16,), generator=gen).tolist()
            width = max(len(enc[i]) for i in pick)
            ids = torch.full((16, width), 1, dtype=torch.long)
            for row, i in enumerate(pick):
                ids[row, : len(enc[i])] = torch.tensor(enc[i])
            labels = ids.masked_fill(ids == 1, -100)
            loss = model(input_ids=ids, attention_mask=(ids != 1).long(), labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    return out


def scratch_copy(checkpoint: Path, out: Path, *, seed: int = 0) -> Path:
    """``checkpoint`` with every weight re-initialised (same tokenizer and config)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    shutil.copytree(checkpoint, out, dirs_exist_ok=True)
    torch.manual_seed(seed)
    OPTForCausalLM(OPTConfig.from_pretrained(checkpoint)).save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "iot23")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per fold")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning rate [fedgate's default for --base-model]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from gateway.model.evaluation import evaluate_scenarios
    from gateway.model.pipeline import train_model
    from gateway.output import emit_rows

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    texts = corpus()
    ckpt = make_tiny_checkpoint(args.out / "tiny-opt", texts, steps=args.pretrain_steps)
    scratch = scratch_copy(ckpt, args.out / "tiny-opt-scratch")
    result = {"corpus_texts": len(texts), "pretrain_steps": args.pretrain_steps, "epochs": args.epochs, "rows": []}
    for name, base in (("pretrained", ckpt), ("scratch", scratch)):
        model = train_model([args.data], args.out / f"teacher-{name}", preset="teacher", base_model=base,
                            epochs=args.epochs, lr=args.lr, device="cpu")
        loso = evaluate_scenarios(model.path, [args.data], epochs=args.epochs)
        for row in loso["rows"]:
            result["rows"].append({"init": name, **row})
        print(f"{name}: done at {time.perf_counter() - started:.0f}s", file=sys.stderr)
    result["seconds"] = round(time.perf_counter() - started)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        cols = ["init", "held_out", "flows", "malicious", "student_accuracy", "student_f1", "student_macro_f1",
                "rf_accuracy", "rf_f1"]
        emit_rows(result["rows"], cols, title="leave-one-scenario-out, teacher from a tiny checkpoint (text)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
