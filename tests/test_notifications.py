"""The notification webhook: a flagged finding and a dead-lettered delivery each queue an outbox
message in the node database; the notifier posts their JSON (no patient name or id) to a
webhook on loopback, queues a retry after a 503, and drops what the webhook refuses.
(`serve` posting a dead-letter's notification through its worker: tests/test_fhir_destination.py.)"""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import select

from dicom_node import notifications
from dicom_node.audit import AuditTrail
from dicom_node.config import NotificationSettings, Settings
from dicom_node.db import Delivery, DeliveryStatus, Instance, Job, JobStatus, NodeDatabase, OutboxMessage, Task
from dicom_node.delivery import Deliverer
from dicom_node.errors import ConfigError
from dicom_node.notifications import Notifier, notify_flagged
from dicom_node.results import result_dir, save_findings
from dicom_node.senders.base import Disposition
from dicom_node.writers import OutputKind, write_results
from tests.http_receiver import HttpReceiver
from tests.writers_fixtures import ALGORITHM, display_of, read_source, synthetic_result


@pytest.fixture(scope="module")
def analysed():
    """RG1, a result flagging COVID-19 (0.93) and its SR."""
    source = read_source("RG1_UNCI.dcm")
    result = synthetic_result(source)
    return source, result, write_results(source, result, display_of(source), ALGORITHM)[OutputKind.SR]


@pytest.fixture
def webhook():
    receiver = HttpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def node(tmp_path, webhook):
    """Settings with the webhook and a refusing FHIR destination, the node database, the audit trail;
    notifications configured as a worker configures them (undone afterwards)."""
    refusing = HttpReceiver(status=400).start()
    settings = Settings(
        state_dir=tmp_path / "state", audit={"secret": "s"}, delivery={"max_failures": 1, "timeout_s": 5},
        destinations=[{"name": "ris", "type": "fhir", "base_url": refusing.url}],
        notifications={"webhook": {"url": webhook.url + "/notify?token=t",
                                    "auth": {"type": "bearer", "token": "hook-token"}}})
    db = NodeDatabase(settings.node_database_url)
    audit = AuditTrail.from_settings(settings)
    notifications.configure(settings.notifications)
    yield settings, db, audit
    notifications.configure(NotificationSettings())
    audit.close()
    db.dispose()
    refusing.stop()


def add_instance(db: NodeDatabase, source) -> Instance:
    with db.session() as session:
        job = Job(study_instance_uid=str(source.StudyInstanceUID), status=JobStatus.RUNNING)
        session.add(job)
        session.flush()
        instance = Instance(sop_instance_uid=str(source.SOPInstanceUID), sop_class_uid=str(source.SOPClassUID),
                            study_instance_uid=str(source.StudyInstanceUID),
                            series_instance_uid=str(source.SeriesInstanceUID),
                            transfer_syntax_uid="1.2.840.10008.1.2.1", path="/nowhere", size_bytes=1, calling_ae="STORESCU", job_id=job.id)
        session.add(instance)
        session.flush()
        return instance


def messages(db: NodeDatabase, task: Task) -> list[OutboxMessage]:
    with db.session() as session:
        return list(session.scalars(select(OutboxMessage).where(OutboxMessage.task == task)
                                    .order_by(OutboxMessage.id)))


def assert_no_phi(source, receiver: HttpReceiver) -> None:
    for request in receiver.received:
        for secret in (str(source.PatientID), str(source.PatientName)):
            assert secret.encode() not in request.body


