"""The SCP's listening server: per-host limits at accept, and TLS handshakes on each
connection's own thread under a deadline.

pynetdicom's server wraps every accepted socket with TLS in its listening thread, so one
peer that connects and says nothing stops every other TLS connection; and it counts every
connection, authenticated or not, against ``AE.maximum_associations`` from the moment it is
accepted, so a few dozen silent connections keep every legitimate peer out. Here a host may
hold at most ``scp.max_pending_per_host`` connections that are not yet through TLS and
association negotiation; more are closed as they are accepted, before they count anywhere.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

from pynetdicom import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

logger = logging.getLogger(__name__)

#: The shortest interval between two reports (log line and audit event) of refused
#: connections from one host for one reason; those in between are counted into the next.
REPORT_INTERVAL_S = 60.0

TOO_MANY_PENDING = "connection closed at accept: scp.max_pending_per_host connections from this host not yet negotiated"
HANDSHAKE_FAILED = "TLS handshake failed: no client certificate the CA accepts, or not TLS"
HANDSHAKE_LATE = "TLS handshake not complete within scp.acse_timeout_s"

Report = Callable[[str, str, int], None]


class ConnectionGuard:
    """Counts, per host, the connections not yet through TLS and association negotiation;
    admits at most ``per_host`` of them; reports refused connections through ``report(host,
    reason, count)`` on its own thread, at most once per host and reason every
    :data:`REPORT_INTERVAL_S` (``count`` says how many were refused since the last report)."""

    def __init__(self, per_host: int, report: Report) -> None:
        self.per_host = per_host
        self._report = report
        self._lock = threading.Lock()
        self._starting: Counter[str] = Counter()  # accepted, association not yet running
        self._negotiating: WeakKeyDictionary[Association, str] = WeakKeyDictionary()
        self._opened_at: WeakKeyDictionary[Association, float] = WeakKeyDictionary()
        self._last_report: dict[tuple[str, str], float] = {}
        self._unreported: Counter[tuple[str, str]] = Counter()
        self._reports: queue.SimpleQueue[tuple[str, str, int] | None] = queue.SimpleQueue()
        self._reporter: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread that writes the reports."""
        self._reporter = threading.Thread(target=self._write_reports, name="scp-connection-reports",
                                          daemon=True)
        self._reporter.start()

    def stop(self) -> None:
        """Report what is still counted, then end the reporting thread."""
        with self._lock:
            for (host, reason), count in self._unreported.items():
                self._reports.put((host, reason, count))
            self._unreported.clear()
        self._reports.put(None)
        if self._reporter is not None:
            self._reporter.join(30)

    def pending(self, host: str) -> int:
        """Return how many connections from ``host`` are not yet through negotiation."""
        with self._lock:
            return self._pending(host)

    def _pending(self, host: str) -> int:
        return self._starting[host] + sum(
            1 for assoc, peer in list(self._negotiating.items()) if peer == host and assoc.is_alive())

    def admit(self, host: str) -> bool:
        """Count a connection just accepted from ``host``; return False (and report it) when
        ``host`` already holds ``per_host`` pending connections."""
        with self._lock:
            if self._pending(host) < self.per_host:
                self._starting[host] += 1
                return True
        self.refused(host, TOO_MANY_PENDING)
        return False

    def started(self, host: str) -> None:
        """The connection admitted from ``host`` runs its association (counted by
        :meth:`negotiating`), or has ended."""
        with self._lock:
            self._starting[host] -= 1
            if not self._starting[host]:
                del self._starting[host]

    def negotiating(self, assoc: Association, host: str, opened_at: float) -> None:
        """Count ``assoc`` as pending until :meth:`decided` or until its thread ends."""
        with self._lock:
            self._negotiating[assoc] = host
            self._opened_at[assoc] = opened_at

    def decided(self, assoc: Association) -> None:
        """The association request of ``assoc`` was decided: it is no longer pending."""
        with self._lock:
            self._negotiating.pop(assoc, None)

    def opened_at(self, assoc: Association) -> float | None:
        """Return when the connection of ``assoc`` was accepted (``time.monotonic()``)."""
        return self._opened_at.get(assoc)

    def refused(self, host: str, reason: str) -> None:
        """Count a connection from ``host`` refused for ``reason`` (one of this module's fixed
        texts); queue a report when the last one for them is old enough."""
        key = (host, reason)
        now = time.monotonic()
        with self._lock:
            self._unreported[key] += 1
            if now - self._last_report.get(key, -REPORT_INTERVAL_S) < REPORT_INTERVAL_S:
                return
            self._last_report[key] = now
            count = self._unreported.pop(key)
        self._reports.put((host, reason, count))

    def _write_reports(self) -> None:
        while (item := self._reports.get()) is not None:
            try:
                self._report(*item)
            except Exception:  # a report that fails must not end the reporting
                logger.exception("Could not report refused connections")


class HandshakeRefused(Exception):
    """A TLS handshake failed or was too slow; the message is one of this module's fixed texts."""


def tls_handshake(raw: socket.socket, context: ssl.SSLContext, deadline: float) -> ssl.SSLSocket:
    """Return ``raw`` wrapped by ``context`` as a server, its handshake done before ``deadline``
    (``time.monotonic()``) however the peer trickles its bytes. Raises :class:`HandshakeRefused`
    (the socket closed) when it fails or is late."""
    raw.setblocking(False)
    tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandshakeRefused(HANDSHAKE_LATE)
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                select.select([tls], [], [], remaining)
            except ssl.SSLWantWriteError:
                select.select([], [tls], [], remaining)
    except HandshakeRefused:
        tls.close()
        raise
    except OSError as exc:  # ssl.SSLError included: no or bad certificate, not TLS, reset
        logger.debug("TLS handshake failed: %s %s", type(exc).__name__, getattr(exc, "reason", ""))
        tls.close()
        raise HandshakeRefused(HANDSHAKE_FAILED) from None
    tls.setblocking(True)
    return tls


class _GuardedRequestHandler(RequestHandler):
    server: GuardedAssociationServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        self.server.guard.negotiating(assoc, self.client_address[0], self.server.accepted_at())
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with ``guard`` applied at accept and the TLS handshake
    (``ssl_context``) done on each connection's own thread within ``handshake_timeout_s``."""

    def __init__(self, *args: Any, guard: ConnectionGuard, handshake_timeout_s: float,
                 **kwargs: Any) -> None:
        self.guard = guard
        self.handshake_timeout_s = handshake_timeout_s
        self._connection = threading.local()
        super().__init__(*args, request_handler=_GuardedRequestHandler, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; nothing is read from or written to it on this thread."""
        assert self.socket is not None
        return self.socket.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection unless its host holds too many pending ones (it is then closed)."""
        return self.guard.admit(client_address[0])

    def accepted_at(self) -> float:
        """Return when the connection handled on this thread was accepted."""
        return self._connection.accepted_at

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Handshake (with TLS), then start the association; on the connection's own thread."""
        host = client_address[0]
        self._connection.accepted_at = accepted_at = time.monotonic()
        try:
            if self.ssl_context is not None:
                request = tls_handshake(request, self.ssl_context, accepted_at + self.handshake_timeout_s)
            self.finish_request(request, client_address)
        except HandshakeRefused as refused:
            self.guard.refused(host, str(refused))
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        finally:
            self.guard.started(host)
