"""Model building jobs: train, distill, build the default model.

These are the service functions behind ``fedgate model train|distill|build-default``:
they read data directories, split, train, pick the alert threshold on the validation
part and write a model directory.  Progress goes to an optional ``Progress`` (rich) so
the command shows it and tests stay quiet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.model.data import FlowDataset, data_digest, encode, load_scenarios, paper_split
from gateway.model.labels import LabelSet, record_label
from gateway.model.metrics import malicious_score, softmax, choose_threshold
from gateway.model.device import Precision, describe, resolve_device
from gateway.model.modeldir import ModelInfo, load_student, save_model_dir
from gateway.model.opt import (
    FINETUNE_LR, LORA_LR, PRESETS, build_model, check_base_model, from_base_model, merge_lora, parameter_count,
    with_lora,
)
from gateway.model.prompt import DEFAULT_TEMPLATE, get_template
from gateway.model.text import is_text_template
from gateway.model.tokenizer import FlowTokenizer
from gateway.model.train import evaluate, predict_logits, train_epochs

log = logging.getLogger(__name__)
DEFAULT_SEED = 23
DEFAULT_CANDIDATES = 3  # students trained by build_default; the best on validation is kept


@dataclass
class PreparedData:
    """Pooled labelled flows of some data directories and their paper split."""

    records: list
    names: list[str]
    scenario_of: np.ndarray  # scenario name per record
    split: tuple[np.ndarray, np.ndarray, np.ndarray]  # train, validation, test indices
    digest: str
    seed: int
    paths: list[str]


def prepare(paths: Sequence[str | Path], *, seed: int) -> PreparedData:
    scenarios = load_scenarios(paths)
    records = [r for s in scenarios for r in s.records]
    names = [record_label(r) for r in records]
    scen = np.array([s.name for s in scenarios for _ in s.records], dtype=object)
    return PreparedData(
        records=records,
        names=names,
        scenario_of=scen,
        split=paper_split(names, seed=seed),
        digest=data_digest(s.path for s in scenarios),
        seed=seed,
        paths=[str(p) for p in paths],
    )


def _take(records: list, index: np.ndarray) -> list:
    return [records[i] for i in index]


class _Epochs:
    """Adapts train_epochs' on_epoch to a rich progress task (or nothing)."""

    def __init__(self, progress, description: str, total: int):
        self.progress = progress
        self.task = progress.add_task(description, total=total) if progress is not None else None

    def __call__(self, epoch: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=epoch, description=f"{self.progress.tasks[self.task].description.split(' loss')[0]} loss {loss:.4f}")


def fit_threshold(model, val: FlowDataset) -> tuple[float, dict]:
    """The alert threshold that maximises binary F1 on ``val``, and val metrics at it."""
    if len(val) == 0:
        return 0.5, {}
    probs = softmax(predict_logits(model, val.ids).astype(np.float64))
    threshold = choose_threshold(val.y != 0, malicious_score(probs), val.weight)
    metrics = evaluate(model, val, threshold=threshold)
    return threshold, _summary(metrics)


def _summary(metrics: dict) -> dict:
    keys = ("accuracy", "precision", "recall", "f1", "label_accuracy", "macro_f1", "flows")
    return {k: round(float(metrics[k]), 6) for k in keys if k in metrics}


