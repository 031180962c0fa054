"""What the ``deliver`` task does: send a job's result objects to one destination, or plan their retry.

A job's objects for one destination travel together, over one association: a
message names one delivery, and every due delivery of the same job and
destination goes with it.

Transient failures (out of resources, association refused or aborted, timeouts)
are retried with exponential back-off and jitter until ``max_age_s``; other
failures ``max_failures`` times; then the delivery is dead-lettered. An object the
destination accepts in none of the transfer syntaxes offered (see :mod:`dicom_node.scu`)
is dead-lettered at once: no retry changes that. A retry is
an outbox message due at its time, so it survives broker and node restarts.
A delivery is claimed with a lease before it is sent, so a message delivered
twice never sends an object twice at once, and a finished one is left alone.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from dicom_node.audit import AuditEvent, AuditTrail, Outcome
from dicom_node.config import DeliverySettings, Destination, Settings
from dicom_node.db import (
    Delivery, DeliveryStatus, Instance, NodeDatabase, OutboxMessage, queue_message, utcnow,
)
from dicom_node.metrics import DELIVERIES, STAGE_SECONDS
from dicom_node.scu import Disposition, Peer, StoreOutcome, store_files

logger = logging.getLogger(__name__)

UNFINISHED = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)


def queue_deliveries(session: Session, *, job_id: int, source_sop_uid: str,
                     outputs: Iterable[tuple[str, str, Path]],
                     destinations: Iterable[Destination]) -> list[int]:
    """Create (or reset, for a re-run) one delivery per output and destination, each with
    its outbox message, in the caller's transaction. ``outputs`` are (kind, SOP Instance
    UID, file). One message per destination carries all of its deliveries. Returns the
    delivery ids."""
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
            row.status, row.attempts, row.created_at = DeliveryStatus.PENDING, 0, utcnow()
            row.next_attempt_at = row.delivered_at = row.last_status = row.last_error = None
            session.flush()
            lead = lead or row.id
            ids.append(row.id)
        if lead is not None:
            queue_message(session, "deliver", lead)
    return ids


class Deliverer:
    """Sends deliveries and records what became of them."""

    def __init__(self, db: NodeDatabase, audit: AuditTrail, destinations: Iterable[Destination],
                 policy: DeliverySettings, *, calling_ae: str, worker: str,
                 jitter: Callable[[], float] = random.random) -> None:
        self.db = db
        self.audit = audit
        self.destinations = {d.name: d for d in destinations}
        self.policy = policy
        self.calling_ae = calling_ae
        self.worker = worker
        self.jitter = jitter

    @classmethod
    def from_settings(cls, settings: Settings, db: NodeDatabase, audit: AuditTrail, *,
                      worker: str) -> Deliverer:
        return cls(db, audit, settings.destinations, settings.delivery,
                   calling_ae=settings.scp.ae_title, worker=worker)

    def _lease(self) -> timedelta:
        return timedelta(seconds=2 * self.policy.timeout_s + 30)

    def _claim(self, delivery_id: int) -> Delivery | None:
        now = utcnow()
        with self.db.session() as session:
            claimed = session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id, Delivery.status.in_(UNFINISHED),
                       or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now))
                .values(next_attempt_at=now + self._lease())
            ).rowcount
            return session.get(Delivery, delivery_id) if claimed else None

    def _claim_group(self, delivery_id: int) -> list[Delivery]:
        """Claim the named delivery's due siblings (same job and destination), itself included."""
        with self.db.session() as session:
            named = session.get(Delivery, delivery_id)
            if named is None:
                return []
            siblings = session.scalars(select(Delivery.id).where(
                Delivery.job_id == named.job_id, Delivery.destination == named.destination,
                Delivery.status.in_(UNFINISHED)).order_by(Delivery.id)).all()
        return [claimed for sibling in siblings if (claimed := self._claim(sibling)) is not None]

    def run(self, delivery_id: int) -> DeliveryStatus | None:
        """Send the named delivery and its due siblings now, over one association; return
        the named delivery's new status, or None when it had nothing to do."""
        group = self._claim_group(delivery_id)
        if not group:
            logger.info("Delivery %d is finished, not due or being sent: nothing to do",
                        delivery_id)
            return None
        destination = self.destinations.get(group[0].destination)
        peer = (Peer(destination.ae_title, destination.host, destination.port, destination.tls)
                if destination else None)
        outcomes = {d.id: self._unsendable(d, peer) for d in group}
        sendable = [d for d in group if outcomes[d.id] is None]
        if sendable:
            with STAGE_SECONDS.labels("deliver").time():
                sent = store_files([Path(d.path) for d in sendable], peer,
                                   calling_ae=destination.calling_ae or self.calling_ae,
                                   timeout_s=self.policy.timeout_s)
            outcomes.update((d.id, outcome) for d, outcome in zip(sendable, sent, strict=True))
        now, jitter = utcnow(), self.jitter()
        steps = {d.id: self._record(d, outcomes[d.id], peer, now, jitter) for d in group}
        self._queue_retries(steps)
        return steps[delivery_id][0] if delivery_id in steps else None

    @staticmethod
    def _unsendable(delivery: Delivery, peer: Peer | None) -> StoreOutcome | None:
        reason = ("destination no longer configured" if peer is None
                  else "result file missing (purged?)" if not Path(delivery.path).exists()
                  else None)
        return (StoreOutcome(Path(delivery.path), delivery.sop_instance_uid, None,
                             Disposition.GIVE_UP, reason) if reason else None)

    def _record(self, delivery: Delivery, outcome: StoreOutcome, peer: Peer | None,
                now: datetime, jitter: float) -> tuple[DeliveryStatus, datetime | None]:
        attempts = delivery.attempts + 1
        status, next_attempt = self._next_step(delivery, outcome.disposition, attempts, now, jitter)
        with self.db.session() as session:
            session.execute(update(Delivery).where(Delivery.id == delivery.id).values(
                status=status, attempts=attempts, next_attempt_at=next_attempt,
                last_status=outcome.status, last_error=outcome.detail or None,
                delivered_at=now if status is DeliveryStatus.DELIVERED else None))
        answered = "no answer" if outcome.status is None else f"status 0x{outcome.status:04X}"
        detail = (f"{delivery.kind} to {delivery.destination}: {answered}"
                  + (f" ({outcome.detail})" if outcome.detail else "")
                  + (f"; retry at {next_attempt:%H:%M:%S}" if next_attempt else ""))
        DELIVERIES.labels(status.value).inc()
        logger.info("Delivery %d %s: %s", delivery.id, status.value, detail)
        with self.db.session() as session:
            source = session.scalar(select(Instance).where(
                Instance.sop_instance_uid == delivery.source_sop_instance_uid))
        self.audit.record(
            AuditEvent.RESULT_SENT if status is DeliveryStatus.DELIVERED else AuditEvent.RESULT_FAILED,
            outcome=_audit_outcome(status), actor=self.worker, job_id=delivery.job_id,
            remote=str(peer) if peer else None, sop_uid=delivery.sop_instance_uid,
            study_uid=source.study_instance_uid if source else None,
            pseudonym=source.patient_pseudonym if source else None, detail=detail)
        return status, next_attempt

    def _queue_retries(self, steps: dict[int, tuple[DeliveryStatus, datetime | None]]) -> None:
        """One outbox message per distinct retry time: deliveries due together go together."""
        leads: dict[datetime, int] = {}
        for delivery_id, (_, retry_at) in sorted(steps.items()):
            if retry_at is not None:
                leads.setdefault(retry_at, delivery_id)
        with self.db.session() as session:
            for retry_at, lead in leads.items():
                queue_message(session, "deliver", lead, not_before=retry_at)

    def _next_step(self, delivery: Delivery, disposition: Disposition, attempts: int,
                   now: datetime, jitter: float) -> tuple[DeliveryStatus, datetime | None]:
        if disposition is Disposition.DELIVERED:
            return DeliveryStatus.DELIVERED, None
        if disposition is Disposition.NOT_ACCEPTED:
            return DeliveryStatus.DEAD, None
        wait = min(self.policy.first_retry_s * 2 ** (attempts - 1), self.policy.max_retry_interval_s)
        retry_at = now + timedelta(seconds=wait * (1 + self.policy.jitter * jitter))
        if disposition is Disposition.RETRY:
            if retry_at - delivery.created_at <= timedelta(seconds=self.policy.max_age_s):
                return DeliveryStatus.RETRYING, retry_at
        elif attempts < self.policy.max_failures:
            return DeliveryStatus.RETRYING, retry_at
        return DeliveryStatus.DEAD, None

    def requeue_abandoned(self) -> list[int]:
        """Queue again unfinished deliveries whose lease or retry time has passed without a
        message to carry them (a worker died mid-send); return their ids."""
        now = utcnow()
        with self.db.session() as session:
            waiting = set(session.scalars(select(OutboxMessage.target_id).where(
                OutboxMessage.task == "deliver", OutboxMessage.published_at.is_(None))))
            abandoned = [d for d in session.scalars(select(Delivery.id).where(
                Delivery.status.in_(UNFINISHED),
                or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now)))
                if d not in waiting]
            for delivery_id in abandoned:
                queue_message(session, "deliver", delivery_id)
        return abandoned


def _audit_outcome(status: DeliveryStatus) -> Outcome:
    return {DeliveryStatus.DELIVERED: Outcome.SUCCESS, DeliveryStatus.RETRYING: Outcome.MINOR_FAILURE,
            DeliveryStatus.DEAD: Outcome.SERIOUS_FAILURE}[status]
