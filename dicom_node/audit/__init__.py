"""The audit trail: who sent what, what the node did with it, where results went, who looked.

``from dicom_node.audit import AuditTrail, AuditEvent, Outcome`` is all a writer needs.
"""

from dicom_node.audit.events import AuditEvent, DicomCode, Outcome
from dicom_node.audit.trail import AuditTrail

__all__ = ["AuditEvent", "AuditTrail", "DicomCode", "Outcome"]
