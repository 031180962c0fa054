"""Storage commitment per DIMSE destination: results stored, then committed only when the
destination confirms every object; unanswered requests asked again, failed objects sent again,
both dead-lettered after the destination's number of requests; retention keeps what waits.

Orthanc (a storage commitment SCP) answers on a new association to the node's SCP; it runs,
with the node, inside a network namespace (Orthanc 1.10 cannot bind loopback only). A small
pynetdicom peer answers on the N-ACTION's own association, with the failures Orthanc never sends.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import select

from dicom_node.audit import AuditTrail
from dicom_node.audit.query import EventFilter, read_events
from dicom_node.config import load_settings
from dicom_node.db import Delivery, DeliveryStatus, Instance, Job, JobStatus, NodeDatabase, utcnow
from dicom_node.delivery import Deliverer
from dicom_node.retention import sweep_data
from dicom_node.scu import STORAGE_COMMITMENT_INSTANCE
from dicom_node.workflow import queue_deliveries
from tests.audit_fixtures import make_node, patient_dataset, store_instance
from tests.conftest import (
    OrthancInNamespace, dcmtk_tool, free_port, in_namespace, run_tool, sample_file, wait_for,
)
from tests.dicom_factory import write_cr

KINDS = {"sc", "seg", "sr"}


# -- against Orthanc, through `serve` -----------------------------------------------------------

def _node_and_orthanc(node_factory, namespace, tmp_path, *, answer_port: int | None = None,
                      **commitment: object):
    """Return a node and an Orthanc in ``namespace``: the node sends to Orthanc with storage
    commitment; Orthanc answers the node's AE at ``answer_port`` (default: the node's port)."""
    node_port = free_port()
    orthanc = OrthancInNamespace(namespace, tmp_path, {
        "DicomModalities": {"dicom-node": ["DICOM_NODE", "127.0.0.1", answer_port or node_port]},
        "Plugins": []})
    node = node_factory({
        "scp": {"port": node_port, "allowed_peers": [{"ae_title": "ORTHANC"}]},
        "destinations": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                          "port": orthanc.dicom_port, "storage_commitment": True, **commitment}],
        "delivery": {"timeout_s": 10},
    })
    node.command = in_namespace(namespace, *node.command)
    node.port = node_port
    return node, orthanc


def _send_chest_image(node, namespace: str) -> Dataset:
    """Send a chest CR to the node with DCMTK's storescu, calling as ORTHANC; return it."""
    path = sample_file("RG1_UNCR.dcm")
    sent = run_tool(*in_namespace(namespace, dcmtk_tool("storescu"), "-aet", "ORTHANC", "-aec", "DICOM_NODE",
                                  "127.0.0.1", str(node.port), str(path)))
    assert sent.returncode == 0, sent.stderr
    return dcmread(path, stop_before_pixels=True)


def _results(node, study_uid: str, *statuses: DeliveryStatus) -> list[Delivery] | None:
    """The node's three deliveries of the study's results when all are in ``statuses``, else None."""
    jobs = node.jobs(study_uid)
    deliveries = node.deliveries(jobs[0].id) if jobs else []
    return deliveries if {d.kind for d in deliveries} == KINDS and all(
        d.status in statuses for d in deliveries) else None


def _events(node, study_uid: str) -> list[str]:
    return [e["event"] for e in json.loads(node.cli("audit", "list", "--study", study_uid, "--format", "json"))]


@pytest.mark.slow
def test_results_stored_in_orthanc_are_committed(node_factory, namespace, tmp_path):
    node, orthanc = _node_and_orthanc(node_factory, namespace, tmp_path)
    orthanc.start()
    try:
        node.start()
        source = _send_chest_image(node, namespace)
        committed = wait_for(lambda: _results(node, source.StudyInstanceUID, DeliveryStatus.COMMITTED),
                             240, "the three results committed")
        assert {d.commit_requests for d in committed} == {1}
        assert len({d.commit_transaction_uid for d in committed}) == 1  # one request for the job's objects
        for delivery in committed:  # in Orthanc indeed
            assert orthanc.post("/tools/lookup", delivery.sop_instance_uid.encode())
        events = _events(node, source.StudyInstanceUID)
        assert events.count("result-sent") == 3
        assert events.count("result-commit-requested") == 3
        assert events.count("result-committed") == 3
        assert node.stop() == 0
    finally:
        orthanc.stop()


