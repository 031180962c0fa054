"""Every state change of jobs and deliveries, in one place.

A job: ``queued`` → ``running`` (:func:`claim_job`) → ``done`` | ``skipped`` | ``failed``
(:func:`finish_job`); back to ``queued`` when its worker died (:func:`requeue_interrupted_jobs`),
when its results did not fit on the disk (:func:`defer_job`), or when an administrator has a
finished job analysed again (:func:`retry_job`).

A delivery: ``pending`` (:func:`queue_deliveries`) → claimed with a lease
(:func:`claim_deliveries`) → ``delivered``, ``retrying`` at a back-off time or ``dead``
(dead-lettered) by :func:`next_step` and :func:`record_attempt`; back to ``pending`` when an
administrator has a job's results sent again (:func:`resend_job`). To a destination that commits
storage, a stored object is ``stored`` (not ``delivered``) while its commitment is asked
(:func:`request_commitment`), then ``committed`` by the answer (:func:`record_commitment`), or
``retrying`` to be sent again when the answer says it failed; dead-lettered
(:func:`dead_letter`) after too many requests. A shadow route's deliveries are ``held`` instead of
pending (:func:`queue_results`): never due, never claimed, until an administrator releases them
(:func:`release_job`, :func:`release_finished_between`), which makes them pending.

Whatever queues work adds its outbox message (a :class:`~dicom_node.db.Task`) in the same
transaction. Each change is audited: the administrator's (retry, resend, release) here with the
OS user as actor, a delivery attempt and a held result here with the worker as actor, a job's
start, verdicts and deferral by the analysis, which knows its instances.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from dicom_node.audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import DeliverySettings, Destination
from dicom_node.db import (
    Delivery, DeliveryStatus, Instance, Job, JobStatus, NodeDatabase, OutboxMessage, Task,
    queue_message, utcnow,
)
from dicom_node.errors import NoSuchJobError, StateChangeError
from dicom_node.notifications import notify_dead_lettered
from dicom_node.routing import RouteDecision
from dicom_node.senders.base import Disposition, SendOutcome
from dicom_node.worker_identity import worker_is_gone

logger = logging.getLogger(__name__)

JOB_LEASE = timedelta(minutes=30)
"""A job running longer than this is taken to belong to a dead worker."""
UNFINISHED = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)
FINISHED_JOB = tuple(status for status in JobStatus if status.finished)
COMMITTING = (DeliveryStatus.STORED,)
DELIVERY_EVENTS: dict[DeliveryStatus, tuple[AuditEvent, Outcome]] = {
    DeliveryStatus.DELIVERED: (AuditEvent.RESULT_SENT, Outcome.SUCCESS),
    DeliveryStatus.STORED: (AuditEvent.RESULT_SENT, Outcome.SUCCESS),
    DeliveryStatus.RETRYING: (AuditEvent.RESULT_FAILED, Outcome.MINOR_FAILURE),
    DeliveryStatus.DEAD: (AuditEvent.RESULT_DEAD_LETTERED, Outcome.SERIOUS_FAILURE),
}
"""How an attempt's outcome is audited, by the delivery's new status."""
RETRIED = "queued again by an administrator (jobs retry)"
RESENT = "queued again by an administrator (jobs resend)"
HELD = "held: its route runs in shadow mode"
RELEASED = "released by an administrator (jobs release)"

Step = tuple[DeliveryStatus, datetime | None]
"""A delivery's new status and, when retrying, the time of its next attempt."""


class Answer(Protocol):
    """What the destination answered to one object: its status (None: no answer) and a
    fixed text saying why it failed (empty when it did not)."""

    @property
    def status(self) -> int | None: ...

    @property
    def detail(self) -> str: ...


# Jobs

def claim_job(db: NodeDatabase, job_id: int, *, worker: str, lease: timedelta) -> Job | None:
    """Mark a queued job running by ``worker``, its lease running ``lease`` from now, and return
    it; a running job whose lease lapsed (its worker died or hangs; without a lease, running
    longer than :data:`JOB_LEASE`) is taken over. Returns None when the job is not queued
    (finished, or running in a live worker): nothing to do."""
    now = utcnow()
    lapsed = (Job.status == JobStatus.RUNNING) & or_(
        Job.lease_until < now, Job.lease_until.is_(None) & (Job.started_at < now - JOB_LEASE))
    with db.session() as session:
        claimed = session.execute(
            update(Job).where(Job.id == job_id).where((Job.status == JobStatus.QUEUED) | lapsed)
            .values(status=JobStatus.RUNNING, started_at=now, worker=worker, lease_until=now + lease)
        ).rowcount
        return session.get(Job, job_id) if claimed else None


