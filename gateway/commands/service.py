"""``fedgate gateway run`` and ``fedgate config check``: operate a gateway from its config."""

from __future__ import annotations

import signal
import threading

import click

from gateway.output import emit_json, emit_rows

CONFIG_OPTION = click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False),
    help="Gateway TOML file (see deploy/gw.example.toml); FEDGATE__SECTION__KEY variables override it.",
)


def _load(config_path: str):
    from gateway.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def gateway() -> None:
    """Run the edge gateway: live sources, detection, store, alerts, FL, status page.

    \b
    Examples:
      fedgate gateway run --config gw.toml
      FEDGATE__MQTT__HOST=broker fedgate -v gateway run --config gw.toml
    """


@gateway.command()
@CONFIG_OPTION
def run(config_path: str) -> None:
    """Run the gateway until SIGTERM or Ctrl-C (then commit, save offsets, say offline).

    \b
    It follows [source] zeek_log / pcap_dir / interface, classifies every flow with
    [gateway] model, stores flows and detections in [gateway] database, publishes
    alerts on {prefix}/gw/{id}/alerts, takes part in federated learning ([fl]) and
    serves a status page, /api/status and Prometheus /metrics on [http] listen.

    \b
    Examples:
      fedgate gateway run --config deploy/gw.example.toml
      FEDGATE_DB_URL=postgresql+psycopg://fedgate@db/gw fedgate gateway run --config gw.toml
    """
    from gateway.service import GatewayService, ServiceError
    from gateway.store.db import StoreError

    config = _load(config_path)
    for note in config.warnings():
        click.echo(f"warning: {note}", err=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        service = GatewayService(config).start()
    except (ServiceError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
    if service.http is not None:
        click.echo(f"gateway {config.gateway.id} running; status page {service.http.url}/", err=True)
    else:
        click.echo(f"gateway {config.gateway.id} running", err=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        click.echo("stopping: committing the batch in hand and saving offsets", err=True)
        service.stop()
    click.echo(f"stopped; {service.status()['flows']} flows this run", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def config() -> None:
    """Check a gateway configuration file.

    \b
    Examples:
      fedgate config check --config gw.toml
      fedgate config check --config gw.toml --json
    """


@config.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object: settings by section, overrides, warnings.")
def check(config_path: str, as_json: bool) -> None:
    """Validate the file (and environment overrides) and print the effective settings.

    \b
    Exit status 0 when valid; otherwise 1 with one line naming the key and the problem,
    e.g. "gw.toml: mqtt.port: 70000 is not a TCP port (1..65535)".
    Passwords and database passwords are shown as ***.

    \b
    Examples:
      fedgate config check --config gw.toml
      FEDGATE__MQTT__PORT=8883 fedgate config check --config gw.toml --json
    """
    from gateway.config import env_overrides

    cfg = _load(config_path)
    settings = cfg.as_dict()
    overridden = set(env_overrides())
    paths = _resolved_paths(cfg)
    if as_json:
        emit_json({"config": config_path, "valid": True, "settings": settings, "paths": paths,
                   "env_overrides": sorted(overridden), "warnings": cfg.warnings()})
        return
    rows = [
        {"key": f"{section}.{key}", "value": value, "from": "env" if f"{section}.{key}" in overridden else ""}
        for section, values in settings.items() for key, value in values.items()
    ]
    emit_rows(rows, ["key", "value", "from"], title=f"{config_path}: valid")
    emit_rows([{"key": k, **v} for k, v in paths.items()], ["key", "path", "status"], title="resolved paths",
              whole=("key", "path"))
    for note in cfg.warnings():
        click.echo(f"warning: {note}", err=True)


def _resolved_paths(cfg) -> dict[str, dict]:
    """What ``config.paths()`` resolves, with what is there now: the bundled model's
    version, whether a file to read exists, whether a directory will be created."""
    import os

    from gateway.model.modeldir import ModelDirError, bundled_model_dir, bundled_model_version

    try:
        bundled = os.path.realpath(bundled_model_dir())
    except ModelDirError:
        bundled = None
    out = {}
    for key, (path, use) in cfg.paths().items():
        if use == "glob":
            status = "pattern"
        elif os.path.exists(path):
            status = "exists" if use == "read" else "exists (written)"
        elif use == "read":
            status = "missing"
        else:  # the gateway creates state_dir, and a SQLite file in an existing directory
            state_dir = os.path.abspath(cfg.gateway.state_dir)
            parent = os.path.dirname(path)
            creatable = os.path.isdir(parent) or os.path.commonpath([state_dir, path]) == state_dir
            status = "created at start" if creatable else f"missing directory {parent}"
        if key == "gateway.model" and bundled and os.path.realpath(path) == bundled:
            status = f"bundled model {bundled_model_version()}"
        out[key] = {"path": path, "use": use, "status": status}
    return out
