"""The ``hl7`` sender: a study's findings to the RIS as one ORU^R01 over MLLP, ACK checked.

The message (:mod:`dicom_node.senders.hl7_oru`) is framed as MLLP (0x0B, message, 0x1C 0x0D)
on one TCP connection (TLS when configured, the RIS's certificate and host name verified),
and the answer is read as an HL7 acknowledgment in original mode:

- MSA-1 AA (or CA) for our MSH-10: every SR delivered;
- AE (or CE): the RIS could not process it now: retried;
- AR (or CR): the RIS rejects it: given up (dead-lettered after delivery's tries);
- refused, unreachable, TLS failure, no ACK within ``ack_timeout_s``, closed without ACK, an
  unreadable ACK or one for another message: retried.

An SR that cannot be read, or whose study lacks the patient id or accession number, is
given up on its own. Outcome details are fixed texts; MSA-3 and ERR, which may quote the
message, are never logged or recorded.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from datetime import datetime

from dicom_node.config import Hl7Destination, Settings
from dicom_node.errors import ConfigError
from dicom_node.senders.base import Disposition, SendObject, SendOutcome
from dicom_node.senders.hl7_oru import Parties, Report, ReportError, build_oru, control_id, read_report

logger = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
#: The longest acknowledgment read: an ACK is a few hundred bytes.
MAX_ACK_BYTES = 1 << 20
#: MSA-1 → what becomes of the message's objects (original and enhanced mode codes).
ACKNOWLEDGMENTS = {
    "AA": (Disposition.DELIVERED, "ACK AA: accepted"),
    "CA": (Disposition.DELIVERED, "ACK CA: accepted"),
    "AE": (Disposition.RETRY, "ACK AE: application error"),
    "CE": (Disposition.RETRY, "ACK CE: commit error"),
    "AR": (Disposition.GIVE_UP, "ACK AR: rejected"),
    "CR": (Disposition.GIVE_UP, "ACK CR: rejected"),
}


class NoAcknowledgment(Exception):
    """The RIS gave no usable acknowledgment; the message is a fixed text."""


class Hl7Sender:
    """Sends to a RIS over MLLP as :class:`~dicom_node.config.Hl7Destination` says."""

    def __init__(self, destination: Hl7Destination, settings: Settings) -> None:
        self.host, self.port = destination.host, destination.port
        self.timeout_s = destination.ack_timeout_s
        self.parties = Parties(destination.sending_application or settings.scp.ae_title,
                               destination.sending_facility, destination.receiving_application,
                               destination.receiving_facility)
        self.tls = _client_tls(destination) if destination.tls else None
        self.remote = f"mllp{'s' if self.tls else ''}://{self.host}:{self.port}"

    def send(self, objects: Sequence[SendObject]) -> list[SendOutcome]:
        """Send the SRs among ``objects`` as one ORU^R01; return one outcome per object: what the
        ACK says for those in the message, give up for those that cannot be read or are of
        another study than the first."""
        refused: dict[int, SendOutcome] = {}
        reports: list[Report] = []
        for index, item in enumerate(objects):
            try:
                report = read_report(item.path)
            except ReportError as exc:
                refused[index] = SendOutcome(Disposition.GIVE_UP, None, str(exc))
                continue
            if reports and report.study_instance_uid != reports[0].study_instance_uid:
                refused[index] = SendOutcome(Disposition.GIVE_UP, None, "of another study than the message")
                continue
            reports.append(report)
        if not reports:
            return list(refused.values())
        sent = self._deliver(reports)
        return [refused.get(index, sent) for index in range(len(objects))]

    def _deliver(self, reports: list[Report]) -> SendOutcome:
        """Send the message of ``reports``; return the outcome for each of them."""
        control = control_id(reports)
        message = build_oru(reports, self.parties, datetime.now()).to_er7().encode("utf-8")
        try:
            ack = self._exchange(message)
            disposition, detail = read_acknowledgment(ack, control)
        except NoAcknowledgment as exc:
            disposition, detail = Disposition.RETRY, str(exc)
        logger.info("ORU %s (%d SR) to %s: %s", control, len(reports), self.remote, detail)
        return SendOutcome(disposition, None, detail)

    def _exchange(self, message: bytes) -> bytes:
        """Send ``message`` in an MLLP frame and return the frame that answers it.

        Raises :class:`NoAcknowledgment` when the RIS cannot be reached or gives no answer in time.
        """
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout_s) as raw:
                connection = (self.tls.wrap_socket(raw, server_hostname=self.host) if self.tls
                              else raw)
                with connection:
                    connection.sendall(START + message + END)
                    return _read_frame(connection)
        except ConnectionRefusedError as exc:
            raise NoAcknowledgment("connection refused") from exc
        except TimeoutError as exc:
            raise NoAcknowledgment("no ACK in time") from exc
        except ssl.SSLError as exc:
            raise NoAcknowledgment("TLS failed (certificate or handshake)") from exc
        except OSError as exc:
            raise NoAcknowledgment("connection failed") from exc


def _read_frame(connection: socket.socket) -> bytes:
    """Return the first MLLP frame's content read from ``connection``."""
    data = b""
    while END not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise NoAcknowledgment("connection closed without ACK")
        data += chunk
        if len(data) > MAX_ACK_BYTES:
            raise NoAcknowledgment("ACK too long")
    start = data.find(START)
    if start < 0 or start > data.find(END):
        raise NoAcknowledgment("ACK not framed as MLLP")
    return data[start + 1:data.find(END)]


def read_acknowledgment(ack: bytes, control: str) -> tuple[Disposition, str]:
    """Return what MSA-1 of ``ack`` means for the message ``control`` (its MSH-10), and a fixed
    text saying so.

    Raises :class:`NoAcknowledgment` when ``ack`` has no MSH and MSA or acknowledges another message.
    """
    segments = ack.decode("utf-8", errors="replace").replace("\n", "\r").split("\r")
    if not segments[0].startswith("MSH") or len(segments[0]) < 4:
        raise NoAcknowledgment("ACK unreadable: no MSH")
    separator = segments[0][3]
    msa = next((s.split(separator) for s in segments if s.startswith(f"MSA{separator}")), None)
    if msa is None or len(msa) < 3:
        raise NoAcknowledgment("ACK unreadable: no MSA")
    if msa[2] != control:
        raise NoAcknowledgment("ACK for another message")
    if msa[1] not in ACKNOWLEDGMENTS:
        raise NoAcknowledgment("ACK with an unknown code")
    return ACKNOWLEDGMENTS[msa[1]]


def _client_tls(destination: Hl7Destination) -> ssl.SSLContext:
    """Return a client context that verifies the RIS (host name included) against the
    destination's CA bundle, or the system's, and presents its certificate when it has one.

    Raises :class:`ConfigError` naming the destination when a file cannot be loaded.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=destination.ca_certificates)
        if destination.certificate is not None:
            context.load_cert_chain(destination.certificate, destination.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"destinations.{destination.name}: its TLS certificates or key cannot be "
                          "loaded") from exc
    return context
