"""The ``fedgate-aggregator`` command: run the aggregator, show its status, run experiments.

Commands parse options and call service functions; no SQL and no maths here.
``experiment`` lives in ``cloud_aggregator/experiment.py`` and is imported lazily.
"""

from __future__ import annotations

import signal
import threading
from datetime import datetime, timezone

import click

from gateway.cli import LazyGroup, version_option
from gateway.output import configure_logging, emit_json, emit_mapping, emit_rows

LAZY = {"experiment": "cloud_aggregator.experiment:experiment_command"}


class _TolerantLazyGroup(LazyGroup):
    """A lazily imported command that cannot be loaded is left out instead of breaking
    ``--help`` for every other command (its module may land separately)."""

    def get_command(self, ctx, cmd_name):
        try:
            return super().get_command(ctx, cmd_name)
        except (ImportError, AttributeError) as exc:
            if ctx.invoked_subcommand == cmd_name or cmd_name in (ctx.protected_args or []):
                raise click.ClickException(f"command {cmd_name!r} is not available: {exc}") from None
            return None


@click.group(cls=_TolerantLazyGroup, lazy_commands=LAZY, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@version_option("fedgate-aggregator")
def main(verbose: int) -> None:
    """fedgate-aggregator: pool gateway updates, aggregate (GSFS, FedAvg, FedOpt), broadcast.

    \b
    Examples:
      fedgate-aggregator run --config agg.toml
      fedgate-aggregator status --database aggregator.db
      fedgate-aggregator status --database aggregator.db --json
      fedgate-aggregator keygen keys/aggregator.key
      fedgate-aggregator teacher --config agg.toml --model build/teacher
      fedgate-aggregator experiment --help
    """
    configure_logging(verbose)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="TOML file with [aggregator], [mqtt], [strategy] (and [strategy.robust], [strategy.dp], [local]).")
@click.option("--http", "http_listen", default=None, metavar="HOST:PORT",
              help="Serve the status page, /api/status and Prometheus /metrics here (e.g. 127.0.0.1:9109).")
def run(config_path: str, http_listen: str | None) -> None:
    """Run the aggregator until SIGINT/SIGTERM.

    \b
    Minimal agg.toml:
      [aggregator]
      database = "aggregator.db"
      initial_model = "models/default/model.safetensors"
      signing_key = "keys/aggregator.key"      # made once by: fedgate-aggregator keygen keys/aggregator.key
      [mqtt]
      host = "127.0.0.1"
      port = 1883
      [strategy]
      name = "gsfs"                            # or fedavg, fedopt
      rho = 0.6
      deadline_s = 60
    \b
    Example:
      fedgate-aggregator -v run --config agg.toml
      fedgate-aggregator run --config agg.toml --http 127.0.0.1:9109
    """
    from cloud_aggregator.service import AggregatorConfig
    from cloud_aggregator.service import run as run_service

    try:
        config = AggregatorConfig.from_toml(config_path)
    except (ValueError, TypeError, OSError) as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"aggregator running ({config.strategy}, broker {config.mqtt.host}:{config.mqtt.port}, "
               f"db {config.database}); Ctrl-C stops", err=True)
    page = None
    if http_listen:
        from cloud_aggregator.web import serve
        from gateway.config import ConfigError, parse_listen

        try:
            page = serve(config.database, parse_listen(http_listen, "--http"))
        except (ConfigError, OSError) as exc:
            raise click.ClickException(f"--http {http_listen}: {exc}") from None
        click.echo(f"status page {page.url}/", err=True)
    try:
        run_service(config, stop=stop)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if page is not None:
            page.stop()


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The aggregator's TOML: its [mqtt] broker and credentials and its topic prefix are used.")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Teacher model directory (fedgate model train --preset teacher).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True,
              help="ONNX Runtime provider: auto = CUDA when a session really runs there, else the CPU.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which graph of the teacher runs (fp16 wants `fedgate model export DIR --fp16`).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=500.0, show_default=True,
              help="Flows per second answered per gateway (a token bucket); beyond: rate_limited.")
