"""Prometheus metrics: counters of what arrived and left, and per-stage durations.

Each process (``serve``, every ``worker``) serves its own metrics on its own port
when one is configured (``metrics.serve_port``, ``metrics.worker_port``).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

INSTANCES = Counter("dicom_node_instances", "C-STORE requests by outcome "
                    "(received, ignored, rejected)", ["outcome"])
JOBS = Counter("dicom_node_jobs", "Jobs finished, by status", ["status"])
DELIVERIES = Counter("dicom_node_deliveries", "Delivery attempts, by resulting status", ["status"])
STAGE_SECONDS = Histogram(
    "dicom_node_stage_seconds", "Seconds spent per stage", ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)

# Set by serve's housekeeping from the instances received over the last week (dicom_node.quality).
SCORE_PSI = Gauge("dicom_node_score_psi", "Population stability index of a finding's scores over the drift "
                  "window against its validation reference", ["pipeline", "finding"])
FLAG_RATE = Gauge("dicom_node_flag_rate", "Share of the images analysed in the drift window that a finding "
                  "flagged", ["pipeline", "finding"])
WINDOW_SCORES = Gauge("dicom_node_window_scores", "Images a finding scored in the drift window",
                      ["pipeline", "finding"])


def serve_metrics(host: str, port: int | None) -> None:
    """Expose this process's metrics over HTTP at ``host:port``; nothing when port is None."""
    if port is None:
        return
    start_http_server(port, addr=host)
    logger.info("Metrics on http://%s:%d/metrics", host, port)
