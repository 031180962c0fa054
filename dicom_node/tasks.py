"""The Celery app and its tasks. Tasks take ids, never data sets, and are idempotent.

The worker process builds its :class:`WorkerContext` (databases, audit trail,
pipeline with its weights checked) once at start, before it takes a message;
tasks only look the context up. Inference workers use the solo or threads pool:
torch must never be initialised in a process that forks.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.exceptions import ChannelError
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from dicom_node.audit import AuditTrail
from dicom_node.config import Settings
from dicom_node.db import NodeDatabase, OutboxMessage, Task
from dicom_node.delivery import Deliverer
from dicom_node.errors import WeightsCheckError
from dicom_node.metrics import serve_metrics
from dicom_node.notifications import Notifier, configure as configure_notifications
from dicom_node.worker_identity import worker_name
from pipelines.errors import WeightsError

if TYPE_CHECKING:
    from dicom_node.analysis import Analyzer

logger = logging.getLogger(__name__)

app = Celery("dicom_node")

ANALYZE = "dicom_node.analyze"
DELIVER = "dicom_node.deliver"
NOTIFY_FLAGGED = "dicom_node.notify_flagged"
NOTIFY_DEAD_LETTERED = "dicom_node.notify_dead_lettered"
TASKS = {Task.ANALYZE: (ANALYZE, "job_id"), Task.DELIVER: (DELIVER, "delivery_id"),
         Task.NOTIFY_FLAGGED: (NOTIFY_FLAGGED, "instance_id"),
         Task.NOTIFY_DEAD_LETTERED: (NOTIFY_DEAD_LETTERED, "delivery_id")}
"""Outbox task → (Celery task name, keyword argument that carries the id)."""
QUEUES = {name: task.value for task, (name, _) in TASKS.items()}
"""Each task has its own queue, named as the outbox task, so that a slow destination never
holds up analysis."""
NOTIFY_QUEUES = (QUEUES[NOTIFY_FLAGGED], QUEUES[NOTIFY_DEAD_LETTERED])
LANES = {"analysis": (QUEUES[ANALYZE],), "delivery": (QUEUES[DELIVER], *NOTIFY_QUEUES),
         "both": (QUEUES[ANALYZE], QUEUES[DELIVER], *NOTIFY_QUEUES)}
"""The queues a worker process consumes, by ``dicom-node worker --lane``: notifications go with
deliveries."""


def configure(settings: Settings) -> Celery:
    """Point the Celery app at the configured broker; return it.

    The default broker is kombu's SQLAlchemy transport on an SQLite file in the
    state folder (WAL mode, a busy timeout, a short polling interval).
    """
    url = settings.broker_url
    options: dict[str, Any] = {}
    if url.startswith("sqla+"):
        # kombu hands the transport options of this transport to create_engine,
        # so the polling interval is set on the transport class instead.
        kombu_sqlalchemy.Transport.polling_interval = settings.broker.polling_interval_s
        options = {"connect_args": {"timeout": 30}}
        if url.startswith("sqla+sqlite:///"):
            _enable_wal(Path(url.removeprefix("sqla+sqlite:///")))
    app.conf.update(
        broker_url=url,
        result_backend=settings.broker.result_backend,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_ignore_result=settings.broker.result_backend is None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_publish_retry=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
        task_routes={name: {"queue": queue} for name, queue in QUEUES.items()},
    )
    return app


def _enable_wal(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=30) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def broker_reachable() -> bool:
    """Return whether the configured broker accepts a connection now."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
        return True
    except Exception:
        return False


def waiting_messages(task: Task) -> int | None:
    """Return how many messages of an outbox task wait in the broker; None when it cannot tell."""
    queue = QUEUES[TASKS[task][0]]
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
            try:
                return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:  # an empty Redis queue does not exist
                return 0
    except Exception:
        return None


def publish(message: OutboxMessage) -> None:
    """Send one outbox message as a task; raises when the broker cannot take it."""
    name, argument = TASKS[Task(message.task)]
    app.send_task(name, kwargs={argument: message.target_id}, queue=QUEUES[name])


def sweep_consumed_messages(settings: Settings) -> int:
    """Delete messages the SQLAlchemy transport consumed but keeps; return how many."""
    url = settings.broker_url
    if not url.startswith("sqla+sqlite:///"):
        return 0
    path = Path(url.removeprefix("sqla+sqlite:///"))
    if not path.exists():
        return 0
    with sqlite3.connect(path, timeout=30) as connection:
        try:
            return connection.execute("DELETE FROM kombu_message WHERE visible = 0").rowcount
        except sqlite3.OperationalError:  # table not created yet
            return 0