@pytest.mark.slow
def test_an_answer_blocked_then_orthanc_stopped_is_asked_again_until_committed(node_factory, namespace,
                                                                                tmp_path):
    # Orthanc first answers an AE where nothing listens: the answer never arrives.
    node, orthanc = _node_and_orthanc(node_factory, namespace, tmp_path, answer_port=free_port(),
                                      commitment_timeout_s=3, commitment_requests=20)
    orthanc.start()
    try:
        node.start()
        source = _send_chest_image(node, namespace)
        study = source.StudyInstanceUID
        wait_for(lambda: (r := _results(node, study, DeliveryStatus.STORED))
                 and min(d.commit_requests for d in r) >= 2, 240, "the commitment asked again")
        orthanc.stop()  # stored, not committed; and now the destination is down
        asked = max(d.commit_requests for d in _results(node, study, DeliveryStatus.STORED))
        wait_for(lambda: min(d.commit_requests for d in _results(node, study, DeliveryStatus.STORED))
                 > asked, 30, "a request while Orthanc is stopped")
        assert _results(node, study, DeliveryStatus.STORED)  # still not committed

        config = json.loads(orthanc.config.read_text())
        config["DicomModalities"]["dicom-node"][2] = node.port
        orthanc.config.write_text(json.dumps(config))
        orthanc.start()
        committed = wait_for(lambda: _results(node, study, DeliveryStatus.COMMITTED), 60,
                             "the results committed once Orthanc answers")
        assert all(d.commit_requests > asked for d in committed)
        events = _events(node, study)
        assert events.count("result-sent") == 3  # asked again, never sent again: Orthanc kept them
        assert events.count("result-committed") == 3
        assert "result-dead-lettered" not in events
        assert node.stop() == 0
    finally:
        orthanc.stop()


# -- the node's deliverer against a peer that answers on the same association -------------------

class CommitmentPeer:
    """A pynetdicom storage and storage commitment SCP that answers each N-ACTION with an
    N-EVENT-REPORT on the same association, before its N-ACTION response: every object it
    stored committed, except those in ``failing`` (failure reason 0x0110); it takes requests
    and never answers them while ``answering`` is False."""

    def __init__(self) -> None:
        self.port = free_port()
        self.failing: set[str] = set()
        self.stored: list[str] = []
        self.requests = 0
        self.answering = True
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context(StorageCommitmentPushModel)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)])

    def _on_store(self, event: Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _on_action(self, event: Event) -> tuple[int, None]:
        self.requests += 1
        if not self.answering:
            return 0x0000, None
        request = event.action_information
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        report.ReferencedSOPSequence = [i for i in request.ReferencedSOPSequence
                                        if i.ReferencedSOPInstanceUID not in self.failing]
        failed = [i for i in request.ReferencedSOPSequence if i.ReferencedSOPInstanceUID in self.failing]
        for item in failed:
            item.FailureReason = 0x0110
        if failed:
            report.FailedSOPSequence = failed
        status, _ = event.assoc.send_n_event_report(report, 2 if failed else 1, StorageCommitmentPushModel,
                                                    STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        return 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def peer():
    peer = CommitmentPeer()
    yield peer
    peer.stop()


@pytest.fixture
def deliverer(tmp_path, peer):
    """A deliverer sending to ``peer`` with storage commitment (2 requests per object), and the
    ids of three deliveries of one job."""
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "audit": {"secret": "s"},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": peer.port,
                          "storage_commitment": True, "commitment_timeout_s": 60, "commitment_requests": 2}],
        "delivery": {"timeout_s": 5},
    }))
    settings = load_settings(config)
    db = NodeDatabase(settings.node_database_url)
    audit = AuditTrail.from_settings(settings)
    outputs = [(kind, str(write_cr(tmp_path / f"{kind}.dcm").SOPInstanceUID), tmp_path / f"{kind}.dcm")
               for kind in sorted(KINDS)]
    with db.session() as session:
        job = Job(study_instance_uid="1.2.3", status=JobStatus.DONE)
        session.add(job)
        session.flush()
        ids = queue_deliveries(session, job_id=job.id, source_sop_uid="1.2.3.4", outputs=outputs,
                               destinations=settings.destinations)
    yield Deliverer.from_settings(settings, db, audit, worker="test-worker"), ids
    audit.close()
    db.dispose()


