"""deploy/: the systemd units pass `systemd-analyze verify` and the compose files pass
`docker compose config`, where those tools exist (skipped with the reason otherwise)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def _exec_paths(unit_text: str) -> list[str]:
    paths = []
    for line in unit_text.splitlines():
        key, _, value = line.partition("=")
        if key.strip().startswith("Exec") and value.strip():
            paths.append(shlex.split(value)[0].lstrip("-@:+!"))
    return paths


@pytest.fixture(scope="module")
def systemd_root(tmp_path_factory) -> Path:
    """A file-system root for `systemd-analyze verify --root`: the host's system units
    (targets etc.), our units installed the way RUNBOOK.md says, and stand-ins for the
    programs they run (/opt/fedgate/venv/bin/... does not exist on a build machine)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    system_units = next((d for d in SYSTEM_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if system_units is None:
        pytest.skip("no systemd unit directory with sysinit.target on this host")
    root = tmp_path_factory.mktemp("sdroot")
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in ("fedgate-gateway@.service", "fedgate-aggregator.service"):
        shutil.copy(SYSTEMD / unit, etc / unit)
    # live capture only on instance "capture", as the runbook installs it
    (etc / "fedgate-gateway@capture.service.d").mkdir()
    shutil.copy(SYSTEMD / "dropins/live-capture.conf", etc / "fedgate-gateway@capture.service.d")
    (etc / "mosquitto.service.d").mkdir()
    shutil.copy(SYSTEMD / "mosquitto.service.d/fedgate.conf", etc / "mosquitto.service.d")
    texts = [p.read_text() for p in etc.rglob("*") if p.is_file()]
    texts += [(root / "usr/lib/systemd/system/mosquitto.service").read_text()
              if (root / "usr/lib/systemd/system/mosquitto.service").exists() else ""]
    for exe in {p for t in texts for p in _exec_paths(t)}:
        target = root / exe.lstrip("/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("#!/bin/sh\nexit 0\n")
            target.chmod(0o755)
    return root


def verify(root: Path, unit: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", unit],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("unit", [
    "fedgate-gateway@site1.service",
    "fedgate-gateway@capture.service",  # with the live-capture drop-in
    "fedgate-aggregator.service",
])
def test_units_pass_systemd_analyze_verify(systemd_root, unit):
    out = verify(systemd_root, unit)
    # verify exits 0 on unknown keys or unparsable values: any output is a finding
    assert out.returncode == 0 and out.stderr.strip() == "" and out.stdout.strip() == "", (
        out.stdout + out.stderr)


def test_mosquitto_drop_in_passes_verify(systemd_root):
    if not (systemd_root / "usr/lib/systemd/system/mosquitto.service").exists():
        pytest.skip("the host has no packaged mosquitto.service to put the drop-in on")
    out = verify(systemd_root, "mosquitto.service")
    assert out.returncode == 0 and out.stderr.strip() == "", out.stdout + out.stderr


def test_verify_catches_a_broken_unit(systemd_root):
    # the check above is worth something only if it notices mistakes
    bad = systemd_root / "etc/systemd/system/fedgate-broken.service"
    bad.write_text((SYSTEMD / "fedgate-aggregator.service").read_text()
                   .replace("ProtectSystem=strict", "ProtectSytem=strict"))
    out = verify(systemd_root, "fedgate-broken.service")
    assert "Unknown key" in out.stderr


def _compose_command() -> list[str] | None:
    """A Compose v2 client: the files use the Compose Specification (top-level `name`),
    which the legacy Python docker-compose 1.x refuses."""
    docker = shutil.which("docker")
    candidates = ([[docker, "compose"]] if docker else []) + (
        [["docker-compose"]] if shutil.which("docker-compose") else [])
    for cmd in candidates:
        out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().lstrip("v").split(".")[0].isdigit() \
                and int(out.stdout.strip().lstrip("v").split(".")[0]) >= 2:
            return cmd
    return None


def test_compose_files_pass_docker_compose_config(tmp_path):
    compose = _compose_command()
    if compose is None:
        pytest.skip("no Compose v2 client (docker compose / docker-compose >= 2)")
    env = {**os.environ, "FEDGATE_PKI": str(tmp_path / "pki")}
    out = subprocess.run(
        [*compose, "-f", str(REPO / "deploy/compose.yaml"), "-f",
         str(REPO / "deploy/compose.gpu.yaml"), "config", "--quiet"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert out.returncode == 0, out.stderr
