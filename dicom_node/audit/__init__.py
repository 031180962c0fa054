"""The audit trail: who sent what, what the node did with it, where results went, who looked.

``from dicom_node.audit import AuditTrail, AuditEvent, Outcome`` is all a writer needs.
Inside: ``events`` (event types and their PS3.15 A.5 codes), ``keys`` (the secret and the
keyed hashes), ``store`` (tables, engine, write lock), ``trail`` (pseudonyms and appends),
``chain`` (verification and purge), ``query`` (audited reads) and ``failures`` (what a
row or a log line may say about an exception).
"""

from dicom_node.audit.events import AuditEvent, DicomCode, Outcome
from dicom_node.audit.trail import AuditTrail

__all__ = ["AuditEvent", "AuditTrail", "DicomCode", "Outcome"]