def _deliveries(deliverer: Deliverer) -> list[Delivery]:
    with deliverer.db.session() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def _answer_overdue(deliverer: Deliverer) -> None:
    """Move the time the answer is due to the past, as if the commitment timeout had passed."""
    with deliverer.db.session() as session:
        for delivery in session.scalars(select(Delivery)):
            delivery.next_attempt_at = utcnow() - timedelta(seconds=1)


def test_an_answer_on_the_same_association_commits_every_object(deliverer, peer):
    deliverer, ids = deliverer
    assert deliverer.run(ids[0]) is DeliveryStatus.COMMITTED
    assert {d.status for d in _deliveries(deliverer)} == {DeliveryStatus.COMMITTED}
    assert peer.requests == 1 and len(peer.stored) == 3


def test_a_failed_object_is_sent_and_asked_again_then_dead_lettered(deliverer, peer):
    deliverer, ids = deliverer
    failing = _deliveries(deliverer)[1]
    peer.failing.add(failing.sop_instance_uid)
    deliverer.run(ids[0])
    by_id = {d.id: d for d in _deliveries(deliverer)}
    assert by_id[failing.id].status is DeliveryStatus.RETRYING  # to be sent again
    assert by_id[failing.id].last_status == 0x0110
    assert {by_id[i].status for i in ids if i != failing.id} == {DeliveryStatus.COMMITTED}

    assert deliverer.run(failing.id) is DeliveryStatus.RETRYING  # sent and asked again: failed again
    assert peer.stored.count(failing.sop_instance_uid) == 2 and peer.requests == 2
    assert deliverer.run(failing.id) is DeliveryStatus.DEAD  # two requests made: dead-lettered
    assert peer.stored.count(failing.sop_instance_uid) == 2
    dead = {d.id: d for d in _deliveries(deliverer)}[failing.id]
    assert dead.last_error == "not committed after 2 storage commitment request(s)"
    events = [e["event"] for e in read_events(deliverer.audit, EventFilter())[1]
              if e["sop_uid"] == failing.sop_instance_uid]
    assert events.count("result-commit-failed") == 2 and events[-1] == "result-dead-lettered"


def test_an_unanswered_request_is_asked_again_then_dead_lettered(deliverer, peer):
    deliverer, ids = deliverer
    peer.answering = False
    assert deliverer.run(ids[0]) is DeliveryStatus.STORED
    assert deliverer.run(ids[0]) is None  # the answer is not overdue yet: nothing to do
    _answer_overdue(deliverer)
    assert deliverer.run(ids[0]) is DeliveryStatus.STORED  # asked again
    assert {d.commit_requests for d in _deliveries(deliverer)} == {2}
    _answer_overdue(deliverer)
    assert deliverer.run(ids[0]) is DeliveryStatus.DEAD
    assert peer.requests == 2 and len(peer.stored) == 3  # asked twice, never sent again
    assert {d.last_error for d in _deliveries(deliverer)} == {
        "no storage commitment answer after 2 storage commitment request(s)"}


# -- retention ----------------------------------------------------------------------------------

def test_retention_keeps_an_instance_whose_results_are_stored_but_not_committed(tmp_path):
    node = make_node(tmp_path)
    node.settings.retention.data_days = 30
    db = NodeDatabase(node.settings.node_database_url)
    now = datetime.now(UTC)
    ds = patient_dataset()
    store_instance(node, db, ds, finished_at=now - timedelta(days=31))
    with db.session() as session:
        job_id = session.scalar(select(Instance.job_id))
        session.add(Delivery(job_id=job_id, source_sop_instance_uid=ds.SOPInstanceUID, destination="pacs",
                             kind="sr", sop_instance_uid="1.2.3.9", path="/x.dcm",
                             status=DeliveryStatus.STORED))
    assert sweep_data(node.settings, node.trail, db, now=now).instances == 0
    with db.session() as session:
        session.scalar(select(Delivery)).status = DeliveryStatus.COMMITTED
    assert sweep_data(node.settings, node.trail, db, now=now).instances == 1
    db.dispose()
