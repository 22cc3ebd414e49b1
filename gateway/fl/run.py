"""``python -m gateway.fl.run``: a gateway process that takes part in federated learning.

The experiment harness starts one per data directory; it is also the smallest way to
put a gateway's store into a federation by hand. It trains on the labelled flows of
its store (``--db``), follows the retained global model and control topics, uploads
through the durable outbox, and runs until SIGTERM/SIGINT (then says "offline").

\b
Example:
  python -m gateway.fl.run --gateway-id gw-a --db sqlite:///gw-a.db \\
      --model models/default --port 1883 --verify-key agg.pub
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from gateway.fl.trigger import TriggerConfig

log = logging.getLogger("gateway.fl.run")


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.option("--gateway-id", required=True, help="This gateway's id (topic segment).")
@click.option("--db", "db_url", required=True, help="SQLAlchemy URL of the gateway's store.")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Model directory: architecture, tokenizer and labels (weights come from the global model).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=1883, show_default=True, type=int)
@click.option("--prefix", default="fedgate/v1", show_default=True, help="Topic prefix.")
@click.option("--verify-key", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="Aggregator's Ed25519 public key (PEM); global models and control messages must be signed "
                   "by it (repeat for a key rotation).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Keeps the newest global version accepted: after a restart nothing older is loaded.")
@click.option("--allow-unsigned", is_flag=True,
              help="Run without --verify-key and load unsigned global models (lab use only).")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False),
              help="Labelled conn log never trained on; the local model is scored on it after each round.")
@click.option("--strategy", type=click.Choice(["gsfs", "fedavg", "fedopt"]), default="gsfs", show_default=True,
              help="Until the control topic says otherwise.")
@click.option("--local-epochs", default=1, show_default=True, type=int)
@click.option("--max-local-steps", default=50, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", default=3e-3, show_default=True, type=float)
@click.option("--compression", type=click.Choice(["none", "int8", "topk"]), default="none", show_default=True)
@click.option("--topk-fraction", default=0.01, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=1, show_default=True, type=int, help="torch threads for this process.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where local training runs (auto: CUDA when torch sees a GPU).")
@click.option("--status-interval", default=5.0, show_default=True, type=float)
@click.option("--tau", default=TriggerConfig().tau, show_default=True, type=float, help="GSFS performance threshold.")
@click.option("--ema", default=TriggerConfig().ema, show_default=True, type=float, help="GSFS gradient EMA factor.")
@click.option("--k", "zk", default=TriggerConfig().k, show_default=True, type=float, help="GSFS z-score multiplier.")
@click.option("--warmup", default=TriggerConfig().warmup, show_default=True, type=int)
@click.option("--eval-every", default=TriggerConfig().eval_every, show_default=True, type=int)
@click.option("-v", "--verbose", count=True)
def main(gateway_id, db_url, model_dir, host, port, prefix, verify_key, state_dir, allow_unsigned, eval_data, strategy,
         local_epochs, max_local_steps, batch_size, lr, compression, topk_fraction, seed, threads, device,
         status_interval, tau, ema, zk, warmup, eval_every, verbose) -> None:
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2),
                        format=f"%(asctime)s %(levelname)s {gateway_id} %(name)s: %(message)s", stream=sys.stderr)
    from gateway.fl import versionfile
    from gateway.fl.client import ClientSettings, FLClient
    from gateway.fl.learner import TorchLearner
    from gateway.fl.link import GatewayLink
    from gateway.mqtt import MqttSettings
    from gateway.protocol import signing
    from gateway.store.db import open_store

    if not verify_key and not allow_unsigned:
        raise click.UsageError("give --verify-key (the aggregator's public key), or --allow-unsigned for a lab")
    try:
        settings = ClientSettings(
            gateway_id=gateway_id, strategy=strategy, local_epochs=local_epochs, max_local_steps=max_local_steps,
            batch_size=batch_size, lr=lr, compression=compression, topk_fraction=topk_fraction, seed=seed,
            status_interval_s=status_interval,
            trigger=TriggerConfig(tau=tau, ema=ema, k=zk, warmup=warmup, eval_every=eval_every),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    from gateway.model.modeldir import ModelDirError
    from gateway.store.db import StoreError

    try:
        learner = TorchLearner(model_dir, threads=threads, device=device)
        engine, sessions = open_store(db_url)
        eval_ds = load_eval_data(learner, Path(eval_data)) if eval_data else None
        key = [signing.load_public_key(p) for p in verify_key] or None
    except (ModelDirError, StoreError, OSError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    link = GatewayLink(MqttSettings(host=host, port=port, client_id=f"gw-{gateway_id}", keepalive_s=10,
                                    reconnect_min_s=1, reconnect_max_s=5),
                       gateway_id=gateway_id, prefix=prefix)
    client = FLClient(settings=settings, learner=learner, sessions=sessions, link=link, verify_key=key,
                      allow_unsigned=allow_unsigned, eval_data=eval_ds,
                      version_file=None if state_dir is None else Path(state_dir) / versionfile.FILE_NAME)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    client.start()
    log.info("gateway %s started (strategy %s until told otherwise)", gateway_id, strategy)
    done.wait()
    client.stop()
    engine.dispose()


def load_eval_data(learner, path: Path):
    """Labelled flows of a conn log, encoded for the learner (the held-out test part)."""
    from gateway.flows.zeek import iter_records
    from gateway.model.labels import record_label

    records = [r for r in iter_records(path) if r.label is not None]
    return learner.encode(records, [record_label(r) for r in records])


if __name__ == "__main__":  # pragma: no cover
    main()