def renew_job_lease(db: NodeDatabase, job_id: int, *, worker: str, lease: timedelta) -> bool:
    """Extend ``worker``'s lease of its running job to ``lease`` from now; return False when the
    job is not running by it any more (taken over, or finished)."""
    with db.session() as session:
        return bool(session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker == worker)
            .values(lease_until=utcnow() + lease)).rowcount)


def requeue_lapsed_jobs(db: NodeDatabase) -> list[int]:
    """Queue again the running jobs whose lease lapsed: their worker, on whichever host, died or
    hangs. The instances it decided keep their verdicts. Returns the ids."""
    now = utcnow()
    with db.session() as session:
        lapsed = session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING,
                                                      Job.lease_until < now)).all()
        for job_id in lapsed:
            taken = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING,
                                                      Job.lease_until < now)
                                    .values(status=JobStatus.QUEUED, started_at=None, lease_until=None)).rowcount
            if taken:
                queue_message(session, Task.ANALYZE, job_id)
    if lapsed:
        logger.warning("Queued %d job(s) again whose worker stopped renewing its lease: %s",
                       len(lapsed), ", ".join(map(str, lapsed)))
    return list(lapsed)


def requeue_interrupted_jobs(db: NodeDatabase, *, worker: str) -> list[int]:
    """Queue again the jobs dead workers left: those ``worker`` (this name) or a worker process
    of this host that no longer runs was running, and queued ones whose message a dead worker
    had taken (a broker without redelivery loses those). A message that still waits in the
    broker makes a duplicate, which is a no-op. Returns the ids."""
    with db.session() as session:
        rows = session.execute(select(Job.id, Job.status, Job.worker).where(
            Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))).all()
        interrupted = [job_id for job_id, status, owner in rows if status is JobStatus.QUEUED
                       or owner == worker or worker_is_gone(owner)]
        for job_id in interrupted:
            session.execute(update(Job).where(Job.id == job_id)
                            .values(status=JobStatus.QUEUED, started_at=None, lease_until=None))
            queue_message(session, Task.ANALYZE, job_id)
    if interrupted:
        logger.warning("Queued %d interrupted job(s) again", len(interrupted))
    return interrupted


def defer_job(db: NodeDatabase, job_id: int, *, reason: str, delay: timedelta) -> None:
    """Queue a running job again, due ``delay`` from now, noting ``reason``."""
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            status=JobStatus.QUEUED, started_at=None, lease_until=None, reason=reason))
        queue_message(session, Task.ANALYZE, job_id, not_before=utcnow() + delay)


def finish_job(db: NodeDatabase, job_id: int, status: JobStatus, reason: str) -> None:
    """Record a job's final status (done, skipped or failed) and its reason."""
    if not status.finished:
        raise ValueError(f"a job finishes done, skipped or failed, not {status.value}")
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            status=status, finished_at=utcnow(), lease_until=None, reason=reason))


def retry_job(db: NodeDatabase, audit: AuditTrail, job_id: int, *, actor: str) -> Job:
    """Queue a finished job to be analysed again (its instances' verdicts cleared; its outputs
    keep their UIDs and replace the old ones) and audit it as ``actor``; return the job.

    Raises :class:`NoSuchJobError` for an unknown id, :class:`StateChangeError` when the job
    is not finished (queued or running: it is being analysed already).
    """
    with db.session() as session:
        retried = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(FINISHED_JOB))
                                  .values(status=JobStatus.QUEUED, started_at=None,
                                          finished_at=None, reason=None)).rowcount
        job = _job(session, job_id)
        if not retried:
            raise StateChangeError(f"job {job_id} is {job.status.value}: only a finished job "
                                   "can be analysed again")
        session.execute(update(Instance).where(Instance.job_id == job_id).values(
            verdict=None, verdict_reason=None))
        queue_message(session, Task.ANALYZE, job_id)
    logger.info("Job %d queued again by %s", job_id, actor)
    audit.record(AuditEvent.JOB_RETRIED, actor=actor, job_id=job_id,
                 study_uid=job.study_instance_uid, detail=RETRIED)
    return job


