"""Aggregator throughput and memory: updates aggregated per second, and memory against
the number of clients.

Throughput (one row per strategy): ``--clients`` updates of an OPT-shaped model of
``--params`` float32 parameters (default ~200k, "student-sized" in the issue; the
shipped student preset is ~40k) are combined into a new global model; updates/s =
clients / seconds, wall and CPU.  Rows:

* fedavg / gsfs / fedopt (plain): the strategy maths alone, defences off (decoded
  deltas in memory); per_s = updates per wall second, per_cpu_s = per CPU second of
  this process;
* gsfs + robust <combiner>: the shipped defaults (one vote, sample and norm bounds,
  cloud_aggregator.safety.RobustSettings) with each combiner: what robust aggregation
  costs per window of ``--clients`` updates;
* pipeline (no SQL): validate_envelope (digest, zstd, safetensors, shapes,
  finiteness) + pool offer + GSFS aggregation on one thread;
* service worker: the aggregator's own worker loop (see ``bench_service``): updates
  enter its inbox as from paho's thread, validation on the decode threads (and again
  with none: inline in the worker), group commit of up to 64 queued messages, acks
  after the commit, one GSFS aggregation (checkpoint, sign, publish) once all
  ``--clients`` gateways reported;
* service handle_batch, batch 1: the worst case, one transaction per update.

Wire: bytes of one update envelope with no compression, int8 and top-k (1%) against
the raw float32 delta.

Memory: for each client count, every client sends ``--submissions`` updates (the pool
keeps only the newest per client), then one aggregation runs.  tracemalloc reports the
pool's bytes after intake and the peak during aggregation; "pool / (clients x model)"
stays ~1 when memory grows with the pool the aggregator must keep and not with the
number of submissions.

    python -m benchmarks.aggregate                     # tables
    python -m benchmarks.aggregate --params 100000 --clients 200 --json

The machine's cores are shared with other work while this runs, so figures are a floor.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/aggregate.py` as well as `-m`
    sys.path.insert(0, str(REPO_ROOT))

from cloud_aggregator.pool import PooledUpdate, UpdatePool  # noqa: E402
from cloud_aggregator.strategies import build_strategy  # noqa: E402
from gateway.output import emit_json, emit_rows  # noqa: E402
from gateway.protocol.envelope import encode_update  # noqa: E402
from gateway.protocol.validation import ValidationPolicy, spec_of, validate_envelope  # noqa: E402

GOAL_UPDATES_PER_S = 500


def opt_shaped_model(target_params: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Tensors laid out like a small OPT classifier (embeddings, layers, head) with about
    ``target_params`` float32 parameters (vocabulary sized to hit the target)."""
    # the shipped student preset (hidden 32, ffn 64) below ~120k, a wider one above
    hidden, ffn = (32, 64) if target_params < 120_000 else (64, 256)
    layers, positions, labels = 2, 64, 12
    per_layer = 4 * hidden * hidden + 4 * hidden + 2 * hidden * ffn + hidden + ffn + 4 * hidden
    fixed = layers * per_layer + positions * hidden + 2 * hidden + hidden * labels
    vocab = max(16, (target_params - fixed) // hidden)
    rng = np.random.default_rng(seed)
    shapes = {"model.decoder.embed_tokens.weight": (vocab, hidden),
              "model.decoder.embed_positions.weight": (positions, hidden)}
    for i in range(layers):
        p = f"model.decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
            shapes[p + f"self_attn.{proj}.bias"] = (hidden,)
        shapes[p + "fc1.weight"], shapes[p + "fc1.bias"] = (ffn, hidden), (ffn,)
        shapes[p + "fc2.weight"], shapes[p + "fc2.bias"] = (hidden, ffn), (hidden,)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[p + f"{ln}.weight"], shapes[p + f"{ln}.bias"] = (hidden,), (hidden,)
    shapes["model.decoder.final_layer_norm.weight"] = (hidden,)
    shapes["model.decoder.final_layer_norm.bias"] = (hidden,)
    shapes["score.weight"] = (labels, hidden)
    return {k: (rng.normal(size=s) * 0.02).astype(np.float32) for k, s in shapes.items()}


def n_params(tensors) -> int:
    return sum(int(v.size) for v in tensors.values())


def deltas_for(model, clients: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=v.shape).astype(np.float32) * 1e-3 for k, v in model.items()}
    # cheap distinct deltas: a shared random direction scaled per client
    return [{k: v * np.float32(1 + 0.01 * i) for k, v in base.items()} for i in range(clients)]


