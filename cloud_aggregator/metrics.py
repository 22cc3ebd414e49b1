"""Prometheus metrics of the aggregator, read from its database at scrape time.

The aggregator keeps everything durable in its SQL store (global version, pool, clients,
rounds with central metrics, rejections), so the metrics are a ``prometheus_client``
collector over :func:`cloud_aggregator.store.status_summary`: no counter is kept twice,
the figures survive a restart, and a read-only dashboard process (``python -m
cloud_aggregator.web``) can serve them beside a scaled-out aggregator.

Names (all prefixed ``fedgate_agg_``):

====================================  ===================================================
global_version                        version of the current global model
round                                 current round number
aggregations_total                    global versions produced since the start
pool_size                             updates waiting to be aggregated
clients_alive                         gateways whose retained status says online
clients_known                         gateways ever seen
updates_accepted_total                updates validated and pooled
rejected_total{reason}                messages refused, by reason
upload_bytes_total                    update bytes received (summed over aggregations)
broadcast_bytes_total                 global-model bytes sent (times live clients)
central_metric{metric}                central accuracy / F1 / ... of the newest version
client_online{gateway}                1 while that gateway is online
client_submissions_total{gateway}     updates that gateway submitted
client_flows{gateway}                 flows the gateway reports in its status
candidates_refused_total{reason}      candidate globals not published (aggregate check:
                                      not_finite, step_norm; deployment gate: gate,
                                      scorer_failed)
gate_passed_total                     published versions the deployment gate scored
gate_score{metric}                    the gate's score of the current global version
====================================  ===================================================
"""

from __future__ import annotations

import logging
import math

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud_aggregator import store

log = logging.getLogger(__name__)

PREFIX = "fedgate_agg"


def dashboard_figures(session: Session, *, last_rounds: int = 50) -> dict:
    """Everything the page and the metrics show, from the aggregator DB."""
    summary = store.status_summary(session, last_rounds=last_rounds)
    infos = store.load_clients(session)
    clients = []
    labels_total: dict[str, int] = {}
    for c in summary.clients:
        status = infos[c["gateway"]].status if c["gateway"] in infos else {}
        by_label = status.get("detections_by_label") if isinstance(status.get("detections_by_label"), dict) else {}
        for label, n in by_label.items():
            if isinstance(n, (int, float)):
                labels_total[str(label)] = labels_total.get(str(label), 0) + int(n)
        clients.append({**c, "flows": status.get("flows"), "alerts": status.get("alerts"),
                        "model_version": status.get("model_version"), "version": status.get("version"),
                        "uploads": status.get("uploads"), "detections_by_label": by_label})
    totals = session.execute(select(func.count(), func.coalesce(func.sum(store.RoundRow.bytes_up), 0),
                                    func.coalesce(func.sum(store.RoundRow.bytes_down), 0))).one()
    return {
        "state": summary.state,
        "clients": clients,
        "clients_alive": sum(1 for c in clients if c["online"]),
        "pool_size": len(summary.pool),
        "pool": summary.pool,
        "rounds": summary.rounds,  # oldest first (charts)
        "aggregations": int(totals[0]),
        "upload_bytes": int(totals[1]),
        "broadcast_bytes": int(totals[2]),
        "rejections": summary.rejections,
        "detections_by_label": labels_total,
        "refused": summary.refused,
        "refusals": summary.refusals,
        "gate_passed": int((summary.state or {}).get("gate_passed") or 0),
    }


class AggregatorCollector:
    """A collector over the aggregator DB (register it on a registry)."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def describe(self):
        return []

    def collect(self):
        try:
            with self.sessions() as session:
                f = dashboard_figures(session, last_rounds=1)
        except SQLAlchemyError as exc:
            log.error("aggregator metrics: database not readable: %s", str(exc).splitlines()[0])
            up = GaugeMetricFamily(f"{PREFIX}_store_up", "1 when the aggregator DB could be read")
            up.add_metric([], 0.0)
            yield up
            return
        up = GaugeMetricFamily(f"{PREFIX}_store_up", "1 when the aggregator DB could be read")
        up.add_metric([], 1.0)
        yield up
        state = f["state"] or {}

        def gauge(name: str, text: str, value) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"{PREFIX}_{name}", text)
            g.add_metric([], float(value or 0))
            return g

        def counter(name: str, text: str, value) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", text, value=float(value or 0))

        if state:  # no state row before the aggregator's first start: no version to report
            yield gauge("global_version", "version of the current global model", state.get("version"))
            yield gauge("round", "current round number", state.get("round"))
        yield counter("aggregations", "global versions produced", f["aggregations"])
        yield gauge("pool_size", "updates waiting to be aggregated", f["pool_size"])
        yield gauge("clients_alive", "gateways whose status says online", f["clients_alive"])
        yield gauge("clients_known", "gateways ever seen", len(f["clients"]))
        yield counter("updates_accepted", "updates validated and pooled", state.get("accepted_updates"))
        yield counter("upload_bytes", "update bytes received", f["upload_bytes"])
        yield counter("broadcast_bytes", "global-model bytes sent (times live clients)", f["broadcast_bytes"])
        rej = CounterMetricFamily(f"{PREFIX}_rejected", "messages refused, by reason", labels=["reason"])
        for reason, n in sorted(f["rejections"].items()):
            rej.add_metric([reason], float(n))
        yield rej
        central = GaugeMetricFamily(f"{PREFIX}_central_metric", "central metric of the newest version",
                                    labels=["metric"])
        for key, value in (f["rounds"][-1] if f["rounds"] else {}).items():
            if key.startswith("central_") and isinstance(value, (int, float)):
                central.add_metric([key[len("central_"):]], float(value))
        yield central
        refused = CounterMetricFamily(f"{PREFIX}_candidates_refused", "candidate globals not published, by reason",
                                      labels=["reason"])
        for reason, n in sorted(f["refused"].items()):
            refused.add_metric([reason], float(n))
        yield refused
        yield counter("gate_passed", "published versions the deployment gate scored", f["gate_passed"])
        gate = GaugeMetricFamily(f"{PREFIX}_gate_score", "the deployment gate's score of the current version",
                                 labels=["metric"])
        for key, value in (f["rounds"][-1] if f["rounds"] else {}).items():
            if key.startswith("gate_") and isinstance(value, (int, float)) and math.isfinite(value):
                gate.add_metric([key[len("gate_"):]], float(value))
        yield gate
        online = GaugeMetricFamily(f"{PREFIX}_client_online", "1 while the gateway is online", labels=["gateway"])
        subs = CounterMetricFamily(f"{PREFIX}_client_submissions", "updates submitted", labels=["gateway"])
        flows = GaugeMetricFamily(f"{PREFIX}_client_flows", "flows the gateway reports", labels=["gateway"])
        for c in f["clients"]:
            online.add_metric([c["gateway"]], 1.0 if c["online"] else 0.0)
            subs.add_metric([c["gateway"]], float(c["submissions"] or 0))
            if isinstance(c.get("flows"), (int, float)):
                flows.add_metric([c["gateway"]], float(c["flows"]))
        yield online
        yield subs
        yield flows


def make_registry(sessions: sessionmaker[Session]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AggregatorCollector(sessions))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
