"""Work whose broker message was lost is queued again, once, and only then."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from dicom_node.db import (
    Delivery, DeliveryStatus, Job, JobStatus, NodeDatabase, OutboxMessage, utcnow,
)
from dicom_node.lost_messages import requeue_lost

GRACE = timedelta(seconds=60)


@pytest.fixture
def db(tmp_path):
    database = NodeDatabase(f"sqlite:///{tmp_path / 'node.db'}")
    yield database
    database.dispose()


def add_job(db, status: JobStatus, published_ago: timedelta | None) -> int:
    """A job with one analyze message, published that long ago (None: not published)."""
    with db.session() as session:
        job = Job(study_instance_uid="1.2.3", status=status)
        session.add(job)
        session.flush()
        session.add(OutboxMessage(task="analyze", target_id=job.id, published_at=(
            None if published_ago is None else utcnow() - published_ago)))
        return job.id


def add_deliveries(db, job_id: int, destination: str, published_ago: timedelta) -> list[int]:
    """SC, SEG and SR of a job for one destination, pending; the first carries the message."""
    with db.session() as session:
        rows = [Delivery(job_id=job_id, destination=destination, kind=kind, sop_instance_uid=f"9.{job_id}.{n}",
                         source_sop_instance_uid="1.2.3.4", path="/r", status=DeliveryStatus.PENDING,
                         attempts=0, created_at=utcnow() - published_ago)
                for n, kind in enumerate(("sc", "seg", "sr"))]
        session.add_all(rows)
        session.flush()
        session.add(OutboxMessage(task="deliver", target_id=rows[0].id, published_at=utcnow() - published_ago))
        return [r.id for r in rows]


def messages(db, task: str) -> list[int]:
    with db.session() as session:
        return list(session.scalars(select(OutboxMessage.target_id).where(
            OutboxMessage.task == task, OutboxMessage.published_at.is_(None))))


def test_queued_work_the_empty_broker_lost_is_queued_again_once_per_job_and_destination(db):
    lost = add_job(db, JobStatus.QUEUED, timedelta(minutes=5))
    recent = add_job(db, JobStatus.QUEUED, timedelta(seconds=10))
    add_job(db, JobStatus.RUNNING, timedelta(minutes=5))
    done = add_job(db, JobStatus.DONE, timedelta(minutes=5))
    group = add_deliveries(db, done, "pacs", timedelta(minutes=5))
    add_deliveries(db, add_job(db, JobStatus.DONE, timedelta(minutes=5)), "pacs", timedelta(seconds=10))
    requeued = requeue_lost(db, lambda task: 0, GRACE)
    assert requeued == {"analyze": [lost], "deliver": [group[0]]}
    assert messages(db, "analyze") == [lost] and recent != lost
    assert messages(db, "deliver") == [group[0]]
    # The new messages are carried now: a second look finds nothing lost.
    assert requeue_lost(db, lambda task: 0, GRACE) == {}


@pytest.mark.parametrize("waiting", [1, None])
def test_nothing_is_queued_while_the_broker_holds_messages_or_cannot_tell(db, waiting):
    add_job(db, JobStatus.QUEUED, timedelta(minutes=5))
    add_deliveries(db, add_job(db, JobStatus.DONE, timedelta(minutes=5)), "pacs", timedelta(minutes=5))
    assert requeue_lost(db, lambda task: waiting, GRACE) == {}
