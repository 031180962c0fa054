"""ATNA export: every audit event reaches a real rsyslog as an RFC 5424 message carrying a DICOM
PS3.15 A.5 AuditMessage, over TCP and TLS, exactly once and in order, also when the repository
is down for a while during a burst; the export cursor holds back audit retention."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.audit import AuditEvent, AuditTrail, Outcome
from dicom_node.audit.chain import verify_chain
from dicom_node.audit.store import events
from dicom_node.audit.store import export_cursors
from dicom_node.audit.syslog_export import SyslogExporter
from dicom_node.config import load_settings
from dicom_node.retention import purge_audit
from tests.conftest import dcmtk_tool, free_port, run_tool, wait_for
from tests.dicom_factory import TEST_PATIENT_ID, TEST_PATIENT_NAME, write_cr
from tests.test_security_network import pki  # noqa: F401  (a fixture: CA, server and client certificates)

PATIENT_ID = "PAT-SECRET-4711"
HEADER = re.compile(r"^(\d+) ")
CODED = ("csd-code", "codeSystemName", "originalText")
CODED_ELEMENTS = {"EventID", "EventTypeCode", "RoleIDCode", "AuditSourceTypeCode", "ParticipantObjectIDTypeCode"}


class Rsyslog:
    """rsyslogd in the foreground, listening on a free loopback port with imtcp (plain, or TLS
    requiring a client certificate signed by the test CA), writing each received message as
    one JSON line: its PRI, APP-NAME, MSGID, STRUCTURED-DATA and MSG as rsyslog parsed them."""

    def __init__(self, folder: Path, tls: dict[str, Path] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.output = folder / "received.jsonl"
        self.config = folder / "rsyslog.conf"
        driver = ""
        if tls:
            driver = (f' DefaultNetstreamDriverCAFile="{tls["ca"]}"'
                      f' DefaultNetstreamDriverCertFile="{tls["server.crt"]}"'
                      f' DefaultNetstreamDriverKeyFile="{tls["server.key"]}"')
        tcp = ' StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid"'
        self.config.write_text(f"""
