"""What can happen on the node, and how it maps onto DICOM PS3.15 Annex A.5 audit messages."""

from __future__ import annotations

import enum
from typing import NamedTuple


class DicomCode(NamedTuple):
    """A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str


APPLICATION_ACTIVITY = DicomCode("110100", "DCM", "Application Activity")
AUDIT_LOG_USED = DicomCode("110101", "DCM", "Audit Log Used")
INSTANCES_ACCESSED = DicomCode("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = DicomCode("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = DicomCode("110105", "DCM", "DICOM Study Deleted")
EXPORT = DicomCode("110106", "DCM", "Export")
PATIENT_RECORD = DicomCode("110110", "DCM", "Patient Record")
SECURITY_ALERT = DicomCode("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = DicomCode("110114", "DCM", "User Authentication")
# Participant roles, source type and object types of the A.5 messages (dicom_node.audit.atna).
APPLICATION = DicomCode("110150", "DCM", "Application")
DESTINATION = DicomCode("110152", "DCM", "Destination Role ID")
SOURCE = DicomCode("110153", "DCM", "Source Role ID")
APPLICATION_SERVER = DicomCode("4", "DCM", "Application Server Process Tier in a Multi-tier System")
PATIENT_NUMBER = DicomCode("2", "RFC-3881", "Patient Number")
STUDY_INSTANCE_UID = DicomCode("110180", "DCM", "Study Instance UID")
URI = DicomCode("12", "RFC-3881", "URI")


class AuditEvent(enum.StrEnum):
    """One kind of step the node records; the value is what the store and the CLI show."""

    NODE_STARTED = "node-started"
    NODE_STOPPED = "node-stopped"
    CONFIG_LOADED = "config-loaded"
    ASSOCIATION_ACCEPTED = "association-accepted"
    ASSOCIATION_REJECTED = "association-rejected"
    INSTANCE_RECEIVED = "instance-received"
    INSTANCE_IGNORED = "instance-ignored"
    INSTANCE_REJECTED = "instance-rejected"
    JOB_QUEUED = "job-queued"
    JOB_SKIPPED = "job-skipped"
    JOB_STARTED = "job-started"
    JOB_COMPLETED = "job-completed"
    JOB_FAILED = "job-failed"
    JOB_RETRIED = "job-retried"
    RESULT_SENT = "result-sent"
    RESULT_FAILED = "result-failed"
    RESULT_QUEUED = "result-queued"
    RESULT_RESENT = "result-resent"
    RESULT_HELD = "result-held"
    RESULT_RELEASED = "result-released"
    RESULT_DEAD_LETTERED = "result-dead-lettered"
    RESULT_COMMIT_REQUESTED = "result-commit-requested"
    RESULT_COMMITTED = "result-committed"
    RESULT_COMMIT_FAILED = "result-commit-failed"
    DATA_PURGED = "data-purged"
    SUBJECT_EXPORTED = "subject-exported"
    SUBJECT_ERASED = "subject-erased"
    AUDIT_QUERIED = "audit-queried"
    CHAIN_HEAD_KEYED = "chain-head-keyed"
    CHAIN_HEAD_UNSIGNED = "chain-head-unsigned"
    SCHEMA_UPGRADED = "schema-upgraded"
    CALIBRATION_WRITTEN = "calibration-written"
    FEEDBACK_RECORDED = "feedback-recorded"
    FEEDBACK_EXPORTED = "feedback-exported"
    FEEDBACK_LOGIN = "feedback-login"
    FEEDBACK_USER_SET = "feedback-user-set"

    @property
    def dicom_event_id(self) -> DicomCode:
        """Return the A.5 EventID (CID 400) this event is reported as."""
        return _EVENT_IDS[self]

    @property
    def dicom_action(self) -> str:
        """Return the A.5 EventActionCode: C(reate), R(ead), U(pdate), D(elete) or E(xecute)."""
        return _ACTIONS[self]


_EVENT_IDS: dict[AuditEvent, DicomCode] = {
    AuditEvent.NODE_STARTED: APPLICATION_ACTIVITY,
    AuditEvent.NODE_STOPPED: APPLICATION_ACTIVITY,
    AuditEvent.CONFIG_LOADED: SECURITY_ALERT,  # EventTypeCode 110131 Software Configuration
    AuditEvent.ASSOCIATION_ACCEPTED: USER_AUTHENTICATION,
    AuditEvent.ASSOCIATION_REJECTED: SECURITY_ALERT,  # EventTypeCode 110126 Node Authentication
    AuditEvent.INSTANCE_RECEIVED: INSTANCES_TRANSFERRED,
    AuditEvent.INSTANCE_IGNORED: INSTANCES_TRANSFERRED,
    AuditEvent.INSTANCE_REJECTED: INSTANCES_TRANSFERRED,
    AuditEvent.JOB_QUEUED: INSTANCES_ACCESSED,
    AuditEvent.JOB_SKIPPED: INSTANCES_ACCESSED,
    AuditEvent.JOB_STARTED: INSTANCES_ACCESSED,
    AuditEvent.JOB_COMPLETED: INSTANCES_ACCESSED,
    AuditEvent.JOB_FAILED: INSTANCES_ACCESSED,
    AuditEvent.JOB_RETRIED: INSTANCES_ACCESSED,  # an administrator has the instances read again
    AuditEvent.RESULT_SENT: INSTANCES_TRANSFERRED,
    AuditEvent.RESULT_FAILED: INSTANCES_TRANSFERRED,
    AuditEvent.RESULT_QUEUED: INSTANCES_TRANSFERRED,
    AuditEvent.RESULT_RESENT: INSTANCES_TRANSFERRED,  # an administrator has a result sent again
    AuditEvent.RESULT_HELD: INSTANCES_ACCESSED,  # a shadow route's result made and kept on the node, not sent
    AuditEvent.RESULT_RELEASED: INSTANCES_TRANSFERRED,  # an administrator has a held result sent
    AuditEvent.RESULT_DEAD_LETTERED: INSTANCES_TRANSFERRED,  # the node gave up sending a result
    # Storage commitment (PS3.4 Annex J) is part of the transfer: asked, confirmed, refused or unanswered.
    AuditEvent.RESULT_COMMIT_REQUESTED: INSTANCES_TRANSFERRED,
    AuditEvent.RESULT_COMMITTED: INSTANCES_TRANSFERRED,
    AuditEvent.RESULT_COMMIT_FAILED: INSTANCES_TRANSFERRED,
    AuditEvent.DATA_PURGED: STUDY_DELETED,
    AuditEvent.SUBJECT_EXPORTED: EXPORT,
    AuditEvent.SUBJECT_ERASED: PATIENT_RECORD,
    AuditEvent.AUDIT_QUERIED: AUDIT_LOG_USED,
    AuditEvent.CHAIN_HEAD_KEYED: SECURITY_ALERT,  # the trail's protection changed
    AuditEvent.CHAIN_HEAD_UNSIGNED: SECURITY_ALERT,  # the trail was altered: rows may be missing
    AuditEvent.SCHEMA_UPGRADED: SECURITY_ALERT,  # EventTypeCode 110131 Software Configuration
    AuditEvent.CALIBRATION_WRITTEN: SECURITY_ALERT,  # EventTypeCode 110131 Software Configuration: new thresholds
    AuditEvent.FEEDBACK_RECORDED: INSTANCES_ACCESSED,  # a radiologist's verdict on a result
    AuditEvent.FEEDBACK_EXPORTED: EXPORT,
    AuditEvent.FEEDBACK_LOGIN: USER_AUTHENTICATION,  # EventTypeCode 110122 Login
    AuditEvent.FEEDBACK_USER_SET: SECURITY_ALERT,  # EventTypeCode 110137 User Security Attributes Changed
}

_ACTIONS: dict[AuditEvent, str] = {
    **{event: "E" for event in AuditEvent},
    AuditEvent.INSTANCE_RECEIVED: "C",
    AuditEvent.INSTANCE_IGNORED: "C",
    AuditEvent.INSTANCE_REJECTED: "C",
    AuditEvent.JOB_QUEUED: "R",
    AuditEvent.RESULT_SENT: "R",
    AuditEvent.RESULT_FAILED: "R",
    AuditEvent.RESULT_QUEUED: "R",
    AuditEvent.JOB_RETRIED: "R",
    AuditEvent.RESULT_RESENT: "R",
    AuditEvent.RESULT_HELD: "C",
    AuditEvent.RESULT_RELEASED: "R",
    AuditEvent.RESULT_DEAD_LETTERED: "R",
    AuditEvent.RESULT_COMMIT_REQUESTED: "R",
    AuditEvent.RESULT_COMMITTED: "R",
    AuditEvent.RESULT_COMMIT_FAILED: "R",
    AuditEvent.DATA_PURGED: "D",
    AuditEvent.SUBJECT_EXPORTED: "R",
    AuditEvent.SUBJECT_ERASED: "D",
    AuditEvent.AUDIT_QUERIED: "R",
    AuditEvent.CHAIN_HEAD_KEYED: "U",
    AuditEvent.SCHEMA_UPGRADED: "U",
    AuditEvent.CALIBRATION_WRITTEN: "U",
    AuditEvent.FEEDBACK_RECORDED: "C",
    AuditEvent.FEEDBACK_EXPORTED: "R",
    AuditEvent.FEEDBACK_USER_SET: "U",
}


class Outcome(enum.StrEnum):
    """How an event ended; maps onto the A.5 EventOutcomeIndicator."""

    SUCCESS = "success"
    MINOR_FAILURE = "minor-failure"
    SERIOUS_FAILURE = "serious-failure"
    MAJOR_FAILURE = "major-failure"

    @property
    def dicom_indicator(self) -> int:
        """Return the EventOutcomeIndicator: 0, 4, 8 or 12."""
        return 4 * list(Outcome).index(self)


#: EventTypeCode (CID 401 to 403) of the events whose EventID asks for one.
EVENT_TYPES: dict[AuditEvent, DicomCode] = {
    AuditEvent.NODE_STARTED: DicomCode("110120", "DCM", "Application Start"),
    AuditEvent.NODE_STOPPED: DicomCode("110121", "DCM", "Application Stop"),
    AuditEvent.ASSOCIATION_ACCEPTED: DicomCode("110122", "DCM", "Login"),
    AuditEvent.ASSOCIATION_REJECTED: DicomCode("110126", "DCM", "Node Authentication"),
    AuditEvent.CONFIG_LOADED: DicomCode("110131", "DCM", "Software Configuration"),
    AuditEvent.SCHEMA_UPGRADED: DicomCode("110131", "DCM", "Software Configuration"),
    AuditEvent.CHAIN_HEAD_KEYED: DicomCode("110129", "DCM", "Security Configuration"),
    AuditEvent.CHAIN_HEAD_UNSIGNED: DicomCode("110135", "DCM", "Object Security Attributes Changed"),
}