# Deliveries

def queue_results(db: NodeDatabase, audit: AuditTrail, *, job_id: int, source: Instance,
                  outputs: Iterable[tuple[str, str, Path]], decision: RouteDecision, actor: str) -> list[int]:
    """Queue the deliveries of ``source``'s outputs to the destinations of its route in one
    transaction (see :func:`queue_deliveries`); a shadow route's are held, each audited as held
    as ``actor``. Returns the delivery ids."""
    with db.session() as session:
        ids = queue_deliveries(session, job_id=job_id, source_sop_uid=source.sop_instance_uid,
                               outputs=outputs, destinations=decision.destinations, held=decision.shadow)
        held = (list(session.scalars(select(Delivery).where(Delivery.id.in_(ids)).order_by(Delivery.id)))
                if decision.shadow else [])
    if held:
        logger.info("Job %d: %d result deliveries held (route %s in shadow mode)", job_id, len(held),
                    decision.route)
    for delivery in held:
        audit.record(AuditEvent.RESULT_HELD, actor=actor, job_id=job_id, sop_uid=delivery.sop_instance_uid,
                     study_uid=source.study_instance_uid, pseudonym=source.patient_pseudonym,
                     detail=f"{delivery.kind} to {delivery.destination} {HELD} (route {decision.route})")
    return ids


def queue_deliveries(session: Session, *, job_id: int, source_sop_uid: str,
                     outputs: Iterable[tuple[str, str, Path]],
                     destinations: Iterable[Destination], held: bool = False) -> list[int]:
    """Create (or reset, for a re-run) one delivery per output and destination, each with
    its outbox message, in the caller's transaction; with ``held``, held and without a message.
    ``outputs`` are (kind, SOP Instance UID, file). One message per destination carries all of
    its deliveries. Returns the delivery ids."""
    ids = []
    outputs = list(outputs)
    for destination in destinations:
        lead = None
        for kind, sop_uid, path in outputs:
            if kind not in destination.outputs:
                continue
            row = session.scalar(select(Delivery).where(
                Delivery.destination == destination.name, Delivery.sop_instance_uid == sop_uid))
            if row is None:
                row = Delivery(destination=destination.name, sop_instance_uid=sop_uid)
                session.add(row)
            row.job_id, row.source_sop_instance_uid, row.kind, row.path = (
                job_id, source_sop_uid, kind, str(path))
            _make_pending(row)
            if held:
                row.status = DeliveryStatus.HELD
            session.flush()
            lead = lead or row.id
            ids.append(row.id)
        if lead is not None and not held:
            queue_message(session, Task.DELIVER, lead)
    return ids


def _make_pending(row: Delivery) -> None:
    row.status, row.attempts, row.commit_requests, row.created_at = DeliveryStatus.PENDING, 0, 0, utcnow()
    row.next_attempt_at = row.delivered_at = row.last_status = row.last_error = None
    row.commit_transaction_uid = row.commit_requested_at = None


def claim_deliveries(db: NodeDatabase, delivery_id: int, *, lease: timedelta,
                     statuses: tuple[DeliveryStatus, ...] = UNFINISHED) -> list[Delivery]:
    """Claim the named delivery, then its siblings (same job and destination) in ``statuses``
    (default: those to send; :data:`COMMITTING`: those whose commitment answer is overdue) due at
    the same moment, for ``lease``: no other message handles them meanwhile. Returns those claimed,
    in id order; none when the named delivery is finished, not due or being handled (its own
    message handles the group when it is due, so a job's objects travel together)."""
    now = utcnow()
    named = _claim_delivery(db, delivery_id, lease, statuses, now)
    if named is None:
        return []
    with db.session() as session:
        siblings = session.scalars(select(Delivery.id).where(
            Delivery.job_id == named.job_id, Delivery.destination == named.destination,
            Delivery.id != delivery_id, Delivery.status.in_(statuses)).order_by(Delivery.id)).all()
    claimed = [named, *(c for sibling in siblings
                        if (c := _claim_delivery(db, sibling, lease, statuses, now)) is not None)]
    return sorted(claimed, key=lambda delivery: delivery.id)