@dataclass
class WorkerContext:
    """What a worker process holds for its whole life: the parts of its lane."""

    analyzer: Analyzer | None
    deliverer: Deliverer | None
    notifier: Notifier | None = None


_context: WorkerContext | None = None


def start_worker(settings: Settings, *, lane: str = "both", name: str | None = None) -> None:
    """Build the worker context of ``lane`` (see :data:`LANES`) and run it.

    The analysis lane loads the models now (weights checked, not on the first study)
    and runs the configured pool; the delivery lane loads no model and sends with a
    pool of ``delivery.threads`` threads. Work a dead predecessor left half done
    (running jobs, deliveries whose lease ran out) is queued again first. Outbox messages the
    worker queues are published as their transaction commits.
    """
    global _context
    configure(settings)
    name = name or worker_name()
    db = NodeDatabase(settings.node_database_url)
    db.publish_at_commit(publish)  # the next task (a delivery, a retry) goes at once, not at the scheduler's tick
    audit = AuditTrail.from_settings(settings)
    queues = LANES[lane]
    analyzer = deliverer = notifier = None
    configure_notifications(settings.notifications)
    if QUEUES[ANALYZE] in queues:
        import torch  # only in analysis workers

        from dicom_node.analysis import Analyzer

        torch.set_num_threads(settings.worker.threads_for(_cores())[0])

        try:
            analyzer = Analyzer.from_settings(settings, db, audit, worker=name)
        except WeightsError as exc:
            raise WeightsCheckError(str(exc)) from exc
        analyzer.requeue_interrupted()
    if QUEUES[DELIVER] in queues:
        deliverer = Deliverer.from_settings(settings, db, audit, worker=name)
        deliverer.requeue_abandoned()
        notifier = Notifier.from_settings(settings, db)
    _context = WorkerContext(analyzer=analyzer, deliverer=deliverer, notifier=notifier)
    if lane == "delivery":
        pool, concurrency = "threads", settings.delivery.threads
        serve_metrics(settings.metrics.host, settings.metrics.delivery_port)
    else:
        pool, concurrency = settings.worker.pool, settings.worker.threads_for(_cores())[1]
        serve_metrics(settings.metrics.host, settings.metrics.worker_port)
    app.worker_main([
        "--quiet", "worker", f"--pool={pool}", f"--concurrency={concurrency}", "--prefetch-multiplier=1",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--hostname={lane}-{name}", "-Q", ",".join(queues),
        "--loglevel", settings.log_level,
    ])


def _cores() -> int:
    """Return how many cores this process may run on."""
    return len(os.sched_getaffinity(0))


def _require_context() -> WorkerContext:
    if _context is None:
        raise RuntimeError("task run outside a dicom-node worker process")
    return _context


@app.task(name=ANALYZE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def analyze(*, job_id: int) -> None:
    """Analyse one job's instances; a job that is not queued any more is a no-op."""
    analyzer = _require_context().analyzer
    if analyzer is None:
        raise RuntimeError("an analyze task reached a worker without the analysis lane")
    analyzer.run(job_id)


@app.task(name=DELIVER, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver(*, delivery_id: int) -> None:
    """Send one result object; a delivery finished or not yet due is a no-op."""
    deliverer = _require_context().deliverer
    if deliverer is None:
        raise RuntimeError("a deliver task reached a worker without the delivery lane")
    deliverer.run(delivery_id)


def _notify(task: Task, target_id: int) -> None:
    notifier = _require_context().notifier
    if notifier is None:
        logger.info("Notification %s %d: no webhook configured, dropped", task.value, target_id)
        return
    notifier.run(task, target_id)


@app.task(name=NOTIFY_FLAGGED, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def notify_flagged(*, instance_id: int) -> None:
    """Post the ``finding-flagged`` notification of one instance (see :mod:`dicom_node.notifications`)."""
    _notify(Task.NOTIFY_FLAGGED, instance_id)


@app.task(name=NOTIFY_DEAD_LETTERED, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def notify_dead_lettered(*, delivery_id: int) -> None:
    """Post the ``delivery-dead-lettered`` notification of one delivery."""
    _notify(Task.NOTIFY_DEAD_LETTERED, delivery_id)
