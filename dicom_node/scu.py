"""C-ECHO / C-STORE SCU and the classification of what a peer answered.

``classify`` decides what a delivery does next, by pynetdicom's status categories:
delivered (success, and every warning: 0xB000-0xBFFF and the general warnings such
as 0x0107 and 0x0116 mean the peer stored the object), retry (out of resources,
resource limitation, association refused or aborted, timeouts), or give up (any
other failure: retrying will not change the answer).
"""

from __future__ import annotations

import enum
import logging
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicom_node.config import TlsSettings
from dicom_node.errors import PeerError

logger = logging.getLogger(__name__)

ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Peer:
    """A remote AE: title, host, port and optional TLS."""

    ae_title: str
    host: str
    port: int
    tls: TlsSettings | None = None

    @classmethod
    def parse(cls, address: str) -> Peer:
        """Parse ``AE@HOST:PORT``; raises ``ValueError`` naming the expected form."""
        match = ADDRESS.match(address.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"{address!r} is not AE@HOST:PORT")
        return cls(match["ae"], match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Disposition(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give-up"


def classify(status: int | None) -> Disposition:
    """Return what to do after a C-STORE answered ``status`` (None: no answer at all)."""
    if status is None:
        return Disposition.RETRY
    if code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING):
        return Disposition.DELIVERED
    if 0xA700 <= status <= 0xA7FF or status == 0x0213:  # out of resources / resource limitation
        return Disposition.RETRY
    return Disposition.GIVE_UP


@dataclass(frozen=True)
class StoreOutcome:
    """What the peer said about one file."""

    path: Path
    sop_instance_uid: str | None
    status: int | None
    disposition: Disposition
    detail: str = ""


def _client_tls(tls: TlsSettings, host: str) -> tuple[ssl.SSLContext, str]:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificates)
    context.load_cert_chain(tls.certificate, tls.private_key)
    return context, host


def _associate(ae: AE, peer: Peer) -> Association:
    tls_args = _client_tls(peer.tls, peer.host) if peer.tls else None
    return ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)


def _scu_ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


def _association_failure(assoc: Association) -> str:
    if assoc.is_rejected:
        return "association rejected"
    if assoc.is_established:
        return "association aborted"
    return "no association: peer unreachable or aborted"


def echo(peer: Peer, *, calling_ae: str, timeout_s: float = 30) -> int:
    """Send C-ECHO; return the status. Raises :class:`PeerError` when no association."""
    ae = _scu_ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        raise PeerError(f"{peer}: {_association_failure(assoc)}")
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in response:
        raise PeerError(f"{peer}: no C-ECHO response")
    return int(response.Status)


def store_files(paths: Iterable[Path], peer: Peer, *, calling_ae: str,
                timeout_s: float = 60) -> list[StoreOutcome]:
    """Send DICOM files over one association, as stored (no transcoding).

    Returns one outcome per file; files that cannot be read are GIVE_UP, and every
    file is RETRY when the association cannot be established or breaks.
    """
    paths = list(paths)
    outcomes: dict[Path, StoreOutcome] = {}
    # One presentation context per (SOP class, transfer syntax), as DCMTK does: a peer
    # that prefers its own first syntax cannot then leave a compressed file unsendable.
    requested: set[tuple[str, str]] = set()
    headers: dict[Path, tuple[str, str, str]] = {}
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            headers[path] = (str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                             str(ds.file_meta.TransferSyntaxUID))
        except Exception as exc:
            outcomes[path] = StoreOutcome(path, None, None, Disposition.GIVE_UP,
                                          f"not a readable DICOM file: {type(exc).__name__}")
            continue
        sop_class, _, syntax = headers[path]
        requested.add((sop_class, syntax))
        if syntax in UNCOMPRESSED:
            requested.update((sop_class, other) for other in UNCOMPRESSED)
    if len(requested) > MAX_CONTEXTS:
        raise ValueError(f"{len(requested)} SOP class and transfer syntax pairs exceed one "
                         f"association's {MAX_CONTEXTS} presentation contexts")
    if headers:
        ae = _scu_ae(calling_ae, timeout_s)
        for sop_class, syntax in sorted(requested):
            ae.add_requested_context(sop_class, syntax)
        outcomes.update(_send(ae, peer, headers))
    return [outcomes[path] for path in paths]


def _send(ae: AE, peer: Peer, headers: dict[Path, tuple[str, str, str]]) -> dict[Path, StoreOutcome]:
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        reason = _association_failure(assoc)
        return {p: StoreOutcome(p, h[1], None, Disposition.RETRY, reason)
                for p, h in headers.items()}
    outcomes: dict[Path, StoreOutcome] = {}
    try:
        for path, (_, sop_uid, _) in headers.items():
            if not assoc.is_established:
                outcomes[path] = StoreOutcome(path, sop_uid, None, Disposition.RETRY,
                                              _association_failure(assoc))
                continue
            try:
                response = assoc.send_c_store(path)
            except (ValueError, RuntimeError) as exc:  # no accepted context, or aborted
                outcomes[path] = StoreOutcome(path, sop_uid, None, Disposition.GIVE_UP
                                              if isinstance(exc, ValueError) else Disposition.RETRY,
                                              str(exc)[:200])
                continue
            status = int(response.Status) if "Status" in response else None
            detail = "" if status is not None else "no response (timeout or abort)"
            outcomes[path] = StoreOutcome(path, sop_uid, status, classify(status), detail)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
