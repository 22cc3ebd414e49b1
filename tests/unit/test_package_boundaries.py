"""The two packages as installed things: the edge package never depends on the cloud
one, the cloud package uses only the edge package's public names, and both commands
say which version -- of fedgate and of its bundled model -- they are."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]


def _modules(package: str):
    for path in sorted((REPO / package).rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported(tree: ast.AST):
    """(module, names) of every import, at any depth (function-level imports included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, tuple(a.name for a in node.names)


def test_gateway_never_imports_cloud_aggregator():
    found = [f"{path.relative_to(REPO)}: {module}" for path, tree in _modules("gateway")
             for module, _ in _imported(tree) if module.split(".")[0] == "cloud_aggregator"]
    assert not found, f"the edge package must not depend on the cloud one: {found}"


def test_cloud_aggregator_uses_only_public_gateway_names():
    private = []
    for path, tree in _modules("cloud_aggregator"):
        gateway_aliases = set()
        for module, names in _imported(tree):
            if module.split(".")[0] != "gateway":
                continue
            parts = module.split(".")
            private += [f"{path.relative_to(REPO)}: {module}" for p in parts if p.startswith("_") and not p.startswith("__")]
            private += [f"{path.relative_to(REPO)}: {module}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
            gateway_aliases.update(names)
        for node in ast.walk(tree):  # module._private through a name imported from gateway
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in gateway_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                private.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not private, f"cloud_aggregator reaches into gateway's private names: {private}"


@pytest.mark.parametrize("module, prog", [("gateway.cli", "fedgate"), ("cloud_aggregator.cli", "fedgate-aggregator")])
def test_version_names_the_package_and_the_bundled_model(module, prog):
    import importlib

    from gateway import __version__
    from gateway.model.modeldir import bundled_model_dir

    main = importlib.import_module(module).main
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    model_version = json.loads((bundled_model_dir() / "metadata.json").read_text())["version"]
    first, second = result.output.splitlines()[:2]
    assert first == f"{prog} {__version__}"
    assert second.startswith(f"bundled model {model_version} (") and str(bundled_model_dir()) in second
