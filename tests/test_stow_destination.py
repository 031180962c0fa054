"""The ``stow`` destination: a job's results POSTed in one STOW-RS request, and what the node does
with each answer.

Unit level: a small STOW-RS server of the tests (http.server on 127.0.0.1, plain or TLS) answers
what each test scripts, and the node's delivery rows (a real SQLite node.db) show each object's
classification and its retries. End to end: `serve` and Orthanc with its DICOMweb plugin and basic
authentication run in one network namespace (Orthanc 1.10 cannot listen on loopback only); Orthanc
is down when the first results are due, and the three results are found through QIDO-RS after it
comes up.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.audit import AuditTrail
from dicom_node.config import StowDestination, TlsSettings, load_settings
from dicom_node.db import DeliveryStatus, JobStatus, NodeDatabase, utcnow
from dicom_node.delivery import Deliverer
from dicom_node.errors import ConfigError
from dicom_node.senders.base import build_sender
from dicom_node.senders.stow import StowSender
from tests.conftest import OrthancInNamespace, free_port, in_namespace, wait_for
from tests.dicom_factory import write_rg1_study
from tests.test_delivery_syntaxes import RESULT_CLASSES, finished_job, storescu
from tests.test_senders import deliveries, queue_job
from tests.test_viewer_ohif import DICOMWEB_PLUGIN

JSON, XML = "application/dicom+json", "application/dicom+xml"
#: What a test's server answers: HTTP status, content type, body.
Answer = tuple[int, str, bytes]


def store_response(referenced: dict[str, int | None], failed: dict[str, int], xml: bool = False) -> bytes:
    """Return a Store Instances Response listing ``referenced`` (UID → WarningReason or None) and
    ``failed`` (UID → FailureReason), in DICOM JSON or in PS3.19 XML."""
    def item(uid: str, tag: str, code: int | None) -> dict[str, Any]:
        return {"00081155": {"vr": "UI", "Value": [uid]},
                **({tag: {"vr": "US", "Value": [code]}} if code is not None else {})}

    sequences = {"00081199": [item(uid, "00081196", code) for uid, code in referenced.items()],
                 "00081198": [item(uid, "00081197", code) for uid, code in failed.items()]}
    if not xml:
        return json.dumps({tag: {"vr": "SQ", "Value": items} for tag, items in sequences.items()}).encode()
    attributes = "".join(
        f'<DicomAttribute tag="{tag}" vr="SQ">' + "".join(
            f'<Item number="{n}">' + "".join(
                f'<DicomAttribute tag="{t}" vr="{a["vr"]}"><Value number="1">{a["Value"][0]}</Value></DicomAttribute>'
                for t, a in entry.items()) + "</Item>" for n, entry in enumerate(items, 1))
        + "</DicomAttribute>" for tag, items in sequences.items())
    return (f'<?xml version="1.0" encoding="utf-8"?><NativeDicomModel '
            f'xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">{attributes}</NativeDicomModel>').encode()


class StowPeer:
    """A STOW-RS server of the tests on 127.0.0.1, over TLS when given a certificate: answers each
    POST with the next of ``answers`` (the last again once they run out), and keeps each request's
    headers and body."""

    def __init__(self, answers: list[Answer], tls: TlsSettings | None = None) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                peer.requests.append((dict(self.headers), body))
                status, content_type, answer = peer.answers.pop(0) if len(peer.answers) > 1 else peer.answers[0]
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.certificate, tls.private_key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web/studies"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def stow_peer() -> Iterator[Any]:
    """Start :class:`StowPeer`\\ s; each is stopped at teardown."""
    peers: list[StowPeer] = []

    def start(answers: list[Answer], tls: TlsSettings | None = None) -> StowPeer:
        peers.append(StowPeer(answers, tls))
        return peers[-1]

    yield start
    for peer in peers:
        peer.stop()


@pytest.fixture
def delivery_parts(tmp_path) -> Iterator[Any]:
    """Return ``make(url, **destination)``: a node's settings, node.db and deliverer for one stow
    destination (first retry after 0.1 s), with a finished job's SC, SEG and SR due for it; its
    first delivery's id and objects by kind come with them."""
    opened: list[tuple[NodeDatabase, AuditTrail]] = []

    def make(url: str, **destination: Any) -> tuple[Deliverer, NodeDatabase, int, dict[str, Any]]:
        settings = load_settings(None, state_dir=tmp_path / "state", audit={"secret": "s"},
                                 delivery={"first_retry_s": 0.1, "max_failures": 2, "timeout_s": 5},
                                 destinations=[{"name": "archive", "type": "stow", "url": url, **destination}])
        db = NodeDatabase(settings.node_database_url)
        audit = AuditTrail.from_settings(settings)
        opened.append((db, audit))
        lead, objects = queue_job(settings, db, tmp_path)
        return Deliverer.from_settings(settings, db, audit, worker="test-worker"), db, lead, objects

    yield make
    for db, audit in opened:
        audit.close()
        db.dispose()


