"""Prometheus metrics of a running gateway (``prometheus_client``).

Each :class:`GatewayMetrics` owns its own ``CollectorRegistry`` (two services in one
test process do not collide); the service updates the counters from its threads
(prometheus_client metrics are thread-safe), and figures owned by other parts (the FL
client's uploads and bytes, the outbox) are read at scrape time through callbacks, so
they are never copied twice.  :meth:`GatewayMetrics.exposition` is what ``/metrics``
serves.

Names (all prefixed ``fedgate_gw_``):

==================================  =====================================================
flows_total{source}                 flows read from a source (before de-duplication)
rejected_total{source}              lines/files rejected by the parsers
detections_total{label}             detections committed, by predicted label
alerts_total                        detections at or above the alert threshold, queued
store_errors_total                  failed commits (the batch is read again)
inference_seconds                   histogram: one classify call (a batch)
batch_size                          histogram: flows per committed batch
detection_delay_seconds             histogram: connection end (ts + duration) to its
                                    detection committed, live sources only
queue_depth                         flows read but not yet committed (capture queue)
model_info{version}                 1 for the model version in use
mqtt_connected                      1 while the broker connection is up
outbox_pending                      durable messages not yet acknowledged by the broker
tail_backlog_bytes                  bytes of the live conn.log not yet committed
fl_uploads_total                    model updates queued for the aggregator
fl_upload_bytes_total               bytes of those updates
fl_globals_loaded_total             global models validated and loaded
fl_global_version                   global model version in use (-1: none yet)
fl_rejected_total{reason}           global models refused, by reason
deploy_swapped_total                verified globals the deployment gate let into detection
deploy_refused_total                verified globals kept out of detection (worse on the
                                    gateway's own labelled validation flows)
canary_rollbacks_total              swaps rolled back because the alerted share jumped
==================================  =====================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

PREFIX = "fedgate_gw"
CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DELAY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 20000)


class _CallbackCollector:
    """Figures read at scrape time from ``fn()`` (the FL client's counters, the outbox)."""

    def __init__(self, fn: Callable[[], Mapping[str, Any]]):
        self.fn = fn

    def describe(self):  # no fixed description: collected on demand only
        return []

    def collect(self):
        try:
            values = dict(self.fn() or {})
        except Exception:  # noqa: BLE001 - a scrape must not fail because one part is busy
            log.exception("metrics callback failed")
            return
        for name, kind, text in (
            ("fl_uploads", "counter", "model updates queued for the aggregator"),
            ("fl_upload_bytes", "counter", "bytes of queued model updates"),
            ("fl_globals_loaded", "counter", "global models validated and loaded"),
            ("fl_global_version", "gauge", "global model version in use (-1: none)"),
            ("outbox_pending", "gauge", "durable messages not yet acknowledged by the broker"),
            ("tail_backlog_bytes", "gauge", "bytes of the live conn.log not yet committed"),
        ):
            if name not in values or values[name] is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"{PREFIX}_{name}", text, value=float(values[name]))
        rejected = values.get("fl_rejected")
        if isinstance(rejected, Mapping):
            fam = CounterMetricFamily(f"{PREFIX}_fl_rejected", "global models refused, by reason",
                                      labels=["reason"])
            for reason, n in sorted(rejected.items()):
                fam.add_metric([str(reason)], float(n))
            yield fam


class GatewayMetrics:
    """The gateway's metric definitions, on a registry of their own."""

    def __init__(self, *, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.flows = Counter(f"{PREFIX}_flows", "flows read from a source", ["source"], registry=r)
        self.rejected = Counter(f"{PREFIX}_rejected", "lines or files rejected", ["source"], registry=r)
        self.detections = Counter(f"{PREFIX}_detections", "detections committed", ["label"], registry=r)
        self.alerts = Counter(f"{PREFIX}_alerts", "detections at or above the alert threshold", registry=r)
        self.store_errors = Counter(f"{PREFIX}_store_errors", "failed commits (batch read again)", registry=r)
        self.inference_seconds = Histogram(f"{PREFIX}_inference_seconds", "one classify call (a batch)",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "flows per committed batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.detection_delay = Histogram(f"{PREFIX}_detection_delay_seconds",
                                         "connection end to its detection committed (live sources)",
                                         buckets=DELAY_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "flows read but not yet committed", registry=r)
        self.model_info = Gauge(f"{PREFIX}_model_info", "1 for the model version in use", ["version"], registry=r)
        self.mqtt_connected = Gauge(f"{PREFIX}_mqtt_connected", "1 while the broker connection is up", registry=r)
        self.deploy_swapped = Counter(f"{PREFIX}_deploy_swapped", "verified globals put into detection", registry=r)
        self.deploy_refused = Counter(f"{PREFIX}_deploy_refused",
                                      "verified globals kept out of detection by the deployment gate", registry=r)
        self.canary_rollbacks = Counter(f"{PREFIX}_canary_rollbacks",
                                        "swaps rolled back because the alerted share jumped", registry=r)
        self._model_version: str | None = None

    def add_callback(self, fn: Callable[[], Mapping[str, Any]]) -> None:
        """Expose figures another part keeps (see the module docstring for the names)."""
        self.registry.register(_CallbackCollector(fn))

    def set_model_version(self, version: str | None) -> None:
        if self._model_version is not None:
            self.model_info.remove(self._model_version)
        self._model_version = version
        if version is not None:
            self.model_info.labels(version).set(1)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0.0 when absent): for status pages and tests."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else float(v)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``{label value: sample}`` of a labelled counter, e.g. detections by label."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and label in sample.labels:
                    out[sample.labels[label]] = float(sample.value)
        return out
