"""Association policy: calling-AE allow-list with host check, association limit, audited."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from click.testing import CliRunner
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.cli import main
from tests.conftest import wait_for


def associate(port: int, calling_ae: str = "TESTSCU"):
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")


def test_allowed_ae_from_another_host_is_rejected(start_scp):
    scp = start_scp(allowed_peers=[{"ae_title": "TESTSCU", "host": "10.9.9.9"},
                                   {"ae_title": "LOCALSCU", "host": "127.0.0.1"}])
    refused = associate(scp.port)
    assert refused.is_rejected
    assert refused.acceptor.primitive.diagnostic == 0x03  # calling AE title not recognised
    accepted = associate(scp.port, "LOCALSCU")
    assert accepted.is_established
    accepted.release()


def test_association_limit(start_scp, tmp_path):
    scp = start_scp(max_associations=1)
    first = associate(scp.port)
    assert first.is_established
    second = associate(scp.port)
    assert second.is_rejected
    assert (second.acceptor.primitive.result, second.acceptor.primitive.diagnostic) == (0x02, 0x02)
    first.release()
    third = associate(scp.port)
    assert third.is_established
    third.release()

    listed = CliRunner().invoke(main, ["audit", "list", "--event", "association-rejected",
                                       "--format", "json"],
                                env={"DICOM_NODE_STATE_DIR": str(tmp_path / "state"),
                                     "DICOM_NODE_AUDIT__SECRET": "s"})
    assert listed.exit_code == 0, listed.output
    [event] = json.loads(listed.output)
    assert event["detail"] == "association limit reached" and event["actor"] == "TESTSCU"


def test_the_limit_counts_accepted_associations_not_negotiating_ones(start_scp):
    """Five peers that connect and say nothing yet (still negotiating) take none of the 10 slots. (The
    per-host pending limit is set well above them: this is about the association limit, and a stray
    client of an earlier test reconnecting to a reused port must not close one of the five at accept.)"""
    scp = start_scp(max_associations=10, max_associations_per_peer=10, max_pending_per_host=20)
    silent = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(5)]
    try:
        wait_for(lambda: len(scp.ae.active_associations) >= 5, 10, "the silent connections to be counted by pynetdicom")
        accepted = [associate(scp.port) for _ in range(10)]
        assert all(a.is_established for a in accepted)
        busy = associate(scp.port)
        assert busy.is_rejected and busy.acceptor.primitive.diagnostic == 0x02  # local limit exceeded
        for assoc in accepted:
            assoc.release()
    finally:
        for connection in silent:
            connection.close()


def _dropped(connection: socket.socket, trickle: bytes, interval: float, limit: float) -> float | None:
    """Send ``trickle`` one byte per ``interval`` s; return when the node closed the connection, or None."""
    started = time.monotonic()
    for byte in trickle:
        if time.monotonic() - started > limit:
            return None
        try:
            connection.sendall(bytes([byte]))
            time.sleep(interval)
        except OSError:  # reset or broken pipe: the node closed it
            return time.monotonic() - started
    return None


def test_a_trickled_association_request_is_cut_at_the_negotiation_deadline(start_scp):
    """pynetdicom's timeouts restart with every byte: an A-ASSOCIATE-RQ sent 1 byte per 0.3 s held a slot
    for as long as it lasted. The node aborts it when the whole negotiation is past acse_timeout_s."""
    scp = start_scp(acse_timeout_s=2, network_timeout_s=30)
    request = b"\x01\x00" + (200).to_bytes(4, "big") + b"\x00" * 200  # an A-ASSOCIATE-RQ header and body
    with socket.create_connection(("127.0.0.1", scp.port)) as connection:
        closed_after = _dropped(connection, request, 0.3, 20)
    assert closed_after is not None and closed_after < 6
    assert associate(scp.port).is_established  # and the node serves the others


def test_a_trickled_pdu_is_cut_at_the_pdu_deadline(start_scp):
    """After negotiating, a peer sends a P-DATA-TF PDU 1 byte per 0.3 s: aborted after network_timeout_s
    without a complete PDU, though bytes kept arriving."""
    scp = start_scp(acse_timeout_s=30, network_timeout_s=2)
    assoc = associate(scp.port)
    assert assoc.is_established
    pdu = b"\x04\x00" + (100).to_bytes(4, "big") + b"\x00" * 100
    closed_after = _dropped(assoc.dul.socket.socket, pdu, 0.3, 20)
    assert closed_after is not None and closed_after < 6
    wait_for(lambda: not assoc.is_alive(), 10, "the SCU to see the abort")


def test_one_peer_cannot_take_every_slot(start_scp):
    scp = start_scp(max_associations=4, max_associations_per_peer=2)
    first, second = associate(scp.port, "PACSONE"), associate(scp.port, "PACSONE")
    assert first.is_established and second.is_established
    third = associate(scp.port, "PACSONE")
    assert third.is_rejected and third.acceptor.primitive.diagnostic == 0x02
    for assoc in (first, second):
        assoc.release()


def test_an_oversized_pdu_is_refused_without_being_buffered(start_scp):
    """A P-DATA-TF PDU announced at 512 MiB (max_pdu_bytes 1 MiB): A-ABORT, connection closed at once."""
    scp = start_scp(max_pdu_bytes=1_048_576)
    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as connection:
        connection.sendall(b"\x04\x00" + (512 * 2**20).to_bytes(4, "big") + b"\x00" * 4096)
        answer = connection.recv(64)
        assert answer[:1] == b"\x07"  # A-ABORT
        assert connection.recv(64) == b""  # and closed
    assoc = associate(scp.port)
    assert assoc.is_established
    # The same inside an association.
    assoc.dul.socket.socket.sendall(b"\x04\x00" + (512 * 2**20).to_bytes(4, "big") + b"\x00" * 4096)
    wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 10, "the node to abort the association")


def _association_request(calling_ae: bytes) -> bytes:
    """Return the A-ASSOCIATE-RQ PDU pynetdicom sends for TESTSCU → DICOM_NODE, with ``calling_ae`` in it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        received: list[bytes] = []

        def capture() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(1)
                try:
                    while chunk := connection.recv(65536):
                        received.append(chunk)
                except OSError:
                    pass

        catcher = threading.Thread(target=capture)
        catcher.start()
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        ae.acse_timeout = 0.5
        ae.associate("127.0.0.1", listener.getsockname()[1], ae_title="DICOM_NODE")
        catcher.join()
    return b"".join(received).replace(b"TESTSCU         ", calling_ae.ljust(16))


def _audited_rejections(scp) -> list[tuple[str, str]]:
    with scp.audit.connect() as connection:
        return connection.exec_driver_sql(
            "SELECT event, detail FROM audit_events WHERE event = 'association-rejected'").all()


@pytest.mark.parametrize("kind", ["non-ascii-calling-ae", "unknown-pdu-type"])
def test_a_request_that_cannot_be_decided_is_closed_and_audited(start_scp, kind):
    scp = start_scp(acse_timeout_s=2)
    opening = (_association_request("TÉSTSCU".encode("latin-1")) if kind == "non-ascii-calling-ae"
               else b"\x09\x00\x00\x00\x00\x04abcd")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as connection:
        connection.sendall(opening)
        while connection.recv(64):  # an A-ABORT, perhaps, then the close
            pass
    assert time.monotonic() - started < 6
    [(event, detail)] = wait_for(lambda: _audited_rejections(scp), 10, "the connection to be audited")
    assert detail.startswith("connection closed before an association request could be decided")
    assert associate(scp.port).is_established