def parts(headers: dict[str, str], body: bytes) -> list[bytes]:
    """Return the parts of a ``multipart/related; type="application/dicom"`` request's body."""
    content_type = headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"'), content_type
    boundary = content_type.rpartition("boundary=")[2].encode()
    assert body.endswith(b"--" + boundary + b"--\r\n")
    found = []
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        assert head.strip() == b"Content-Type: application/dicom"
        found.append(data.removesuffix(b"\r\n"))
    return found


def statuses(db: NodeDatabase) -> dict[str, tuple[DeliveryStatus, int | None, str | None]]:
    return {kind: (row.status, row.last_status, row.last_error) for kind, row in deliveries(db).items()}


def run_when_due(deliverer: Deliverer, db: NodeDatabase, lead: int) -> DeliveryStatus | None:
    """Run the delivery ``lead`` once every unfinished delivery is due, so that they all go in
    one request; return its new status."""
    wait_for(lambda: all(row.next_attempt_at is None or row.next_attempt_at <= utcnow()
                         for row in deliveries(db).values() if not row.status.finished),
             10, "the retries to be due")
    return deliverer.run(lead)


def test_a_job_goes_in_one_request_of_its_files_with_the_token_and_warnings_are_delivered(
        stow_peer, delivery_parts, tmp_path):
    token = tmp_path / "stow.token"
    token.write_text("s3cret-token\n")
    peer = stow_peer([])
    deliverer, db, lead, objects = delivery_parts(peer.url + "?access_token=abc",
                                                  auth={"type": "bearer", "token_file": str(token)})
    peer.answers = [(200, JSON, store_response({objects["sc"].sop_instance_uid: None,
                                                objects["seg"].sop_instance_uid: 0xB000}, {}))]
    assert deliverer.run(lead) is DeliveryStatus.DELIVERED
    [(headers, body)] = peer.requests
    assert parts(headers, body) == [o.path.read_bytes() for o in objects.values()]  # as stored, in order
    assert headers["Authorization"] == "Bearer s3cret-token"
    assert headers["Accept"].startswith(JSON)
    assert statuses(db) == {"sc": (DeliveryStatus.DELIVERED, 0x0000, None),
                            "seg": (DeliveryStatus.DELIVERED, 0xB000, "stored with a warning"),
                            "sr": (DeliveryStatus.DELIVERED, None, "HTTP 200: all stored")}
    assert deliverer.senders["archive"].remote == peer.url + "?access_token=***"


@pytest.mark.parametrize("xml", [False, True], ids=["json", "xml"])
def test_a_202_delivers_the_stored_and_classifies_each_failure(stow_peer, delivery_parts, xml):
    peer = stow_peer([])
    deliverer, db, lead, objects = delivery_parts(peer.url)
    uid = {kind: o.sop_instance_uid for kind, o in objects.items()}
    peer.answers = [(202, XML if xml else JSON,
                     store_response({uid["sc"]: None}, {uid["seg"]: 0xA700, uid["sr"]: 0x0122}, xml))]
    deliverer.run(lead)
    assert statuses(db) == {
        "sc": (DeliveryStatus.DELIVERED, 0x0000, None),
        "seg": (DeliveryStatus.RETRYING, 0xA700, "refused for now: out of resources"),
        "sr": (DeliveryStatus.DEAD, 0x0122, "the destination does not take this SOP class or transfer syntax")}
    peer.answers = [(200, JSON, store_response({uid["seg"]: None}, {}))]
    assert run_when_due(deliverer, db, deliveries(db)["seg"].id) is DeliveryStatus.DELIVERED
    assert deliveries(db)["seg"].attempts == 2 and len(peer.requests) == 2


def test_a_409_fails_each_object_by_its_reason_and_gives_up_after_max_failures(stow_peer, delivery_parts):
    peer = stow_peer([])
    deliverer, db, lead, objects = delivery_parts(peer.url)
    uid = {kind: o.sop_instance_uid for kind, o in objects.items()}
    peer.answers = [(409, JSON, store_response({}, {uid["sc"]: 0xA900, uid["seg"]: 0xC122}))]
    deliverer.run(lead)
    assert statuses(db) == {
        "sc": (DeliveryStatus.RETRYING, 0xA900, "failed"),
        "seg": (DeliveryStatus.DEAD, 0xC122, "the destination does not take this SOP class or transfer syntax"),
        "sr": (DeliveryStatus.RETRYING, None, "HTTP 409: not named in the response")}
    assert run_when_due(deliverer, db, lead) is DeliveryStatus.DEAD  # max_failures: 2
    assert {kind: row.status for kind, row in deliveries(db).items()} == dict.fromkeys(
        ("sc", "seg", "sr"), DeliveryStatus.DEAD)


