"""Prometheus metrics: counters of what arrived and left, and per-stage durations.

Each process (``serve``, every ``worker``) serves its own metrics on its own port
when one is configured (``metrics.serve_port``, ``metrics.worker_port``).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

logger = logging.getLogger(__name__)

INSTANCES = Counter("dicom_node_instances", "C-STORE requests by outcome "
                    "(received, ignored, rejected)", ["outcome"])
JOBS = Counter("dicom_node_jobs", "Jobs finished, by status", ["status"])
DELIVERIES = Counter("dicom_node_deliveries", "Delivery attempts, by resulting status", ["status"])
STAGE_SECONDS = Histogram(
    "dicom_node_stage_seconds", "Seconds spent per stage", ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)


def serve_metrics(host: str, port: int | None) -> None:
    """Expose this process's metrics over HTTP at ``host:port``; nothing when port is None."""
    if port is None:
        return
    start_http_server(port, addr=host)
    logger.info("Metrics on http://%s:%d/metrics", host, port)
