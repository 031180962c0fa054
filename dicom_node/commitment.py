"""Storage commitment (Push Model, PS3.4 Annex J): asking a destination to commit what it stored,
and taking its answer.

After a job's objects are stored to a DIMSE destination with ``storage_commitment: true``, the
delivery lane sends one N-ACTION Request Storage Commitment (a new Transaction UID, the Referenced
SOP Sequence of the objects). The destination answers with an N-EVENT-REPORT (event type 1: all
committed; 2: failures present) on the same association or, usually, on a new association to the
node's SCP. :class:`CommitmentReports` takes it on either; :mod:`dicom_node.workflow` records what
it says.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom.events import Event

from dicom_node.audit import AuditTrail
from dicom_node.config import DimseDestination, Settings
from dicom_node.db import Delivery, NodeDatabase
from dicom_node.scu import Peer, request_commitment
from dicom_node.workflow import record_commitment

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
MISSING_ATTRIBUTE = 0x0120
#: N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3).
ALL_COMMITTED, FAILURES_PRESENT = 1, 2


@dataclass(frozen=True)
class Commitment:
    """How one destination is asked for commitment: its peer, calling AE, association timeout,
    how long an answer may take, and how many requests an object gets."""

    peer: Peer
    calling_ae: str
    timeout_s: float
    answer_timeout_s: float
    requests: int

    @classmethod
    def of(cls, destination: DimseDestination, settings: Settings) -> Commitment:
        """Return the commitment settings of ``destination`` (which asks for commitment)."""
        return cls(Peer(destination.ae_title, destination.host, destination.port, destination.tls),
                   destination.calling_ae or settings.scp.ae_title, settings.delivery.timeout_s,
                   destination.commitment_timeout_s, destination.commitment_requests)

    def request(self, deliveries: Iterable[Delivery], transaction_uid: str,
                reports: CommitmentReports) -> int | None:
        """Ask the destination to commit ``deliveries`` (stored: their files are read for their
        SOP Class UIDs) in transaction ``transaction_uid``; return the N-ACTION status (None: no
        association or no answer). An answer on this association goes to ``reports``."""
        request = Dataset()
        request.TransactionUID = transaction_uid
        request.ReferencedSOPSequence = [_reference(d) for d in deliveries]
        return request_commitment(self.peer, request, calling_ae=self.calling_ae,
                                  timeout_s=self.timeout_s, on_report=reports.on_event_report)


def new_transaction_uid() -> str:
    """Return a new Transaction UID (2.25 and a random UUID)."""
    return generate_uid(prefix=None)


def _reference(delivery: Delivery) -> Dataset:
    header = dcmread(Path(delivery.path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = delivery.sop_instance_uid
    return item


class CommitmentReports:
    """Takes storage commitment answers (N-EVENT-REPORT) and records them."""

    def __init__(self, db: NodeDatabase, audit: AuditTrail) -> None:
        self.db = db
        self.audit = audit

    def on_event_report(self, event: Event) -> tuple[int, Dataset | None]:
        """Record the answer ``event`` carries (see :func:`dicom_node.workflow.record_commitment`).

        Statuses: 0x0000 recorded (also for a transaction the node does not know or asked again
        since: the answer is logged and ignored); 0x0113 an event type other than 1 or 2; 0x0120
        no Transaction UID; 0x0110 an undecodable event information or a failure to record it.
        """
        assoc = event.assoc
        calling_ae, remote = assoc.requestor.ae_title.strip(), assoc.requestor.address
        if assoc.is_requestor:  # on the node's own N-ACTION association: the peer is the acceptor
            calling_ae, remote = assoc.acceptor.ae_title.strip(), assoc.acceptor.address
        event_type = event.request.EventTypeID
        if event_type not in (ALL_COMMITTED, FAILURES_PRESENT):
            logger.warning("Storage commitment answer from %s with event type %s: refused", calling_ae, event_type)
            return NO_SUCH_EVENT_TYPE, None
        try:
            report = event.event_information
            transaction_uid = str(report.get("TransactionUID", "")) if report is not None else ""
            committed = [str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])]
            failed = {str(i.ReferencedSOPInstanceUID): _reason(i) for i in report.get("FailedSOPSequence", [])}
        except Exception as exc:  # a handler answers with a status, never raises
            logger.warning("Undecodable storage commitment answer from %s: %s", calling_ae, type(exc).__name__)
            return PROCESSING_FAILURE, None
        if not transaction_uid:
            return MISSING_ATTRIBUTE, None
        try:
            concerned = record_commitment(self.db, self.audit, transaction_uid, committed, failed,
                                          actor=calling_ae, remote=remote)
        except Exception:
            logger.exception("Could not record a storage commitment answer")
            return PROCESSING_FAILURE, None
        if not concerned:
            logger.warning("Storage commitment answer from %s for transaction %s, which waits for no "
                           "answer (unknown, answered, or asked again since): ignored", calling_ae, transaction_uid)
        return SUCCESS, None


def _reason(item: Dataset) -> int | None:
    reason = item.get("FailureReason")
    return int(reason) if reason is not None else None