@pytest.mark.parametrize("first", [503, 429, "refused"])
def test_an_unavailable_destination_is_retried_past_max_failures_until_it_stores(
        stow_peer, delivery_parts, first):
    peer = stow_peer([(200, JSON, b"")])
    url = f"http://127.0.0.1:{free_port()}/dicom-web/studies" if first == "refused" else peer.url
    deliverer, db, lead, _ = delivery_parts(url)
    if first != "refused":
        peer.answers = [(first, "text/plain", b"busy")] * 3 + [(200, JSON, b"")]
    for _ in range(3):  # more than max_failures (2): a transient failure is retried until max_age_s
        assert run_when_due(deliverer, db, lead) is DeliveryStatus.RETRYING
    detail = ("no answer: unreachable, refused or timed out" if first == "refused"
              else f"HTTP {first}: destination busy or unavailable")
    assert statuses(db) == dict.fromkeys(("sc", "seg", "sr"), (DeliveryStatus.RETRYING, None, detail))
    if first == "refused":  # the destination comes up where it was configured
        deliverer.senders["archive"].client.url = peer.url
    assert run_when_due(deliverer, db, lead) is DeliveryStatus.DELIVERED
    assert {kind: (row.status, row.attempts) for kind, row in deliveries(db).items()} == dict.fromkeys(
        ("sc", "seg", "sr"), (DeliveryStatus.DELIVERED, 4))


@pytest.mark.parametrize(("code", "status", "detail"), [
    (401, DeliveryStatus.RETRYING, "HTTP 401: not authorised, check the auth settings"),
    (403, DeliveryStatus.RETRYING, "HTTP 403: not authorised, check the auth settings"),
    (415, DeliveryStatus.DEAD, "HTTP 415: the destination does not take the media type sent"),
    (400, DeliveryStatus.RETRYING, "HTTP 400: request refused"),
    (302, DeliveryStatus.RETRYING, "HTTP 302: redirected, configure the final URL"),
])
def test_a_refusal_is_a_fixed_text_never_the_response_body(stow_peer, delivery_parts, code, status, detail):
    peer = stow_peer([(code, "text/plain", b"Doe^Jane 12345 is not allowed here")])
    deliverer, db, lead, _ = delivery_parts(peer.url, auth={"type": "basic", "username": "node",
                                                            "password": "pw"})
    deliverer.run(lead)
    assert statuses(db) == dict.fromkeys(("sc", "seg", "sr"), (status, None, detail))
    assert peer.requests[0][0]["Authorization"] == "Basic bm9kZTpwdw=="  # node:pw
    if status is DeliveryStatus.RETRYING:  # a permanent failure: tried max_failures (2) times
        assert run_when_due(deliverer, db, lead) is DeliveryStatus.DEAD
    assert len(peer.requests) == (1 if status is DeliveryStatus.DEAD else 2)


def test_tls_is_verified_by_default_and_a_ca_bundle_makes_the_server_trusted(
        stow_peer, delivery_parts, certificate):
    peer = stow_peer([(200, JSON, b"")], tls=certificate)
    deliverer, db, lead, _ = delivery_parts(peer.url)
    deliverer.run(lead)
    assert statuses(db)["sc"] == (DeliveryStatus.RETRYING, None,
                                  "TLS failed: certificate not trusted or no common protocol")
    assert peer.requests == []
    settings = load_settings(None, audit={"secret": "s"}, destinations=[
        {"name": "archive", "type": "stow", "url": peer.url, "ca_certificates": str(certificate.ca_certificates)}])
    deliverer.senders["archive"] = build_sender(settings.destinations[0], settings)
    assert run_when_due(deliverer, db, lead) is DeliveryStatus.DELIVERED
    assert len(peer.requests) == 1


def stow_settings(**destination: Any):
    return load_settings(None, audit={"secret": "s"}, destinations=[
        {"name": "archive", "type": "stow", "url": "https://pacs.example/dicom-web/studies", **destination}])


