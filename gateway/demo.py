"""``python -m gateway.demo`` (what ``make demo`` runs): fedgate end to end on embedded defaults.

1. Replays an IoT-23 scenario from ``data/iot23`` into a temporary SQLite store,
   classifying every flow with the default model (``models/default``), and prints the
   replay summary and a few detections.
2. Runs a short federated experiment (``fedgate-aggregator experiment --quick``: a real
   mosquitto, the aggregator, three gateway processes, GSFS vs FedAvg vs FedOpt) and
   prints its summary and where the report is.

Everything is written under a temporary directory (``--workdir`` keeps it somewhere
else). Takes a few minutes on two CPU cores.

\b
Examples:
  python -m gateway.demo
  python -m gateway.demo --workdir /tmp/fedgate-demo --skip-experiment
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.panel import Panel

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "data" / "iot23"
REPLAY_SCENARIO = "CTU-Malware-Capture-8-1"  # Hakai: C&C and benign flows, 10k lines
EXPERIMENT_GATEWAYS = ("CTU-Honeypot-Capture-7-1", "CTU-Honeypot-Capture-4-1", "CTU-Malware-Capture-8-1")


def replay_part(console: Console, workdir: Path, model_dir: Path) -> None:
    from gateway.ingest import replay
    from gateway.output import emit_mapping, emit_rows
    from gateway.store import repository as repo
    from gateway.store.db import open_store

    log_path = DATA / REPLAY_SCENARIO / "conn.log.labeled"
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
                             "detection", "score"], title="a few detections (score >= 0.5)")
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
        console.print(f"[yellow]{model_dir} holds no model (make model builds it): flows are stored unclassified")
        return None
    return load_classifier(model_dir)


def experiment_part(console: Console, workdir: Path) -> Path:
    from cloud_aggregator.experiment import QUICK, ExperimentSettings, run_experiment, summary_rows
    from gateway.output import emit_rows

    console.rule("[bold]2. Federated learning: GSFS vs FedAvg vs FedOpt (quick)")
    out = workdir / "experiment"
    settings = ExperimentSettings(gateway_data=tuple(DATA / g for g in EXPERIMENT_GATEWAYS), out=out,
                                  rounds=3, quick=True, **{k: v for k, v in QUICK.items() if k != "rounds"})
    report = run_experiment(settings, console=console)
    emit_rows(summary_rows(report), ["run", "rounds", "central_acc", "central_f1", "client_f1", "uploads",
                                     "MB_up", "wall_s"], title="experiment summary")
    return out / "report.md"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the demo's files here (default: a new temporary directory).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (default: the committed models/default).")
@click.option("--skip-experiment", is_flag=True, help="Only the replay part.")
def main(workdir: Path | None, model_dir: Path | None, skip_experiment: bool) -> None:
    from gateway.model.modeldir import bundled_model_dir

    model_dir = model_dir or bundled_model_dir()
    console = Console()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fedgate-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    console.print(Panel.fit("fedgate demo: edge flow classification + federated learning over MQTT",
                            subtitle=str(workdir)))
    replay_part(console, workdir, model_dir)
    if not skip_experiment:
        report = experiment_part(console, workdir)
        console.print(f"[bold green]report:[/bold green] {report} (report.json and PNG plots beside it)")
    console.print(f"demo finished in {time.time() - started:.0f} s; files in {workdir}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