def timed(fn):
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def bench_strategies(model, clients: int) -> list[dict]:
    from cloud_aggregator.strategies import UpdateView

    deltas = deltas_for(model, clients)
    views = [UpdateView(sender=f"gw{i}", delta=d, num_samples=100 + i, base_version=max(0, 5 - i % 3),
                        submissions=1 + i % 4) for i, d in enumerate(deltas)]
    from cloud_aggregator.safety import COMBINERS, RobustSettings

    rows = []
    plain = RobustSettings.off()
    cases = [("fedavg (plain)", "fedavg", plain), ("gsfs (plain)", "gsfs", plain), ("fedopt (plain)", "fedopt", plain)]
    cases += [(f"gsfs + robust {c}" + (" (default)" if c == RobustSettings().combiner else ""), "gsfs",
               RobustSettings(combiner=c)) for c in COMBINERS]
    for label, name, robust in cases:
        strategy = build_strategy(name, robust=robust)
        _, wall, cpu = timed(lambda: strategy.aggregate(model, views, version=5))
        rows.append(row(label, clients, wall, cpu))
    return rows


def row(label: str, updates: int, wall: float, cpu: float) -> dict:
    return {"phase": label, "n": updates, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "per_s": round(updates / wall) if wall else None,
            "per_cpu_s": round(updates / cpu) if cpu else None,
            "goal_met": bool(wall and updates / wall >= GOAL_UPDATES_PER_S)}


def bench_pipeline(model, clients: int) -> dict:
    """validate_envelope + pool offer + GSFS aggregation, no SQL, one thread."""
    deltas = deltas_for(model, clients)
    envelopes = [encode_update(d, sender=f"gw{i}", base_version=0, num_samples=100).data for i, d in enumerate(deltas)]
    spec = spec_of(model)
    strategy = build_strategy("gsfs")
    clock = time.time

    def run():
        pool = UpdatePool(clock=clock)
        policy = ValidationPolicy(expected=spec, current_version=0, max_staleness=10, is_replay=pool.is_replay)
        for data in envelopes:
            env = validate_envelope(data, policy)
            h = env.header
            pool.offer(PooledUpdate(sender=h.sender, message_id=h.message_id, base_version=h.base_version,
                                    round=h.round, num_samples=h.num_samples, delta=env.tensors,
                                    received_at=clock(), wire_bytes=len(data)))
        view = pool.view()
        return strategy.aggregate(model, strategy.eligible(view), version=0)

    _, wall, cpu = timed(run)
    return row("pipeline (no SQL)", clients, wall, cpu)


def bench_service(model, clients: int, *, intake_batch: int, decode_threads: int, worker: bool = True) -> dict:
    """The service's own intake and one aggregation (checkpoint, sign, publish), without
    a broker: the MQTT link is never connected, so acks and publishes are no-ops.

    worker: ``clients`` gateways are online (their statuses are stored first, untimed)
    and GSFS with rho = 1 aggregates once all have reported; the timed part puts every
    update in the service's inbox, as paho's network thread does (validation starts
    there, on the decode threads), and waits for the new global version from the
    service's own worker thread (group commit of whatever is queued, then acks).
    Otherwise: ``AggregatorService.handle_batch`` on slices of ``intake_batch``
    messages, then ``aggregate_now``."""
    from cloud_aggregator.service import AggregatorConfig, AggregatorService
    from gateway.mqtt import Inbound, MqttSettings
    from gateway.protocol import signing, topics

    deltas = deltas_for(model, clients)
    messages = [Inbound(topics.gateway_update(f"gw{i}"),
                        encode_update(d, sender=f"gw{i}", base_version=0, num_samples=100).data, 1, False, i + 1)
                for i, d in enumerate(deltas)]
    statuses = [Inbound(topics.gateway_status(f"gw{i}"), b'{"state": "online"}', 1, True, clients + i + 1)
                for i in range(clients)]
    with tempfile.TemporaryDirectory() as tmp:
        config = AggregatorConfig(database=os.path.join(tmp, "agg.db"), intake_batch=intake_batch,
                                  decode_threads=decode_threads, mqtt=MqttSettings(client_id="bench"),
                                  strategy_params={"rho": 1.0, "deadline_s": 3600.0})
        service = AggregatorService(config, initial_weights=model, signing_key=signing.generate_private_key())
        log_level = logging.getLogger("cloud_aggregator").level
        logging.getLogger("cloud_aggregator").setLevel(logging.ERROR)
        service.handle_batch(statuses)

        def run_worker():
            for m in messages:
                service.inbox.put(m)
            return service.wait_for(lambda svc: svc.version == 1, timeout=600)

        def run_batches():
            for start in range(0, len(messages), intake_batch):
                service.handle_batch(messages[start:start + intake_batch])
            return service.aggregate_now()

        try:
            if worker:
                service.start(connect=False)
            done, wall, cpu = timed(run_worker if worker else run_batches)
            assert done and service.accepted == clients, "benchmark intake lost updates"
        finally:
            service.stop()
            logging.getLogger("cloud_aggregator").setLevel(log_level)
    how = "worker" if worker else "handle_batch"
    return row(f"service {how} (SQLite, batch {intake_batch}, {decode_threads} thr)", clients, wall, cpu)