@pytest.mark.parametrize(("destination", "message"), [
    ({"url": "https://node:pw@pacs.example/studies"}, "credentials go in auth"),
    ({"url": "ftp://pacs.example/studies"}, "expected an http:// or https:// URL"),
    ({"auth": {"type": "bearer"}}, "give either token or token_file"),
    ({"auth": {"type": "basic", "username": "node", "password": "pw", "password_file": "/x"}},
     "give either password or password_file"),
    ({"auth": {"type": "digest"}}, "does not match any of the expected tags: 'bearer', 'basic'"),
])
def test_bad_stow_settings_are_refused_naming_the_key(destination, message):
    with pytest.raises(ConfigError, match=message):
        stow_settings(**destination)


def test_secrets_are_hidden_and_a_missing_secret_file_or_ca_bundle_fails_at_start(tmp_path):
    settings = stow_settings(auth={"type": "basic", "username": "node", "password": "pw"})
    assert isinstance(settings.destinations[0], StowDestination)
    assert settings.redacted()["destinations"][0]["auth"]["password"] == "***"
    missing = stow_settings(auth={"type": "bearer", "token_file": str(tmp_path / "absent.token")})
    with pytest.raises(ConfigError, match="cannot read the secret file .*absent.token"):
        build_sender(missing.destinations[0], missing)
    no_ca = stow_settings(ca_certificates=str(tmp_path / "absent.pem"))
    with pytest.raises(ConfigError, match="ca_certificates .*absent.pem is not a file"):
        StowSender(no_ca.destinations[0], no_ca)


USER, PASSWORD = "dicom-node", "stow-Pa55"


class OrthancWithUser(OrthancInNamespace):
    """Orthanc with its DICOMweb plugin and HTTP basic authentication of one registered user; the
    test's own REST calls (curl) authenticate as that user."""

    def __init__(self, namespace: str, root: Path) -> None:
        super().__init__(namespace, root, {"Plugins": [DICOMWEB_PLUGIN]})
        config = json.loads(self.config.read_text())
        self.config.write_text(json.dumps({**config, "AuthenticationEnabled": True,
                                           "RegisteredUsers": {USER: PASSWORD}}))

    def _rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        run = subprocess.run(in_namespace(self.namespace, "curl", "-sf", "-u", f"{USER}:{PASSWORD}", "-X", method,
                                          *(["--data-binary", "@-"] if body else []),
                                          f"http://127.0.0.1:{self.http_port}{path}"),
                             input=body or b"", capture_output=True, timeout=60, check=False)
        return json.loads(run.stdout) if run.returncode == 0 else None


@pytest.mark.slow
def test_orthanc_dicomweb_gets_sc_seg_and_sr_after_an_outage(node_factory, namespace, tmp_path):
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    orthanc = OrthancWithUser(namespace, tmp_path)
    password = tmp_path / "stow.password"
    password.write_text(PASSWORD)
    node_port = free_port()
    node = node_factory({
        "scp": {"port": node_port},
        "delivery": {"first_retry_s": 1, "max_retry_interval_s": 2},
        "destinations": [{"name": "archive", "type": "stow",
                          "url": f"http://127.0.0.1:{orthanc.http_port}/dicom-web/studies",
                          "auth": {"type": "basic", "username": USER, "password_file": str(password)}}],
    })
    node.command = in_namespace(namespace, *node.command)
    node.port = node_port
    source = write_rg1_study(tmp_path / "rg1.dcm", PixelSpacing=[0.171, 0.171])
    try:
        node.start()
        storescu(node.port, [tmp_path / "rg1.dcm"], *in_namespace(namespace))
        job = wait_for(lambda: finished_job(node, source.StudyInstanceUID), 300, "the job to finish")
        assert job.status is JobStatus.DONE, job.reason
        wait_for(lambda: (rows := node.deliveries(job.id)) and all(
            r.status is DeliveryStatus.RETRYING and r.last_error.startswith("no answer") for r in rows),
            60, "the deliveries to wait for the archive")
        orthanc.start()
        rows = wait_for(lambda: (rows := node.deliveries(job.id)) and all(
            r.status is DeliveryStatus.DELIVERED for r in rows) and rows, 120, "SC, SEG and SR to be stored")
        assert all(r.attempts >= 2 for r in rows)
        found = orthanc.get(f"/dicom-web/studies/{source.StudyInstanceUID}/instances")
        assert found is not None
        assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(r.sop_instance_uid for r in rows)
        assert sorted(i["00080016"]["Value"][0] for i in found) == RESULT_CLASSES
        assert {dcmread(r.path, stop_before_pixels=True).StudyInstanceUID for r in rows} == {
            source.StudyInstanceUID}
        assert node.stop() == 0
    finally:
        orthanc.stop()
