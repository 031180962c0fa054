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
"""Stages in the order of the data flow: store (a C-STORE written), audit (an event recorded), complete
(association release to job), decode (an image's pixels, per pipeline), inference_wait (an image waiting for
its model), pipeline (one model call on a batch), writers (an image's results written), deliver (a send)."""
INFERENCE_BATCH_IMAGES = Histogram(
    "dicom_node_inference_batch_images", "Images per model call of a pipeline", ["pipeline"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
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
