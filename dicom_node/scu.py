"""C-ECHO / C-STORE SCU, the storage commitment request, and the classification of what a peer answered.

``classify`` decides what a delivery does next, by pynetdicom's status categories:
delivered (success, and every warning: 0xB000-0xBFFF and the general warnings such
as 0x0107 and 0x0116 mean the peer stored the object), retry (out of resources,
resource limitation, association refused or aborted, timeouts), or give up (any
other failure: retrying will not change the answer).

Every object is offered in its own transfer syntax and in Explicit and Implicit VR
Little Endian, and sent in what the peer accepted: as stored when it took the
object's own syntax, else decoded (the same object, under the same SOP Instance
UID). A peer that accepts none of them for the object's SOP class will not take it
later either: :attr:`Disposition.NOT_ACCEPTED`.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicom_node.config import TlsSettings
from dicom_node.errors import PeerError
from dicom_node.senders.base import Disposition

logger = logging.getLogger(__name__)

ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
#: What every object is offered in beside its own transfer syntax, in order of preference.
FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Presentation contexts one association may request (odd context ids 1 to 255).
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


def _associate(ae: AE, peer: Peer, evt_handlers: list[EventHandlerType] | None = None) -> Association:
    tls_args = _client_tls(peer.tls, peer.host) if peer.tls else None
    return ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args,
                        evt_handlers=evt_handlers)


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


#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
#: N-ACTION Action Type ID: Request Storage Commitment.
REQUEST_STORAGE_COMMITMENT = 1


def request_commitment(peer: Peer, request: Dataset, *, calling_ae: str, timeout_s: float,
                       on_report: Callable[[Event], tuple[int, Dataset | None]]) -> int | None:
    """Send N-ACTION Request Storage Commitment carrying ``request`` (Transaction UID and
    Referenced SOP Sequence); return the status answered, None when there was no association
    or no answer. An N-EVENT-REPORT the peer sends on this association before it is released
    goes to ``on_report`` (a pynetdicom EVT_N_EVENT_REPORT handler)."""
    ae = _scu_ae(calling_ae, timeout_s)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = _associate(ae, peer, [(evt.EVT_N_EVENT_REPORT, on_report)])
    if not assoc.is_established:
        logger.warning("Storage commitment request to %s: %s", peer, _association_failure(assoc))
        return None
    try:
        status, _ = assoc.send_n_action(request, REQUEST_STORAGE_COMMITMENT, StorageCommitmentPushModel,
                                        STORAGE_COMMITMENT_INSTANCE)
    finally:
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if "Status" in status else None


@dataclass(frozen=True)
class _Header:
    sop_class: UID
    sop_instance_uid: str
    transfer_syntax: UID


def store_files(paths: Iterable[Path], peer: Peer, *, calling_ae: str,
                timeout_s: float = 60) -> list[StoreOutcome]:
    """Send DICOM files over one association, each in a transfer syntax the peer accepted.

    Each file is offered in its own transfer syntax and in Explicit and Implicit VR Little
    Endian, one presentation context per SOP class and syntax, so that the peer picks.
    Returns one outcome per file: GIVE_UP for files that cannot be read or decoded,
    NOT_ACCEPTED for files the peer accepts in none of those syntaxes, and RETRY for every
    file when the association cannot be established or breaks. Raises ``ValueError`` when
    the files need more presentation contexts than one association has.
    """
    paths = list(paths)
    outcomes: dict[Path, StoreOutcome] = {}
    headers: dict[Path, _Header] = {}
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            headers[path] = _Header(UID(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                    UID(ds.file_meta.TransferSyntaxUID))
        except Exception as exc:
            outcomes[path] = StoreOutcome(path, None, None, Disposition.GIVE_UP,
                                          f"not a readable DICOM file: {type(exc).__name__}")
    # One presentation context per (SOP class, transfer syntax), as DCMTK does: the peer
    # accepts or refuses each syntax on its own, rather than picking one of several.
    requested = sorted({(h.sop_class, syntax) for h in headers.values()
                        for syntax in (h.transfer_syntax, *FALLBACK_SYNTAXES)})
    if len(requested) > MAX_CONTEXTS:
        raise ValueError(f"{len(requested)} SOP class and transfer syntax pairs exceed one "
                         f"association's {MAX_CONTEXTS} presentation contexts")
    if headers:
        ae = _scu_ae(calling_ae, timeout_s)
        for sop_class, syntax in requested:
            ae.add_requested_context(sop_class, syntax)
        outcomes.update(_send(ae, peer, headers))
    return [outcomes[path] for path in paths]


def _not_accepted(header: _Header) -> str:
    offered = ", ".join(s.name for s in dict.fromkeys((header.transfer_syntax, *FALLBACK_SYNTAXES)))
    return f"the peer accepts no presentation context for {header.sop_class.name} (offered in {offered})"


def _in_accepted_syntax(path: Path, header: _Header, accepted: set[UID]) -> Path | Dataset | None:
    """Return what to send of ``path``: the file when the peer accepted its transfer syntax, or
    an uncompressed syntax that pynetdicom converts it to as it sends; else its data set decoded
    to Explicit VR Little Endian, same SOP Instance UID (pynetdicom sends that as Implicit VR
    where only that was accepted). None when the peer accepted none of them."""
    fallback = [syntax for syntax in FALLBACK_SYNTAXES if syntax in accepted]
    if header.transfer_syntax in accepted or (fallback and not header.transfer_syntax.is_compressed):
        return path
    if not fallback:
        return None
    dataset = dcmread(path)
    dataset.decompress(generate_instance_uid=False)
    logger.info("%s decoded from %s for a peer that accepts only %s", header.sop_instance_uid,
                header.transfer_syntax.name, " or ".join(syntax.name for syntax in fallback))
    return dataset


def _send(ae: AE, peer: Peer, headers: dict[Path, _Header]) -> dict[Path, StoreOutcome]:
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:  # pynetdicom aborts such an association
            return {p: StoreOutcome(p, h.sop_instance_uid, None, Disposition.NOT_ACCEPTED, _not_accepted(h))
                    for p, h in headers.items()}
        reason = _association_failure(assoc)
        return {p: StoreOutcome(p, h.sop_instance_uid, None, Disposition.RETRY, reason)
                for p, h in headers.items()}
    outcomes: dict[Path, StoreOutcome] = {}
    try:
        for path, header in headers.items():
            outcomes[path] = _store(assoc, path, header)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _store(assoc: Association, path: Path, header: _Header) -> StoreOutcome:
    """Send one file over ``assoc`` in a transfer syntax the peer accepted; return what became of it."""
    sop_uid = header.sop_instance_uid
    if not assoc.is_established:
        return StoreOutcome(path, sop_uid, None, Disposition.RETRY, _association_failure(assoc))
    accepted = {UID(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                if cx.abstract_syntax == header.sop_class}
    try:
        sendable = _in_accepted_syntax(path, header, accepted)
    except Exception as exc:  # any codec failure: the object cannot be decoded for this peer
        return StoreOutcome(path, sop_uid, None, Disposition.GIVE_UP,
                            f"cannot decode {header.transfer_syntax.name} for the peer: {type(exc).__name__}")
    if sendable is None:
        return StoreOutcome(path, sop_uid, None, Disposition.NOT_ACCEPTED, _not_accepted(header))
    try:
        response = assoc.send_c_store(sendable)
    except ValueError:  # pynetdicom cannot encode it in the accepted syntax
        return StoreOutcome(path, sop_uid, None, Disposition.GIVE_UP,
                            "cannot be encoded in the accepted transfer syntax")
    except RuntimeError:  # the association ended before the request
        return StoreOutcome(path, sop_uid, None, Disposition.RETRY, _association_failure(assoc))
    status = int(response.Status) if "Status" in response else None
    detail = "" if status is not None else "no response (timeout or abort)"
    return StoreOutcome(path, sop_uid, status, classify(status), detail)
