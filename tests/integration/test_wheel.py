"""The built wheel is the product: it must carry the bundled model and every other file
the packages read at run time (migrations, templates, the status pages, the development
broker config), so an install outside the repository works like the checkout.

The wheel is built from a copy of the tracked files (a stale ``build/`` of the working
tree cannot leak into it), with pip's build isolation as a user's ``pip wheel .`` does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "cloud_aggregator")
# read at run time by path or importlib.resources; named so a lost pattern fails loudly
RUNTIME_FILES = (
    "gateway/model/default/config.json",
    "gateway/model/default/model.safetensors",
    "gateway/model/default/tokenizer.json",
    "gateway/model/default/labels.json",
    "gateway/model/default/metadata.json",
    "gateway/model/default/model.onnx",
    "gateway/model/default/model.int8.onnx",
    "gateway/store/migrations/env.py",
    "gateway/store/migrations/script.py.mako",
    "gateway/web/index.html",
    "cloud_aggregator/migrations/env.py",
    "cloud_aggregator/migrations/script.py.mako",
    "cloud_aggregator/web/index.html",
    "cloud_aggregator/mosquitto-dev.conf",
)

# compiled into gateway.flows._compiled when the wheel is built; not read at run time
BUILD_INPUTS = (".pyx", ".pxd", ".pxi")

pytestmark = pytest.mark.integration


def _tracked(*paths: str) -> list[str]:
    """Files git tracks under ``paths`` (a checkout), else every file there."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--", *paths], capture_output=True,
                             check=True, timeout=60).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [str(p.relative_to(REPO)) for d in paths for p in (REPO / d).rglob("*") if p.is_file()]
    return [f for f in files if "__pycache__" not in f and not f.endswith(".pyc")]


def build_wheel(out: Path) -> Path:
    """``pip wheel`` of a clean copy of the package sources; the wheel's path."""
    src = out / "src"
    for rel in _tracked("pyproject.toml", "README.md", *PACKAGES):
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (out / "dist").glob("fedgate-*.whl")
    return wheel


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_wheel_carries_the_bundled_model_and_every_runtime_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [f for f in RUNTIME_FILES if f not in names]
        assert not missing, f"the wheel lacks files read at run time: {missing}"
        for f in RUNTIME_FILES:  # the same bytes as the sources (the model is not rebuilt or cut)
            assert _digest(z.read(f)) == _digest((REPO / f).read_bytes()), f


def test_wheel_carries_every_file_of_the_packages(wheel):
    """Not only the named files: everything under gateway/ and cloud_aggregator/ (a new
    template, a new migration, a new data file) must reach the wheel."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = [f for f in _tracked(*PACKAGES) if f not in names and not f.endswith(BUILD_INPUTS)]
    assert not missing, f"package files left out of the wheel (package-data patterns?): {missing}"
    strays = sorted({n.split("/")[0] for n in names} - {*PACKAGES, wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"})
    assert not strays, f"unexpected top-level entries in the wheel: {strays}"


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler: the extension is optional")
def test_wheel_carries_the_compiled_flows_module(wheel):
    """The compiled hot path is optional (an install without a compiler falls back to
    Python); where a compiler exists, a wheel silently built without it is a defect."""
    with zipfile.ZipFile(wheel) as z:
        built = [n for n in z.namelist() if n.startswith("gateway/flows/_compiled") and n.endswith((".so", ".pyd"))]
    assert built, "the wheel lacks gateway.flows._compiled although a C compiler is present"


def test_wheel_metadata_names_the_commands_and_the_version(wheel):
    from gateway import __version__

    assert wheel.name.startswith(f"fedgate-{__version__}-")
    with zipfile.ZipFile(wheel) as z:
        entry_points = z.read(f"fedgate-{__version__}.dist-info/entry_points.txt").decode()
    assert "fedgate = gateway.cli:main" in entry_points
    assert "fedgate-aggregator = cloud_aggregator.cli:main" in entry_points


# ---------------------------------------------------------------- installed, outside the repository


def _requirements(wheel: Path) -> list[str]:
    """The wheel's own Requires-Dist (not the possibly older metadata of a dev install)."""
    from email.parser import Parser

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []


def _dependency_dirs(wheel: Path) -> list[str]:
    """The site directories holding the wheel's installed dependencies (torch, onnxruntime...).

    A venv that lists them in a .pth reuses them instead of downloading gigabytes; their
    own .pth files (this checkout's editable install among them) are not processed, so
    the wheel is the only fedgate the venv can import."""
    import importlib.metadata as md
    import re

    dirs, missing = [], []
    for req in _requirements(wheel):
        if "extra ==" in req:
            continue
        name = re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0]
        try:
            site = str(md.distribution(name).locate_file(""))
        except md.PackageNotFoundError:
            missing.append(req)
            continue
        if site not in dirs:
            dirs.append(site)
    assert not missing, f"this environment lacks pinned dependencies (make setup installs them): {missing}"
    return dirs


