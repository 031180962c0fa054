"""GDPR duties towards one person: access (export) and erasure.

A person is named by PatientID (and issuer); the node only ever finds their pseudonym,
which is what the audit trail and the node database hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select

from dicom_node.audit import AuditEvent, AuditTrail, Outcome
from dicom_node.audit.query import EventFilter, plain, read_events
from dicom_node.config import Settings
from dicom_node.db import Feedback, Instance, NodeDatabase
from dicom_node.retention import Removed, delete_instance_data, delete_instance_records

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Erasure:
    """What erasing a person removed; ``pseudonym`` is None when the node never knew them."""

    pseudonym: str | None
    removed: Removed


def export_subject(trail: AuditTrail, db: NodeDatabase, patient_id: str,
                   issuer: str | None = None, *, actor: str) -> dict[str, Any]:
    """Return every audit event about the person and the instances the node still holds.

    The result is plain data for JSON: ``pseudonym``, ``events`` and ``instances``.
    Records SUBJECT_EXPORTED by ``actor``. Raises :class:`AuditError` when auditing fails.
    """
    pseudonym, rows = read_events(trail, EventFilter(patient_id=patient_id, issuer=issuer))
    events = [plain(row) for row in rows]
    instances: list[dict[str, Any]] = []
    if pseudonym is not None:
        with db.session() as session:
            instances = [
                {"study_uid": i.study_instance_uid, "series_uid": i.series_instance_uid,
                 "sop_uid": i.sop_instance_uid, "received_at": i.received_at.isoformat(),
                 "calling_ae": i.calling_ae, "job_id": i.job_id,
                 "verdict": i.verdict and i.verdict.value}
                for i in session.scalars(select(Instance).where(
                    Instance.patient_pseudonym == pseudonym).order_by(Instance.id))
            ]
    trail.record(AuditEvent.SUBJECT_EXPORTED, actor=actor, pseudonym=pseudonym,
                 outcome=Outcome.SUCCESS if pseudonym else Outcome.MINOR_FAILURE,
                 detail=f"{len(events)} events, {len(instances)} instances exported"
                        if pseudonym else "no pseudonym for the given patient")
    return {"pseudonym": pseudonym, "events": events, "instances": instances}


def erase_subject(settings: Settings, trail: AuditTrail, db: NodeDatabase, patient_id: str,
                  issuer: str | None = None, *, actor: str) -> Erasure:
    """Delete the person's spooled images and results, every node row that names their
    instances (instances, their deliveries and outbox messages, jobs of theirs alone, feedback on
    them), then their pseudonym.

    The node database's write-ahead log is then emptied, so that with SQLite's secure delete
    the erased UIDs are in neither file. Past audit events stay, unchanged, but can no longer
    be linked to the person.
    Records SUBJECT_ERASED by ``actor``. Raises :class:`DataRemovalError` when a stored
    path lies outside the node's folders, :class:`AuditError` when auditing fails.
    """
    pseudonym = trail.lookup_pseudonym(patient_id, issuer)
    if pseudonym is None:
        trail.record(AuditEvent.SUBJECT_ERASED, actor=actor, outcome=Outcome.MINOR_FAILURE,
                     detail="no pseudonym for the given patient; nothing to erase")
        return Erasure(None, Removed())
    removed = Removed()
    with db.session() as session:
        instances = session.scalars(
            select(Instance).where(Instance.patient_pseudonym == pseudonym)).all()
        for instance in instances:
            removed += delete_instance_data(settings, instance)
        # Radiologists' verdicts on the person's images go too: a reason is free text.
        session.execute(delete(Feedback).where(Feedback.sop_instance_uid.in_([i.sop_instance_uid for i in instances])))
        removed += delete_instance_records(session, instances)
    db.truncate_log()
    trail.forget_pseudonym(pseudonym)  # last: a failure above leaves the person findable
    trail.record(AuditEvent.SUBJECT_ERASED, actor=actor, pseudonym=pseudonym,
                 detail=f"pseudonym unlinked; deleted {removed}")
    logger.info("erased subject %s: %s", pseudonym, removed)
    return Erasure(pseudonym, removed)
