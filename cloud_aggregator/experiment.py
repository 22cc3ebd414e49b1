"""``fedgate-aggregator experiment``: compare GSFS, FedAvg and FedOpt on real gateways.

For every data directory (an IoT-23 scenario: naturally non-IID) the harness keeps a
stratified test part out of all training, writes the rest into that gateway's own
SQLite store, then for each strategy (and compression) starts a real mosquitto from
``broker_config/dev.conf``, the aggregator, and ONE gateway process per data directory
(``python -m gateway.fl.run``), all from the same initial model and seeds. It watches the
broker like any other client: every global model (verified with the aggregator's
public key, evaluated centrally on the pooled test parts), every update (count and
bytes) and every gateway status (each client's own model scored on the same test
parts after each round). The report (Markdown, JSON, PNG plots) lands in ``--out``.

The initial model has never seen a gateway's flows: a student with random weights
(seeded), whose vocabulary is built from the training parts (the word list only) and
whose label list is the union of the training labels.

Training is kept light so that seven gateways share two CPU cores: each gateway's
flows are deduplicated into weighted rows (IoT-23 is very repetitive), at most
``--max-train-flows`` flows per gateway are kept (stratified sample, documented in
the report), and local training is capped at ``--max-local-steps`` steps per round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

log = logging.getLogger(__name__)

STRATEGY_NAMES = ("gsfs", "fedavg", "fedopt")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class ExperimentSettings:
    """Everything one experiment run needs (keyword-only; defaults documented).

    strategies      strategies to compare, in order (default gsfs, fedavg, fedopt)
    compressions    update compressions to run each strategy with (default none)
    gateway_data    one data directory per gateway
    rounds          global versions to reach per run (default 10)
    out             report directory
    seed            split, initial model and training seed (default 0)
    test_fraction   stratified share of every scenario kept for testing (default 0.2)
    max_train_flows flows per gateway kept for training (stratified sample; default 5000)
    local_epochs    FedAvg/FedOpt local epochs per round (default 3)
    max_local_steps local optimiser steps per round (default 20)
    batch_size      (default 64)
    lr              local learning rate (default 3e-3)
    target_f1       F1 for the "time to target" column (default 0.99)
    round_timeout_s a run stops when no new global version arrived for this long (default 120)
    gsfs_deadline_s GSFS server deadline: aggregate what arrived after this (default 8)
    dp_noise        DP noise multiplier (None: DP off)
    dp_clip         DP clipping norm (default 1.0)
    quick           tiny settings for demos and tests
    """

    strategies: tuple[str, ...] = STRATEGY_NAMES
    compressions: tuple[str, ...] = ("none",)
    gateway_data: tuple[Path, ...]
    rounds: int = 10
    out: Path
    seed: int = 0
    test_fraction: float = 0.2
    max_train_flows: int = 5000
    local_epochs: int = 3
    max_local_steps: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    target_f1: float = 0.99
    round_timeout_s: float = 120.0
    gsfs_deadline_s: float = 8.0
    dp_noise: float | None = None
    dp_clip: float = 1.0
    quick: bool = False

    def __post_init__(self) -> None:
        bad = [s for s in self.strategies if s not in STRATEGY_NAMES]
        if not self.strategies or bad:
            raise ValueError(f"unknown strategies {bad}; choose from {', '.join(STRATEGY_NAMES)}")
        bad = [c for c in self.compressions if c not in ("none", "int8", "topk")]
        if not self.compressions or bad:
            raise ValueError(f"unknown compressions {bad}; choose from none, int8, topk")
        if not self.gateway_data:
            raise ValueError("give at least one --gateway-data directory")
        if self.rounds < 1 or self.max_local_steps < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("rounds, max_local_steps, local_epochs and batch_size must be >= 1")
        if not 0 < self.test_fraction < 1:
            raise ValueError("test_fraction must be in (0, 1)")
        if self.max_train_flows < 10:
            raise ValueError("max_train_flows must be >= 10")
        if self.dp_noise is not None and self.dp_noise <= 0:
            raise ValueError("dp_noise must be > 0")


# --------------------------------------------------------------------------- data


@dataclass
class GatewayData:
    name: str  # gateway id
    scenario: str
    train: list  # ConnRecord
    test: list
    train_flows_total: int  # before the training sample cap


def gateway_id_for(scenario: str) -> str:
    from gateway.protocol.topics import check_gateway_id

    gid = "".join(c if c.isalnum() or c in "-_." else "-" for c in scenario)[:64].strip("-.") or "gw"
    return check_gateway_id(gid)


def split_scenarios(paths: Sequence[Path], *, test_fraction: float, max_train_flows: int, seed: int
                    ) -> list[GatewayData]:
    """Stratified train/test split of every scenario; training part capped (stratified)."""
    import numpy as np

    from gateway.fl.split import stratified_split
    from gateway.model.labels import record_label

    out = []
    names: set[str] = set()
    for path in paths:
        scenario = _one_scenario(Path(path))
        classes = [record_label(r) for r in scenario.records]
        train_idx, test_idx = stratified_split(classes, [1 - test_fraction, test_fraction], seed=seed)
        total = len(train_idx)
        if total > max_train_flows:
            keep_share = max_train_flows / total
            keep, _ = stratified_split([classes[i] for i in train_idx], [keep_share, 1 - keep_share], seed=seed + 1)
            train_idx = train_idx[np.sort(keep)]
        gid = gateway_id_for(scenario.name)
        if gid in names:
            raise ValueError(f"two data directories are both named {scenario.name!r}")
        names.add(gid)
        out.append(GatewayData(name=gid, scenario=scenario.name, train=[scenario.records[i] for i in train_idx],
                               test=[scenario.records[i] for i in test_idx], train_flows_total=total))
    return out


def _one_scenario(path: Path):
    from gateway.model.data import load_scenarios

    scenarios = load_scenarios([path])
    if len(scenarios) != 1:
        raise ValueError(f"{path}: expected one labelled conn log, found {len(scenarios)}")
    return scenarios[0]


def build_initial_model(train_records: Sequence, out: Path, *, seed: int):
    """A randomly initialised student (seeded) with a vocabulary built from
    ``train_records`` (words only) and their label set; saved without ONNX."""
    from gateway.model.labels import LabelSet, record_label
    from gateway.model.modeldir import save_model_dir
    from gateway.model.opt import build_model
    from gateway.model.prompt import DEFAULT_TEMPLATE, get_template
    from gateway.model.tokenizer import FlowTokenizer

    tokenizer = FlowTokenizer.build(train_records, get_template(DEFAULT_TEMPLATE))
    labels = LabelSet.from_labels(record_label(r) for r in train_records)
    model = build_model("student", tokenizer, labels, seed=seed)
    return save_model_dir(model, tokenizer, labels, out, version=f"initial-seed{seed}", onnx=False,
                          extra={"preset": "student", "init": "random", "seed": seed})
