"""Guards on what an SCP association's connection carries: deadlines on whole PDUs, the
size of an announced PDU, and the spool's free space while a data set arrives.

They reach into pynetdicom's socket and DIMSE message (``assoc.dul.socket``,
``assoc.dimse.message``): its own timeouts restart with every byte and it buffers a PDU
whole before looking at it, which a hostile peer turns into held slots and memory.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

from pynetdicom import Association

from dicom_node.config import ScpSettings
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)

DEADLINE_POLL_S = 0.5
#: PDU bytes allowed beyond scp.max_pdu_bytes (the PDV item headers of a P-DATA-TF PDU; an
#: A-ASSOCIATE-RQ of many presentation contexts).
PDU_HEADER_ALLOWANCE = 65536
#: A-ABORT PDU from the service provider, reason "invalid PDU parameter value" (PS3.8 9.3.8).
P_DATA_TF = b"\x04"
A_ABORT_INVALID_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"


class Dropped:
    """Stands in for the temporary file of a data set arriving while the disk is low: the file
    is emptied at once (freeing its space) and every later byte is dropped."""

    def __init__(self, written: Any) -> None:
        written.close()
        self.name = written.name
        self.file = self
        os.truncate(self.name, 0)

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def guard_receive(assoc: Association, pdu_limit: int | None, spool: Spool) -> None:
    """Guard what the association's socket receives:

    - a PDU announced longer than ``pdu_limit`` bytes is refused before it is buffered: an
      A-ABORT, and the connection closed (its partial data set is removed when the
      connection closes, :meth:`dicom_node.scp.StorageSCP._on_closed`);
    - a P-DATA-TF PDU that would take the spool's disk below its free-space minimum stops
      the data set being written: from then on its bytes are dropped, and the C-STORE
      handler answers 0xA700 for it.

    pynetdicom reads each PDU as two socket reads, its 6-byte header, then the announced
    length in one call that holds all of it in memory; that second call is where the
    announced length is seen. It writes a data set into the temporary file of its
    unfinished DIMSE message, which is what :class:`Dropped` replaces.
    """
    sock = assoc.dul.socket
    receive = sock.recv
    header: list[bytes] = []  # the last PDU header read, while its body is awaited

    def refuse(why: str) -> OSError:
        logger.warning("Aborting the association from %s: %s", assoc.requestor.address, why)
        raw = sock.socket
        if raw is not None:
            try:
                raw.sendall(A_ABORT_INVALID_PDU)
            except OSError:
                pass
            shut_down(assoc)
        return OSError(why)

    def guarded_recv(length: int) -> bytearray:
        if not header:
            data = receive(length)
            header.append(bytes(data[:1]))
            return data
        pdu_type = header.pop()
        if pdu_limit is not None and length > pdu_limit:
            raise refuse(f"a PDU of {length} bytes announced, {pdu_limit} allowed")
        if pdu_type == P_DATA_TF and spool.free_bytes() - length < spool.min_free_bytes:
            message = getattr(assoc.dimse, "message", None)
            current = getattr(message, "_data_set_file", None)
            if current is not None and not isinstance(current, Dropped):
                logger.warning("The spool's disk is below its free-space minimum: not writing the data set "
                               "arriving from %s", assoc.requestor.address)
                message._data_set_file = Dropped(current)  # type: ignore[union-attr]
        return receive(length)

    sock.recv = guarded_recv  # type: ignore[method-assign]


def shut_down(assoc: Association) -> None:
    """Shut the association's socket down both ways (its reader thread then ends the association)."""
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if raw is None:
        return
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the peer
        pass


class DeadlineWatch:
    """Closes the connection of associations past a deadline: no complete association request
    within ``acse_timeout_s`` of the connection opening, or no complete PDU for ``network_timeout_s``.
    pynetdicom's own timeouts restart with every byte, so a peer trickling bytes would hold
    its slot; and its abort waits for a read that only the peer can finish, so the socket is
    shut down instead, which ends that read and the association with it."""

    def __init__(self, settings: ScpSettings) -> None:
        self.settings = settings
        self._opened: WeakKeyDictionary[Association, float] = WeakKeyDictionary()
        self._last_pdu: WeakKeyDictionary[Association, float] = WeakKeyDictionary()
        self._cut: WeakSet[Association] = WeakSet()
        self._watching = threading.Event()

    def opened(self, assoc: Association, at: float | None = None) -> None:
        """Start the negotiation deadline of ``assoc`` at ``at`` (when its connection was
        accepted, before any TLS handshake; default now)."""
        self._opened[assoc] = time.monotonic() if at is None else at

    def received_pdu(self, assoc: Association) -> None:
        self._last_pdu[assoc] = time.monotonic()

    def start(self, associations: Callable[[], list[Association]]) -> None:
        """Watch, on a background thread, the associations ``associations()`` returns."""
        self._watching.set()
        threading.Thread(target=self._watch, args=(associations,), name="scp-deadlines",
                         daemon=True).start()

    def stop(self) -> None:
        self._watching.clear()

    def _watch(self, associations: Callable[[], list[Association]]) -> None:
        while self._watching.is_set():
            now = time.monotonic()
            for assoc in associations():
                last_pdu = self._last_pdu.get(assoc)
                if last_pdu is None:  # the association request itself is not complete yet
                    late = now - self._opened.get(assoc, now) > self.settings.acse_timeout_s
                    what = "complete association request"
                else:
                    late = now - last_pdu > self.settings.network_timeout_s
                    what = "complete PDU"
                if late and assoc not in self._cut:
                    logger.warning("Closing the association from %s: no %s within its deadline",
                                   assoc.requestor.address, what)
                    self._cut.add(assoc)
                    shut_down(assoc)
            time.sleep(DEADLINE_POLL_S)
