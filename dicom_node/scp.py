"""The C-STORE / C-ECHO SCP: association policy, presentation contexts, handlers; it also takes
storage commitment answers (N-EVENT-REPORT, see :mod:`dicom_node.commitment`).

Handlers only validate, write, record and return a status; they never analyse
and never raise towards the peer. An instance is acknowledged with 0x0000 only
after its file is durable in the spool and its row is committed.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import ssl
import tempfile
import threading
import time
from collections.abc import Collection
from pathlib import Path
from weakref import WeakKeyDictionary, WeakSet

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, Association, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from dicom_node.arrivals import Arrivals
from dicom_node.audit import AuditEvent, AuditTrail, Outcome
from dicom_node.commitment import CommitmentReports
from dicom_node.config import AllowedPeer, ScpSettings, TlsSettings
from dicom_node.db import Instance, Job, NodeDatabase, utcnow
from dicom_node.errors import (
    AuditError,
    DatasetTooLargeError,
    DiskFullError,
    DuplicateInstanceError,
    ImageTooLargeError,
    InvalidUIDError,
    NodeError,
    PortInUseError,
    SOPClassMismatchError,
    UnreadableDatasetError,
)
from dicom_node.metrics import INSTANCES, STAGE_SECONDS
from dicom_node.scp_connection import PDU_HEADER_ALLOWANCE, DeadlineWatch, Dropped, guard_receive
from dicom_node.scp_server import ConnectionGuard, GuardedAssociationServer
from dicom_node.spool import InstanceHeader, Spool, check_image_size, read_header
from dicom_node.tls_subject import certificate_subject, parse_subject

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
DUPLICATE_SOP_INSTANCE = 0x0111

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# A-ASSOCIATE-RJ (result, source, diagnostic)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_BUSY = (0x02, 0x03, 0x02)

NOT_LOOPBACK = "not a loopback peer, and no scp.allowed_peers (closed by default)"
AE_NOT_ALLOWED = "calling AE not allowed"
WRONG_CERTIFICATE = "client certificate subject is not the one allowed for this calling AE"


def _server_tls_context(tls: TlsSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        context.load_verify_locations(tls.ca_certificates)
    context.verify_mode = ssl.CERT_REQUIRED if tls.ca_certificates else ssl.CERT_NONE
    return context


def _prefer_requestor_order(proposed: list[PresentationContext]) -> None:
    """Make negotiation pick, for each proposed context, the peer's first syntax we support.

    pynetdicom picks the first syntax of *our* list that the peer proposed, so a
    context proposing JPEG 2000 then Explicit VR would get Explicit VR and the peer
    would have to decompress (DCMTK's storescu then fails). Each proposed context
    is narrowed to its own preferred, supported syntax before negotiation.
    """
    for context in proposed:
        supported = [uid for uid in context.transfer_syntax if uid in TRANSFER_SYNTAXES]
        if supported:
            context.transfer_syntax = supported[:1]


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _certificate_fits(peer: AllowedPeer, assoc: Association) -> bool:
    """Return whether ``assoc`` came over TLS with a certificate of ``peer``'s pinned subject
    (True when it pins none)."""
    if peer.certificate_subject is None:
        return True
    connection = assoc.dul.socket.socket if assoc.dul.socket else None
    if not isinstance(connection, ssl.SSLSocket):
        return False
    return certificate_subject(connection.getpeercert()) == parse_subject(peer.certificate_subject)


class StorageSCP:
    """The node's listening AE; collaborators are passed in, handlers bound to them.

    It keeps instances of ``kept_sop_classes`` (the configured pipelines', see
    :func:`dicom_node.plugins.kept_sop_classes`) and acknowledges and drops any other. It tells
    ``arrivals`` which studies each association stored and when it was released.
    """

    def __init__(self, settings: ScpSettings, db: NodeDatabase, spool: Spool,
                 audit: AuditTrail, *, kept_sop_classes: Collection[str],
                 arrivals: Arrivals | None = None) -> None:
        self.settings = settings
        self.kept_sop_classes = frozenset(kept_sop_classes)
        self.arrivals = arrivals or Arrivals()
        self.db = db
        self.spool = spool
        self.audit = audit
        # Each patient's pseudonym is looked up once per association, not per instance.
        self._pseudonyms: WeakKeyDictionary[Association, dict[tuple[str, str], str | None]] = (
            WeakKeyDictionary())
        # The associations the policy accepted: the limit counts these, not those still negotiating.
        self._accepted: WeakSet[Association] = WeakSet()
        self._accepting = threading.Lock()
        self.deadlines = DeadlineWatch(settings)
        # Connections whose association request reached the policy (accepted or rejected, audited).
        self._decided: WeakSet[Association] = WeakSet()
        self.guard = ConnectionGuard(settings.pending_limit_per_host, self._report_refused)
        self.commitment_reports = CommitmentReports(db, audit)
        self.ae = self._build_ae()
        self.server: GuardedAssociationServer | None = None

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.add_supported_context(Verification)
        # Storage commitment answers (N-EVENT-REPORT) from a destination, which calls as the SCP
        # of the SOP class (SCP/SCU role selection) or without proposing roles.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.maximum_pdu_size = s.max_pdu_bytes
        # The node's own policy (EVT_REQUESTED) enforces the association limit on the
        # associations it accepted, and audits it. pynetdicom's check, which also counts
        # associations still negotiating or being rejected, stays as a flood backstop; the
        # per-host limit at accept (scp_server) keeps unauthenticated connections below it.
        ae.maximum_associations = 2 * s.max_associations + 10
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        return ae

    @property
    def port(self) -> int:
        """The port actually listened on (useful when configured as 0)."""
        assert self.server is not None, "the SCP is not started"
        return self.server.server_address[1]

    def start(self) -> None:
        """Start listening in background threads; received data sets stream into the spool.

        Raises :class:`PortInUseError` when the address is taken.
        """
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom streams each data set into a NamedTemporaryFile: put those in
        # the spool's own folder so committing one is a rename on the same disk.
        tempfile.tempdir = str(self.spool.incoming)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self.commitment_reports.on_event_report),
            (evt.EVT_CONN_OPEN, self._on_opened),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_DIMSE_RECV, self._on_message),
        ]
        tls = _server_tls_context(self.settings.tls) if self.settings.tls else None
        try:
            # As AE.start_server(block=False), with the node's server class.
            self.server = self.ae.make_server(
                (self.settings.host, self.settings.port), evt_handlers=handlers, ssl_context=tls,
                server_class=GuardedAssociationServer, guard=self.guard,
                handshake_timeout_s=self.settings.acse_timeout_s,
            )
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(f"port {self.settings.port} on {self.settings.host} is in use "
                                 "by another program (scp.port)") from None
        self.guard.start()
        threading.Thread(target=self.server.serve_forever, name="scp-accept", daemon=True).start()
        self.ae._servers.append(self.server)  # AE.shutdown() and the server's shutdown() use it
        self.deadlines.start(lambda: [a for a in self.ae.active_associations if a.is_acceptor])
        logger.info("SCP %s listening on %s:%d", self.settings.ae_title,
                    self.settings.host, self.port)

    def stop(self, *, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish, then abort the rest."""
        if self.server is None:
            return
        self.deadlines.stop()
        self.server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        for association in self.ae.active_associations:
            association.abort()
        self.guard.stop()
        self.server = None

    def active_associations(self) -> int:
        return sum(1 for a in self.ae.active_associations if a.is_acceptor)

    # -- association policy -------------------------------------------------

    def _refusal(self, assoc: Association, calling_ae: str, address: str) -> str:
        """Return why the peer may not associate ("" when it may).

        With no ``allowed_peers`` only loopback peers may, unless ``accept_any_peer``. An allowed
        peer that pins a certificate subject must present, over TLS, a certificate of it.
        """
        peers = self.settings.allowed_peers
        if not peers:
            return "" if self.settings.accept_any_peer or _is_loopback(address) else NOT_LOOPBACK
        matching = [p for p in peers if p.ae_title == calling_ae and p.host in (None, address)]
        if not matching:
            return AE_NOT_ALLOWED
        if any(_certificate_fits(p, assoc) for p in matching):
            return ""
        return WRONG_CERTIFICATE

    def _take_slot(self, assoc: Association, calling_ae: str, address: str) -> str:
        """Count ``assoc`` among the accepted associations unless a limit is reached; return
        which limit it was ("" when counted)."""
        with self._accepting:
            open_ = [a for a in self._accepted if a.is_alive() and not (a.is_released or a.is_aborted)]
            per_peer = self.settings.max_associations_per_peer
            if len(open_) >= self.settings.max_associations:
                return "association limit reached"
            if sum(a.requestor.primitive.calling_ae_title.strip() == calling_ae for a in open_) >= per_peer:
                return f"limit of {per_peer} associations per calling AE reached"
            if sum(a.requestor.address == address for a in open_) >= per_peer:
                return f"limit of {per_peer} associations per host reached"
            self._accepted.add(assoc)
            return ""

    # -- connections ----------------------------------------------------------

    def _on_opened(self, event: Event) -> None:
        self.deadlines.opened(event.assoc, self.guard.opened_at(event.assoc))
        limit = self.settings.max_pdu_bytes + PDU_HEADER_ALLOWANCE if self.settings.max_pdu_bytes else None
        guard_receive(event.assoc, limit, self.spool)

    def _on_pdu(self, event: Event) -> None:
        self.deadlines.received_pdu(event.assoc)

    def _on_requested(self, event: Event) -> None:
        """Accept or reject the association request by the node's policy, and audit it.

        Rejected as "calling AE not recognised": a peer :meth:`_refusal` names. Rejected as transient (busy): over a limit, the spool's disk below its free-space
        minimum, or an acceptance the audit trail cannot record (no unaudited association).
        """
        assoc = event.assoc
        request = assoc.requestor.primitive  # requestor.ae_title is set only after this event
        calling_ae = request.calling_ae_title.strip()
        called_ae = request.called_ae_title.strip()
        address = assoc.requestor.address
        self._decided.add(assoc)
        self.guard.decided(assoc)
        if reason := self._refusal(assoc, calling_ae, address):
            reject = REJECT_CALLING_AE
        elif self.settings.check_called_ae and called_ae != self.settings.ae_title:
            reject, reason = REJECT_CALLED_AE, "called AE title does not match"
        elif self.spool.free_bytes() < self.spool.min_free_bytes:
            reject, reason = REJECT_BUSY, "the spool's disk is below its free-space minimum"
        elif reason := self._take_slot(assoc, calling_ae, address):
            reject = REJECT_BUSY
        if not reason:
            try:
                self.audit.record(AuditEvent.ASSOCIATION_ACCEPTED, actor=calling_ae, remote=address)
            except AuditError as exc:
                logger.error("Rejecting association from %s at %s: it cannot be audited (%s)",
                             calling_ae, address, exc)
                self._accepted.discard(assoc)
                assoc.acse.send_reject(*REJECT_BUSY)
                assoc.kill()
                return
            _prefer_requestor_order(assoc.requestor.primitive.presentation_context_definition_list)
            return
        logger.info("Rejecting association from %s at %s: %s", calling_ae, address, reason)
        assoc.acse.send_reject(*reject)
        assoc.kill()  # as pynetdicom does after its own rejections: flushes the PDU
        try:
            self.audit.record(AuditEvent.ASSOCIATION_REJECTED, outcome=Outcome.MINOR_FAILURE,
                              actor=calling_ae, remote=address, detail=reason)
        except AuditError as exc:
            logger.error("The rejection of an association from %s could not be audited: %s", address, exc)

    def _report_refused(self, host: str, reason: str, count: int) -> None:
        """Log and audit ``count`` connections from ``host`` closed before any association
        request, for ``reason`` (a fixed text of :mod:`dicom_node.scp_server`)."""
        logger.warning("Closed %d connection(s) from %s: %s", count, host, reason)
        try:
            self.audit.record(AuditEvent.ASSOCIATION_REJECTED, outcome=Outcome.MINOR_FAILURE,
                              remote=host, detail=reason if count == 1 else f"{reason} ({count} connections)")
        except AuditError as exc:
            logger.error("Refused connections from %s could not be audited: %s", host, exc)

    def _audit_undecided(self, assoc: Association) -> None:
        """Audit a connection that closed before its association request reached the policy: the
        request could not be decoded (a non-ASCII AE title), was not an association request (an
        unknown PDU type), or did not arrive in time."""
        try:
            self.audit.record(AuditEvent.ASSOCIATION_REJECTED, outcome=Outcome.MINOR_FAILURE,
                              remote=assoc.requestor.address,
                              detail="connection closed before an association request could be decided "
                                     "(undecodable, not an association request, or too slow)")
        except AuditError as exc:
            logger.error("A connection from %s could not be audited: %s", assoc.requestor.address, exc)

    def _on_closed(self, event: Event) -> None:
        """Remove the partial file of a data set still arriving when the connection closed
        (released, aborted, reset or timed out): it was never acknowledged.

        pynetdicom streams a C-STORE data set into the file of its unfinished DIMSE message
        and forgets the message only once it is complete.
        """
        if event.assoc not in self._decided:
            self._audit_undecided(event.assoc)
        self.arrivals.ended(id(event.assoc))
        message = getattr(event.assoc.dimse, "message", None)
        partial = getattr(message, "_data_set_path", None)
        if partial is None:
            return
        stream = getattr(message, "_data_set_file", None)
        if stream is not None:
            stream.close()
        Path(partial).unlink(missing_ok=True)
        logger.warning("Removed the partial data set of an unfinished C-STORE from %s",
                       event.assoc.requestor.address)

    def _on_released(self, event: Event) -> None:
        """The peer released the association: the studies it stored are complete unless more of
        them arrive within the grace (see :mod:`dicom_node.arrivals`)."""
        self.arrivals.released(id(event.assoc))

    def _on_message(self, event: Event) -> None:
        """Audit a request that cannot become a DIMSE primitive (a UID over 64 characters, a
        wrong VR): pynetdicom aborts the association on it, before any handler could answer."""
        message = event.message
        try:
            message.message_to_primitive()
        except Exception as exc:
            kind = type(message).__name__.replace("_", "-")
            calling_ae = event.assoc.requestor.ae_title.strip()
            logger.warning("Aborting the association from %s: an invalid %s (%s)",
                           calling_ae, kind, type(exc).__name__)
            self.audit.record(
                AuditEvent.INSTANCE_REJECTED if kind == "C-STORE-RQ" else AuditEvent.ASSOCIATION_REJECTED,
                outcome=Outcome.MINOR_FAILURE, actor=calling_ae, remote=event.assoc.requestor.address,
                detail=f"invalid {kind}, association aborted: {type(exc).__name__}")

    def _on_echo(self, event: Event) -> int:
        """Answer C-ECHO. Statuses: 0x0000."""
        return SUCCESS

    # -- C-STORE ------------------------------------------------------------

    def _on_store(self, event: Event) -> int:
        """Time and count :meth:`_store`; return its status."""
        with STAGE_SECONDS.labels("store").time():
            return self._store(event)

    def _store(self, event: Event) -> int:
        """Validate, spool and record one instance.

        A deflated data set is inflated in steps, against the size limit, and kept as
        Explicit VR Little Endian. Statuses: 0x0000 stored (or ignored: not an image the
        node analyses); 0xA700 out of resources (disk below the minimum, data set too
        large or inflating past the limit, an image over the pixel budget, state
        database busy: the spooled file is removed again); 0xA900 data set does not match
        the SOP class; 0x0111 duplicate SOP instance (its UID is held in another study:
        the first stays as it was, see :meth:`_check_same_study`); 0xC210 cannot understand
        (undecodable or truncated data set, missing or invalid UID); 0x0110 processing
        failure (anything unexpected, logged).
        """
        calling_ae = event.assoc.requestor.ae_title.strip()
        address = event.assoc.requestor.address
        received = Path(event.dataset_path)
        header: InstanceHeader | None = None
        committed: Path | None = None  # a spooled file that is new, removed again if its row fails
        try:
            if isinstance(getattr(event.request, "_dataset_file", None), Dropped):
                raise DiskFullError("the spool's disk fell below its free-space minimum while the data set arrived")
            self.spool.check_free_space()
            self.spool.check_size(received.stat().st_size)
            self.spool.inflate(received)
            header = read_header(received)
            self._check_request(event, header)
            pseudonym = self._pseudonym(event.assoc, header)
            if header.sop_class_uid not in self.kept_sop_classes:
                received.unlink(missing_ok=True)
                INSTANCES.labels("ignored").inc()
                self._audit_instance(AuditEvent.INSTANCE_IGNORED, header, calling_ae, address,
                                     pseudonym, detail="not an image the node analyses")
                return SUCCESS
            check_image_size(header, self.settings.max_image_megapixels)
            self._check_same_study(header)
            new = not self.spool.path_for(header).exists()
            final = self.spool.commit(received, header)
            committed = final if new else None
            self._record_instance(header, final, calling_ae, pseudonym)
        except (DiskFullError, DatasetTooLargeError, ImageTooLargeError, OperationalError) as exc:
            if committed is not None:
                committed.unlink(missing_ok=True)
            return self._refuse(OUT_OF_RESOURCES, exc, received, header, calling_ae, address)
        except DuplicateInstanceError as exc:
            return self._refuse(DUPLICATE_SOP_INSTANCE, exc, received, header, calling_ae, address)
        except (UnreadableDatasetError, InvalidUIDError) as exc:
            return self._refuse(CANNOT_UNDERSTAND, exc, received, header, calling_ae, address)
        except SOPClassMismatchError as exc:
            return self._refuse(SOP_CLASS_MISMATCH, exc, received, header, calling_ae, address)
        except Exception as exc:  # a handler must answer with a status, never raise
            logger.exception("Unexpected error storing an instance")
            return self._refuse(PROCESSING_FAILURE, exc, received, header, calling_ae, address)
        self._audit_instance(AuditEvent.INSTANCE_RECEIVED, header, calling_ae, address, pseudonym)
        INSTANCES.labels("received").inc()
        self.arrivals.stored(id(event.assoc), header.study_instance_uid)
        return SUCCESS

    def _pseudonym(self, assoc: Association, header: InstanceHeader) -> str | None:
        known = self._pseudonyms.setdefault(assoc, {})
        patient = (header.issuer_of_patient_id or "", header.patient_id or "")
        if patient not in known:
            known[patient] = self.audit.pseudonym(header.patient_id, header.issuer_of_patient_id)
        return known[patient]

    def _check_same_study(self, header: InstanceHeader) -> None:
        """Raise :class:`DuplicateInstanceError` when the node holds this SOP Instance UID in
        another study. One UID names one object: taking the second would give two different
        sets of results, for two studies, under the same result UIDs."""
        with self.db.session() as session:
            held = session.scalar(select(Instance.study_instance_uid).where(
                Instance.sop_instance_uid == header.sop_instance_uid))
        if held is not None and held != header.study_instance_uid:
            raise DuplicateInstanceError("SOP Instance UID already received in another study")

    @staticmethod
    def _check_request(event: Event, header: InstanceHeader) -> None:
        """Raise when the data set's SOP Class or Instance UID differs from the request's."""
        request = event.request
        if header.sop_class_uid != str(request.AffectedSOPClassUID):
            raise SOPClassMismatchError("SOP Class UID differs from the C-STORE request")
        if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            raise UnreadableDatasetError("SOP Instance UID differs from the C-STORE request")

    def _refuse(self, status: int, error: Exception, received: Path,
                header: InstanceHeader | None, calling_ae: str, address: str) -> int:
        received.unlink(missing_ok=True)
        INSTANCES.labels("rejected").inc()
        # The node's own errors carry fixed texts; anything else is named by its type only.
        why = str(error) if isinstance(error, NodeError) else type(error).__name__
        logger.warning("Refused an instance from %s with 0x%04X: %s", calling_ae, status, why)
        self.audit.record(
            AuditEvent.INSTANCE_REJECTED, outcome=Outcome.MINOR_FAILURE, actor=calling_ae,
            remote=address, sop_uid=header.sop_instance_uid if header else None,
            study_uid=header.study_instance_uid if header else None,
            detail=f"status 0x{status:04X}: {why}",
        )
        return status

    def _audit_instance(self, event: AuditEvent, header: InstanceHeader, calling_ae: str,
                        address: str, pseudonym: str | None, detail: str = "") -> None:
        self.audit.record(event, actor=calling_ae, remote=address, pseudonym=pseudonym,
                          study_uid=header.study_instance_uid,
                          series_uid=header.series_instance_uid,
                          sop_uid=header.sop_instance_uid, detail=detail)

    def _record_instance(self, header: InstanceHeader, path: Path, calling_ae: str,
                         pseudonym: str | None) -> None:
        """Insert or refresh the instance row; a re-sent instance whose job ran gets a new job."""
        for attempt in range(2):
            try:
                with self.db.session() as session:
                    row = session.scalar(select(Instance).where(
                        Instance.sop_instance_uid == header.sop_instance_uid))
                    if row is None:
                        row = Instance(sop_instance_uid=header.sop_instance_uid)
                        session.add(row)
                    elif row.job_id is not None:
                        job = session.get(Job, row.job_id)
                        if job is not None and job.status.finished:
                            row.job_id, row.verdict, row.verdict_reason = None, None, None
                    row.sop_class_uid = header.sop_class_uid
                    row.study_instance_uid = header.study_instance_uid
                    row.series_instance_uid = header.series_instance_uid
                    row.transfer_syntax_uid = header.transfer_syntax_uid
                    row.path = str(path)
                    row.size_bytes = header.size_bytes
                    row.calling_ae = calling_ae
                    row.patient_pseudonym = pseudonym
                    row.received_at = utcnow()
                return
            except IntegrityError:
                if attempt:
                    raise