@click.option("--burst", type=click.IntRange(1), default=5000, show_default=True, help="Token bucket size per gateway.")
def teacher(config_path, model_dir, provider, precision, rate, burst) -> None:
    """Serve the teacher: answer gateways' escalated flows over MQTT 5 request/response.

    Gateways with [escalation] enabled publish the flows their student is unsure of on
    fedgate/v1/gw/<id>/escalate; the answers go to fedgate/v1/gw/<id>/verdict (the
    production ACL grants exactly that) and are stored there as second detections.

    \b
    Examples:
      fedgate-aggregator teacher --config agg.toml --model build/teacher
      fedgate-aggregator -v teacher --config agg.toml --model build/teacher --provider cuda --precision fp16
    """
    from cloud_aggregator.teacher import run as run_teacher
    from cloud_aggregator.teacher import settings_from_aggregator_toml

    try:
        settings = settings_from_aggregator_toml(config_path, model_dir=model_dir, provider=provider,
                                                 precision=precision, rate=rate, burst=burst)
    except (ValueError, TypeError, OSError) as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"teacher {model_dir} answering escalations (broker {settings.mqtt.host}:{settings.mqtt.port}); "
               "Ctrl-C stops", err=True)
    try:
        run_teacher(settings, stop=stop)
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


def _when(ts: float | None) -> str | None:
    return None if not ts else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@main.command()
@click.option("--database", default="aggregator.db", show_default=True,
              help="Aggregator DB: SQLite file or SQLAlchemy URL.")
@click.option("--rounds", "last_rounds", default=20, show_default=True, help="How many recent aggregations to list.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (state, clients, pool, rounds, rejections).")
def status(database: str, last_rounds: int, as_json: bool) -> None:
    """Show global version, gateways (alive or not), the pool, recent rounds with central
    metrics, and rejection counts, from the aggregator DB.

    \b
    Examples:
      fedgate-aggregator status --database aggregator.db
      fedgate-aggregator status --database postgresql+psycopg://fl@db/agg --json | jq .rounds
    """
    from cloud_aggregator.service import status as read_status

    summary = read_status(database, last_rounds=last_rounds)
    if as_json:
        emit_json({"state": summary.state, "clients": summary.clients, "pool": summary.pool,
                   "rounds": summary.rounds, "rejections": summary.rejections})
        return
    if not summary.state:
        raise click.ClickException(f"{database}: no aggregator state yet (has the aggregator run?)")
    emit_mapping({**{k: v for k, v in summary.state.items() if k != "updated_at"},
                  "updated_at": _when(summary.state.get("updated_at"))}, as_json=False, title="aggregator")
    emit_rows([{**c, "last_update_at": _when(c["last_update_at"]), "status_at": _when(c["status_at"])}
               for c in summary.clients],
              ["gateway", "online", "state", "submissions", "window", "last_update_at", "status_at"],
              title="gateways")
    emit_rows([{**p, "received_at": _when(p["received_at"])} for p in summary.pool],
              ["gateway", "base_version", "round", "num_samples", "submissions", "bytes", "received_at"],
              title="pool (not yet aggregated)")
    metric_cols = sorted({k for r in summary.rounds for k in r if k.startswith(("central_", "client_"))})
    emit_rows(summary.rounds, ["version", "strategy", "round", "updates", "live", *metric_cols, "epsilon",
                               "bytes_up", "bytes_down", "seconds"], title="aggregations")
    emit_rows([{"reason": k, "count": v} for k, v in sorted(summary.rejections.items())], ["reason", "count"],
              title="rejections")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing key.")
def keygen(path: str, force: bool) -> None:
    """Create the Ed25519 key that signs global models (PATH 0600, PATH.pub for gateways).

    \b
    Example:
      fedgate-aggregator keygen keys/aggregator.key
    """
    import os

    from gateway.protocol import signing

    if os.path.exists(path) and not force:
        raise click.ClickException(f"{path} exists (use --force to replace it)")
    key = signing.generate_private_key()
    signing.save_private_key(key, path)
    signing.save_public_key(key, path + ".pub")
    emit_mapping({"private_key": path, "public_key": path + ".pub", "key_id": signing.key_id(key)}, as_json=False)


if __name__ == "__main__":  # pragma: no cover
    main()
