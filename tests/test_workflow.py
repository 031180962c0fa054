"""The state machine of jobs and deliveries (``dicom_node.workflow``) on real SQLite files, and
the administrator's ``jobs retry`` / ``jobs resend``: the rows they change, the outbox messages
they queue (named by the one task vocabulary) and the audit events they record."""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node import tasks, workflow
from dicom_node.audit import AuditEvent
from dicom_node.audit.events import INSTANCES_ACCESSED, INSTANCES_TRANSFERRED
from dicom_node.db import (
    Delivery, DeliveryStatus, Instance, InstanceVerdict, Job, JobStatus, NodeDatabase,
    OutboxMessage, Task, utcnow,
)
from dicom_node.errors import NoSuchJobError, StateChangeError
from dicom_node.senders.base import Disposition
from tests.audit_fixtures import Node, make_node

LEASE = timedelta(seconds=30)

STUDY = "1.2.826.0.1.3680043.8.498.3001"
KINDS = ("sc", "seg", "sr")


@dataclass
class Answer:
    """What a destination answered (as a sender reports it)."""

    status: int | None
    detail: str


@pytest.fixture
def node(tmp_path: Path) -> Node:
    node = make_node(tmp_path)
    yield node
    node.trail.close()


@pytest.fixture
def db(node: Node) -> NodeDatabase:
    database = NodeDatabase(node.settings.node_database_url)
    yield database
    database.dispose()


def add_job(db: NodeDatabase, status: JobStatus, verdict: InstanceVerdict | None = None,
            worker: str | None = None) -> int:
    """A job of one instance, in ``status``, its instance decided as ``verdict``."""
    with db.session() as session:
        job = Job(study_instance_uid=STUDY, status=status, worker=worker,
                  started_at=utcnow() if status is not JobStatus.QUEUED else None,
                  finished_at=utcnow() if status.finished else None,
                  reason="1 of 1 instance(s) failed" if status is JobStatus.FAILED else None)
        session.add(job)
        session.flush()
        session.add(Instance(sop_instance_uid=f"{STUDY}.1.{job.id}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                             study_instance_uid=STUDY, series_instance_uid=f"{STUDY}.1",
                             transfer_syntax_uid="1.2.840.10008.1.2.1", path="/spool/x.dcm", size_bytes=1,
                             calling_ae="MODALITY", job_id=job.id, verdict=verdict,
                             verdict_reason="unexpected error in the pipeline" if verdict else None))
        return job.id


def add_delivery(db: NodeDatabase, job_id: int, destination: str, kind: str, status: DeliveryStatus,
                 attempts: int = 0) -> int:
    with db.session() as session:
        row = Delivery(job_id=job_id, source_sop_instance_uid=f"{STUDY}.1.{job_id}", destination=destination,
                       kind=kind, sop_instance_uid=f"2.25.{job_id}.{len(destination)}.{KINDS.index(kind)}",
                       path="/r.dcm",
                       status=status, attempts=attempts, created_at=utcnow() - timedelta(hours=1),
                       last_status=0xC000 if status is DeliveryStatus.DEAD else None,
                       last_error="refused" if status is DeliveryStatus.DEAD else None)
        session.add(row)
        session.flush()
        return row.id


def get(db: NodeDatabase, cls: type, row_id: int):  # type: ignore[no-untyped-def]
    with db.session() as session:
        return session.get(cls, row_id)


def outbox(db: NodeDatabase) -> list[tuple[str, int, bool]]:
    """Unpublished messages: (task, target, whether due later)."""
    with db.session() as session:
        return [(m.task, m.target_id, m.not_before is not None) for m in session.scalars(
            select(OutboxMessage).where(OutboxMessage.published_at.is_(None)).order_by(OutboxMessage.id))]


def events(node: Node, *names: str) -> list[dict[str, object]]:
    return node.cli_json("audit", "list", *[arg for name in names for arg in ("--event", name)])


def test_jobs_retry_queues_a_failed_job_again_audited_as_job_retried_by_the_os_user(node, db):
    job_id = add_job(db, JobStatus.FAILED, InstanceVerdict.FAILED)
    done = node.cli("jobs", "retry", str(job_id))
    assert done.exit_code == 0, done.output
    assert done.output == f"job {job_id} queued again\n"
    job = get(db, Job, job_id)
    assert (job.status, job.started_at, job.finished_at, job.reason) == (JobStatus.QUEUED, None, None, None)
    with db.session() as session:
        instance = session.scalar(select(Instance).where(Instance.job_id == job_id))
    assert (instance.verdict, instance.verdict_reason) == (None, None)
    assert outbox(db) == [(Task.ANALYZE, job_id, False)]
    [event] = events(node, "job-retried")
    assert event["actor"] == getpass.getuser() and event["job_id"] == job_id
    assert event["study_uid"] == STUDY and event["outcome"] == "success"
    assert event["detail"] == "queued again by an administrator (jobs retry)"
    assert AuditEvent.JOB_RETRIED.dicom_event_id == INSTANCES_ACCESSED


