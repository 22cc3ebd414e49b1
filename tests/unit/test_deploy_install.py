"""deploy/ works without a checkout: the images install the wheel (with the bundled
model) and check it at build time, compose mounts only configs, keys, state and the
watched Zeek logs, and the deploy configs resolve to the bundled model and the state
volume.  (Building the images needs a Docker daemon; these checks read the files.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gateway.config import load_config
from gateway.model.modeldir import WEIGHTS, bundled_model_dir

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _mounts(service: dict) -> list[tuple[str, str]]:
    out = []
    for spec in service.get("volumes", []):
        spec = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", spec)
        source, target = spec.split(":")[:2]
        out.append((source, target))
    return out


def test_compose_mounts_no_code_and_no_model_from_the_checkout():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for source, target in _mounts(service):
            if not source.startswith("."):
                continue  # a named volume
            allowed = (source.startswith(("./config/", "./pki")) or source.startswith("../broker_config/")
                       or (target == "/var/log/zeek" and source.startswith("../data/")))  # a site's logs
            assert allowed, f"{name} mounts {source} -> {target} from the checkout"
            assert "models" not in source and "gateway" not in Path(source).parts


@pytest.mark.parametrize("image", ["gateway", "aggregator"])
def test_images_install_the_wheel_and_check_the_bundled_model_at_build_time(image):
    text = (DEPLOY / "docker" / f"{image}.Dockerfile").read_text()
    build = text.split("\nFROM ")[1]  # the build stage
    assert "pip wheel --no-deps" in build and "pip install /tmp/dist/fedgate-" in build
    assert "validate_model_dir" in build and "--version" in build
    assert "/opt/fedgate/models" not in text
    ignore = (DEPLOY / "docker" / f"{image}.Dockerfile.dockerignore").read_text().split()
    assert "!gateway/" in ignore  # the build context holds gateway/model/default


def test_gateway_image_and_unit_put_state_in_their_writable_directory():
    image = (DEPLOY / "docker" / "gateway.Dockerfile").read_text()
    assert "FEDGATE__GATEWAY__STATE_DIR=/var/lib/fedgate" in image and 'VOLUME ["/var/lib/fedgate"]' in image
    unit = (DEPLOY / "systemd" / "fedgate-gateway@.service").read_text()
    assert "Environment=FEDGATE__GATEWAY__STATE_DIR=%S/fedgate/%i" in unit
    assert "StateDirectory=fedgate/%i" in unit and "ReadWritePaths=/var/lib/fedgate/%i" in unit


@pytest.mark.parametrize("gw", ["gw1", "gw2"])
def test_deploy_gateway_configs_use_the_bundled_model_and_the_state_volume(gw):
    cfg = load_config(DEPLOY / "config" / f"gateway-{gw}.toml", env={})
    assert cfg.gateway.model == str(bundled_model_dir())
    assert cfg.gateway.state_dir == "/var/lib/fedgate"
    assert cfg.database_url == "sqlite:////var/lib/fedgate/gateway.db"
    # as the systemd unit runs it: the instance state directory wins
    cfg = load_config(DEPLOY / "config" / f"gateway-{gw}.toml",
                      env={"FEDGATE__GATEWAY__STATE_DIR": "/var/lib/fedgate/site1"})
    assert cfg.database_url == "sqlite:////var/lib/fedgate/site1/gateway.db"


def test_deploy_aggregator_starts_from_the_bundled_weights():
    from cloud_aggregator.service import AggregatorConfig

    cfg = AggregatorConfig.from_toml(DEPLOY / "config" / "aggregator.toml")
    assert cfg.initial_model == str(bundled_model_dir() / WEIGHTS) and Path(cfg.initial_model).is_file()
