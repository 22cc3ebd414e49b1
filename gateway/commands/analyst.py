"""Analyst commands: ``fedgate replay``, ``query``, ``stats``, ``feedback``.

They parse options and call ``gateway.ingest`` / ``gateway.store.repository``; output
goes through ``gateway.output``.  A database that cannot be reached or written ends the
command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import click

from gateway.output import FORMATS, emit_json, emit_mapping, emit_rows, printable

DB_HELP = "Database URL (default: $FEDGATE_DB or sqlite:///./fedgate.db), e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time_bound(text: str, *, now: float) -> float:
    """Epoch seconds for ``30m``/``1h``/``2d`` (that long before ``now``), an ISO 8601
    time (UTC when it has no zone) or plain epoch seconds."""
    m = _DURATION.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use a duration (30m, 1h, 2d), ISO 8601 (2018-10-25T12:00:00) or epoch seconds"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


class TimeBound(click.ParamType):
    name = "TIME"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return parse_time_bound(str(value), now=time.time())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


class StoreUnavailable(click.ClickException):
    """The database cannot be used: exit status 2 (1 is for bad input)."""

    exit_code = 2


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def _store(url: str | None) -> Iterator:
    """Open the store; turn its errors into one clean message and exit status 2."""
    from gateway.store.db import StoreError, open_store

    try:
        engine, factory = open_store(url)
    except StoreError as exc:
        raise StoreUnavailable(str(exc)) from None
    try:
        yield factory
    except StoreError as exc:
        raise StoreUnavailable(str(exc)) from None
    finally:
        engine.dispose()


def _load_classifier(model_dir: str | None, no_classify: bool):
    """The classifier replay uses: --model DIR, else the model bundled with fedgate."""
    if no_classify:
        return None
    if importlib.util.find_spec("gateway.inference") is None:
        if model_dir is not None:
            raise click.ClickException("--model needs gateway.inference, which this installation lacks")
        return None
    from gateway.model.modeldir import ModelDirError, bundled_model_dir

    try:
        model = Path(model_dir) if model_dir else bundled_model_dir()
    except ModelDirError as exc:
        raise click.ClickException(f"no bundled model: {exc} (pass --model DIR or --no-classify)") from None
    from gateway import inference

    try:
        # ---- the one place replay gets its model ----
        return inference.load_classifier(model)
    except (OSError, ValueError, RuntimeError) as exc:  # bad model dir, no usable provider
        raise click.ClickException(f"cannot load the model in {model}: {exc}") from None


# ---------------------------------------------------------------- replay


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--db", "db_url", default=None, help=DB_HELP)
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="Model directory to classify flows with (default: the model bundled with fedgate).")
@click.option("--no-classify", is_flag=True, help="Store flows only, no detections.")
@click.option("--strict", is_flag=True, help="Stop with exit status 1 at the first bad line.")
@click.option("--source", default=None,
              help="Key to store the flows under (default: each file's absolute path). "
                   "Give rotated archives of one sensor the same key.")
@click.option("--from-start", is_flag=True,
              help="Ignore the saved offset and read whole files again (stored flows are skipped).")
@click.option("--batch-size", default=20_000, show_default=True, type=click.IntRange(min=1),
              help="Records per transaction.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def replay(files, db_url, model_dir, no_classify, strict, source, from_start, batch_size, as_json):
    """Ingest Zeek conn logs (TSV, JSON, IoT-23 labelled, .gz) or pcaps into the store.

    Each batch of flows and the file's offset are committed together, so an
    interrupted replay resumes where it stopped and a repeated one stores nothing twice.
    Bad lines are counted, logged with file and line, and skipped.
    Exit status: 0 done, 1 a bad line under --strict, 2 the database is not
    usable, 130 interrupted (run the same command again to resume).

    \b
    Examples:
      fedgate replay data/iot23/CTU-Honeypot-Capture-4-1/conn.log.labeled
      fedgate replay --db postgresql+psycopg://postgres@127.0.0.1:5432/test data/iot23/*/conn.log.labeled
      fedgate replay --strict --json /var/log/zeek/conn.2026-11-24-14-00-00.log.gz
      fedgate replay --model build/student capture.pcap     # another model directory
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from gateway.ingest import ReplayError, replay as run_replay
    from gateway.output import progress_label

    classifier = _load_classifier(model_dir, no_classify)
    with _store(db_url) as factory:
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty(),
        )
        tasks: dict[str, int] = {}

        def on_progress(path: str, done: int, total: int) -> None:
            if path not in tasks:
                tasks[path] = progress.add_task(progress_label(Path(path).name), total=total)
            progress.update(tasks[path], completed=done)

        try:
            with progress:
                summary = run_replay(
                    files, session_factory=factory, classifier=classifier, strict=strict,
                    batch_size=batch_size, progress=on_progress, source=source, from_start=from_start,
                )
        except ReplayError as exc:
            click.echo(f"error: {printable(str(exc))}", err=True)
            click.echo("batches before this line are stored; fix the input or run without --strict", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: every committed batch is stored; the same command resumes", err=True)
            sys.exit(130)
    data = summary.as_dict()
    if as_json:
        emit_json(data)
        return
    columns = ["path", "kind", "records", "stored", "duplicates", "rejected", "resumed_from"]
    if any(f["error"] for f in data["files"]):
        columns.append("error")
    emit_rows(data["files"], columns, title="files", whole=("path",),
              optional=["records", "stored", "rejected", "error", "duplicates", "kind", "resumed_from"])
    overview = {k: data[k] for k in ("records", "stored", "duplicates", "rejected", "elapsed_s")}
    overview["records_per_s"] = int(data["records_per_s"])
    for reason, n in sorted(data["rejected_by_reason"].items()):
        overview[f"rejected: {reason}"] = n
    for reason, n in sorted(data["skipped_packets"].items()):
        overview[f"skipped packets: {reason}"] = n
    if data["model_version"]:
        overview.update(
            model_version=data["model_version"], detections=data["detections"],
            labelled=data["labelled"], accuracy=data["accuracy"], label_accuracy=data["label_accuracy"],
        )
    emit_mapping(overview, as_json=False, title="replay")


# ---------------------------------------------------------------- query

# what a narrow terminal gives up first: the end of this list (uid and endpoints stay)
QUERY_TABLE_OPTIONAL = ["detection", "time (UTC)", "label", "feedback", "proto", "state"]


@click.command()
@click.option("--since", type=TimeBound(), default=None, help="Flows at or after: 30m, 1h, 2d, ISO 8601 or epoch.")
@click.option("--until", type=TimeBound(), default=None, help="Flows before: same forms as --since.")
@click.option("--host", default=None, help="Either end of the flow is this IP.")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Either end uses this port.")
@click.option("--label", default=None, help="Label, IoT-23 detailed label, detection or feedback label (any case).")
@click.option("--min-score", type=click.FloatRange(0, 1), default=None, help="Latest detection score at least this.")
@click.option("--source", default=None, help="Only flows of this source.")
@click.option("--uid", default=None, help="Only the flow(s) with this Zeek uid.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Newest N flows.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table: the columns that fit the terminal (addresses and uids never cut); wide: every "
                   "column at full width; json, csv: every stored field, for scripts.")
@click.option("--db", "db_url", default=None, help=DB_HELP)
def query(since, until, host, port, label, min_score, source, uid, limit, fmt, db_url):
    """List stored flows with their latest detection and feedback, newest first.

    \b
    Examples:
      fedgate query --since 1h --min-score 0.9
      fedgate query --host 192.168.1.132 --port 23 --limit 20
      fedgate query --since 1h --format wide | less -S
      fedgate query --label C&C --format csv > cc.csv
      fedgate query --uid CGm6jB4dXK71ZDWUDh --format json
      fedgate query --since 2018-10-25T12:00:00 --until 2018-10-25T13:00:00 --format json
    """
    from gateway.store.repository import QUERY_COLUMNS, FlowQuery, query_flows

    try:
        q = FlowQuery(since=since, until=until, host=host, port=port, label=label,
                      min_score=min_score, source=source, uid=uid, limit=limit)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with _store(db_url) as factory, factory() as session:
        rows = query_flows(session, q)
    if fmt in ("table", "wide"):
        # a narrower view for terminals; json/csv carry every column
        view = [
            {
                "time (UTC)": datetime.fromtimestamp(r["ts"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                "uid": r["uid"],
                "orig": _endpoint(r["orig_h"], r["orig_p"]),
                "resp": _endpoint(r["resp_h"], r["resp_p"]),
                "proto": r["proto"],
                "state": r["conn_state"],
                "label": r["detailed_label"] if r["detailed_label"] not in (None, "-") else r["label"],
                "detection": None if r["detection"] is None else f"{r['detection']} {r['score']:.2f}",
                "feedback": r["feedback"],
            }
            for r in rows
        ]
        columns = ["time (UTC)", "uid", "orig", "resp", "proto", "state", "label", "detection", "feedback"]
        emit_rows(view, columns, fmt=fmt, title=f"{len(rows)} flows", whole=("uid", "orig", "resp"),
                  optional=QUERY_TABLE_OPTIONAL, hidden_hint="--format wide shows them")
    else:
        emit_rows(rows, QUERY_COLUMNS, fmt=fmt)


# ---------------------------------------------------------------- stats


@click.command()
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Top talkers to list.")
@click.option("--prune-days", type=click.FloatRange(min=0), default=None,
              help="First delete flows (and their detections) stored more than N days ago, "
                   "and acknowledged outbox messages; feedback is kept.")
@click.option("--db", "db_url", default=None, help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stats(top, prune_days, db_url, as_json):
    """Counts by label, detections by model, top talkers and per-source figures.

    \b
    Examples:
      fedgate stats
      fedgate stats --top 5 --json
      fedgate stats --prune-days 30     # retention: keep 30 days of flows
    """
    from gateway.store.repository import prune, store_stats

    with _store(db_url) as factory:
        pruned = None
        if prune_days is not None:
            with factory.begin() as session:
                pruned = prune(session, older_than_days=prune_days)
        with factory() as session:
            data = store_stats(session, top=top)
    if pruned is not None:
        data["pruned"] = pruned
    if as_json:
        emit_json(data)
        return
    totals = dict(data["totals"])
    if pruned is not None:
        totals.update({f"pruned {k}": v for k, v in pruned.items()})
    emit_mapping(totals, as_json=False, title="store")
    emit_rows(data["by_label"], ["label", "detailed_label", "flows"], title="flows by label")
    if data["by_detection"]:
        emit_rows(data["by_detection"], ["model_version", "label", "detections", "mean_score"], title="detections")
    emit_rows(data["top_talkers"], ["host", "flows", "bytes", "peers"], title="top talkers (originators)",
              whole=("host",))
    per_source = [dict(r, first_ts=_iso(r["first_ts"]), last_ts=_iso(r["last_ts"]),
                       last_ingested_at=_iso(r["last_ingested_at"])) for r in data["per_source"]]
    emit_rows(per_source, ["source", "flows", "labelled_malicious", "first_ts", "last_ts", "last_ingested_at", "offset"],
              title="sources", whole=("source",),
              optional=["flows", "labelled_malicious", "last_ts", "first_ts", "last_ingested_at", "offset"])


# ---------------------------------------------------------------- feedback


@click.command()
@click.argument("uid")
@click.argument("label")
@click.option("--note", default=None, help="Free text kept with the verdict.")
@click.option("--source", default=None, help="Source of the flow, when the uid is stored under several.")
@click.option("--db", "db_url", default=None, help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the stored verdict as JSON.")
def feedback(uid, label, note, source, db_url, as_json):
    """Record an analyst's verdict LABEL on the stored flow UID (e.g. a false positive).

    Verdicts are kept (never pruned) and used as labels by local training.

    \b
    Examples:
      fedgate feedback CGm6jB4dXK71ZDWUDh benign --note "NTP to Google, not C&C"
      fedgate feedback CnaDAG3n5r8eiG4su2 Malicious --source /data/gw1/conn.log
    """
    from gateway.store.repository import AmbiguousFlow, FlowNotFound, add_feedback

    with _store(db_url) as factory:
        try:
            with factory.begin() as session:
                fb = add_feedback(session, uid, label, note=note, source=source)
                row = {"id": fb.id, "uid": fb.uid, "source": fb.source, "label": fb.label,
                       "note": fb.note, "created_at": _iso(fb.created_at)}
        except (FlowNotFound, AmbiguousFlow, ValueError) as exc:
            raise click.ClickException(str(exc.args[0] if exc.args else exc)) from None
    emit_mapping(row, as_json=as_json, title="feedback stored")
