"""Senders: one per kind of destination, found by entry point (see :mod:`dicom_node.senders.base`)."""
