"""Turns complete studies into jobs and publishes the outbox.

A study is complete, and its unassigned instances become one job, when:

- the association that brought it was released ``release_grace_s`` ago and no open
  association is bringing more of it (see :mod:`dicom_node.arrivals`); or
- its newest unassigned instance is older than the quiet period (the fallback for PACS
  that send a study over many associations, and after a restart); or
- the route its instances take expects series (``expected_series``) and a series meeting
  each has arrived (see :mod:`dicom_node.routing`); or
- its oldest unassigned instance is older than ``force_complete_s`` (a study that never
  goes quiet).

An instance arriving after its study's job was made gets a job of its own. The job, its
instances and its outbox message are committed together;
the message is published afterwards, and whatever could not be published (broker
down, crash) is published on a later tick. Tasks are idempotent, so publishing a
message twice is harmless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select, update

from dicom_node.arrivals import Arrivals
from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.db import (
    Instance, Job, JobStatus, NodeDatabase, OutboxMessage, Task, queue_message, utcnow,
)
from dicom_node.metrics import STAGE_SECONDS
from dicom_node.routing import Router

logger = logging.getLogger(__name__)

Publisher = Callable[[OutboxMessage], None]
"""Sends one outbox message to the broker; raises when the broker cannot take it."""


class Scheduler:
    """Groups complete studies into jobs and publishes the outbox, on a background thread."""

    def __init__(self, db: NodeDatabase, audit: AuditTrail, publish: Publisher, *,
                 quiet_seconds: float, poll_seconds: float, arrivals: Arrivals | None = None,
                 release_grace_s: float | None = None, force_complete_s: float | None = None,
                 router: Router | None = None, housekeeping: Callable[[], None] | None = None) -> None:
        self.db = db
        self.audit = audit
        self.publish = publish
        self.quiet = timedelta(seconds=quiet_seconds)
        self.poll_seconds = poll_seconds
        self.arrivals = arrivals if release_grace_s is not None else None
        self.grace = timedelta(seconds=release_grace_s or 0)
        self.force = timedelta(seconds=force_complete_s) if force_complete_s is not None else None
        self.router = router if router is not None and router.expects_series() else None
        self.housekeeping = housekeeping
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop after its current tick, then publish what is pending once more."""
        self._stop.set()
        if self.arrivals is not None:
            self.arrivals.changed.set()
        if self._thread is not None:
            self._thread.join()
        self.publish_outbox()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive a bad tick; the next one retries
                logger.exception("Scheduler tick failed")
            self._wait()

    def _wait(self) -> None:
        """Wait for the next tick: ``poll_seconds``, or less when a released study falls due
        sooner; a release wakes the wait to reckon again."""
        if self.arrivals is None:
            self._stop.wait(self.poll_seconds)
            return
        due_in = self.arrivals.next_due_in(self.grace)
        self.arrivals.changed.clear()
        if due_in is None or due_in > 0:
            self.arrivals.changed.wait(min(self.poll_seconds, due_in if due_in is not None else self.poll_seconds))

    def tick(self) -> None:
        """Queue complete studies, publish the outbox, run housekeeping."""
        self.queue_complete_studies()
        self.publish_outbox()
        if self.housekeeping is not None:
            self.housekeeping()

    def queue_complete_studies(self) -> list[int]:
        """Create one job per complete study of unassigned instances (released, quiet or forced,
        see the module's docstring); return the new job ids."""
        now = utcnow()
        created = []
        if self.arrivals is not None:
            for study_uid, released_at in self.arrivals.due(self.grace).items():
                job_id = self._queue(study_uid, now, "released")
                self.arrivals.forget(study_uid)
                if job_id is not None:
                    STAGE_SECONDS.labels("complete").observe((utcnow() - released_at).total_seconds())
                    created.append(job_id)
        if self.router is not None:
            created += [job_id for study_uid in self._with_expected_series()
                        if (job_id := self._queue(study_uid, now, "expected series")) is not None]
        conditions = [("quiet", func.max(Instance.received_at) <= now - self.quiet)]
        if self.force is not None:
            conditions.append(("forced", func.min(Instance.received_at) <= now - self.force))
        for why, condition in conditions:
            with self.db.session() as session:
                studies = session.execute(
                    select(Instance.study_instance_uid).where(Instance.job_id.is_(None))
                    .group_by(Instance.study_instance_uid).having(condition)).scalars().all()
            cutoff = now - self.quiet if why == "quiet" else now
            created += [job_id for study_uid in studies if (job_id := self._queue(study_uid, cutoff, why)) is not None]
        return created

    def _with_expected_series(self) -> list[str]:
        """Return the studies of unassigned instances whose route's expected series have arrived
        (headers read from the spool; an unreadable one counts as not arrived)."""
        assert self.router is not None
        with self.db.session() as session:
            rows = session.execute(select(Instance.study_instance_uid, Instance.path, Instance.calling_ae)
                                   .where(Instance.job_id.is_(None)).order_by(Instance.id)).all()
        arrived: dict[str, list[tuple[Dataset, str]]] = {}
        for study_uid, path, calling_ae in rows:
            try:
                arrived.setdefault(study_uid, []).append((dcmread(path, stop_before_pixels=True), calling_ae))
            except (OSError, InvalidDicomError):
                continue
        return [study for study, datasets in arrived.items() if self.router.expected_series_arrived(datasets)]

    def _queue(self, study_uid: str, cutoff: datetime, why: str) -> int | None:
        """Make the job of the study's unassigned instances received by ``cutoff``, audited; return
        its id, or None when there were none."""
        job_id, pseudonym, count = self._queue_study(study_uid, cutoff)
        if job_id is None:
            return None
        logger.info("Queued job %d for study %s (%d instances, %s)", job_id, study_uid, count, why)
        self.audit.record(AuditEvent.JOB_QUEUED, actor="scheduler", job_id=job_id,
                          study_uid=study_uid, pseudonym=pseudonym,
                          detail=f"{count} instance(s)")
        return job_id

    def _queue_study(self, study_uid: str, cutoff: datetime) -> tuple[int | None, str | None, int]:
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
