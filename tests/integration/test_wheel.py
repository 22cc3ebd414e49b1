"""The built wheel is the product: it must carry the bundled model and every other file
the packages read at run time (migrations, templates, the status pages, the development
broker config), so an install outside the repository works like the checkout.

The wheel is built from a copy of the tracked files (a stale ``build/`` of the working
tree cannot leak into it), with pip's build isolation as a user's ``pip wheel .`` does.
"""

from __future__ import annotations

import hashlib
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
    missing = [f for f in _tracked(*PACKAGES) if f not in names]
    assert not missing, f"package files left out of the wheel (package-data patterns?): {missing}"
    strays = sorted({n.split("/")[0] for n in names} - {*PACKAGES, wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"})
    assert not strays, f"unexpected top-level entries in the wheel: {strays}"


def test_wheel_metadata_names_the_commands_and_the_version(wheel):
    from gateway import __version__

    assert wheel.name.startswith(f"fedgate-{__version__}-")
    with zipfile.ZipFile(wheel) as z:
        entry_points = z.read(f"fedgate-{__version__}.dist-info/entry_points.txt").decode()
    assert "fedgate = gateway.cli:main" in entry_points
    assert "fedgate-aggregator = cloud_aggregator.cli:main" in entry_points