def train_model(
    data: Sequence[str | Path] | PreparedData,
    out: str | Path,
    *,
    preset: str = "student",
    base_model: str | Path | None = None,
    epochs: int | None = None,
    seed: int = DEFAULT_SEED,
    lr: float | None = None,
    template: str | None = None,
    int8: bool = False,
    train_index: np.ndarray | None = None,
    val_index: np.ndarray | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    warmup: float = 0.1,
    lora_rank: int | None = None,
    progress=None,
) -> ModelInfo:
    """Train a classifier with cross-entropy on the train part of the paper split
    (or ``train_index``), choose its threshold on the validation part, save it.
    ``device``: auto, cpu, cuda or cuda:N (:mod:`gateway.model.device`);
    ``batch_size``: training rows per step [the preset's]; ``warmup``: share of the
    steps the learning rate rises over.

    ``base_model``: a local pretrained OPT checkpoint directory with its tokenizer.  Its
    embeddings and layers are kept as they are and flows are read as text
    (``template`` defaults to ``flow-text``) through its own BPE tokenizer; ``lr``
    defaults to a fine-tuning rate, and ``lora_rank`` trains LoRA adapters instead of
    all weights (merged into the saved model).  Without it ``template`` defaults to
    the edge template and the preset's architecture is initialised from ``seed``."""
    from gateway.model.text import FLOW_TEXT, TextTokenizer, is_text_template

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if lora_rank is not None and base_model is None:
        raise ValueError("LoRA adapts a pretrained checkpoint: give --base-model too")
    p = PRESETS[preset]
    chosen = get_template(template or (FLOW_TEXT.ident if base_model is not None else DEFAULT_TEMPLATE))
    if base_model is not None and not is_text_template(chosen):
        raise ValueError(f"--base-model reads flows as text with the checkpoint's own tokenizer; template "
                         f"{chosen.ident} is made of flow words it does not know (use {FLOW_TEXT.ident})")
    if base_model is None and is_text_template(chosen):
        raise ValueError(f"template {chosen.ident} needs a pretrained checkpoint's tokenizer (--base-model DIR)")
    prepared = data if isinstance(data, PreparedData) else prepare(data, seed=seed)
    tr_idx = prepared.split[0] if train_index is None else train_index
    va_idx = prepared.split[1] if val_index is None else val_index
    train_records = _take(prepared.records, tr_idx)
    if base_model is not None:
        check_base_model(base_model)
        tokenizer = TextTokenizer.from_checkpoint(base_model, chosen)
    else:
        tokenizer = FlowTokenizer.build(train_records, chosen)
    labels = LabelSet.from_labels(prepared.names[i] for i in tr_idx)
    train_ds = encode(train_records, tokenizer, labels).dedupe()
    val_ds = encode(_take(prepared.records, va_idx), tokenizer, labels).dedupe()

    def make_model(model_seed: int):
        if base_model is not None:
            model = from_base_model(base_model, tokenizer, labels, seed=model_seed)
            return with_lora(model, lora_rank) if lora_rank else model
        return build_model(p, tokenizer, labels, seed=model_seed)

    if base_model is not None and lr is None:
        lr = LORA_LR if lora_rank else FINETUNE_LR
    return _train_and_save(
        make_model, tokenizer, labels, train_ds, val_ds, out,
        preset=preset, epochs=epochs, lr=lr, seed=seed, digest=prepared.digest, int8=int8, parent=None,
        progress=progress, description=f"train {preset}", device=device, batch_size=batch_size,
        after_train=merge_lora, warmup=warmup,
        extra={
            "kind": "teacher" if preset == "teacher" else "student",
            "base_model": str(base_model) if base_model else None,
        },
        training={"loss": "cross-entropy", "split_seed": prepared.seed, "data": prepared.paths,
                  "warmup": warmup, "lora_rank": lora_rank},
    )


def distill_model(
    teacher_dir: str | Path,
    data: Sequence[str | Path] | PreparedData,
    out: str | Path,
    *,
    preset: str = "student",
    epochs: int | None = None,
    seed: int | None = None,
    temperature: float = 2.0,
    alpha: float = 0.3,
    lr: float | None = None,
    int8: bool = True,
    candidates: int = 1,
    train_index: np.ndarray | None = None,
    val_index: np.ndarray | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress=None,
) -> ModelInfo:
    """Distil a student from a teacher directory on the same split the teacher used
    (its split seed), with the teacher's tokenizer and labels.

    ``candidates`` > 1 trains that many students (seeds ``seed``, ``seed + 1``, ...)
    and keeps the one with the best validation macro-F1 (then binary F1): with one or
    two validation flows per rare label, a single run's rare-label result is luck."""
    teacher, tokenizer, labels, t_meta = load_student(teacher_dir)
    split_seed = int(t_meta.get("training", {}).get("split_seed", DEFAULT_SEED))
    seed = split_seed if seed is None else seed
    prepared = data if isinstance(data, PreparedData) else prepare(data, seed=split_seed)
    if prepared.digest != t_meta.get("data_digest"):
        log.warning("distilling on other data than the teacher was trained on (digest differs)")
    tr_idx = prepared.split[0] if train_index is None else train_index
    va_idx = prepared.split[1] if val_index is None else val_index
    teacher.to(resolve_device(device))
    if is_text_template(tokenizer.template):
        # a fine-tuned checkpoint reads text; the edge student reads flow words
        t_tokenizer = tokenizer
        tokenizer = FlowTokenizer.build(_take(prepared.records, tr_idx), get_template(DEFAULT_TEMPLATE))
        train_ds, t_logits = distillation_rows(_take(prepared.records, tr_idx), tokenizer, t_tokenizer, teacher,
                                               labels)
    else:
        train_ds = encode(_take(prepared.records, tr_idx), tokenizer, labels).dedupe()
        t_logits = predict_logits(teacher, train_ds.ids)
    val_ds = encode(_take(prepared.records, va_idx), tokenizer, labels).dedupe()
    teacher.cpu()
    p = PRESETS[preset]
    ratio = parameter_count(build_model(p, tokenizer, labels, seed=seed)) / parameter_count(teacher)
    if ratio > 0.1:
        log.warning("student has %.0f%% of the teacher's parameters (target <= 10%%)", 100 * ratio)
    return _train_and_save(
        lambda model_seed: build_model(p, tokenizer, labels, seed=model_seed), tokenizer, labels,
        train_ds, val_ds, out, candidates=candidates,
        preset=preset, epochs=epochs, lr=lr, seed=seed, digest=prepared.digest, int8=int8,
        parent=str(t_meta["version"]), progress=progress, description=f"distill {preset}",
        device=device, batch_size=batch_size,
        extra={"kind": "student", "teacher": {"version": t_meta["version"], "parameters": parameter_count(teacher)}},
        training={"loss": "distillation", "temperature": temperature, "alpha": alpha,
                  "split_seed": split_seed, "data": prepared.paths},
        teacher_logits=t_logits, temperature=temperature, alpha=alpha,
    )