@pytest.mark.parametrize("status", [JobStatus.RUNNING, JobStatus.QUEUED])
def test_retrying_a_job_not_finished_is_refused_and_changes_nothing(node, db, status):
    job_id = add_job(db, status, worker="dicom-node-1@host")
    before = get(db, Job, job_id)
    refused = node.cli("jobs", "retry", str(job_id))
    assert refused.exit_code == 1
    assert refused.output == (f"Error: job {job_id} is {status.value}: "
                              "only a finished job can be analysed again\n")
    after = get(db, Job, job_id)
    assert (after.status, after.started_at, after.worker) == (before.status, before.started_at, before.worker)
    assert outbox(db) == [] and events(node, "job-retried") == []
    with pytest.raises(StateChangeError):
        workflow.retry_job(db, node.trail, job_id, actor="someone")


def test_unknown_jobs_are_named(node, db):
    for command in ("retry", "resend", "show"):
        missing = node.cli("jobs", command, "41")
        assert (missing.exit_code, missing.output) == (1, "Error: no job 41\n")
    with pytest.raises(NoSuchJobError):
        workflow.resend_job(db, node.trail, 41, actor="someone")


def test_jobs_resend_makes_a_dead_lettered_delivery_pending_audited_as_result_resent(node, db):
    job_id = add_job(db, JobStatus.DONE, InstanceVerdict.ANALYSED)
    dead = add_delivery(db, job_id, "pacs", "sc", DeliveryStatus.DEAD, attempts=3)
    sent = add_delivery(db, job_id, "pacs", "sr", DeliveryStatus.DELIVERED, attempts=1)
    archive = add_delivery(db, job_id, "archive", "sc", DeliveryStatus.DEAD, attempts=5)
    done = node.cli("jobs", "resend", str(job_id))
    assert done.exit_code == 0, done.output
    assert done.output == f"3 deliveries of job {job_id} queued again\n"
    for delivery_id in (dead, sent, archive):
        row = get(db, Delivery, delivery_id)
        assert (row.status, row.attempts, row.last_status, row.last_error, row.next_attempt_at,
                row.delivered_at) == (DeliveryStatus.PENDING, 0, None, None, None, None)
        assert utcnow() - row.created_at < timedelta(minutes=1)  # its back-off starts again
    assert outbox(db) == [(Task.DELIVER, dead, False), (Task.DELIVER, archive, False)]  # one per destination
    resent = events(node, "result-resent")
    assert [e["sop_uid"] for e in resent] == [get(db, Delivery, d).sop_instance_uid for d in (dead, sent, archive)]
    assert {e["actor"] for e in resent} == {getpass.getuser()} and {e["job_id"] for e in resent} == {job_id}
    assert resent[0]["detail"] == "sc to pacs queued again by an administrator (jobs resend)"
    assert AuditEvent.RESULT_RESENT.dicom_event_id == INSTANCES_TRANSFERRED


def test_resending_a_job_without_deliveries_is_refused(node, db):
    job_id = add_job(db, JobStatus.SKIPPED)
    refused = node.cli("jobs", "resend", str(job_id))
    assert (refused.exit_code, refused.output) == (1, f"Error: job {job_id} has no deliveries\n")
    assert outbox(db) == [] and events(node, "result-resent") == []


def test_a_job_is_claimed_once_deferred_and_finished(db):
    job_id = add_job(db, JobStatus.QUEUED)
    claimed = workflow.claim_job(db, job_id, worker="w1", lease=LEASE)
    assert claimed is not None and claimed.status is JobStatus.RUNNING and claimed.worker == "w1"
    assert workflow.claim_job(db, job_id, worker="w2", lease=LEASE) is None  # a second message does nothing
    workflow.defer_job(db, job_id, reason="the results disk is full", delay=timedelta(minutes=1))
    assert get(db, Job, job_id).status is JobStatus.QUEUED
    assert outbox(db) == [(Task.ANALYZE, job_id, True)]
    assert workflow.claim_job(db, job_id, worker="w2", lease=LEASE) is not None
    workflow.finish_job(db, job_id, JobStatus.DONE, "1 instance(s) analysed")
    job = get(db, Job, job_id)
    assert (job.status, job.reason) == (JobStatus.DONE, "1 instance(s) analysed") and job.finished_at
    with pytest.raises(ValueError):
        workflow.finish_job(db, job_id, JobStatus.RUNNING, "")


