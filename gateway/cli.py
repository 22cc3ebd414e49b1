"""The ``fedgate`` command.

Sub-commands live in ``gateway/commands/`` (one module per area) and are imported only
when used, so ``fedgate --help`` stays fast and a command's heavy imports (torch,
scapy) cost nothing to the others.  Commands parse options and call service functions;
they hold no SQL and no maths.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from gateway.output import configure_logging

# command name -> "module:attribute" of a click command or group
COMMANDS: dict[str, str] = {
    "replay": "gateway.commands.analyst:replay",
    "query": "gateway.commands.analyst:query",
    "stats": "gateway.commands.analyst:stats",
    "feedback": "gateway.commands.analyst:feedback",
    "model": "gateway.commands.model:model",
    "flows": "gateway.commands.flows:flows",
    "certs": "gateway.commands.certs:certs",
    "gateway": "gateway.commands.service:gateway",
    "config": "gateway.commands.service:config",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def _available(self) -> list[str]:
        found = []
        for name, target in self.lazy_commands.items():
            module = target.split(":", 1)[0]
            if importlib.util.find_spec(module) is not None:
                found.append(name)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._available()))

    def get_command(self, ctx: click.Context, cmd_name: str):
        if cmd_name in self.lazy_commands and cmd_name in self._available():
            module_name, attr = self.lazy_commands[cmd_name].split(":", 1)
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, cmd_name)


def version_text(prog: str) -> str:
    """``PROG VERSION`` and the bundled model's version (what ``--version`` prints)."""
    from gateway import __version__
    from gateway.model.modeldir import ModelDirError, bundled_model_dir, bundled_model_version

    try:
        where = str(bundled_model_dir())
    except ModelDirError as exc:
        where = str(exc)
    return f"{prog} {__version__}\nbundled model {bundled_model_version() or 'missing'} ({where})"


def version_option(prog: str):
    """``--version``: the package version and the bundled model's, then exit."""

    def show(ctx: click.Context, _param, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(version_text(prog))
            ctx.exit()

    return click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=show,
                        help="Show the version of fedgate and of its bundled model, then exit.")


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@version_option("fedgate")
def main(verbose: int) -> None:
    """fedgate: classify IoT flows at the edge and learn together over MQTT.

    \b
    Examples:
      fedgate replay data/iot23/CTU-Honeypot-Capture-4-1/conn.log.labeled
      fedgate query --since 1h --label C&C
      fedgate model evaluate --model models/default --data data/iot23/*
      fedgate --version
    """
    configure_logging(verbose)


if __name__ == "__main__":  # pragma: no cover
    main()