def _claim_delivery(db: NodeDatabase, delivery_id: int, lease: timedelta,
                    statuses: tuple[DeliveryStatus, ...], now: datetime) -> Delivery | None:
    with db.session() as session:
        claimed = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.status.in_(statuses),
                   or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now))
            .values(next_attempt_at=now + lease)
        ).rowcount
        return session.get(Delivery, delivery_id) if claimed else None


def next_step(policy: DeliverySettings, delivery: Delivery, disposition: Disposition,
              now: datetime, jitter: float, *, commitment: bool = False) -> Step:
    """Return where an attempt that ended in ``disposition`` takes the delivery: delivered
    (stored, with ``commitment``: its commitment is asked next); dead at once when no syntax
    was accepted; else retrying after an exponential back-off with ``jitter`` (0..1) while
    transient failures are younger than ``max_age_s`` and other failures fewer than
    ``max_failures``; dead after that."""
    if disposition is Disposition.DELIVERED:
        return (DeliveryStatus.STORED if commitment else DeliveryStatus.DELIVERED), None
    if disposition is Disposition.NOT_ACCEPTED:
        return DeliveryStatus.DEAD, None
    attempts = delivery.attempts + 1
    wait = min(policy.first_retry_s * 2 ** (attempts - 1), policy.max_retry_interval_s)
    retry_at = now + timedelta(seconds=wait * (1 + policy.jitter * jitter))
    if disposition is Disposition.RETRY:
        if retry_at - delivery.created_at <= timedelta(seconds=policy.max_age_s):
            return DeliveryStatus.RETRYING, retry_at
    elif attempts < policy.max_failures:
        return DeliveryStatus.RETRYING, retry_at
    return DeliveryStatus.DEAD, None


def record_attempt(db: NodeDatabase, audit: AuditTrail, delivery: Delivery, outcome: Answer,
                   step: Step, *, actor: str, remote: str | None, now: datetime) -> None:
    """Store what one attempt came to (delivered, a retry scheduled, dead-lettered) and audit
    it (see :data:`DELIVERY_EVENTS`) as ``actor``; the retry's message is :func:`queue_retries`'."""
    status, retry_at = step
    with db.session() as session:
        session.execute(update(Delivery).where(Delivery.id == delivery.id).values(
            status=status, attempts=delivery.attempts + 1, next_attempt_at=retry_at,
            last_status=outcome.status, last_error=outcome.detail or None,
            delivered_at=now if status in (DeliveryStatus.DELIVERED, DeliveryStatus.STORED) else None))
        if status is DeliveryStatus.DEAD:
            notify_dead_lettered(session, delivery.id)
        source = session.scalar(select(Instance).where(
            Instance.sop_instance_uid == delivery.source_sop_instance_uid))
    answered = "no answer" if outcome.status is None else f"status 0x{outcome.status:04X}"
    detail = (f"{delivery.kind} to {delivery.destination}: {answered}"
              + (f" ({outcome.detail})" if outcome.detail else "")
              + (f"; retry at {retry_at:%H:%M:%S}" if retry_at else ""))
    logger.info("Delivery %d %s: %s", delivery.id, status.value, detail)
    event, audit_outcome = DELIVERY_EVENTS[status]
    audit.record(event, outcome=audit_outcome, actor=actor, job_id=delivery.job_id, remote=remote,
                 sop_uid=delivery.sop_instance_uid,
                 study_uid=source.study_instance_uid if source else None,
                 pseudonym=source.patient_pseudonym if source else None, detail=detail)


def dead_letter(db: NodeDatabase, audit: AuditTrail, deliveries: Iterable[Delivery], reason: str, *,
                actor: str, remote: str | None) -> None:
    """Dead-letter ``deliveries`` without sending them, for ``reason`` (a fixed text), audited as
    an attempt of ``actor``."""
    now = utcnow()
    for delivery in deliveries:
        record_attempt(db, audit, delivery, SendOutcome(Disposition.GIVE_UP, None, reason),
                       (DeliveryStatus.DEAD, None), actor=actor, remote=remote, now=now)


