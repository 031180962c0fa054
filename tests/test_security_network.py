"""Who may connect, against a real ``serve``: closed to other hosts by default, opened only on
purpose; TLS handshakes and silent connections that cannot keep legitimate peers out; client
certificates required with a CA, and pinned to an allowed peer's subject; audit rows that never quote
a library's message.

A peer on another host is a DCMTK tool or Python client in a second network namespace
(``linked_namespaces``); the node listens in the first."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from dicom_node.scp import NOT_LOOPBACK, WRONG_CERTIFICATE
from dicom_node.scp_server import HANDSHAKE_FAILED, TOO_MANY_PENDING
from tests.conftest import dataset_bytes, dcmtk_tool, in_namespace, run_tool, wait_for
from tests.dicom_factory import write_cr
from tests.test_scp_bad_input import _raw_c_store_request

NO_WORKER = {"worker": {"embedded": False}}
CLOSED = {**NO_WORKER, "scp": {"host": "0.0.0.0", "allowed_peers": []}}


def _rejections(node) -> list[dict]:
    return json.loads(node.cli("audit", "list", "--event", "association-rejected", "--format", "json"))


def _echoscu(node, host: str, namespace: str | None = None, calling_ae: str = "ECHOSCU"):
    command = [dcmtk_tool("echoscu"), "-aet", calling_ae, "-aec", "DICOM_NODE", "-to", "10", host, str(node.port)]
    return run_tool(*(in_namespace(namespace, *command) if namespace else command), timeout=60)


def _in_node_namespace(node, pair) -> None:
    node.command = in_namespace(pair.node, *node.command)


def test_closed_by_default_admits_loopback_only(node_factory, linked_namespaces):
    pair = linked_namespaces
    node = node_factory(CLOSED)
    _in_node_namespace(node, pair)
    node.start()
    assert ("SCP closed: no scp.allowed_peers, so only peers on this machine's loopback may associate"
            in node.log.read_text())

    outside = _echoscu(node, pair.node_address, pair.peer)
    assert outside.returncode != 0
    assert "Association Rejected" in outside.stdout + outside.stderr
    [rejected] = _rejections(node)
    assert rejected["remote"] == pair.peer_address and rejected["detail"] == NOT_LOOPBACK

    assert _echoscu(node, "127.0.0.1", pair.node).returncode == 0


def test_an_open_scp_must_be_acknowledged(node_factory):
    node = node_factory({**NO_WORKER, "scp": {"allowed_peers": [], "accept_any_peer": True}})
    refused = subprocess.run(node.command, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "scp.accept_any_peer" in refused.stderr + refused.stdout


def test_an_acknowledged_open_scp_admits_other_hosts_and_warns(node_factory, linked_namespaces):
    pair = linked_namespaces
    node = node_factory({**CLOSED, "scp": {**CLOSED["scp"], "accept_any_peer": True},
                         "acknowledged_risks": ["scp-open"]})
    _in_node_namespace(node, pair)
    node.start()
    assert any("WARNING" in line and "scp.accept_any_peer: true admits every calling AE from every host" in line
               for line in node.log.read_text().splitlines())
    assert _echoscu(node, pair.node_address, pair.peer).returncode == 0


HOLD_SILENT = """
import select, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = [socket.create_connection((host, port), timeout=10) for _ in range(count)]
closed, reported = set(), -1
while True:
    readable, _, _ = select.select([s for s in held if s not in closed], [], [], 0.1)
    for s in readable:
        try:
            if not s.recv(1):
                closed.add(s)
        except OSError:
            closed.add(s)
    if len(closed) != reported:
        reported = len(closed)
        print(f"closed {reported}", flush=True)
