"""Export of the audit trail to the hospital's audit repository over syslog, in event id order,
losing nothing when the repository is away.

Each event becomes one RFC 5424 message (facility 10, authpriv; severity from the outcome;
APP-NAME ``dicom-node``; MSGID ``DICOM+RFC3881``; ``[meta sequenceId=...]`` carrying the event
id; the :mod:`~dicom_node.audit.atna` AuditMessage as MSG), framed by octet counting
(RFC 6587 §3.4.1) over TCP or TLS (RFC 5425). The export cursor (``audit_export_cursors``:
the id of the last event the repository took) lives in the audit store and moves only past
messages the repository took: syslog has no answer of its own, so the node reads how many
bytes the repository's TCP stack acknowledged from the kernel (``TCP_INFO``, Linux), and counts
them taken when the connection still stood ``settle_s`` later or was closed in order. After a
failure the exporter reconnects with doubling waits and sends again from the cursor.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import socket
import ssl
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.audit import store
from dicom_node.audit.atna import AuditSource, audit_message
from dicom_node.audit.events import Outcome
from dicom_node.audit.trail import AuditTrail
from dicom_node.config import Settings, SyslogSettings
from dicom_node.errors import AuditError

logger = logging.getLogger(__name__)

EXPORTER = "syslog"
APP_NAME = "dicom-node"
MSGID = "DICOM+RFC3881"
FACILITY_AUTHPRIV = 10
SEVERITY = {Outcome.SUCCESS: 5, Outcome.MINOR_FAILURE: 4,  # notice, warning
            Outcome.SERIOUS_FAILURE: 3, Outcome.MAJOR_FAILURE: 2}  # error, critical
BOM = "\ufeff".encode()
MAX_SEQUENCE_ID = 2**31 - 1
BATCH = 200
POLL_S = 0.5
TCP_ESTABLISHED = 1
TCP_CLOSE_WAIT = 8
ORDERLY, ABORTED = "orderly", "aborted"
TCP_INFO_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in struct tcp_info (Linux 4.1+)

def syslog_message(row: Mapping[str, Any], source: AuditSource, hostname: str) -> bytes:
    """Return one ``audit_events`` row as an RFC 5424 message, framed by its octet count."""
    outcome = Outcome(row["outcome"])
    sequence = (row["id"] - 1) % MAX_SEQUENCE_ID + 1
    header = (f"<{FACILITY_AUTHPRIV * 8 + SEVERITY[outcome]}>1 {_timestamp(row['time'])} "
              f"{hostname} {APP_NAME} - {MSGID} [meta sequenceId=\"{sequence}\"] ")
    message = header.encode("ascii") + BOM + audit_message(row, source)
    return f"{len(message)} ".encode("ascii") + message


def unexported_since(connection: Connection) -> datetime | None:
    """Return the time of the oldest event an exporter has yet to send; None when every event
    was exported or no exporter has ever run on this store."""
    cursor = connection.execute(select(func.min(store.export_cursors.c.last_id))).scalar()
    if cursor is None:
        return None
    return connection.execute(
        select(func.min(store.events.c.time)).where(store.events.c.id > cursor)).scalar()


class SyslogExporter:
    """A thread that sends every new audit event to the repository, oldest first, and moves the
    cursor as the repository takes them.

    A message counts as taken once the repository's TCP stack acknowledged it and the connection
    still stood ``settle_s`` later, or ended in an orderly close: a repository that aborts (a
    reset) discards what it had acknowledged but not read, and those messages are sent again.
    """

    def __init__(self, settings: Settings, trail: AuditTrail) -> None:
        """Read (creating at 0) the cursor of ``trail``'s store. Raises :class:`AuditError`
        when the store cannot be written."""
        self.settings: SyslogSettings = settings.audit.syslog
        self.trail = trail
        self.hostname = _syslog_hostname()
        self.source = AuditSource(self.settings.audit_source_id or settings.scp.ae_title,
                                  settings.scp.ae_title, self.hostname)
        self.cursor = self._saved = self._acknowledged = trail.write(_read_or_create_cursor)
        self._unsettled: deque[tuple[float, int]] = deque()  # (when acknowledged, last event id)
        self.failures = 0
        self._link: _Link | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)

    @property
    def acknowledged(self) -> int:
        """The id of the last event the repository acknowledged, settled or not."""
        return self._acknowledged

    @property
    def destination(self) -> str:
        return f"{self.settings.transport}://{self.settings.host}:{self.settings.port}"

    def start(self) -> None:
        logger.info("Exporting audit events after event %d to %s", self.cursor, self.destination)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then send once more (the node's stop event among what is left) and
        let it settle; what the repository does not take now is sent at the next start."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.export_pending()
            deadline = time.monotonic() + self.settings.settle_s
            while self._unsettled and self._link is not None and time.monotonic() < deadline:
                time.sleep(0.05)
                self._settle()
        except (OSError, AuditError, SQLAlchemyError) as exc:
            logger.warning("Audit events after %d stay for the next start: %s", self.cursor,
                           _reason(exc))
        self._close_link()
        self._save()

    def export_pending(self) -> int:
        """Send up to :data:`BATCH` events after those acknowledged, wait until the repository
        acknowledged them, and save the cursor past those settled; return how many were sent.

        Raises ``OSError`` when the repository cannot be reached or does not take them,
        :class:`AuditError` when the store cannot be written.
        """
        if self._settle() == ABORTED:
            raise ConnectionResetError(errno.ECONNRESET, "reset by the repository")
        with self.trail.connect() as connection:
            rows = connection.execute(
                select(store.events).where(store.events.c.id > self._acknowledged)
                .order_by(store.events.c.id).limit(BATCH)).mappings().all()
        if rows:
            if self._link is None:
                self._link = _Link.connect(self.settings)
            try:
                for row in rows:
                    self._link.send(row["id"], syslog_message(row, self.source, self.hostname))
                self._link.drain(self.settings.timeout_s, self._stop)
            finally:
                self._note(self._link.taken())
        self._save()
        return len(rows)

    def _run(self) -> None:
        retry = self.settings.first_retry_s
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                sent = self.export_pending()
            except OSError as exc:
                self.failures += 1
                try:
                    self._settle()
                    self._close_link()
                    self._save()
                except (AuditError, SQLAlchemyError):
                    pass  # the next round saves it
                logger.warning("Audit repository %s did not take the events after %d (%s); "
                               "reconnecting in %.1f s", self.destination, self._acknowledged,
                               _reason(exc), retry)
                wait, retry = retry, min(retry * 2, self.settings.max_retry_interval_s)
                continue
            except (AuditError, SQLAlchemyError) as exc:
                logger.error("Audit export paused: the audit store cannot be read or written (%s)",
                             _reason(exc))
                wait = POLL_S
                continue
            except ValueError:  # a row of an event or outcome this code does not know
                logger.error("Audit export paused at the event after %d: its type or outcome is "
                             "unknown to this dicom-node", self._acknowledged)
                wait = self.settings.max_retry_interval_s
                continue
            retry = self.settings.first_retry_s
            wait = 0.0 if sent == BATCH else POLL_S

    def _note(self, acknowledged: int) -> None:
        if acknowledged > self._acknowledged:
            self._acknowledged = acknowledged
            self._unsettled.append((time.monotonic(), acknowledged))

    def _settle(self) -> str | None:
        """Move the cursor past what settled; after an abort by the repository, go back to send
        again what had not. Return how the connection ended, None while it stands."""
        if self._link is None:
            return None
        ending = self._link.ending()
        if ending is None:
            self._note(self._link.taken())
            settled_before = time.monotonic() - self.settings.settle_s
            while self._unsettled and self._unsettled[0][0] <= settled_before:
                self.cursor = self._unsettled.popleft()[1]
        elif ending == ORDERLY:
            self._note(self._link.taken())
            self._close_link()
        else:
            if self._unsettled:
                logger.warning("Audit repository %s reset the connection: sending the events "
                               "after %d again", self.destination, self.cursor)
            self._unsettled.clear()
            self._acknowledged = self.cursor
            self._link.close()
            self._link = None
        return ending

    def _close_link(self) -> None:
        """Close the connection ourselves: what it acknowledged counts as taken."""
        if self._unsettled:
            self.cursor = self._unsettled[-1][1]
            self._unsettled.clear()
        if self._link is not None:
            self._link.close()
            self._link = None

    def _save(self) -> None:
        if self.cursor == self._saved:
            return
        cursor = self.cursor
        self.trail.write(lambda connection: connection.execute(
            update(store.export_cursors).where(store.export_cursors.c.exporter == EXPORTER)
            .values(last_id=cursor)))
        self._saved = cursor


class _Link:
    """One connection to the repository, and which sent events its TCP stack acknowledged."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._sent: deque[tuple[int, int]] = deque()  # (bytes written after it, event id)
        self._taken = 0
        self._error = 0  # the first errno a send met

    @classmethod
    def connect(cls, settings: SyslogSettings) -> _Link:
        """Connect (over TLS: verifying the repository's certificate and host name); raises
        ``OSError`` (``ssl.SSLError`` included) when that fails."""
        assert settings.host is not None
        sock = socket.create_connection((settings.host, settings.port), settings.timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if settings.transport == "tls":
                context = ssl.create_default_context(
                    cafile=str(settings.ca_certificates) if settings.ca_certificates else None)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                if settings.certificate and settings.private_key:
                    context.load_cert_chain(settings.certificate, settings.private_key)
                sock = context.wrap_socket(sock, server_hostname=settings.host,
                                           suppress_ragged_eofs=False)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def send(self, event_id: int, frame: bytes) -> None:
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            self._error = self._error or exc.errno or errno.EIO
            raise
        self._sent.append((self._written(), event_id))

    def taken(self) -> int:
        """Return the id of the last event whose bytes were all acknowledged; 0 for none."""
        try:
            acked = self._acked()
        except OSError:
            acked = 0
        while self._sent and self._sent[0][0] <= acked:
            self._taken = self._sent.popleft()[1]
        return self._taken

    def drain(self, timeout: float, stop: threading.Event) -> None:
        """Wait until every event sent was acknowledged; raises ``TimeoutError`` after
        ``timeout``, ``ConnectionError`` when the connection ended first."""
        deadline, pause = time.monotonic() + timeout, 0.001
        while True:
            self.taken()
            if not self._sent:
                return
            if self.ending() is not None:
                raise ConnectionError(errno.ECONNRESET, "closed before taking every message")
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, "messages not acknowledged in time")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            if stop.is_set():
                deadline = min(deadline, time.monotonic() + 1.0)

    def ending(self) -> str | None:
        """Return None while the connection stands; :data:`ORDERLY` when the repository closed
        it after reading everything it acknowledged (a FIN first, over TLS after a close_notify:
        a later reset answers what came after, EPIPE); :data:`ABORTED` when it reset it
        (ECONNRESET: unread data discarded), a TLS peer closed without close_notify (a refused
        handshake, for one), or the cause is unknown."""
        try:
            state = self._tcp_info()[0]
            if state == TCP_ESTABLISHED:
                return None
            if state == TCP_CLOSE_WAIT:
                return ORDERLY if self._closed_in_order() else ABORTED
            self._error = self._error or self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return ABORTED
        return ORDERLY if self._error == errno.EPIPE else ABORTED

    def _closed_in_order(self) -> bool:
        """Over TLS, read to the end: True only for a close_notify (the repository sends no data)."""
        if not isinstance(self.sock, ssl.SSLSocket):
            return True
        self.sock.settimeout(0)
        try:
            while self.sock.recv(4096):
                pass
        except OSError:  # no close_notify: ragged EOF, an alert, or a reset
            return False
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _written(self) -> int:
        """Bytes handed to the kernel so far: acknowledged ones plus those still queued."""
        while True:
            before = self._acked()
            queued = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ,
                                                    struct.pack("i", 0)))[0]
            if self._acked() == before:
                return before + queued

    def _acked(self) -> int:
        return struct.unpack_from("Q", self._tcp_info(), TCP_INFO_BYTES_ACKED)[0]

    def _tcp_info(self) -> bytes:
        return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)


def _read_or_create_cursor(connection: Connection) -> int:
    found = connection.execute(select(store.export_cursors.c.last_id)
                               .where(store.export_cursors.c.exporter == EXPORTER)).scalar()
    if found is None:
        connection.execute(insert(store.export_cursors).values(exporter=EXPORTER, last_id=0))
        return 0
    return found


def _syslog_hostname() -> str:
    """Return this host's name as RFC 5424 HOSTNAME allows it (printable US-ASCII), else ``-``."""
    name = socket.gethostname()
    return name if name.isascii() and name.isprintable() and " " not in name and name else "-"


def _timestamp(moment: datetime) -> str:
    """Return ``moment`` as an RFC 5424 TIMESTAMP in UTC, to the microsecond."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _reason(error: BaseException) -> str:
    """A fixed text for a log line: the error's type and its errno or TLS reason code."""
    code = getattr(error, "reason", None) if isinstance(error, ssl.SSLError) else (
        errno.errorcode.get(getattr(error, "errno", None) or 0))
    return f"{type(error).__name__}{f' {code}' if code else ''}"
