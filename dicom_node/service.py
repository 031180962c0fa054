"""``dicom-node serve``: the SCP, the scheduler and a supervised worker in one process tree.

Start order follows the data flow: state → audit export → spool → SCP → scheduler → worker.
Stop order is the reverse of arrival: stop accepting associations and let the
ones in flight finish, publish what is pending, then stop the worker (which
finishes its current task).
"""

from __future__ import annotations

import getpass
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from dicom_node import retention, tasks
from dicom_node.arrivals import Arrivals
from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.audit.syslog_export import SyslogExporter
from dicom_node.config import CONFIG_FILE_ENV, ENV_PREFIX, Settings
from dicom_node.db import NodeDatabase
from dicom_node.feedback.app import FeedbackServer
from dicom_node.lost_messages import requeue_lost
from dicom_node.metrics import serve_metrics
from dicom_node.plugins import kept_sop_classes, verify_weights
from dicom_node.quality import DriftGauges, pipeline_references
from dicom_node.routing import Router
from dicom_node.scheduler import Scheduler
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from dicom_node.state_lock import StateLock
from dicom_node.workflow import requeue_lapsed_jobs

logger = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 60.0
RETENTION_INTERVAL_S = 24 * 3600.0


def overrides_as_environment(overrides: Mapping[str, Any], prefix: str = ENV_PREFIX) -> dict[str, str]:
    """Flatten nested CLI overrides into ``DICOM_NODE_*`` variables for a child process."""
    env: dict[str, str] = {}
    for key, value in overrides.items():
        name = f"{prefix}{key.upper()}"
        if isinstance(value, Mapping):
            env.update(overrides_as_environment(value, f"{name}__"))
        elif value is not None:
            env[name] = str(value)
    return env