"""


def test_silent_connections_from_one_host_do_not_keep_others_out(node_factory, linked_namespaces, tmp_path):
    """40 TCP connections that send nothing, from another host: all but scp.max_pending_per_host are
    closed at accept (one audit row, not 36), and a peer on loopback is served at once. Before, they
    filled pynetdicom's backstop (30 associations) and every association was rejected until the
    negotiation deadline cut them."""
    pair = linked_namespaces
    node = node_factory({**CLOSED, "scp": {**CLOSED["scp"], "acse_timeout_s": 30, "max_pending_per_host": 4}})
    _in_node_namespace(node, pair)
    node.start()
    report = tmp_path / "silent.out"
    with report.open("w") as out:
        holder = subprocess.Popen(in_namespace(pair.peer, sys.executable, "-c", HOLD_SILENT, pair.node_address,
                                               str(node.port), "40"), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "closed 36" in report.read_text(), 15, "the node to close 36 of 40 silent connections")
        started = time.monotonic()
        served = _echoscu(node, "127.0.0.1", pair.node)
        elapsed = time.monotonic() - started
        assert served.returncode == 0, served.stdout + served.stderr
        assert elapsed < 3, f"the loopback peer waited {elapsed:.1f} s"
        assert "closed 37" not in report.read_text()  # the 4 admitted were still held open meanwhile
    finally:
        holder.kill()
        holder.wait()
    closed = [event for event in _rejections(node) if event["detail"].startswith(TOO_MANY_PENDING)]
    assert [(event["remote"], event["detail"]) for event in closed] == [(pair.peer_address, TOO_MANY_PENDING)]


# -- TLS --------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and two client certificates (CN=pacs1 and
    CN=intruder, both O=Hospital), all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    files: dict[str, Path] = {}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Test CA",
             "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.crt"))
    files["ca"] = tmp_path / "ca.crt"
    for name, subject, extension in (("server", "/CN=dicom-node", "subjectAltName=IP:127.0.0.1"),
                                     ("pacs1", "/O=Hospital/CN=pacs1", "keyUsage=digitalSignature"),
                                     ("intruder", "/O=Hospital/CN=intruder", "keyUsage=digitalSignature")):
        key, request, cert = (tmp_path / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", str(key), "-out", str(request))
        extfile = tmp_path / f"{name}.ext"
        extfile.write_text(extension + "\n")
        _openssl("x509", "-req", "-in", str(request), "-CA", str(files["ca"]), "-CAkey", str(tmp_path / "ca.key"),
                 "-CAcreateserial", "-days", "1", "-extfile", str(extfile), "-out", str(cert))
        files[f"{name}.crt"], files[f"{name}.key"] = cert, key
    return files


def _tls_node(node_factory, pki, **scp):
    return node_factory({**NO_WORKER, "scp": {
        "tls": {"certificate": str(pki["server.crt"]), "private_key": str(pki["server.key"]),
                "ca_certificates": str(pki["ca"])}, **scp}}).start()


def _tls_echo(port: int, pki, client: str | None, calling_ae: str = "TESTSCU", timeout_s: float = 10) -> str:
    """Associate over TLS (as ``client``'s certificate, or none) and C-ECHO; return "echoed",
    "rejected 0xNN" (the diagnostic) or "no association"."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki["ca"])
    if client:
        context.load_cert_chain(pki[f"{client}.crt"], pki[f"{client}.key"])
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s  # TLS handshake included
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE", tls_args=(context, "127.0.0.1"))
    if assoc.is_rejected:
        return f"rejected 0x{assoc.acceptor.primitive.diagnostic:02X}"
    if not assoc.is_established:
        return "no association"
    status = assoc.send_c_echo().Status
    assoc.release()
    return "echoed" if status == 0 else f"status 0x{status:04X}"


def test_a_silent_connection_does_not_delay_tls_associations(node_factory, pki):
    """pynetdicom did the TLS handshake on its accept thread: one connection that sent nothing held
    back every TLS association (75 s). Each handshake now runs on its connection's own thread."""
    node = _tls_node(node_factory, pki)
    with socket.create_connection(("127.0.0.1", node.port)):  # accepted first: the backlog is FIFO
        started = time.monotonic()
        outcome = _tls_echo(node.port, pki, "pacs1")
        elapsed = time.monotonic() - started
    assert outcome == "echoed"
    assert elapsed < 3, f"the TLS association waited {elapsed:.1f} s"


def test_client_certificates_required_and_pinned_to_a_subject(node_factory, pki):
    node = _tls_node(node_factory, pki, allowed_peers=[
        {"ae_title": "PACS1", "certificate_subject": "CN=pacs1,O=Hospital"}, {"ae_title": "TESTSCU"}])

    assert _tls_echo(node.port, pki, None) == "no association"  # no client certificate: no handshake
    wait_for(lambda: any(e["detail"] == HANDSHAKE_FAILED for e in _rejections(node)), 10,
             "the failed handshake to be audited")

    assert _tls_echo(node.port, pki, "intruder", calling_ae="PACS1") == "rejected 0x03"  # calling AE not recognised
    assert [e["actor"] for e in _rejections(node) if e["detail"] == WRONG_CERTIFICATE] == ["PACS1"]

    assert _tls_echo(node.port, pki, "pacs1", calling_ae="PACS1") == "echoed"
    assert _tls_echo(node.port, pki, "intruder", calling_ae="TESTSCU") == "echoed"  # pins nothing


# -- fixed audit texts ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The value length")
def test_an_undecodable_request_is_audited_with_a_fixed_text(start_scp, tmp_path):
    """A C-STORE-RQ whose SOP Instance UID has 65 characters cannot become a DIMSE primitive: the audit
    row names the exception's type, never the library's message (which quoted the value)."""
    scp = start_scp()
    sop_uid = "1." + "2" * 63
    write_cr(tmp_path / "long-uid.dcm", sop_uid=sop_uid)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(_raw_c_store_request(
        assoc.accepted_contexts[0].context_id, ComputedRadiographyImageStorage, sop_uid,
        dataset_bytes(tmp_path / "long-uid.dcm")))
    wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 30, "the node to abort the association")
    with scp.audit.connect() as connection:
        [(detail,)] = wait_for(lambda: connection.exec_driver_sql(
            "SELECT detail FROM audit_events WHERE event = 'instance-rejected'").all(), 30, "the request to be audited")
    assert re.fullmatch(r"invalid C-STORE-RQ, association aborted: [A-Za-z]+", detail), detail
