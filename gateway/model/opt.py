"""OPT sequence classifiers built from configs: presets for the teacher and the student.

No weights are downloaded: models are built from an ``OPTConfig`` (random init, seeded)
or loaded from a local pretrained checkpoint directory (``--base-model``), which keeps
its embeddings and layers as they are and reads flows as text through its own BPE
tokenizer (:mod:`gateway.model.text`); only the classification head is new.  LoRA
(``peft``) adapters can train instead of all weights, to fit a large checkpoint in
memory; they are merged back before the model is saved, so a model directory is a
plain OPT either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForSequenceClassification

from gateway.model.labels import LabelSet
from gateway.model.prompt import END
from gateway.model.tokenizer import FlowTokenizer


@dataclass(frozen=True)
class Preset:
    """Architecture and training defaults of a model size."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    dropout: float
    epochs: int
    lr: float
    batch_size: int
    # Loss mass of a class = flows ** class_power (gateway.model.train.row_weights):
    # 0.0 gives every detailed label the same mass, so IoT-23's 1-3 flow labels
    # (FileDownload, C&C-FileDownload) are not drowned by its 10,000-flow ones.
    class_power: float = 0.0


PRESETS: dict[str, Preset] = {
    # ~0.5M parameters (>= 10x the student): trained centrally, never shipped to gateways.
    "teacher": Preset(hidden=96, layers=4, heads=4, ffn=384, dropout=0.1, epochs=25, lr=1e-3, batch_size=128),
    # ~40k parameters: what gateways run (ONNX) and what federated learning trains.
    "student": Preset(hidden=32, layers=2, heads=2, ffn=64, dropout=0.0, epochs=150, lr=5e-3, batch_size=128),
}


def opt_config(preset: Preset, tokenizer: FlowTokenizer, labels: LabelSet) -> OPTConfig:
    end_id = tokenizer.vocab[END]
    return OPTConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        ffn_dim=preset.ffn,
        word_embed_proj_dim=preset.hidden,
        max_position_embeddings=tokenizer.length,
        dropout=preset.dropout,
        attention_dropout=preset.dropout,
        activation_function="relu",
        do_layer_norm_before=True,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=end_id,
        eos_token_id=end_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels.names)),
        label2id={n: i for i, n in enumerate(labels.names)},
        problem_type="single_label_classification",
    )


def build_model(preset: Preset | str, tokenizer: FlowTokenizer, labels: LabelSet, *, seed: int) -> OPTForSequenceClassification:
    """A freshly initialised classifier (same seed -> same weights)."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    model = OPTForSequenceClassification(opt_config(preset, tokenizer, labels))
    model.eval()
    return model


FINETUNE_LR = 5e-5
"""Peak rate when all weights of a pretrained checkpoint train (the presets' 1e-3 and
5e-3 are for random initialisation and would wipe out what the checkpoint knows)."""
LORA_LR = 5e-4
"""Peak rate for LoRA adapters (they start at zero and are few)."""


def from_base_model(base_dir: str | Path, tokenizer, labels: LabelSet, *, seed: int) -> OPTForSequenceClassification:
    """A classifier on a local pretrained OPT checkpoint: its embeddings and layers as
    they are (every row of its vocabulary kept: ``tokenizer`` is the checkpoint's own,
    :class:`gateway.model.text.TextTokenizer`), a fresh seeded head on the label set.
    One embedding row is added only if the tokenizer's template marker falls past the
    checkpoint's spare rows."""
    base_dir = Path(base_dir)
    base_config = check_base_model(base_dir)
    if base_config.max_position_embeddings < tokenizer.length:
        raise ValueError(f"{base_dir / 'config.json'}: max_position_embeddings "
                         f"{base_config.max_position_embeddings} < prompt length {tokenizer.length}")
    torch.manual_seed(seed)
    model = OPTForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels.names)),
        label2id={n: i for i, n in enumerate(labels.names)},
        ignore_mismatched_sizes=True,
        problem_type="single_label_classification",
    )
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_token_embeddings(tokenizer.vocab_size, mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_id
    model.eval()
    return model


def check_base_model(base_dir: str | Path) -> OPTConfig:
    """The OPT config of a checkpoint directory; FileNotFoundError / ValueError naming
    config.json when it is missing or not OPT."""
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir / 'config.json'}: base model directory has no config.json")
    base_config = OPTConfig.from_pretrained(base_dir)
    if base_config.model_type != "opt":
        raise ValueError(f"{base_dir / 'config.json'}: model_type {base_config.model_type!r} is not 'opt'")
    return base_config


def with_lora(model: OPTForSequenceClassification, rank: int):
    """``model`` with LoRA adapters (rank ``rank``, alpha 2 x rank) on the attention
    query and value projections; everything else frozen except the new head."""
    from peft import LoraConfig, TaskType, get_peft_model

    if rank < 1:
        raise ValueError("LoRA rank must be >= 1")
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, config)


def merge_lora(model) -> OPTForSequenceClassification:
    """The plain OPT classifier with trained adapters folded into its weights."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if callable(merge) else model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def preset_dict(name: str) -> dict:
    return {"name": name, **asdict(PRESETS[name])}