DEPS_SATISFIED = """
import importlib.metadata as md, re, sys
from packaging.requirements import Requirement
bad = []
for text in md.requires("fedgate"):
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        bad.append(f"{req} (missing)"); continue
    if not req.specifier.contains(have, prereleases=True):
        bad.append(f"{req} (have {have})")
print("\\n".join(bad) or "dependencies satisfied"); sys.exit(1 if bad else 0)
"""


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv outside the repository with the wheel installed (its dependencies
    taken from this environment's site directories); the venv's bin directory."""
    import venv

    root = tmp_path_factory.mktemp("installed")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "fedgate_deps.pth").write_text("\n".join(_dependency_dirs(wheel)) + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index",
                           "--no-deps", "--force-reinstall", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    check = subprocess.run([str(py), "-c", DEPS_SATISFIED], capture_output=True, text=True, cwd=root, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    return env_dir / "bin"


def _run(bin_dir: Path, *args, cwd: Path, timeout=300, env=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "COLUMNS": "100", **(env or {})})


@pytest.mark.slow
def test_installed_wheel_imports_itself_and_names_its_model(installed, tmp_path):
    where = _run(installed, "python", "-c", "import gateway, cloud_aggregator; print(gateway.__file__)",
                 cwd=tmp_path)
    assert where.returncode == 0 and str(installed.parent) in where.stdout and str(REPO) not in where.stdout
    version = _run(installed, "fedgate", "--version", cwd=tmp_path)
    model = json.loads((REPO / "gateway/model/default/metadata.json").read_text())["version"]
    assert version.returncode == 0 and f"bundled model {model}" in version.stdout
    assert str(installed.parent) in version.stdout  # the model inside the venv, not the checkout's
    agg = _run(installed, "fedgate-aggregator", "--version", cwd=tmp_path)
    assert agg.returncode == 0 and f"bundled model {model}" in agg.stdout


@pytest.mark.slow
def test_installed_replay_classifies_an_iot23_log_and_reports_accuracy(installed, tmp_path, iot23_dir):
    log = iot23_dir / "CTU-Honeypot-Capture-4-1" / "conn.log.labeled"
    out = _run(installed, "fedgate", "replay", "--json", str(log), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["stored"] == summary["detections"] == summary["labelled"] > 0
    assert summary["model_version"] == json.loads((REPO / "gateway/model/default/metadata.json").read_text())["version"]
    assert 0.0 < summary["accuracy"] <= 1.0
    assert (tmp_path / "fedgate.db").is_file()  # replay's default store, in the current directory
    table = _run(installed, "fedgate", "replay", "--from-start", str(log), cwd=tmp_path)
    assert table.returncode == 0 and "accuracy" in table.stdout


def _detections(db: Path) -> int:
    """Flows with a detection in the gateway's SQLite store (read-only; 0 before it exists)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(DISTINCT source || uid) FROM detections").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_installed_gateway_with_a_three_line_config_classifies_a_tailed_log(installed, tmp_path, iot23_dir):
    import signal
    import time

    (tmp_path / "gw.toml").write_text('gateway.id = "gw1"\nsource.zeek_log = "conn.log"\nmqtt.enabled = false\n')
    (tmp_path / "conn.log").touch()
    env = {"FEDGATE__HTTP__LISTEN": "127.0.0.1:0"}  # any free port: tests run side by side
    check = _run(installed, "fedgate", "config", "check", "--config", "gw.toml", "--json", cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stderr
    paths = json.loads(check.stdout)["paths"]
    assert paths["gateway.model"]["status"].startswith("bundled model")
    db = tmp_path / "fedgate-state" / "gateway.db"
    assert paths["gateway.database"]["path"] == str(db)

    import os

    proc = subprocess.Popen([str(installed / "fedgate"), "gateway", "run", "--config", "gw.toml"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    try:
        lines = (iot23_dir / "CTU-Honeypot-Capture-7-1" / "conn.log.labeled").read_text().splitlines(keepends=True)
        body = [ln for ln in lines if not ln.startswith("#")]
        with open(tmp_path / "conn.log", "a") as f:  # Zeek writing: the header, then flows as they end
            f.writelines(ln for ln in lines if ln.startswith("#"))
            for i in range(0, len(body), 25):
                f.writelines(body[i:i + 25])
                f.flush()
                time.sleep(0.05)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and _detections(db) < len(body):
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1]
        q = _run(installed, "fedgate", "query", "--db", f"sqlite:///{db}", "--limit", "100000", "--format", "json",
                 cwd=tmp_path)
        assert q.returncode == 0, q.stderr
        rows = json.loads(q.stdout)
        assert len(rows) == len(body) and all(r["detection"] and r["model_version"] for r in rows)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"stopped; {len(body)} flows this run" in err