def request_commitment(db: NodeDatabase, audit: AuditTrail, deliveries: list[Delivery],
                       transaction_uid: str, ask: Callable[[str], int | None], *, answer_by: datetime,
                       actor: str, remote: str | None) -> None:
    """Ask for the commitment of ``deliveries`` (stored, of one job and destination) in
    transaction ``transaction_uid``: record the request and queue the check of its answer, due
    ``answer_by`` (the lead's message: see :class:`~dicom_node.delivery.Deliverer`), audit it,
    then ``ask`` (send it; it returns the status answered, None: none), so that an answer on its
    own association finds it recorded. A request the destination did not take is audited as a
    failure, and asked again when its answer is overdue."""
    now = utcnow()
    with db.session() as session:
        for delivery in deliveries:
            session.execute(update(Delivery).where(Delivery.id == delivery.id).values(
                commit_transaction_uid=transaction_uid, commit_requested_at=now,
                commit_requests=delivery.commit_requests + 1, next_attempt_at=answer_by))
        queue_message(session, Task.DELIVER, deliveries[0].id, not_before=answer_by)
        sources = _sources(session, deliveries)

    def record(event: AuditEvent, outcome: Outcome, what: str) -> None:
        for delivery in deliveries:
            source = sources.get(delivery.source_sop_instance_uid)
            audit.record(event, outcome=outcome, actor=actor, remote=remote, job_id=delivery.job_id,
                         sop_uid=delivery.sop_instance_uid,
                         study_uid=source.study_instance_uid if source else None,
                         pseudonym=source.patient_pseudonym if source else None,
                         detail=f"{delivery.kind} to {delivery.destination}: storage commitment "
                                f"request {delivery.commit_requests + 1} {what}")

    record(AuditEvent.RESULT_COMMIT_REQUESTED, Outcome.SUCCESS, f"sent, answer due {answer_by:%H:%M:%S}")
    status = ask(transaction_uid)
    if status != 0:
        answered = "no answer" if status is None else f"status 0x{status:04X}"
        logger.warning("Storage commitment request %s to %s not taken: %s", transaction_uid, remote, answered)
        record(AuditEvent.RESULT_COMMIT_FAILED, Outcome.MINOR_FAILURE,
               f"not taken ({answered}); asked again after {answer_by:%H:%M:%S}")


def record_commitment(db: NodeDatabase, audit: AuditTrail, transaction_uid: str,
                      committed: Iterable[str], failed: Mapping[str, int | None], *,
                      actor: str, remote: str | None) -> int:
    """Apply a storage commitment answer to the stored deliveries of request ``transaction_uid``:
    those whose SOP Instance UID is ``committed`` become committed; the others (``failed``, by
    their failure reason, or missing from the answer) retrying, due now, to be sent and asked
    again (:class:`~dicom_node.delivery.Deliverer` dead-letters them after too many requests).
    Audits each as ``actor``; returns how many deliveries the answer concerned (0: an unknown or
    superseded request)."""
    committed = set(committed)
    with db.session() as session:
        deliveries = list(session.scalars(select(Delivery).where(
            Delivery.commit_transaction_uid == transaction_uid,
            Delivery.status.in_(COMMITTING)).order_by(Delivery.id)))
        again = [d for d in deliveries if d.sop_instance_uid not in committed]
        for delivery in deliveries:
            if delivery in again:
                reason = failed.get(delivery.sop_instance_uid)
                delivery.status, delivery.next_attempt_at = DeliveryStatus.RETRYING, None
                delivery.last_status = reason
                delivery.last_error = ("storage commitment failed" if delivery.sop_instance_uid in failed
                                       else "not in the storage commitment answer")
            else:
                delivery.status = DeliveryStatus.COMMITTED
        if again:
            queue_message(session, Task.DELIVER, again[0].id)
        sources = _sources(session, deliveries)
    for delivery in deliveries:
        source = sources.get(delivery.source_sop_instance_uid)
        failure = delivery in again
        detail = (f"{delivery.kind} to {delivery.destination}: "
                  + (_failure(delivery) if failure else "storage committed"))
        logger.info("Delivery %d %s: %s", delivery.id, delivery.status.value, detail)
        audit.record(AuditEvent.RESULT_COMMIT_FAILED if failure else AuditEvent.RESULT_COMMITTED,
                     outcome=Outcome.MINOR_FAILURE if failure else Outcome.SUCCESS,
                     actor=actor, remote=remote, job_id=delivery.job_id,
                     sop_uid=delivery.sop_instance_uid,
                     study_uid=source.study_instance_uid if source else None,
                     pseudonym=source.patient_pseudonym if source else None, detail=detail)
    return len(deliveries)