def test_a_flagged_finding_is_posted_and_retried_after_a_503(node, webhook, analysed):
    settings, db, _ = node
    source, result, _ = analysed
    instance = add_instance(db, source)
    save_findings(result_dir(settings.results_dir, instance.study_instance_uid, instance.sop_instance_uid),
                result, "test")
    notify_flagged(db, instance, result)
    [queued] = messages(db, Task.NOTIFY_FLAGGED)
    assert queued.target_id == instance.id and queued.not_before is None

    notifier = Notifier.from_settings(settings, db)
    webhook.statuses = [503]
    assert notifier.run(Task.NOTIFY_FLAGGED, instance.id) is Disposition.RETRY
    retry = messages(db, Task.NOTIFY_FLAGGED)[-1]
    assert retry.not_before is not None and retry.not_before > queued.created_at
    assert notifier.run(Task.NOTIFY_FLAGGED, instance.id) is Disposition.DELIVERED

    first, second = webhook.received
    assert first.body == second.body and second.path == "/notify?token=t"
    assert second.headers["Authorization"] == "Bearer hook-token"
    sent = second.json()
    assert sent == {
        "event": "finding-flagged", "job_id": instance.job_id, "study_instance_uid": source.StudyInstanceUID,
        "sop_instance_uid": source.SOPInstanceUID, "destination": None, "time": sent["time"],
        "findings": [{"name": "covid19", "display_name": "COVID-19", "probability": 0.93, "threshold": 0.5}]}
    assert datetime.fromisoformat(sent["time"]) == queued.created_at
    assert_no_phi(source, webhook)


def test_nothing_is_queued_without_a_flag_or_without_the_event(node, analysed):
    settings, db, _ = node
    source, _, _ = analysed
    instance = add_instance(db, source)
    notify_flagged(db, instance, synthetic_result(source, flagged=False))
    notifications.configure(NotificationSettings(webhook={"url": "https://hook.example",
                                                          "events": ["delivery-dead-lettered"]}))
    notify_flagged(db, instance, synthetic_result(source))
    assert messages(db, Task.NOTIFY_FLAGGED) == []


def test_a_dead_lettered_delivery_is_posted(node, webhook, analysed, tmp_path):
    settings, db, audit = node
    source, _, sr = analysed
    instance = add_instance(db, source)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    with db.session() as session:
        delivery = Delivery(job_id=instance.job_id, source_sop_instance_uid=instance.sop_instance_uid,
                            destination="ris", kind="sr", sop_instance_uid=str(sr.SOPInstanceUID), path=str(path))
        session.add(delivery)
        session.flush()
        delivery_id = delivery.id

    assert Deliverer.from_settings(settings, db, audit, worker="w").run(delivery_id) is DeliveryStatus.DEAD
    [queued] = messages(db, Task.NOTIFY_DEAD_LETTERED)
    assert queued.target_id == delivery_id
    assert Notifier.from_settings(settings, db).run(Task.NOTIFY_DEAD_LETTERED, delivery_id) is Disposition.DELIVERED
    [request] = webhook.received
    sent = request.json()
    assert {k: v for k, v in sent.items() if k != "time"} == {
        "event": "delivery-dead-lettered", "job_id": instance.job_id, "study_instance_uid": source.StudyInstanceUID,
        "sop_instance_uid": sr.SOPInstanceUID, "kind": "sr", "destination": "ris",
        "reason": "HTTP 400: request refused", "findings": []}
    assert_no_phi(source, webhook)


def test_an_unreadable_token_file_stops_the_notifier_at_start(node, tmp_path):
    settings, db, _ = node
    missing = settings.model_copy(update={"notifications": NotificationSettings(webhook={
        "url": "https://hook.example", "auth": {"type": "bearer", "token_file": str(tmp_path / "absent")}})})
    with pytest.raises(ConfigError, match="notifications.webhook: cannot read the secret file .*absent"):
        Notifier.from_settings(missing, db)


def test_a_refused_notification_is_dropped_not_retried(node, webhook, analysed):
    settings, db, _ = node
    instance = add_instance(db, analysed[0])
    notify_flagged(db, instance, analysed[1])
    webhook.statuses = [400]
    assert Notifier.from_settings(settings, db).run(Task.NOTIFY_FLAGGED, instance.id) is Disposition.GIVE_UP
    assert len(messages(db, Task.NOTIFY_FLAGGED)) == 1
