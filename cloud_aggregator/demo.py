"""``python -m cloud_aggregator.demo`` (what ``make demo`` runs): fedgate end to end on
embedded defaults.

1. Replays an IoT-23 scenario from ``data/iot23`` into a temporary SQLite store,
   classifying every flow with the bundled default model, and prints the replay
   summary and a few detections.
2. Runs a short federated experiment (``fedgate-aggregator experiment --quick``: a real
   mosquitto, the aggregator, three gateway processes, GSFS vs FedAvg vs FedOpt) and
   prints its summary and where the report is.

Everything is written under a temporary directory (``--workdir`` keeps it somewhere
else). Takes a few minutes on two CPU cores.  It lives on the cloud side because it
runs both: the edge package (``gateway``) never imports ``cloud_aggregator``.

\b
Examples:
  python -m cloud_aggregator.demo
  python -m cloud_aggregator.demo --workdir /tmp/fedgate-demo --skip-experiment
  python -m cloud_aggregator.demo --data /srv/iot23      # outside a checkout
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

DATA = Path(__file__).resolve().parent.parent / "data" / "iot23"  # the checkout's sample
REPLAY_SCENARIO = "CTU-Malware-Capture-8-1"  # Hakai: C&C and benign flows, 10k lines
EXPERIMENT_GATEWAYS = ("CTU-Honeypot-Capture-7-1", "CTU-Honeypot-Capture-4-1", "CTU-Malware-Capture-8-1")


def replay_part(console: Console, workdir: Path, model_dir: Path, data: Path) -> None:
    from gateway.ingest import replay
    from gateway.output import emit_mapping, emit_rows
    from gateway.store import repository as repo
    from gateway.store.db import open_store

    log_path = data / REPLAY_SCENARIO / "conn.log.labeled"
    console.rule(f"[bold]1. Replay {REPLAY_SCENARIO} with the default model")
    classifier = _load_classifier(console, model_dir)
    engine, sessions = open_store(f"sqlite:///{workdir / 'demo.db'}")
    try:
        with console.status("replaying and classifying..."):
            summary = replay([log_path], session_factory=sessions, classifier=classifier)
        d = summary.as_dict()
        emit_mapping({k: d[k] for k in ("records", "stored", "rejected", "detections", "model_version",
                                        "accuracy", "records_per_s") if k in d},
                     as_json=False, title="replay summary")
        with sessions() as s:
            rows = repo.query_flows(s, repo.FlowQuery(min_score=0.5, limit=5))
        if rows:
            emit_rows(rows, ["uid", "orig_h", "resp_h", "resp_p", "proto", "conn_state", "detailed_label",
                             "detection", "score"], title="a few detections (score >= 0.5)",
                      whole=("uid", "orig_h", "resp_h"),
                      optional=["detection", "score", "detailed_label", "resp_p", "proto", "conn_state"],
                      hidden_hint=None)
        else:
            console.print("no detection above 0.5 in this scenario")
    finally:
        engine.dispose()


def _load_classifier(console: Console, model_dir: Path):
    """The model engineer's classifier for ``model_dir`` (None: store flows unclassified)."""
    try:
        from gateway.inference import load_classifier
    except ImportError:
        console.print("[yellow]gateway.inference is not available: flows are stored unclassified")
        return None
    if not (model_dir / "config.json").is_file():
        console.print(f"[yellow]{escape(str(model_dir))} holds no model (make model builds it): flows are stored "
                      "unclassified")
        return None
    return load_classifier(model_dir)


def experiment_part(console: Console, workdir: Path, data: Path) -> Path:
    from cloud_aggregator.experiment import QUICK, ExperimentSettings, run_experiment, summary_rows
    from gateway.output import emit_rows

    console.rule("[bold]2. Federated learning: GSFS vs FedAvg vs FedOpt (quick)")
    out = workdir / "experiment"
    settings = ExperimentSettings(gateway_data=tuple(data / g for g in EXPERIMENT_GATEWAYS), out=out,
                                  rounds=3, quick=True, **{k: v for k, v in QUICK.items() if k != "rounds"})
    report = run_experiment(settings, console=console)
    emit_rows(summary_rows(report), ["run", "rounds", "central_acc", "central_f1", "client_f1", "uploads",
                                     "MB_up", "wall_s"], title="experiment summary")
    return out / "report.md"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the demo's files here (default: a new temporary directory).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (default: the model bundled with fedgate).")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=DATA, show_default=True,
              help="IoT-23 directory with the scenarios the demo uses (the checkout's data/iot23).")
@click.option("--skip-experiment", is_flag=True, help="Only the replay part.")
def main(workdir: Path | None, model_dir: Path | None, data: Path, skip_experiment: bool) -> None:
    from gateway.model.modeldir import bundled_model_dir

    model_dir = model_dir or bundled_model_dir()
    console = Console()
    if not (data / REPLAY_SCENARIO / "conn.log.labeled").is_file():
        raise click.ClickException(f"{data} lacks the IoT-23 scenarios of the demo ({REPLAY_SCENARIO}, ...): "
                                   "run it from a checkout or pass --data")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fedgate-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    console.print(Panel.fit("fedgate demo: edge flow classification + federated learning over MQTT",
                            subtitle=escape(str(workdir))))
    replay_part(console, workdir, model_dir, data)
    if not skip_experiment:
        report = experiment_part(console, workdir, data)
        console.print(f"[bold green]report:[/bold green] {escape(str(report))} (report.json and PNG plots beside it)")
    console.print(f"demo finished in {time.time() - started:.0f} s; files in {escape(str(workdir))}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
