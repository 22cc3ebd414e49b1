"""The aggregator's status page: gateways, rounds with central accuracy/F1, detections.

Served by :class:`gateway.web.server.StatusServer` from the aggregator DB (read-only):
``/`` (the page), ``/api/status`` (JSON it polls) and ``/metrics`` (Prometheus, see
:mod:`cloud_aggregator.metrics`).  ``fedgate-aggregator run --http 127.0.0.1:9109``
starts it beside the aggregator; it also runs on its own (e.g. next to a scaled-out
aggregator, or on a copy of its database)::

    python -m cloud_aggregator.web --database aggregator.db --listen 127.0.0.1:9109
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

from gateway.metrics import CONTENT_TYPE
from gateway.web.server import StatusServer, json_route, static_route

log = logging.getLogger(__name__)


def serve(database: str, address: tuple[str, int], *, last_rounds: int = 50) -> StatusServer:
    """Start the page for the aggregator DB ``database`` (SQLite path or URL)."""
    from cloud_aggregator import metrics, store

    sessions = store.make_sessions(database)
    registry = metrics.make_registry(sessions)

    def status() -> dict:
        with sessions() as session:
            return {"now": time.time(), **metrics.dashboard_figures(session, last_rounds=last_rounds)}

    routes = {
        "/": static_route("cloud_aggregator.web", "index.html"),
        "/api/status": json_route(status),
        "/metrics": lambda: (CONTENT_TYPE, metrics.exposition(registry)),
    }
    return StatusServer(address, routes=routes, name="aggregator-http").start()


def main(argv: list[str] | None = None) -> int:
    from gateway.config import ConfigError, parse_listen
    from gateway.output import configure_logging

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database", default="aggregator.db", help="aggregator DB (SQLite file or SQLAlchemy URL)")
    p.add_argument("--listen", default="127.0.0.1:9109", help="host:port (default 127.0.0.1:9109)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    a = p.parse_args(argv)
    try:
        address = parse_listen(a.listen, "--listen")
    except ConfigError as exc:
        p.error(str(exc))
    configure_logging(a.verbose)  # Alembic's "Running upgrade" lines only with -v
    server = serve(a.database, address)
    print(f"aggregator status page on {server.url}/", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
