"""The ``dimse`` sender: a job's objects over one C-STORE association (see :mod:`dicom_node.scu`)."""

from __future__ import annotations

from collections.abc import Sequence

from dicom_node.config import DimseDestination, Settings
from dicom_node.scu import Peer, store_files
from dicom_node.senders.base import SendObject, SendOutcome


class DimseSender:
    """Sends to a DICOM peer, calling as ``calling_ae`` (default: the node's AE title), with the
    node's delivery timeout on each step of the association."""

    def __init__(self, destination: DimseDestination, settings: Settings) -> None:
        self.peer = Peer(destination.ae_title, destination.host, destination.port, destination.tls)
        self.calling_ae = destination.calling_ae or settings.scp.ae_title
        self.timeout_s = settings.delivery.timeout_s
        self.remote = str(self.peer)

    def send(self, objects: Sequence[SendObject]) -> list[SendOutcome]:
        """Store ``objects`` in one association, each in a transfer syntax the peer accepted;
        return one outcome per object as :func:`dicom_node.scu.store_files` classifies it:
        retry for all when the association fails, not accepted for an object the peer takes
        in none of the syntaxes offered, give up for an unreadable file or a failure status.
        """
        stored = store_files([o.path for o in objects], self.peer, calling_ae=self.calling_ae,
                             timeout_s=self.timeout_s)
        return [SendOutcome(o.disposition, o.status, o.detail) for o in stored]