def bench_wire_sizes(model, *, topk_fraction: float = 0.01) -> list[dict]:
    """Bytes of one update envelope per compression, against raw float32 (a delta
    shaped like a local training step: small, roughly normal, per-tensor scales)."""
    from gateway.protocol.envelope import raw_float32_bytes

    rng = np.random.default_rng(3)
    delta = {k: (rng.normal(size=v.shape) * rng.uniform(1e-4, 1e-2)).astype(np.float32) for k, v in model.items()}
    raw = raw_float32_bytes(delta)
    rows = []
    for method in ("none", "int8", "topk"):
        (enc, wall, _cpu) = timed(lambda: encode_update(delta, sender="gw", base_version=0, num_samples=1,
                                                        compression=method, topk_fraction=topk_fraction))
        rows.append({"compression": method if method != "topk" else f"topk {topk_fraction:g}",
                     "raw_float32_bytes": raw, "envelope_bytes": len(enc.data),
                     "ratio": round(raw / len(enc.data), 2), "encode_ms": round(wall * 1e3, 2)})
    return rows


def bench_memory(model, client_counts, submissions: int) -> list[dict]:
    model_mb = n_params(model) * 4 / 2**20
    strategy = build_strategy("gsfs")
    rows = []
    base = deltas_for(model, 1)[0]
    for clients in client_counts:
        gc.collect()
        tracemalloc.start()
        t0 = tracemalloc.get_traced_memory()[0]
        pool = UpdatePool(clock=time.time)
        for k in range(submissions):
            for i in range(clients):
                # a fresh delta per submission, as decoding a new envelope would allocate
                delta = {n: v * np.float32(1 + 0.001 * (i + k)) for n, v in base.items()}
                pool.offer(PooledUpdate(sender=f"gw{i}", message_id=f"{i}-{k}", base_version=0, round=0,
                                        num_samples=10, delta=delta, received_at=time.time()))
        after_intake = tracemalloc.get_traced_memory()[0] - t0
        tracemalloc.reset_peak()
        view = pool.view()
        strategy.aggregate(model, strategy.eligible(view), version=0)
        peak = tracemalloc.get_traced_memory()[1] - t0
        tracemalloc.stop()
        rows.append({"clients": clients, "sent_each": submissions, "model_mb": round(model_mb, 3),
                     "pool_mb": round(after_intake / 2**20, 2), "peak_mb": round(peak / 2**20, 2),
                     "pool/(clients*model)": round(after_intake / 2**20 / (clients * model_mb), 3)})
        del pool, view
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--params", type=int, default=200_000, help="float32 parameters of the model (default 200000)")
    ap.add_argument("--clients", type=int, default=200, help="updates per throughput measurement (default 200)")
    ap.add_argument("--memory-clients", default="10,50,200", help="client counts for the memory table")
    ap.add_argument("--submissions", type=int, default=3, help="updates each client sends in the memory table")
    ap.add_argument("--intake-batch", type=int, default=64, help="updates per SQLite transaction (default 64)")
    ap.add_argument("--decode-threads", type=int, default=2, help="service decode threads (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)

    from rich.progress import Progress

    model = opt_shaped_model(args.params)
    with Progress(transient=True) as progress:
        task = progress.add_task("aggregation benchmarks", total=5)
        throughput = bench_strategies(model, args.clients)
        progress.advance(task)
        throughput.append(bench_pipeline(model, args.clients))
        progress.advance(task)
        throughput.append(bench_service(model, args.clients, intake_batch=args.intake_batch,
                                        decode_threads=args.decode_threads))
        if args.decode_threads != 1:  # validation inline in the worker: no GIL contention
            throughput.append(bench_service(model, args.clients, intake_batch=args.intake_batch, decode_threads=1))
        progress.advance(task)
        throughput.append(bench_service(model, args.clients, intake_batch=1, decode_threads=1, worker=False))
        progress.advance(task)
        memory = bench_memory(model, [int(c) for c in args.memory_clients.split(",")], args.submissions)
        progress.advance(task)
        wire = bench_wire_sizes(model)
    meta = {"params": n_params(model), "tensors": len(model), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}
    if args.json:
        emit_json({"meta": meta, "throughput": throughput, "memory": memory, "wire": wire})
        return 0
    emit_rows(throughput, title=f"aggregation throughput: {meta['params']:,} float32 params in {meta['tensors']} "
                                f"tensors, {args.clients} updates (goal >= {GOAL_UPDATES_PER_S}/s)")
    emit_rows(memory, title="aggregator memory vs clients (tracemalloc)")
    emit_rows(wire, title="update envelope size (zstd + safetensors) vs raw float32")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
