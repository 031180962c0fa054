"""Turns quiet studies into jobs and publishes the outbox.

A study whose newest unassigned instance is older than the quiet period becomes
one job. The job, its instances and its outbox message are committed together;
the message is published afterwards, and whatever could not be published (broker
down, crash) is published on a later tick. Tasks are idempotent, so publishing a
message twice is harmless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import func, select, update

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.db import (
    Instance, Job, JobStatus, NodeDatabase, OutboxMessage, Task, queue_message, utcnow,
)

logger = logging.getLogger(__name__)

Publisher = Callable[[OutboxMessage], None]
"""Sends one outbox message to the broker; raises when the broker cannot take it."""


class Scheduler:
    """Groups quiet studies into jobs and publishes the outbox, on a background thread."""

    def __init__(self, db: NodeDatabase, audit: AuditTrail, publish: Publisher, *,
                 quiet_seconds: float, poll_seconds: float,
                 housekeeping: Callable[[], None] | None = None) -> None:
        self.db = db
        self.audit = audit
        self.publish = publish
        self.quiet = timedelta(seconds=quiet_seconds)
        self.poll_seconds = poll_seconds
        self.housekeeping = housekeeping
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop after its current tick, then publish what is pending once more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.publish_outbox()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive a bad tick; the next one retries
                logger.exception("Scheduler tick failed")
            self._stop.wait(self.poll_seconds)

    def tick(self) -> None:
        """Queue quiet studies, publish the outbox, run housekeeping."""
        self.queue_quiet_studies()
        self.publish_outbox()
        if self.housekeeping is not None:
            self.housekeeping()

    def queue_quiet_studies(self) -> list[int]:
        """Create one job per quiet study of unassigned instances; return the new job ids."""
        cutoff = utcnow() - self.quiet
        with self.db.session() as session:
            quiet = session.execute(
                select(Instance.study_instance_uid)
                .where(Instance.job_id.is_(None))
                .group_by(Instance.study_instance_uid)
                .having(func.max(Instance.received_at) <= cutoff)
            ).scalars().all()
        created = []
        for study_uid in quiet:
            job_id, pseudonym, count = self._queue_study(study_uid, cutoff)
            if job_id is None:
                continue
            created.append(job_id)
            logger.info("Queued job %d for study %s (%d instances)", job_id, study_uid, count)
            self.audit.record(AuditEvent.JOB_QUEUED, actor="scheduler", job_id=job_id,
                              study_uid=study_uid, pseudonym=pseudonym,
                              detail=f"{count} instance(s)")
        return created

    def _queue_study(self, study_uid: str, cutoff) -> tuple[int | None, str | None, int]:  # type: ignore[no-untyped-def]
        with self.db.session() as session:
            instances = session.scalars(
                select(Instance).where(Instance.study_instance_uid == study_uid,
                                       Instance.job_id.is_(None),
                                       Instance.received_at <= cutoff)
            ).all()
            if not instances:
                return None, None, 0
            job = Job(study_instance_uid=study_uid, status=JobStatus.QUEUED)
            session.add(job)
            session.flush()
            for instance in instances:
                instance.job_id = job.id
            queue_message(session, Task.ANALYZE, job.id)
            return job.id, instances[0].patient_pseudonym, len(instances)

    def publish_outbox(self) -> int:
        """Publish due outbox messages in order; stop at the first broker failure.

        Returns how many were published.
        """
        now = utcnow()
        with self.db.session() as session:
            pending = session.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.published_at.is_(None))
                .where((OutboxMessage.not_before.is_(None)) | (OutboxMessage.not_before <= now))
                .order_by(OutboxMessage.id)
            ).all()
        published = 0
        for message in pending:
            try:
                self.publish(message)
            except Exception as exc:
                logger.warning("Broker unavailable, %d message(s) wait in the outbox: %s",
                               len(pending) - published, exc)
                break
            with self.db.session() as session:
                session.execute(update(OutboxMessage)
                                .where(OutboxMessage.id == message.id)
                                .values(published_at=utcnow()))
            published += 1
        return published
