"""What the ``deliver`` task does: send a job's result objects to one destination, or plan their retry.

A job's objects for one destination travel together, over one association: a
message names one delivery, and every due delivery of the same job and
destination goes with it.

Transient failures (out of resources, association refused or aborted, timeouts)
are retried with exponential back-off and jitter until ``max_age_s``; other
failures ``max_failures`` times; then the delivery is dead-lettered. An object the
destination does not accept (for DICOM: in none of the transfer syntaxes offered, see
:mod:`dicom_node.scu`) is dead-lettered at once: no retry changes that. The destination's
sender (see :mod:`dicom_node.senders`) says which of these each object met. A retry is
an outbox message due at its time, so it survives broker and node restarts.
A delivery is claimed with a lease before it is sent, so a message delivered
twice never sends an object twice at once, and a finished one is left alone.

To a destination that commits storage (see :mod:`dicom_node.commitment`), the objects
stored are ``stored`` and their commitment is asked at once; a message due when the
answer is overdue asks again, and an object asked for ``commitment_requests`` times
without being committed is dead-lettered.

The state changes themselves are :mod:`dicom_node.workflow`'s.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path

from dicom_node.audit import AuditTrail
from dicom_node.audit.failures import failure_text, traceback_text
from dicom_node.commitment import Commitment, CommitmentReports, new_transaction_uid
from dicom_node.config import DeliverySettings, DimseDestination, Settings
from dicom_node.db import Delivery, DeliveryStatus, NodeDatabase, utcnow
from dicom_node.metrics import DELIVERIES, STAGE_SECONDS
from dicom_node.senders.base import Disposition, Sender, SendObject, SendOutcome, build_sender
from dicom_node.workflow import (
    COMMITTING, Step, claim_deliveries, dead_letter, next_step, queue_retries, record_attempt,
    request_commitment, requeue_abandoned_deliveries,
)

logger = logging.getLogger(__name__)


class Deliverer:
    """Sends deliveries and records what became of them."""

    def __init__(self, db: NodeDatabase, audit: AuditTrail, senders: Mapping[str, Sender],
                 policy: DeliverySettings, *, worker: str,
                 commitments: Mapping[str, Commitment] | None = None,
                 jitter: Callable[[], float] = random.random) -> None:
        self.db = db
        self.audit = audit
        self.senders = dict(senders)
        self.commitments = dict(commitments or {})
        self.reports = CommitmentReports(db, audit)
        self.policy = policy
        self.worker = worker
        self.jitter = jitter

    @classmethod
    def from_settings(cls, settings: Settings, db: NodeDatabase, audit: AuditTrail, *,
                      worker: str) -> Deliverer:
        """Return a deliverer with the sender of each configured destination; raises
        :class:`ConfigError` when a destination's type has no installed sender."""
        senders = {d.name: build_sender(d, settings) for d in settings.destinations}
        commitments = {d.name: Commitment.of(d, settings) for d in settings.destinations
                       if isinstance(d, DimseDestination) and d.storage_commitment}
        return cls(db, audit, senders, settings.delivery, worker=worker, commitments=commitments)

    def _lease(self) -> timedelta:
        return timedelta(seconds=2 * self.policy.timeout_s + 30)

    def run(self, delivery_id: int) -> DeliveryStatus | None:
        """Send the named delivery and its due siblings now, over one association, or ask again
        for the commitment of those whose answer is overdue; return the named delivery's new
        status, or None when it had nothing to do."""
        group = claim_deliveries(self.db, delivery_id, lease=self._lease())
        overdue = [] if group else claim_deliveries(self.db, delivery_id, lease=self._lease(),
                                                    statuses=COMMITTING)
        if not group and not overdue:
            logger.info("Delivery %d is finished, not due or being sent: nothing to do",
                        delivery_id)
            return None
        destination = (group or overdue)[0].destination
        sender, commitment = self.senders.get(destination), self.commitments.get(destination)
        if overdue:
            if overdue := self._within_requests(overdue, sender, commitment, "no storage commitment answer"):
                self._request_commitment(overdue, sender, commitment)
            return self._status(delivery_id)
        if commitment is not None:  # objects sent again after their commitment failed
            group = self._within_requests(group, sender, commitment, "not committed")
        outcomes = {d.id: self._unsendable(d, sender) for d in group}
        sendable = [d for d in group if outcomes[d.id] is None]
        if sender is not None and sendable:
            with STAGE_SECONDS.labels("deliver").time():
                sent = _send(sender, [SendObject(Path(d.path), d.sop_instance_uid, d.kind)
                                      for d in sendable])
            outcomes.update((d.id, outcome) for d, outcome in zip(sendable, sent, strict=True))
        now, jitter = utcnow(), self.jitter()
        steps = {d.id: self._record(d, outcomes[d.id], sender, commitment, now, jitter) for d in group}
        queue_retries(self.db, steps)
        stored = [d for d in group if steps[d.id][0] is DeliveryStatus.STORED]
        if stored:
            self._request_commitment(stored, sender, commitment)
        return self._status(delivery_id)

    def _within_requests(self, group: list[Delivery], sender: Sender | None,
                         commitment: Commitment | None, why: str) -> list[Delivery]:
        """Return the deliveries of ``group`` that may still be asked for commitment; dead-letter
        the others: ``why`` after the destination's number of requests, or all when it no longer
        asks for commitment."""
        if commitment is None:
            exhausted, reason = group, "storage commitment no longer configured for the destination"
        else:
            exhausted = [d for d in group if d.commit_requests >= commitment.requests]
            reason = f"{why} after {commitment.requests} storage commitment request(s)"
        if exhausted:
            dead_letter(self.db, self.audit, exhausted, reason, actor=self.worker,
                        remote=sender.remote if sender else None)
            DELIVERIES.labels(DeliveryStatus.DEAD.value).inc(len(exhausted))
        return [d for d in group if d not in exhausted]

    def _request_commitment(self, stored: list[Delivery], sender: Sender | None,
                            commitment: Commitment | None) -> None:
        """Ask the destination to commit ``stored`` in one new transaction, and record it."""
        assert commitment is not None, "only a destination that commits storage has stored deliveries"

        def ask(transaction_uid: str) -> int | None:
            try:
                return commitment.request(stored, transaction_uid, self.reports)
            except Exception as exc:  # an unreadable file: asked again when the answer is overdue
                logger.error("Storage commitment request failed:\n%s", traceback_text(exc))
                return None

        request_commitment(self.db, self.audit, stored, new_transaction_uid(), ask,
                           answer_by=utcnow() + timedelta(seconds=commitment.answer_timeout_s),
                           actor=self.worker, remote=sender.remote if sender else str(commitment.peer))

    def _status(self, delivery_id: int) -> DeliveryStatus | None:
        """Return the delivery's status now (a commitment answered at once included)."""
        with self.db.session() as session:
            delivery = session.get(Delivery, delivery_id)
            return delivery.status if delivery else None

    @staticmethod
    def _unsendable(delivery: Delivery, sender: Sender | None) -> SendOutcome | None:
        reason = ("destination no longer configured" if sender is None
                  else "result file missing (purged?)" if not Path(delivery.path).exists()
                  else None)
        return SendOutcome(Disposition.GIVE_UP, None, reason) if reason else None

    def _record(self, delivery: Delivery, outcome: SendOutcome, sender: Sender | None,
                commitment: Commitment | None, now: datetime, jitter: float) -> Step:
        step = next_step(self.policy, delivery, outcome.disposition, now, jitter,
                         commitment=commitment is not None)
        record_attempt(self.db, self.audit, delivery, outcome, step, actor=self.worker,
                       remote=sender.remote if sender else None, now=now)
        DELIVERIES.labels(step[0].value).inc()
        return step

    def requeue_abandoned(self) -> list[int]:
        """Queue again the deliveries a dead worker left (see
        :func:`~dicom_node.workflow.requeue_abandoned_deliveries`); return their ids."""
        return requeue_abandoned_deliveries(self.db)


def _send(sender: Sender, objects: list[SendObject]) -> list[SendOutcome]:
    """Return the sender's outcome for each object; when it raises, or answers for other
    objects than it was given, a failure for each, with a fixed detail."""
    try:
        outcomes = sender.send(objects)
        if len(outcomes) != len(objects):
            raise RuntimeError(f"{len(outcomes)} outcomes for {len(objects)} objects")
    except Exception as exc:  # a sender's fault fails its objects, never the delivery task
        logger.error("The sender to %s failed:\n%s", sender.remote, traceback_text(exc))
        detail = f"sender failed: {failure_text(exc, 'message withheld')}"
        return [SendOutcome(Disposition.GIVE_UP, None, detail) for _ in objects]
    return outcomes
