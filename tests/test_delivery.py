"""Delivery against a real receiving SCP: success, outage, 0xA700 retried, 0xC000 dead-lettered."""

from __future__ import annotations

import getpass
import json
import time

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import select

from dicom_node.audit import AuditTrail
from dicom_node.cli import main
from dicom_node.config import load_settings
from dicom_node.db import (
    Delivery, DeliveryStatus, Job, JobStatus, NodeDatabase, OutboxMessage, utcnow,
)
from dicom_node.delivery import Deliverer
from dicom_node.scu import Disposition, classify
from dicom_node.workflow import queue_deliveries
from tests.dicom_factory import write_cr
from tests.receiving_scp import ReceivingSCP


@pytest.fixture
def pacs():
    scp = ReceivingSCP()
    yield scp
    scp.stop()


@pytest.fixture
def node(tmp_path, pacs):
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "audit": {"secret": "s"},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                          "port": pacs.port}],
        "delivery": {"first_retry_s": 0.2, "max_retry_interval_s": 0.4, "max_age_s": 30,
                     "max_failures": 3, "timeout_s": 5},
    }))
    settings = load_settings(config)
    db = NodeDatabase(settings.node_database_url)
    audit = AuditTrail.from_settings(settings)
    deliverer = Deliverer.from_settings(settings, db, audit, worker="test-worker")
    result = tmp_path / "result.dcm"
    sop_uid = str(write_cr(result).SOPInstanceUID)
    with db.session() as session:
        job = Job(study_instance_uid="1.2.3", status=JobStatus.DONE)
        session.add(job)
        session.flush()
        [delivery_id] = queue_deliveries(session, job_id=job.id, source_sop_uid="1.2.3.4",
                                         outputs=[("sc", sop_uid, result)],
                                         destinations=settings.destinations)
    yield deliverer, delivery_id, sop_uid, config
    audit.close()
    db.dispose()


def delivery(deliverer: Deliverer, delivery_id: int) -> Delivery:
    with deliverer.db.session() as session:
        return session.get(Delivery, delivery_id)


def run_when_due(deliverer: Deliverer, delivery_id: int) -> DeliveryStatus | None:
    due = delivery(deliverer, delivery_id).next_attempt_at
    if due is not None:
        time.sleep(max(0.0, (due - utcnow()).total_seconds()) + 0.05)
    return deliverer.run(delivery_id)


@pytest.mark.parametrize("status, disposition", [
    (0x0000, Disposition.DELIVERED), (0xB000, Disposition.DELIVERED), (0xB007, Disposition.DELIVERED),
    (0x0107, Disposition.DELIVERED), (0x0116, Disposition.DELIVERED), (0x0213, Disposition.RETRY),
    (0xA700, Disposition.RETRY), (0xA7FF, Disposition.RETRY), (None, Disposition.RETRY),
    (0xC000, Disposition.GIVE_UP), (0xA900, Disposition.GIVE_UP), (0x0122, Disposition.GIVE_UP),
])
def test_status_classification(status, disposition):
    assert classify(status) is disposition


@pytest.mark.parametrize("warning", [0x0107, 0x0116])
def test_a_general_warning_is_delivered_once(node, pacs, warning):
    """0x0107 / 0x0116: the PACS stored the object (with a warning); sending it again would duplicate it."""
    deliverer, delivery_id, sop_uid, _ = node
    pacs.status = warning
    pacs.start()
    assert deliverer.run(delivery_id) is DeliveryStatus.DELIVERED
    assert pacs.received[sop_uid] == 1 and sop_uid in pacs.stored
    assert delivery(deliverer, delivery_id).last_status == warning


def test_delivered_once_and_a_second_message_is_a_no_op(node, pacs):
    deliverer, delivery_id, sop_uid, _ = node
    pacs.start()
    assert deliverer.run(delivery_id) is DeliveryStatus.DELIVERED
    assert deliverer.run(delivery_id) is None
    assert pacs.received == {sop_uid: 1}


def test_destination_down_then_up(node, pacs):
    deliverer, delivery_id, sop_uid, _ = node
    assert deliverer.run(delivery_id) is DeliveryStatus.RETRYING
    assert run_when_due(deliverer, delivery_id) is DeliveryStatus.RETRYING
    row = delivery(deliverer, delivery_id)
    assert row.attempts == 2 and row.last_error.startswith("no association")
    with deliverer.db.session() as session:
        retries = session.scalars(select(OutboxMessage).where(
            OutboxMessage.task == "deliver", OutboxMessage.not_before.is_not(None))).all()
    assert len(retries) == 2  # each retry is an outbox message due at its time
    # A message arriving before the retry is due does nothing.
    assert deliverer.run(delivery_id) is None
    pacs.start()
    assert run_when_due(deliverer, delivery_id) is DeliveryStatus.DELIVERED
    assert pacs.received == {sop_uid: 1}


def test_out_of_resources_is_retried(node, pacs):
    deliverer, delivery_id, sop_uid, _ = node
    pacs.status = 0xA700
    pacs.start()
    for _ in range(4):  # more than max_failures: transient failures go on until max_age
        assert run_when_due(deliverer, delivery_id) is DeliveryStatus.RETRYING
    pacs.status = 0x0000
    assert run_when_due(deliverer, delivery_id) is DeliveryStatus.DELIVERED
    assert pacs.stored == {sop_uid: "1.2.840.10008.5.1.4.1.1.1"}