def test_a_dead_workers_job_is_queued_again(db):
    mine = add_job(db, JobStatus.RUNNING, worker="dicom-node-1@this")
    alive = add_job(db, JobStatus.RUNNING, worker="dicom-node-elsewhere@another-host")
    assert workflow.requeue_interrupted_jobs(db, worker="dicom-node-1@this") == [mine]
    assert get(db, Job, mine).status is JobStatus.QUEUED and get(db, Job, alive).status is JobStatus.RUNNING
    assert outbox(db) == [(Task.ANALYZE, mine, False)]


def test_a_job_whose_lease_lapsed_is_queued_again_and_taken_over_whatever_its_host(db):
    """A worker on another host that died stops renewing its lease: serve's housekeeping queues the
    job again and another worker takes it; a live worker's renewed lease keeps its job."""
    job_id, kept = add_job(db, JobStatus.QUEUED), add_job(db, JobStatus.QUEUED)
    assert workflow.claim_job(db, job_id, worker="dicom-node-7@host-a", lease=timedelta(seconds=-1))
    assert workflow.claim_job(db, kept, worker="dicom-node-8@host-b", lease=LEASE)
    assert workflow.claim_job(db, job_id, worker="dicom-node-9@host-c", lease=LEASE) is not None  # lapsed: taken over
    assert not workflow.renew_job_lease(db, job_id, worker="dicom-node-7@host-a", lease=LEASE)  # not its any more
    assert workflow.renew_job_lease(db, kept, worker="dicom-node-8@host-b", lease=LEASE)
    with db.session() as session:
        session.get(Job, job_id).lease_until = utcnow() - timedelta(seconds=1)  # host-c died in turn
    assert workflow.requeue_lapsed_jobs(db) == [job_id]
    assert (get(db, Job, job_id).status, get(db, Job, kept).status) == (JobStatus.QUEUED, JobStatus.RUNNING)
    assert outbox(db) == [(Task.ANALYZE, job_id, False)]


def test_the_last_failure_dead_letters_a_delivery_audited_as_result_dead_lettered(node, db):
    policy = node.settings.delivery
    job_id = add_job(db, JobStatus.DONE, InstanceVerdict.ANALYSED)
    delivery_id = add_delivery(db, job_id, "pacs", "sc", DeliveryStatus.RETRYING, attempts=policy.max_failures - 2)
    [claimed] = workflow.claim_deliveries(db, delivery_id, lease=timedelta(minutes=1))
    assert workflow.claim_deliveries(db, delivery_id, lease=timedelta(minutes=1)) == []  # leased
    now = utcnow()
    refused = Answer(0xC000, "refused")
    step = workflow.next_step(policy, claimed, Disposition.GIVE_UP, now, 0.0)
    assert step == (DeliveryStatus.RETRYING, now + timedelta(seconds=min(
        policy.first_retry_s * 2 ** (policy.max_failures - 2), policy.max_retry_interval_s)))
    workflow.record_attempt(db, node.trail, claimed, refused, step, actor="w", remote="PACS@h:104", now=now)
    workflow.queue_retries(db, {delivery_id: step})
    assert outbox(db) == [(Task.DELIVER, delivery_id, True)]
    again = get(db, Delivery, delivery_id)
    last = workflow.next_step(policy, again, Disposition.GIVE_UP, now, 0.0)
    assert last == (DeliveryStatus.DEAD, None)
    workflow.record_attempt(db, node.trail, again, refused, last, actor="w", remote="PACS@h:104", now=now)
    row = get(db, Delivery, delivery_id)
    assert (row.status, row.attempts, row.last_status) == (DeliveryStatus.DEAD, policy.max_failures, 0xC000)
    assert [e["outcome"] for e in events(node, "result-failed")] == ["minor-failure"]
    [dead] = events(node, "result-dead-lettered")
    assert dead["outcome"] == "serious-failure" and dead["sop_uid"] == row.sop_instance_uid
    assert dead["detail"] == "sc to pacs: status 0xC000 (refused)" and dead["study_uid"] == STUDY
    assert AuditEvent.RESULT_DEAD_LETTERED.dicom_event_id == INSTANCES_TRANSFERRED


def test_every_outbox_task_has_its_celery_task_and_queue():
    assert set(tasks.TASKS) == set(Task)
    assert set(tasks.QUEUES.values()) == {task.value for task in Task}
