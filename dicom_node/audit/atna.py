"""One audit event row as a DICOM PS3.15 Annex A.5 audit message (the ``AuditMessage`` XML).

The message says what happened (EventIdentification: the event's EventID of CID 400, its
EventActionCode, time and outcome, and an EventTypeCode where the standard asks for one), who
took part (ActiveParticipant: the node by its AE title and host, and the peer, calling AE or
operator the row names), who reports it (AuditSourceIdentification) and what it concerned
(ParticipantObjectIdentification: the study by its UID, the patient by the pseudonym only;
the audit store never holds a patient's identifiers).
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dicom_node.audit.events import (
    APPLICATION, APPLICATION_SERVER, DESTINATION, EVENT_TYPES, PATIENT_NUMBER, SOURCE, STUDY_INSTANCE_UID, URI,
    AuditEvent, DicomCode, Outcome,
)

#: Events in which the peer sent to the node (it is the source and the requestor) ...
INBOUND = frozenset({AuditEvent.ASSOCIATION_ACCEPTED, AuditEvent.ASSOCIATION_REJECTED,
                     AuditEvent.INSTANCE_RECEIVED, AuditEvent.INSTANCE_IGNORED,
                     AuditEvent.INSTANCE_REJECTED})
#: ... and those in which the node sent to a destination.
OUTBOUND = frozenset({AuditEvent.RESULT_SENT, AuditEvent.RESULT_FAILED, AuditEvent.RESULT_QUEUED,
                      AuditEvent.RESULT_RESENT, AuditEvent.RESULT_DEAD_LETTERED})

AUDIT_LOG_ID = "urn:dicom-node:audit-trail"
XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'  # no line break: one syslog line


@dataclass(frozen=True)
class AuditSource:
    """Who reports the events: the AuditSourceID, the node's AE title and its host name."""

    source_id: str
    ae_title: str
    host: str


def audit_message(row: Mapping[str, Any], source: AuditSource) -> bytes:
    """Return the UTF-8 ``AuditMessage`` of one ``audit_events`` row (its columns by name).

    Raises ``ValueError`` for a row of an unknown event type or outcome.
    """
    event, outcome = AuditEvent(row["event"]), Outcome(row["outcome"])
    message = ET.Element("AuditMessage")
    identification = ET.SubElement(message, "EventIdentification", {
        "EventActionCode": event.dicom_action,
        "EventDateTime": _date_time(row["time"]),
        "EventOutcomeIndicator": str(outcome.dicom_indicator)})
    _code(identification, "EventID", event.dicom_event_id)
    if event in EVENT_TYPES:
        _code(identification, "EventTypeCode", EVENT_TYPES[event])
    if row["detail"]:
        ET.SubElement(identification, "EventOutcomeDescription").text = row["detail"]
    for participant in _participants(event, row, source):
        message.append(participant)
    audit_source = ET.SubElement(message, "AuditSourceIdentification",
                                 {"AuditSourceID": source.source_id})
    _code(audit_source, "AuditSourceTypeCode", APPLICATION_SERVER)
    if event is AuditEvent.AUDIT_QUERIED:
        _object(message, AUDIT_LOG_ID, "2", "13", URI, name="Security Audit Log")
    if row["study_uid"]:
        _object(message, row["study_uid"], "2", "3", STUDY_INSTANCE_UID)
    if row["pseudonym"]:
        _object(message, row["pseudonym"], "1", "1", PATIENT_NUMBER)
    return XML_DECLARATION + ET.tostring(message, encoding="unicode").encode()


def _participants(event: AuditEvent, row: Mapping[str, Any],
                  source: AuditSource) -> list[ET.Element]:
    """The node first, then the peer (inbound: the calling AE at its address; outbound: the
    destination) or the operator or process that acted."""
    node = _participant(source.ae_title, requestor=event in OUTBOUND or not row["actor"],
                        access_point=source.host)
    if event in INBOUND:
        _code(node, "RoleIDCode", DESTINATION)
        peer = _participant(row["actor"] or row["remote"] or "unknown", requestor=True,
                            access_point=row["remote"])
        _code(peer, "RoleIDCode", SOURCE)
        return [node, peer]
    if event in OUTBOUND:
        if row["actor"]:
            node.set("AlternativeUserID", row["actor"])
        _code(node, "RoleIDCode", SOURCE)
        if not row["remote"]:
            return [node]
        peer = _participant(row["remote"], requestor=False, access_point=None)
        _code(peer, "RoleIDCode", DESTINATION)
        return [node, peer]
    _code(node, "RoleIDCode", APPLICATION)
    if not row["actor"]:
        return [node]
    return [node, _participant(row["actor"], requestor=True, access_point=row["remote"])]


def _participant(user_id: str, *, requestor: bool, access_point: str | None) -> ET.Element:
    participant = ET.Element("ActiveParticipant", {
        "UserID": user_id, "UserIsRequestor": "true" if requestor else "false"})
    if access_point:
        participant.set("NetworkAccessPointID", access_point)
        participant.set("NetworkAccessPointTypeCode", "2" if _is_address(access_point) else "1")
    return participant


def _object(message: ET.Element, object_id: str, type_code: str, role: str, id_type: DicomCode,
            name: str | None = None) -> None:
    found = ET.SubElement(message, "ParticipantObjectIdentification", {
        "ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code,
        "ParticipantObjectTypeCodeRole": role})
    _code(found, "ParticipantObjectIDTypeCode", id_type)
    if name:
        ET.SubElement(found, "ParticipantObjectName").text = name


def _code(parent: ET.Element, tag: str, code: DicomCode) -> ET.Element:
    """Append a CodedValueType element: csd-code, codeSystemName and originalText."""
    return ET.SubElement(parent, tag, {"csd-code": code.value, "codeSystemName": code.scheme,
                                       "originalText": code.meaning})


def _date_time(moment: datetime) -> str:
    """Return ``moment`` as an xsd:dateTime in UTC, to the millisecond."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