def _failure(delivery: Delivery) -> str:
    reason = f" (reason 0x{delivery.last_status:04X})" if delivery.last_status is not None else ""
    return f"{delivery.last_error}{reason}; to be sent again"


def _sources(session: Session, deliveries: Iterable[Delivery]) -> dict[str, Instance]:
    """Return the source instances of ``deliveries``, by SOP Instance UID."""
    uids = {d.source_sop_instance_uid for d in deliveries}
    return {i.sop_instance_uid: i for i in session.scalars(
        select(Instance).where(Instance.sop_instance_uid.in_(uids)))}


def queue_retries(db: NodeDatabase, steps: Mapping[int, Step]) -> None:
    """Queue one outbox message per distinct retry time of ``steps`` (by delivery id), due then:
    deliveries due together go together."""
    leads: dict[datetime, int] = {}
    for delivery_id, (_, retry_at) in sorted(steps.items()):
        if retry_at is not None:
            leads.setdefault(retry_at, delivery_id)
    with db.session() as session:
        for retry_at, lead in leads.items():
            queue_message(session, Task.DELIVER, lead, not_before=retry_at)


def requeue_abandoned_deliveries(db: NodeDatabase) -> list[int]:
    """Queue again unfinished deliveries whose lease or retry time (or commitment answer's
    time) has passed without a message to carry them (a worker died mid-send); return their ids."""
    now = utcnow()
    with db.session() as session:
        waiting = set(session.scalars(select(OutboxMessage.target_id).where(
            OutboxMessage.task == Task.DELIVER, OutboxMessage.published_at.is_(None))))
        abandoned = [d for d in session.scalars(select(Delivery.id).where(
            Delivery.status.in_(UNFINISHED + COMMITTING),
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now)))
            if d not in waiting]
        for delivery_id in abandoned:
            queue_message(session, Task.DELIVER, delivery_id)
    return abandoned


def resend_job(db: NodeDatabase, audit: AuditTrail, job_id: int, *, actor: str) -> list[Delivery]:
    """Make every delivery of a job pending again, dead-lettered and delivered ones included,
    with one message per destination, and audit each as ``actor``; return the deliveries.

    Held deliveries stay held: :func:`release_job` sends those.

    Raises :class:`NoSuchJobError` for an unknown id, :class:`StateChangeError` when the job
    has no deliveries, or only held ones.
    """
    with db.session() as session:
        job = _job(session, job_id)
        every = _deliveries(session, job_id)
        deliveries = [d for d in every if d.status is not DeliveryStatus.HELD]
        if not deliveries:
            raise StateChangeError(f"job {job_id} has no deliveries" if not every else
                                   f"job {job_id}'s results are held (shadow mode): "
                                   f"`dicom-node jobs release {job_id}` sends them")
        leads: dict[str, int] = {}  # one message per destination sends all of its results
        for delivery in deliveries:
            _make_pending(delivery)
            leads.setdefault(delivery.destination, delivery.id)
        for lead in leads.values():
            queue_message(session, Task.DELIVER, lead)
    logger.info("%d deliveries of job %d queued again by %s", len(deliveries), job_id, actor)
    for delivery in deliveries:
        audit.record(AuditEvent.RESULT_RESENT, actor=actor, job_id=job_id,
                     study_uid=job.study_instance_uid, sop_uid=delivery.sop_instance_uid,
                     detail=f"{delivery.kind} to {delivery.destination} {RESENT}")
    return deliveries


def release_job(db: NodeDatabase, audit: AuditTrail, job_id: int, *, actor: str) -> list[Delivery]:
    """Make the held deliveries of a finished job pending, with one message per destination, and
    audit each as released by ``actor``; return them.

    Raises :class:`NoSuchJobError` for an unknown id, :class:`StateChangeError` when the job is
    not finished (more of its results may come) or holds no result.
    """
    with db.session() as session:
        job = _job(session, job_id)
        if not job.status.finished:
            raise StateChangeError(f"job {job_id} is {job.status.value}: release it once it has finished")
        released = _release(session, [job_id])
        if not released:
            raise StateChangeError(f"job {job_id} holds no results")
        sources = _sources(session, released)
    _audit_released(audit, released, sources, actor=actor)
    return released