global(workDirectory="{folder}" maxMessageSize="64k"{driver})
module(load="imtcp"{tcp if tls else ""})
template(name="fields" type="string" string="{{\\"pri\\":\\"%pri%\\",\\"app\\":\\"%app-name:::json%\\",\
\\"msgid\\":\\"%msgid:::json%\\",\\"sd\\":\\"%structured-data:::json%\\",\\"msg\\":\\"%msg:::json%\\"}}\\n")
ruleset(name="audit") {{ action(type="omfile" file="{self.output}" template="fields") }}
input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="audit")
""")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Rsyslog:
        self.process = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(self.config), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=(self.folder / "rsyslogd.log").open("ab"))
        wait_for(self._listening, 30, "rsyslogd to listen")
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"rsyslogd exited with {self.process.returncode}: "
                        f"{(self.folder / 'rsyslogd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def received(self) -> list[dict[str, str]]:
        if not self.output.exists():
            return []
        return [json.loads(line) for line in self.output.read_text().splitlines()]

    def sequence_ids(self) -> list[int]:
        return [int(re.fullmatch(r'\[meta sequenceId="(\d+)"\]', m["sd"]).group(1))  # type: ignore[union-attr]
                for m in self.received()]


@pytest.fixture
def rsyslog_factory(tmp_path: Path) -> Iterator[Callable[..., Rsyslog]]:
    if shutil.which("rsyslogd") is None:
        pytest.skip("rsyslog is not installed (apt-get install rsyslog)")
    started: list[Rsyslog] = []

    def make(name: str = "rsyslog", tls: dict[str, Path] | None = None) -> Rsyslog:
        if tls and not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")):
            pytest.skip("rsyslog's TLS driver is not installed (apt-get install rsyslog-gnutls)")
        folder = tmp_path / name
        folder.mkdir()
        receiver = Rsyslog(folder, tls)
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


@pytest.fixture
def exporter_factory(tmp_path: Path) -> Iterator[Callable[..., tuple[AuditTrail, SyslogExporter]]]:
    """An audit trail on a real SQLite file (one per receiver) and its exporter to that receiver
    (started)."""
    made: list[tuple[AuditTrail, SyslogExporter]] = []

    def make(receiver: Rsyslog, state: str = "state", **syslog: Any) -> tuple[AuditTrail, SyslogExporter]:
        settings = load_settings(None, state_dir=tmp_path / f"{state}-{receiver.folder.name}", audit={"secret": "s", "syslog": {
            "enabled": True, "host": "127.0.0.1", "port": receiver.port, "transport": "tcp",
            "first_retry_s": 0.2, "max_retry_interval_s": 1.0, "timeout_s": 5, **syslog}})
        settings.state_dir.mkdir(exist_ok=True)
        trail = AuditTrail.from_settings(settings)
        exporter = SyslogExporter(settings, trail)
        exporter.start()
        made.append((trail, exporter))
        return trail, exporter

    yield make
    for trail, exporter in made:
        exporter.stop()
        trail.close()


def record_burst(trail: AuditTrail, count: int, pause_s: float = 0.02,
                 during: Callable[[int], None] = lambda _: None) -> None:
    """Record ``count`` events of the kinds the node writes (inbound, outbound, node and
    administrator events), ``during(n)`` called before the n-th."""
    pseudonym = trail.pseudonym(PATIENT_ID)
    kinds: list[dict[str, Any]] = [
        {"event": AuditEvent.ASSOCIATION_ACCEPTED, "actor": "STORESCU", "remote": "127.0.0.1"},
        {"event": AuditEvent.INSTANCE_RECEIVED, "actor": "STORESCU", "remote": "127.0.0.1",
         "pseudonym": pseudonym, "study_uid": "1.2.826.0.1.3680043.8.498.1",
         "sop_uid": "1.2.826.0.1.3680043.8.498.2"},
        {"event": AuditEvent.JOB_COMPLETED, "actor": "worker@host", "job_id": 7,
         "pseudonym": pseudonym, "study_uid": "1.2.826.0.1.3680043.8.498.1"},
        {"event": AuditEvent.RESULT_FAILED, "outcome": Outcome.MINOR_FAILURE, "actor": "worker@host",
         "remote": "PACS@127.0.0.1:104", "study_uid": "1.2.826.0.1.3680043.8.498.1",
         "detail": "sc to pacs: no answer; retry at 10:00:00"},
        {"event": AuditEvent.AUDIT_QUERIED, "actor": "admin", "detail": "list; 3 events"},
    ]
    for n in range(count):
        during(n)
        fields = dict(kinds[n % len(kinds)])
        trail.record(fields.pop("event"), **fields)
        time.sleep(pause_s)


def stored_rows(trail: AuditTrail) -> list[dict[str, Any]]:
    with trail.connect() as connection:
        return [dict(row) for row in connection.execute(select(events).order_by(events.c.id)).mappings()]


def cursor_of(trail: AuditTrail) -> int:
    with trail.connect() as connection:
        return connection.execute(select(export_cursors.c.last_id)).scalar_one()


def check_audit_message(message: dict[str, str], row: dict[str, Any]) -> ET.Element:
    """Check one received message against the row it reports: the RFC 5424 fields rsyslog
    parsed, and the AuditMessage against the structure and required fields of PS3.15 A.5.1."""
    outcome = Outcome(row["outcome"])
    assert message["app"] == "dicom-node" and message["msgid"] == "DICOM+RFC3881"
    assert int(message["pri"]) == 10 * 8 + {Outcome.SUCCESS: 5, Outcome.MINOR_FAILURE: 4}[outcome]
    root = ET.fromstring(message["msg"].removeprefix("\ufeff").encode())
    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    assert re.fullmatch(r"EventIdentification,(ActiveParticipant,)+AuditSourceIdentification"
                        r"(,ParticipantObjectIdentification)*", ",".join(tags)), tags

    identification = root.find("EventIdentification")
    assert identification is not None
    assert identification.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert datetime.fromisoformat(identification.attrib["EventDateTime"]) == row["time"].replace(
        microsecond=row["time"].microsecond // 1000 * 1000)
    assert identification.get("EventOutcomeIndicator") == str(outcome.dicom_indicator)
    assert identification[0].tag == "EventID"
    event_id = identification.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == row["event_id"]
    for coded in root.iter():
        if coded.tag in CODED_ELEMENTS:
            assert all(coded.get(name) for name in CODED), coded.attrib

    for participant in root.iter("ActiveParticipant"):
        assert participant.get("UserID")
        assert participant.get("UserIsRequestor") in {"true", "false"}
        assert participant.get("NetworkAccessPointTypeCode", "1") in {"1", "2", "3", "4", "5"}
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "DICOM_NODE"
    assert source.find("AuditSourceTypeCode") is not None
    objects = {o.get("ParticipantObjectTypeCodeRole"): o for o in root.iter("ParticipantObjectIdentification")}
    for found in objects.values():
        assert found.get("ParticipantObjectID") and found.get("ParticipantObjectTypeCode") in {"1", "2", "3", "4"}
        assert found[0].tag == "ParticipantObjectIDTypeCode"
    if row["study_uid"]:
        assert objects["3"].get("ParticipantObjectID") == row["study_uid"]
        assert objects["3"][0].get("csd-code") == "110180"
    if row["pseudonym"]:
        assert objects["1"].get("ParticipantObjectID") == row["pseudonym"]
    return root


def test_a_burst_arrives_exactly_once_in_order_across_an_outage(rsyslog_factory, exporter_factory):
    receiver = rsyslog_factory().start()
    trail, exporter = exporter_factory(receiver)
    outage: dict[str, float] = {}

    def stop_and_restart(n: int) -> None:
        if n == 40:  # between two sends: rsyslog closes in order, having read everything
            wait_for(lambda: exporter.acknowledged == n, 10, "the first events acknowledged")
            receiver.stop()
            outage["from"], outage["failures"] = time.monotonic(), exporter.failures
        if n == 120:  # later events wait for the repository: at least 5 s and 5 failed tries
            wait_for(lambda: exporter.failures - outage["failures"] >= 5
                     and time.monotonic() - outage["from"] >= 5, 30, "reconnection attempts")
            outage["seconds"] = time.monotonic() - outage["from"]
            outage["attempts"] = exporter.failures - outage["failures"]
            receiver.start()

    record_burst(trail, 160, during=stop_and_restart)
    rows = stored_rows(trail)
    wait_for(lambda: len(receiver.received()) >= len(rows), 30, "every event at rsyslog")

    assert receiver.sequence_ids() == [row["id"] for row in rows]  # exactly once, in order
    wait_for(lambda: cursor_of(trail) == rows[-1]["id"], 10, "the cursor to settle at the last event")
    assert outage["attempts"] >= 5 and outage["seconds"] >= 5
    for message, row in zip(receiver.received(), rows, strict=True):
        check_audit_message(message, row)
    text = receiver.output.read_text()
    assert PATIENT_ID not in text
    inbound = ET.fromstring(receiver.received()[1]["msg"].removeprefix("\ufeff").encode())
    peer = [p.attrib for p in inbound.iter("ActiveParticipant") if p.get("UserID") == "STORESCU"]
    assert peer == [{"UserID": "STORESCU", "UserIsRequestor": "true",
                     "NetworkAccessPointID": "127.0.0.1", "NetworkAccessPointTypeCode": "2"}]


def test_a_repository_that_resets_mid_stream_loses_nothing(rsyslog_factory, exporter_factory):
    """rsyslog stopped while a backlog streams stops reading first and then resets the
    connection, discarding what it had acknowledged but not read: nothing is lost, the messages
    after the last settled one arrive a second time (same sequenceId), in order."""
    receiver = rsyslog_factory().start()
    trail, exporter = exporter_factory(receiver, settle_s=1, first_retry_s=0.1)
    for job_id in range(3000):
        trail.record(AuditEvent.JOB_STARTED, actor="worker@host", job_id=job_id)
    wait_for(lambda: exporter.acknowledged >= 200, 30, "the stream under way")
    receiver.stop()
    receiver.start()
    wait_for(lambda: cursor_of(trail) == 3000, 30, "every event settled")

    ids = receiver.sequence_ids()
    restart = next((i for i in range(1, len(ids)) if ids[i] <= ids[i - 1]), len(ids))
    first, again = ids[:restart], ids[restart:]
    assert first == list(range(1, len(first) + 1))
    assert again == list(range(again[0], 3001)) if again else first[-1] == 3000


def test_tls_verifies_the_repository_and_presents_the_client_certificate(rsyslog_factory, exporter_factory,
                                                                   pki):  # noqa: F811
    receiver = rsyslog_factory(tls=pki).start()
    tls = {"transport": "tls", "ca_certificates": str(pki["ca"]),
           "certificate": str(pki["pacs1.crt"]), "private_key": str(pki["pacs1.key"])}
    untrusting_receiver = rsyslog_factory("untrusted", tls=pki).start()
    refused_trail, refused = exporter_factory(untrusting_receiver, transport="tls")  # the system's CAs
    anonymous_trail, anonymous = exporter_factory(  # no client certificate: rsyslog refuses it
        receiver, "anonymous", transport="tls", ca_certificates=str(pki["ca"]))
    record_burst(refused_trail, 1)
    record_burst(anonymous_trail, 1)

    trail, _ = exporter_factory(receiver, **tls)
    record_burst(trail, 10, pause_s=0)
    rows = stored_rows(trail)
    wait_for(lambda: len(receiver.received()) >= len(rows), 30, "every event over TLS")
    assert receiver.sequence_ids() == [row["id"] for row in rows]
    for message, row in zip(receiver.received(), rows, strict=True):
        check_audit_message(message, row)

    wait_for(lambda: refused.failures >= 2 and anonymous.failures >= 2, 30, "refused sessions")
    assert untrusting_receiver.received() == [] and cursor_of(refused_trail) == 0
    assert len(receiver.received()) == len(rows) and cursor_of(anonymous_trail) == 0


def test_retention_keeps_events_not_yet_exported(rsyslog_factory, exporter_factory):
    receiver = rsyslog_factory().start()
    trail, exporter = exporter_factory(receiver)
    record_burst(trail, 5, pause_s=0)
    wait_for(lambda: cursor_of(trail) == 5, 30, "the first events exported")
    receiver.stop()
    record_burst(trail, 5, pause_s=0)
    wait_for(lambda: exporter.failures >= 1, 30, "the repository missed")

    deleted = purge_audit(trail, timedelta(days=1), actor="test", now=datetime.now(UTC) + timedelta(days=2))

    assert deleted == 5
    assert [row["id"] for row in stored_rows(trail)] == list(range(6, 12))  # 6-10 and the purge's own
    assert verify_chain(trail).ok
    receiver.start()
    wait_for(lambda: cursor_of(trail) == 11, 30, "the backlog exported")
    assert receiver.sequence_ids() == list(range(1, 12))


def test_serve_exports_what_storescu_caused(node_factory, rsyslog_factory, tmp_path):
    receiver = rsyslog_factory().start()
    node = node_factory({"worker": {"embedded": False}, "audit": {"syslog": {
        "enabled": True, "host": "127.0.0.1", "port": receiver.port, "transport": "tcp"}}}).start()
    ds = write_cr(tmp_path / "cr.dcm")
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                    str(node.port), str(tmp_path / "cr.dcm"))
    assert sent.returncode == 0, sent.stderr
    received = wait_for(lambda: [m for m in receiver.received() if "110104" in m["msg"]], 30,
                        "the instance's transfer at rsyslog")
    assert node.stop() == 0
    wait_for(lambda: "110121" in receiver.received()[-1]["msg"], 10, "the node's stop at rsyslog")

    message = ET.fromstring(received[0]["msg"].removeprefix("\ufeff").encode())
    assert message.find("EventIdentification/EventID").get("csd-code") == "110104"  # type: ignore[union-attr]
    assert {p.get("UserID") for p in message.iter("ActiveParticipant")} == {"DICOM_NODE", "STORESCU"}
    study = [o for o in message.iter("ParticipantObjectIdentification")
             if o.get("ParticipantObjectTypeCodeRole") == "3"]
    assert study[0].get("ParticipantObjectID") == ds.StudyInstanceUID
    ids = receiver.sequence_ids()
    assert ids == list(range(1, len(ids) + 1))
    text = receiver.output.read_text()
    assert TEST_PATIENT_ID not in text and str(TEST_PATIENT_NAME) not in text
