"""``fedgate model``: train, distil, export and evaluate the flow classifier.

The commands parse options and call ``gateway.model.pipeline`` / ``evaluation`` /
``export``; they hold no training or metric code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from gateway.output import emit_json, emit_mapping, emit_rows

SUMMARY_COLUMNS = ("accuracy", "precision", "recall", "f1", "label_accuracy", "macro_f1")
DATA_HELP = "Data directory or labelled conn.log (repeatable); every conn.log.labeled below it is used."


def _template_option(default: str | None = "edge", extra: str = ""):
    from gateway.model import text  # noqa: F401 - registers flow-text
    from gateway.model.prompt import DEFAULT_TEMPLATE, TEMPLATE_VERSIONS

    idents = ", ".join(sorted(t.ident for t in TEMPLATE_VERSIONS.values()))
    if default is None:
        return click.option("--template", default=None,
                            help=f"Prompt template, NAME/vN or NAME for its newest version ({idents}) "
                                 f"[{DEFAULT_TEMPLATE}; flow-text with --base-model].{extra}")
    return click.option("--template", default=DEFAULT_TEMPLATE, show_default=True,
                        help=f"Prompt template, NAME/vN or NAME for its newest version ({idents}).{extra}")


def _device_option(default: str = "auto"):
    return click.option(
        "--device", default=default, show_default=True, metavar="auto|cpu|cuda[:N]",
        help="Where torch trains: auto = CUDA when torch sees a GPU, else the CPU. "
             "On CUDA forward passes run under bfloat16/float16 autocast.")


def _batch_option():
    return click.option("--batch-size", type=click.IntRange(1), default=None,
                        help="Training rows per optimiser step [the preset's, on every device].")


def _lr_option():
    return click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                        help="Peak learning rate of AdamW (warm-up, then cosine) [the preset's].")


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # stderr: stdout carries the table or the --json document, nothing else
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=False,
    )


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _model_summary(info, as_json: bool, title: str) -> None:
    meta = info.metadata
    data = {
        "directory": str(info.path),
        "version": meta["version"],
        "parent": meta.get("parent"),
        "preset": meta.get("preset"),
        "parameters": meta.get("parameters"),
        "labels": ",".join(info.labels.names),
        "threshold": round(meta.get("threshold", 0.5), 6),
        "template": f"{meta['template']['name']}/v{meta['template']['version']}",
        **{f"val_{k}": v for k, v in meta.get("metrics", {}).get("validation", {}).items()},
        "train_seconds": meta.get("training", {}).get("seconds"),
    }
    emit_mapping(data, as_json=as_json, title=title)


@click.group()
def model() -> None:
    """Build the flow classifier: train a teacher or student, distil, export ONNX, evaluate.

    \b
    Examples:
      fedgate model train --data data/iot23 --out build/teacher --preset teacher
      fedgate model distill --teacher build/teacher --data data/iot23 --out build/student
      fedgate model export build/student --int8
      fedgate model evaluate --model build/student --model build/teacher --data data/iot23
      fedgate model evaluate --model models/default --data data/iot23 --split scenario
    """


@model.command()
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True), help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write (replaced atomically).")
@click.option("--preset", type=click.Choice(["teacher", "student"]), default="student", show_default=True, help="Model size.")
@click.option("--base-model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local pretrained OPT checkpoint directory with its tokenizer to fine-tune (nothing is "
                   "downloaded): flows are written as text for its own BPE tokenizer, its embeddings kept.")
@click.option("--epochs", type=click.IntRange(0), default=None, help="Passes over the (deduplicated) train part [preset default].")
@click.option("--seed", type=int, default=23, show_default=True, help="Seed of the split and of training.")
@_template_option(default=None)
@_lr_option()
@click.option("--warmup", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Share of the steps over which the learning rate rises linearly.")
@click.option("--lora-rank", type=click.IntRange(1), default=None,
              help="With --base-model: train LoRA adapters of this rank (peft) instead of all weights, "
                   "to fit memory; they are merged into the saved model.")
@_batch_option()
@_device_option()
@click.option("--int8", is_flag=True, help="Also write model.int8.onnx.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train(data, out, preset, base_model, epochs, seed, template, lr, warmup, lora_rank, batch_size, device, int8,
          as_json):
    """Train a classifier on the train part (70%) of the paper split of DATA.

    The alert threshold is chosen on the validation part (20%); the test part (10%)
    is left for `fedgate model evaluate`.  With --base-model the checkpoint is
    fine-tuned (learning rate 5e-5, or 5e-4 with --lora-rank, unless --lr says);
    distil it to the edge student with `fedgate model distill`.

    \b
    Examples:
      fedgate model train --data data/iot23 --out build/teacher --preset teacher
      fedgate model train --data data/iot23 --out build/t125 --preset teacher --base-model ~/opt-125m --epochs 3
      fedgate model train --data data/iot23 --out build/t1b --preset teacher --base-model ~/opt-1.3b --lora-rank 16
      fedgate model train --data data/iot23 --out build/t3 --preset teacher --template edge-compact/v3
      fedgate model train --data data/iot23 --out build/teacher --preset teacher --device cuda
    """
    from gateway.model.pipeline import train_model

    try:
        with _progress() as progress:
            info = train_model(list(data), out, preset=preset, base_model=base_model, epochs=epochs,
                               seed=seed, template=template, lr=lr, warmup=warmup, lora_rank=lora_rank,
                               batch_size=batch_size, device=device, int8=int8, progress=progress)
    except (ValueError, OSError, RuntimeError) as exc:
        raise _fail(exc) from None
    _model_summary(info, as_json, f"trained {preset}")


@model.command()
@click.option("--teacher", required=True, type=click.Path(exists=True, file_okay=False), help="Teacher model directory.")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True), help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Student model directory to write.")
@click.option("--epochs", type=click.IntRange(0), default=None, help="Passes over the train part [preset default].")
@click.option("--temperature", type=click.FloatRange(min=0.05), default=2.0, show_default=True, help="Softmax temperature of the KL term.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.3, show_default=True, help="Weight of the KL term (1 - alpha: cross-entropy).")
@click.option("--seed", type=int, default=None, help="Training seed [the teacher's split seed].")
@click.option("--candidates", type=click.IntRange(1), default=1, show_default=True,
              help="Students trained (seeds SEED, SEED+1, ...); the best validation macro-F1 is kept.")
@_lr_option()
@_batch_option()
@_device_option()
@click.option("--no-int8", is_flag=True, help="Do not write model.int8.onnx.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def distill(teacher, data, out, epochs, temperature, alpha, seed, candidates, lr, batch_size, device, no_int8,
            as_json):
    """Distil a student (about 1/15 of the teacher's parameters) from TEACHER on the same split.

    \b
    Example:
      fedgate model distill --teacher build/teacher --data data/iot23 --out build/student
      fedgate model distill --teacher build/teacher --data data/iot23 --out build/student --candidates 3
    """
    from gateway.model.pipeline import distill_model

    try:
        with _progress() as progress:
            info = distill_model(teacher, list(data), out, epochs=epochs, temperature=temperature, alpha=alpha,
                                 seed=seed, candidates=candidates, lr=lr, batch_size=batch_size, device=device,
                                 int8=not no_int8, progress=progress)
    except (ValueError, OSError, RuntimeError) as exc:
        raise _fail(exc) from None
    _model_summary(info, as_json, "distilled student")


@model.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--int8", is_flag=True, help="Also write the dynamic int8 quantisation model.int8.onnx (CPUs).")
@click.option("--fp16", is_flag=True,
              help="Also write model.fp16.onnx: float16 weights and activations, float32 logits (GPUs); "
                   "checked against the float32 graph before it is written.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(model_dir, int8, fp16, as_json):
    """(Re-)export MODEL_DIR's torch weights to model.onnx (optimum), optionally int8 and fp16.

    The gateway runs the graph its [inference] precision names (fp32, fp16 or int8).

    \b
    Examples:
      fedgate model export build/student --int8
      fedgate model export build/student --fp16
    """
    from gateway.model.modeldir import ModelDirError, export_onnx, validate_model_dir

    try:
        validate_model_dir(model_dir, need_onnx=False)
        written = export_onnx(Path(model_dir), int8=int8, fp16=fp16)
        validate_model_dir(model_dir, need_onnx=True, int8=int8)
    except (ModelDirError, ValueError, OSError) as exc:
        raise _fail(exc) from None
    emit_rows([{"file": str(p), "bytes": p.stat().st_size} for p in written], ["file", "bytes"],
              fmt="json" if as_json else "table", title="exported")


@model.command()
@click.option("--model", "models", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Model directory (repeatable: e.g. student and teacher side by side).")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True), help=DATA_HELP)
@click.option("--split", type=click.Choice(["paper", "scenario"]), default="paper", show_default=True,
              help="paper: the model's own 70/20/10 test part; scenario: leave one data directory out (retrains).")
@click.option("--epochs", type=click.IntRange(1), default=None, help="scenario split: epochs per fold [preset default].")
@click.option("--no-latency", is_flag=True, help="Skip the latency/throughput measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def evaluate(models, data, split, epochs, no_latency, as_json):
    """Accuracy, precision, recall, F1 (binary, per label, macro), confusion matrix,
    latency and throughput of MODEL(s), with a RandomForest reference row.

    \b
    Examples:
      fedgate model evaluate --model models/default --data data/iot23
      fedgate model evaluate --model build/student --model build/teacher --data data/iot23 --json
      fedgate model evaluate --model models/default --data data/iot23 --split scenario
    """
    from gateway.model.evaluation import evaluate_paper, evaluate_scenarios
    from gateway.model.modeldir import ModelDirError

    try:
        with _progress() as progress:
            if split == "paper":
                result = evaluate_paper(list(models), list(data), latency=not no_latency, progress=progress)
            else:
                result = evaluate_scenarios(models[0], list(data), epochs=epochs, progress=progress)
    except (ModelDirError, ValueError, OSError) as exc:
        raise _fail(exc) from None
    if as_json:
        emit_json(result)
        return
    for note in result.get("notes", []):
        click.echo(f"note: {note}", err=True)
    if split == "scenario":
        emit_rows(result["rows"], title=f"leave-one-scenario-out (student preset {result['preset']}, seed {result['seed']})")
        return
    columns = ["model", *SUMMARY_COLUMNS, "p50_ms", "p99_ms", "flows_per_s", "max_logit_diff"]
    emit_rows(result["rows"], columns, title=f"paper split test part ({result['flows']['test']} flows, seed {result['seed']})")
    detail = result["detail"]
    emit_rows(detail["per_label"], ["label", "precision", "recall", "f1", "support"], title=f"per label: {detail['model']}")
    present = [i for i, row in enumerate(detail["confusion"]) if sum(row) or sum(r[i] for r in detail["confusion"])]
    cm_rows = [{"truth \\ predicted": detail["labels"][i], **{detail["labels"][j]: int(detail["confusion"][i][j]) for j in present}}
               for i in present]
    emit_rows(cm_rows, title="confusion matrix")


@model.command("build-default")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True), help=DATA_HELP)
@click.option("--out", default="models/default", show_default=True, type=click.Path(file_okay=False), help="Student directory.")
@click.option("--teacher-out", default="build/teacher", show_default=True, type=click.Path(file_okay=False),
              help="Where the teacher is kept (not committed).")
@click.option("--seed", type=int, default=23, show_default=True)
@_template_option()
@_device_option(default="cpu")
@click.option("--json", "as_json", is_flag=True)
def build_default(data, out, teacher_out, seed, template, device, as_json):
    """Rebuild the default model: teacher, then distilled student with int8 (what `make model` runs).

    \b
    Example:
      fedgate model build-default --data data/iot23 --out models/default
      fedgate model build-default --data data/iot23 --out build/v3 --teacher-out build/t3 --template edge-compact/v3
    """
    from gateway.model.pipeline import build_default as build

    logging.getLogger("root").setLevel(logging.WARNING)
    try:
        with _progress() as progress:
            teacher, student = build(list(data), out, teacher_out=teacher_out, seed=seed, template=template,
                                     device=device, progress=progress)
    except (ValueError, OSError, RuntimeError) as exc:
        raise _fail(exc) from None
    _model_summary(teacher, as_json, "teacher")
    _model_summary(student, as_json, "student (default model)")