def distillation_rows(records: list, student_tok: FlowTokenizer, teacher_tok, teacher, labels: LabelSet
                      ) -> tuple[FlowDataset, np.ndarray]:
    """Deduplicated student rows of ``records`` and, per row, the mean teacher logits of
    the flows it stands for (the teacher reads its own prompts of the same flows)."""
    y = labels.encode([record_label(r) for r in records])
    t_ids = teacher_tok.encode(records)
    t_uniq, t_inv = np.unique(t_ids, axis=0, return_inverse=True)
    per_flow = predict_logits(teacher, t_uniq)[t_inv.ravel()].astype(np.float64)
    rows = np.concatenate([student_tok.encode(records), y[:, None]], axis=1)
    uniq, inv = np.unique(rows, axis=0, return_inverse=True)
    inv = inv.ravel()
    weight = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    logits = np.zeros((len(uniq), per_flow.shape[1]))
    np.add.at(logits, inv, per_flow)
    return (FlowDataset(uniq[:, :-1], uniq[:, -1], weight.astype(np.float32)),
            (logits / weight[:, None]).astype(np.float32))


def _train_and_save(
    make_model: Callable[[int], object], tokenizer, labels, train_ds: FlowDataset, val_ds: FlowDataset, out, *,
    preset: str, epochs: int | None, lr: float | None, seed: int, digest: str, int8: bool,
    parent: str | None, progress, description: str, extra: dict, training: dict, candidates: int = 1,
    device: str = "auto", batch_size: int | None = None, warmup: float = 0.1,
    after_train: Callable[[object], object] | None = None, **loss,
) -> ModelInfo:
    """Train ``make_model(seed)`` (``loss``: distillation arguments of train_epochs, if
    any) for ``candidates`` consecutive seeds, choose each one's threshold on
    ``val_ds``, keep the best on validation (macro-F1, then F1), save it with metadata."""
    if candidates < 1:
        raise ValueError("candidates must be >= 1")
    p = PRESETS[preset]
    n_epochs = p.epochs if epochs is None else epochs
    lr = lr or p.lr
    batch_size = batch_size or p.batch_size
    dev = resolve_device(device)
    started = time.perf_counter()
    best, tried = None, []
    for model_seed in range(seed, seed + candidates):
        model = make_model(model_seed)
        label = description if candidates == 1 else f"{description} seed {model_seed}"
        train_epochs(
            model, train_ds, epochs=n_epochs, lr=lr, seed=model_seed, batch_size=batch_size,
            class_power=p.class_power, device=dev, warmup=warmup, on_epoch=_Epochs(progress, label, n_epochs),
            **loss,
        )
        if after_train is not None:
            model = after_train(model)
        threshold, val_metrics = fit_threshold(model, val_ds)
        rank = (val_metrics.get("macro_f1", 0.0), val_metrics.get("f1", 0.0))
        tried.append({"seed": model_seed, "val_macro_f1": rank[0], "val_f1": rank[1]})
        if best is None or rank > best[0]:
            best = (rank, model_seed, model.cpu(), threshold, val_metrics)
        else:
            model.cpu()  # only the best candidate is kept; free the device for the next
    _, seed, model, threshold, val_metrics = best
    if candidates > 1:
        training = {**training, "candidates": tried}
    return save_model_dir(
        model, tokenizer, labels, out,
        parent=parent,
        threshold=threshold,
        metrics={"validation": val_metrics},
        data_digest=digest,
        int8=int8,
        extra={
            "preset": preset,
            **extra,
            "training": {
                **training, "epochs": n_epochs, "seed": seed, "lr": lr, "split": "paper",
                "class_power": p.class_power, "batch_size": batch_size,
                "device": describe(dev), "precision": Precision.for_device(dev).name,
                "train_rows": len(train_ds), "train_flows": int(train_ds.flows),
                "seconds": round(time.perf_counter() - started, 1),
            },
            "parameters_by_preset": parameter_count(model),
        },
    )


def build_default(
    data: Sequence[str | Path], out: str | Path, *, teacher_out: str | Path, seed: int = DEFAULT_SEED,
    template: str = DEFAULT_TEMPLATE, device: str = "cpu", progress=None,
) -> tuple[ModelInfo, ModelInfo]:
    """Teacher then distilled student (with int8), reproducibly from ``data``; the
    student reads the teacher's ``template``.  ``device`` defaults to the CPU: the
    committed default model must not depend on whether the build host has a GPU."""
    prepared = prepare(data, seed=seed)
    teacher = train_model(prepared, teacher_out, preset="teacher", seed=seed, template=template, device=device,
                          progress=progress)
    student = distill_model(teacher.path, prepared, out, seed=seed, int8=True, candidates=DEFAULT_CANDIDATES,
                            device=device, progress=progress)
    return teacher, student