class WorkerSupervisor:
    """Runs ``dicom-node worker --lane LANE`` as a child process and restarts it when it dies."""

    def __init__(self, config_file: str | None, overrides: Mapping[str, Any], lane: str) -> None:
        self.lane = lane
        self.env = {**os.environ, **overrides_as_environment(overrides)}
        if config_file:
            self.env[CONFIG_FILE_ENV] = str(config_file)
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{lane}-supervisor", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "dicom_node", "worker", "--lane", self.lane],
                                        env=self.env)
        logger.info("Started the %s worker, process %d", self.lane, self.process.pid)

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stop.wait(0.5):
            assert self.process is not None
            code = self.process.poll()
            if code is None:
                backoff = 1.0
                continue
            logger.error("The %s worker, process %d, exited with %d; restarting in %.0f s",
                         self.lane, self.process.pid, code, backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 30.0)
            self.restarts += 1
            self._spawn()

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the worker to finish its task and exit; kill it after ``timeout``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("Worker did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            self.process.wait()


class Node:
    """The running node: everything ``serve`` starts, in order, and stops in reverse."""

    def __init__(self, settings: Settings, *, run_worker: bool, config_file: str | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        if run_worker:
            verify_weights(settings)
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lock = StateLock(settings.state_dir)
        self.lock.acquire()  # before anything touches the state: another node's uploads included
        self.audit = AuditTrail.from_settings(settings)
        self.exporters = [SyslogExporter(settings, self.audit)
                          ] if settings.audit.enabled and settings.audit.syslog.enabled else []
        self.db = NodeDatabase(settings.node_database_url)
        self.spool = Spool(settings.spool_dir,
                           min_free_bytes=int(settings.scp.min_free_disk_mb * 2**20),
                           max_dataset_bytes=int(settings.scp.max_dataset_mb * 2**20))
        tasks.configure(settings)
        # The SCP's own connections wait less for a lock than a peer waits for an answer.
        self.scp_db = NodeDatabase(settings.node_database_url, busy_timeout_s=settings.scp.state_wait_limit_s)
        arrivals = Arrivals()
        self.scp = StorageSCP(settings.scp, self.scp_db, self.spool, self.audit,
                              kept_sop_classes=kept_sop_classes(settings), arrivals=arrivals)
        self.scheduler = Scheduler(
            self.db, self.audit, tasks.publish,
            quiet_seconds=settings.scheduler.study_quiet_seconds,
            poll_seconds=settings.scheduler.poll_seconds, arrivals=arrivals,
            release_grace_s=settings.scheduler.release_grace_s,
            force_complete_s=settings.scheduler.force_complete_s, router=Router.from_settings(settings),
            housekeeping=self._housekeeping,
        )
        self.feedback = FeedbackServer(settings, self.db, self.audit) if settings.feedback.enabled else None
        self.workers = [WorkerSupervisor(config_file, overrides or {}, lane) for lane in ("analysis", "delivery")
                        ] if run_worker else []
        # The drift gauges are worth their reads only where they are scraped.
        self.drift = (DriftGauges(self.db, settings.results_dir, pipeline_references(settings))
                      if settings.metrics.serve_port is not None else None)
        self._last_housekeeping = time.monotonic()
        self._last_retention = time.monotonic() - RETENTION_INTERVAL_S + HOUSEKEEPING_INTERVAL_S
        self._last_lost_check = time.monotonic()
        self._last_lease_check = time.monotonic()

    def start(self) -> None:
        for exporter in self.exporters:
            exporter.start()
        self.audit.record(AuditEvent.CONFIG_LOADED, actor=getpass.getuser(),
                          detail=f"state dir {self.settings.state_dir}")
        discarded = self.spool.discard_incoming()
        if discarded:
            logger.warning("Discarded %d partial file(s) never acknowledged", discarded)
        serve_metrics(self.settings.metrics.host, self.settings.metrics.serve_port)
        if self.feedback:  # before the SCP: a page that cannot listen stops the start with nothing running
            self.feedback.start()
        self.scp.start()
        self._announce_exposure()
        self.scheduler.start()
        for worker in self.workers:
            worker.start()
        self.audit.record(AuditEvent.NODE_STARTED, actor=getpass.getuser(),
                          detail=f"AE {self.settings.scp.ae_title} port {self.scp.port}")

    def _announce_exposure(self) -> None:
        """Log who may associate, in one line, and warn of every acknowledged risk in effect."""
        scp = self.settings.scp
        if scp.allowed_peers:
            logger.info("SCP admits the %d calling AE(s) of scp.allowed_peers only", len(scp.allowed_peers))
        elif not scp.accept_any_peer:
            logger.info("SCP closed: no scp.allowed_peers, so only peers on this machine's loopback "
                        "may associate")
        for risk in self.settings.risks_taken():
            logger.warning("Acknowledged risk in effect: %s", risk)

    def stop(self) -> None:
        logger.info("Stopping: no new associations; finishing those in flight")
        if self.feedback:
            self.feedback.stop()
        self.scp.stop()
        self.scheduler.stop()
        for worker in self.workers:
            worker.stop()
        self.audit.record(AuditEvent.NODE_STOPPED, actor=getpass.getuser())
        for exporter in self.exporters:
            exporter.stop()
        self.audit.close()
        self.db.dispose()
        self.scp_db.dispose()
        self.lock.release()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_lease_check >= self.settings.worker.job_lease_s / 3:
            self._last_lease_check = now
            requeue_lapsed_jobs(self.db)
        lost_after = self.settings.scheduler.lost_message_after_s
        if now - self._last_lost_check >= lost_after:
            self._last_lost_check = now
            requeue_lost(self.db, tasks.waiting_messages, timedelta(seconds=lost_after))
        if now - self._last_housekeeping < HOUSEKEEPING_INTERVAL_S:
            return
        self._last_housekeeping = now
        swept = tasks.sweep_consumed_messages(self.settings)
        if swept:
            logger.debug("Swept %d consumed broker message(s)", swept)
        if now - self._last_retention >= RETENTION_INTERVAL_S:
            self._last_retention = now
            retention.sweep(self.settings, self.audit, self.db)
        if self.drift is not None:
            self.drift.update()
