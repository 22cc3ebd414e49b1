"""Start a real mosquitto for tests, on a free loopback port, from a config text.

A thin test-side adapter over the product's one broker launcher
(``cloud_aggregator.broker.LocalBroker``): tests hand in a config *text* whose
``{port}`` and ``{dir}`` placeholders are filled here (``{dir}`` = the test's work
directory, where certificates and logs live); the launcher then points persistence at a
directory mosquitto can still write after dropping root, so retained messages and
sessions really survive a restart in tests too.
"""

from __future__ import annotations

from pathlib import Path

from cloud_aggregator.broker import BrokerError, LocalBroker, find_mosquitto, free_port

__all__ = ["BrokerError", "Mosquitto", "find_mosquitto", "free_port"]


class Mosquitto(LocalBroker):
    """A mosquitto process; ``start()``/``stop()``/``restart()`` keep port and data dir."""

    def __init__(self, *, config_text: str, workdir: Path, port: int | None = None):
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        source = workdir / "mosquitto.source.conf"
        source.write_text(config_text.replace("{port}", str(port)).replace("{dir}", str(workdir)))
        super().__init__(workdir=workdir, config=source, port=port)

    def restart(self) -> None:
        self.stop()
        self.start()
