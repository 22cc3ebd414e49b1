"""Start a local mosquitto from a broker_config file (the experiment harness and demo).

The one place the product starts a broker. ``{port}`` and ``{dir}`` placeholders in
the config text are filled in (port: a free loopback port unless given; dir: the
broker's working directory, where persistence and the log go). Production brokers are
run by systemd or a container (deploy/), not by this.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
# package data, so the experiment runs in any install; broker_config/dev.conf links here
DEV_CONFIG = Path(__file__).resolve().parent / "mosquitto-dev.conf"


class BrokerError(RuntimeError):
    """mosquitto is missing, did not start, or died."""


def find_mosquitto() -> str | None:
    for name in MOSQUITTO_CANDIDATES:
        found = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(text: str, *, port: int, workdir: Path) -> str:
    """Fill the ``{port}``/``{dir}`` placeholders; in a config without them (dev.conf),
    point the first listener at ``port`` and persistence into ``workdir``."""
    text = text.replace("{port}", str(port)).replace("{dir}", str(workdir))
    text = re.sub(r"(?m)^(listener\s+)\d+", rf"\g<1>{port}", text, count=1)
    return re.sub(r"(?m)^persistence_location\s+.*$", f"persistence_location {workdir}/", text)


class LocalBroker:
    """A mosquitto child process; ``stop()``/``start()`` keep its port and data directory
    (so a restart keeps persisted retained messages and sessions). ``cleanup()`` removes
    a data directory made outside ``workdir``."""

    def __init__(self, *, workdir: str | Path, config: str | Path = DEV_CONFIG, port: int | None = None):
        self.binary = find_mosquitto()
        if self.binary is None:
            raise BrokerError("mosquitto is not installed (make system-deps installs it)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # mosquitto started as root drops to the 'mosquitto' user, which cannot reach a
            # directory below a private (0700) parent: persist in a world-usable one instead.
            import tempfile

            self.data_dir = Path(tempfile.mkdtemp(prefix="fedgate-mosquitto-"))
            os.chmod(self.data_dir, 0o1777)
        config = Path(config)
        if not config.is_file():
            raise BrokerError(f"{config}: broker config not found")
        self.port = port or free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        self.config_path.write_text(render_config(config.read_text(), port=self.port, workdir=self.data_dir))
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "LocalBroker":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self.data_dir != self.workdir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