def test_refused_is_dead_lettered_and_listed(node, pacs):
    deliverer, delivery_id, sop_uid, config = node
    pacs.status = 0xC000
    pacs.start()
    states = [run_when_due(deliverer, delivery_id) for _ in range(3)]
    assert states == [DeliveryStatus.RETRYING, DeliveryStatus.RETRYING, DeliveryStatus.DEAD]
    assert run_when_due(deliverer, delivery_id) is None
    assert pacs.received == {sop_uid: 3}
    listed = CliRunner().invoke(main, ["--config", str(config), "jobs", "list",
                                       "--status", "dead-letter", "--format", "json"])
    assert listed.exit_code == 0, listed.output
    assert '"dead": 1' in listed.output
    shown = CliRunner().invoke(main, ["--config", str(config), "jobs", "show", "1"])
    assert "0xC000" in shown.output and "dead" in shown.output
    audited = CliRunner().invoke(main, ["--config", str(config), "audit", "list", "--event", "result-failed",
                                        "--event", "result-dead-lettered", "--format", "json"])
    assert [(e["event"], e["outcome"]) for e in json.loads(audited.output)] == [
        ("result-failed", "minor-failure")] * 2 + [("result-dead-lettered", "serious-failure")]
    # resend makes a dead-lettered delivery pending again
    pacs.status = 0x0000
    resent = CliRunner().invoke(main, ["--config", str(config), "jobs", "resend", "1"])
    assert resent.exit_code == 0, resent.output
    row = delivery(deliverer, delivery_id)
    assert row.status is DeliveryStatus.PENDING and row.last_status is None and row.last_error is None
    assert deliverer.run(delivery_id) is DeliveryStatus.DELIVERED


def test_retry_and_resend_are_audited_with_the_os_user(node):
    _, _, sop_uid, config = node
    for command in ("retry", "resend"):
        done = CliRunner().invoke(main, ["--config", str(config), "jobs", command, "1"])
        assert done.exit_code == 0, done.output
    listed = CliRunner().invoke(main, ["--config", str(config), "audit", "list", "--study", "1.2.3",
                                       "--format", "json"])
    assert listed.exit_code == 0, listed.output
    events = {e["event"]: e for e in json.loads(listed.output)}
    assert events["job-retried"]["detail"] == "queued again by an administrator (jobs retry)"
    assert events["job-retried"]["actor"] == getpass.getuser() and events["job-retried"]["job_id"] == 1
    assert events["result-resent"]["sop_uid"] == sop_uid
    assert events["result-resent"]["actor"] == getpass.getuser()
    assert events["result-resent"]["detail"] == "sc to pacs queued again by an administrator (jobs resend)"


def test_transient_failures_stop_at_max_age(node, pacs):
    deliverer, delivery_id, _, _ = node
    deliverer.policy = deliverer.policy.model_copy(update={"max_age_s": 0.5})
    states = []
    for _ in range(5):
        states.append(run_when_due(deliverer, delivery_id))
        if states[-1] is DeliveryStatus.DEAD:
            break
    assert states[-1] is DeliveryStatus.DEAD
    assert delivery(deliverer, delivery_id).last_error.startswith("no association")


def test_a_jobs_objects_travel_over_one_association(tmp_path, node, pacs):
    """SC, SEG and SR of one job: one message, one association, also when retried after an outage."""
    deliverer, _, _, config = node
    settings = load_settings(config)
    outputs = [(kind, str(write_cr(tmp_path / f"{kind}.dcm").SOPInstanceUID), tmp_path / f"{kind}.dcm")
               for kind in ("sc", "seg", "sr")]
    with deliverer.db.session() as session:
        job = Job(study_instance_uid="1.2.3", status=JobStatus.DONE)
        session.add(job)
        session.flush()
        ids = queue_deliveries(session, job_id=job.id, source_sop_uid="1.2.3.5", outputs=outputs,
                               destinations=settings.destinations)
    with deliverer.db.session() as session:
        messages = session.scalars(select(OutboxMessage.target_id).where(
            OutboxMessage.task == "deliver", OutboxMessage.target_id.in_(ids))).all()
    assert messages == [ids[0]]
    assert deliverer.run(ids[0]) is DeliveryStatus.RETRYING  # destination down
    rows = [delivery(deliverer, i) for i in ids]
    assert {r.status for r in rows} == {DeliveryStatus.RETRYING}
    assert len({r.next_attempt_at for r in rows}) == 1  # due together
    with deliverer.db.session() as session:
        retries = session.scalars(select(OutboxMessage.target_id).where(
            OutboxMessage.task == "deliver", OutboxMessage.not_before.is_not(None),
            OutboxMessage.target_id.in_(ids))).all()
    assert retries == [ids[0]]
    pacs.start()
    assert run_when_due(deliverer, ids[0]) is DeliveryStatus.DELIVERED
    assert {delivery(deliverer, i).status for i in ids} == {DeliveryStatus.DELIVERED}
    assert pacs.associations == 1 and sorted(pacs.received) == sorted(uid for _, uid, _ in outputs)
    assert all(deliverer.run(i) is None for i in ids)