def release_finished_between(db: NodeDatabase, audit: AuditTrail, since: datetime, until: datetime, *,
                             actor: str) -> list[Delivery]:
    """Release (see :func:`release_job`) the held deliveries of the jobs that finished from ``since``
    up to, not including, ``until``; return them (none when no such job holds a result).

    Raises ``ValueError`` when ``until`` is not after ``since`` or either has no time zone.
    """
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("The release range needs times with a time zone.")
    if until <= since:
        raise ValueError("The release range must end after it starts.")
    with db.session() as session:
        jobs = list(session.scalars(select(Job.id).where(
            Job.finished_at >= since.astimezone(UTC), Job.finished_at < until.astimezone(UTC))))
        released = _release(session, jobs)
        sources = _sources(session, released)
    _audit_released(audit, released, sources, actor=actor)
    return released


def _release(session: Session, job_ids: list[int]) -> list[Delivery]:
    """Make the held deliveries of ``job_ids`` pending (their age counted from now, for the retry
    limits), queue one message per job and destination; return them. A delivery another release
    took meanwhile is left to it."""
    now = utcnow()
    released: list[Delivery] = []
    leads: dict[tuple[int, str], int] = {}
    held = session.scalars(select(Delivery.id).where(
        Delivery.job_id.in_(job_ids), Delivery.status == DeliveryStatus.HELD).order_by(Delivery.id)).all()
    for delivery_id in held:
        if session.execute(update(Delivery).where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.HELD)
                           .values(status=DeliveryStatus.PENDING, created_at=now, next_attempt_at=None)).rowcount:
            delivery = session.get_one(Delivery, delivery_id)
            released.append(delivery)
            leads.setdefault((delivery.job_id, delivery.destination), delivery_id)
    for lead in leads.values():
        queue_message(session, Task.DELIVER, lead)
    return released


def _audit_released(audit: AuditTrail, released: list[Delivery], sources: Mapping[str, Instance], *,
                    actor: str) -> None:
    """Audit each of ``released`` as released by ``actor``, with its source instance's study and pseudonym."""
    if released:
        logger.info("%d held deliveries released by %s", len(released), actor)
    for delivery in released:
        source = sources.get(delivery.source_sop_instance_uid)
        audit.record(AuditEvent.RESULT_RELEASED, actor=actor, job_id=delivery.job_id,
                     study_uid=source.study_instance_uid if source else None,
                     pseudonym=source.patient_pseudonym if source else None,
                     sop_uid=delivery.sop_instance_uid, detail=f"{delivery.kind} to {delivery.destination} {RELEASED}")


# What the administrator looks at

def list_jobs(db: NodeDatabase, *, statuses: Iterable[JobStatus] = (),
              delivery_statuses: Iterable[DeliveryStatus] = (), limit: int = 50) -> list[tuple[Job, list[Delivery]]]:
    """Return the newest jobs with their deliveries: all, or those in ``statuses`` and those with a
    delivery in ``delivery_statuses`` (dead-lettered, held)."""
    statuses, delivery_statuses = list(statuses), list(delivery_statuses)
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if delivery_statuses:
        having = select(Delivery.job_id).where(Delivery.status.in_(delivery_statuses))
        query = query.where(Job.id.in_(having) | Job.status.in_(statuses))
    elif statuses:
        query = query.where(Job.status.in_(statuses))
    with db.session() as session:
        return [(job, _deliveries(session, job.id))
                for job in session.scalars(query)]


def job_details(db: NodeDatabase, job_id: int) -> tuple[Job, list[Instance], list[Delivery]]:
    """Return a job, its instances and its deliveries; raises :class:`NoSuchJobError`."""
    with db.session() as session:
        job = _job(session, job_id)
        instances = list(session.scalars(select(Instance).where(Instance.job_id == job_id)
                                         .order_by(Instance.id)))
        deliveries = _deliveries(session, job_id)
    return job, instances, deliveries


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NoSuchJobError(f"no job {job_id}")
    return job


def _deliveries(session: Session, job_id: int) -> list[Delivery]:
    return list(session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))
