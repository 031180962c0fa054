"""Quiet-period grouping and the outbox, on a real SQLite state database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from dicom_node.audit import AuditTrail
from dicom_node.config import load_settings
from dicom_node.db import Instance, Job, JobStatus, NodeDatabase, OutboxMessage, utcnow
from dicom_node.scheduler import Scheduler


@pytest.fixture
def state(tmp_path):
    settings = load_settings(None, state_dir=tmp_path, audit={"secret": "s"})
    db = NodeDatabase(settings.node_database_url)
    audit = AuditTrail.from_settings(settings)
    yield db, audit
    audit.close()
    db.dispose()


def add_instance(db, study: str, sop: str, age_s: float) -> None:
    with db.session() as session:
        session.add(Instance(
            sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            study_instance_uid=study, series_instance_uid=study + ".1",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"/spool/{sop}.dcm", size_bytes=1,
            calling_ae="PACS", received_at=utcnow() - timedelta(seconds=age_s)))


class Broker:
    def __init__(self) -> None:
        self.up = True
        self.sent: list[tuple[str, int]] = []

    def publish(self, message: OutboxMessage) -> None:
        if not self.up:
            raise ConnectionError("broker down")
        self.sent.append((message.task, message.target_id))


def jobs(db) -> list[Job]:
    with db.session() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_a_quiet_study_becomes_one_job_and_a_busy_one_waits(state):
    db, audit = state
    broker = Broker()
    scheduler = Scheduler(db, audit, broker.publish, quiet_seconds=5, poll_seconds=1)
    add_instance(db, "1.1", "1.1.1", age_s=10)
    add_instance(db, "1.1", "1.1.2", age_s=8)
    add_instance(db, "1.2", "1.2.1", age_s=1)
    scheduler.tick()
    [job] = jobs(db)
    assert (job.study_instance_uid, job.status) == ("1.1", JobStatus.QUEUED)
    assert broker.sent == [("analyze", job.id)]
    with db.session() as session:
        assigned = {i.sop_instance_uid: i.job_id for i in session.scalars(select(Instance))}
    assert assigned == {"1.1.1": job.id, "1.1.2": job.id, "1.2.1": None}


def test_an_instance_after_its_studys_job_gets_a_new_job(state):
    db, audit = state
    broker = Broker()
    scheduler = Scheduler(db, audit, broker.publish, quiet_seconds=5, poll_seconds=1)
    add_instance(db, "1.1", "1.1.1", age_s=10)
    scheduler.tick()
    add_instance(db, "1.1", "1.1.2", age_s=6)
    scheduler.tick()
    first, second = jobs(db)
    assert first.study_instance_uid == second.study_instance_uid == "1.1"
    assert broker.sent == [("analyze", first.id), ("analyze", second.id)]


def test_messages_wait_in_the_outbox_while_the_broker_is_down(state):
    db, audit = state
    broker = Broker()
    broker.up = False
    scheduler = Scheduler(db, audit, broker.publish, quiet_seconds=0, poll_seconds=1)
    for n in range(3):
        add_instance(db, f"1.{n}", f"1.{n}.1", age_s=1)
    scheduler.tick()
    assert len(jobs(db)) == 3 and broker.sent == []
    # A new scheduler (as after a restart) publishes what the first could not, in order.
    broker.up = True
    Scheduler(db, audit, broker.publish, quiet_seconds=0, poll_seconds=1).tick()
    assert broker.sent == [("analyze", job.id) for job in jobs(db)]
    with db.session() as session:
        assert all(m.published_at for m in session.scalars(select(OutboxMessage)))
    scheduler.tick()
    assert len(broker.sent) == 3
