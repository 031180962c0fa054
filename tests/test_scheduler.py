"""When a study is complete (its association released, the quiet period, forced) and the outbox,
on a real SQLite state database; the release through the SCP and through `serve`."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import select

from dicom_node.arrivals import Arrivals
from dicom_node.audit import AuditTrail
from dicom_node.config import load_settings
from dicom_node.db import Instance, Job, JobStatus, NodeDatabase, OutboxMessage, Task, queue_message, utcnow
from dicom_node.routing import Route, Router
from dicom_node.scheduler import Scheduler
from tests.conftest import dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import write_cr


@pytest.fixture
def state(tmp_path):
    settings = load_settings(None, state_dir=tmp_path, audit={"secret": "s"})
    db = NodeDatabase(settings.node_database_url)
    audit = AuditTrail.from_settings(settings)
    yield db, audit
    audit.close()
    db.dispose()


def add_instance(db, study: str, sop: str, age_s: float) -> None:
    with db.session() as session:
        session.add(Instance(
            sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            study_instance_uid=study, series_instance_uid=study + ".1",
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"/spool/{sop}.dcm", size_bytes=1,
            calling_ae="PACS", received_at=utcnow() - timedelta(seconds=age_s)))


class Broker:
    def __init__(self) -> None:
        self.up = True
        self.sent: list[tuple[str, int]] = []

    def publish(self, message: OutboxMessage) -> None:
        if not self.up:
            raise ConnectionError("broker down")
        self.sent.append((message.task, message.target_id))


def jobs(db) -> list[Job]:
    with db.session() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_a_quiet_study_becomes_one_job_and_a_busy_one_waits(state):
    db, audit = state
    broker = Broker()
    scheduler = Scheduler(db, audit, broker.publish, quiet_seconds=5, poll_seconds=1)
    add_instance(db, "1.1", "1.1.1", age_s=10)
    add_instance(db, "1.1", "1.1.2", age_s=8)
    add_instance(db, "1.2", "1.2.1", age_s=1)
    scheduler.tick()
    [job] = jobs(db)
    assert (job.study_instance_uid, job.status) == ("1.1", JobStatus.QUEUED)
    assert broker.sent == [("analyze", job.id)]
    with db.session() as session:
        assigned = {i.sop_instance_uid: i.job_id for i in session.scalars(select(Instance))}
    assert assigned == {"1.1.1": job.id, "1.1.2": job.id, "1.2.1": None}


def test_an_instance_after_its_studys_job_gets_a_new_job(state):
    db, audit = state
    broker = Broker()
    scheduler = Scheduler(db, audit, broker.publish, quiet_seconds=5, poll_seconds=1)
    add_instance(db, "1.1", "1.1.1", age_s=10)
    scheduler.tick()
    add_instance(db, "1.1", "1.1.2", age_s=6)
    scheduler.tick()
    first, second = jobs(db)
    assert first.study_instance_uid == second.study_instance_uid == "1.1"
    assert broker.sent == [("analyze", first.id), ("analyze", second.id)]


def test_messages_wait_in_the_outbox_while_the_broker_is_down(state):
    db, audit = state
    broker = Broker()
    broker.up = False
    scheduler = Scheduler(db, audit, broker.publish, quiet_seconds=0, poll_seconds=1)
    for n in range(3):
        add_instance(db, f"1.{n}", f"1.{n}.1", age_s=1)
    scheduler.tick()
    assert len(jobs(db)) == 3 and broker.sent == []
    # A new scheduler (as after a restart) publishes what the first could not, in order.
    broker.up = True
    Scheduler(db, audit, broker.publish, quiet_seconds=0, poll_seconds=1).tick()
    assert broker.sent == [("analyze", job.id) for job in jobs(db)]
    with db.session() as session:
        assert all(m.published_at for m in session.scalars(select(OutboxMessage)))
    scheduler.tick()
    assert len(broker.sent) == 3


def scheduler_with(db, audit, arrivals: Arrivals, *, grace_s: float = 0, quiet_s: float = 60,
                   force_s: float | None = None) -> Scheduler:
    return Scheduler(db, audit, Broker().publish, quiet_seconds=quiet_s, poll_seconds=1, arrivals=arrivals,
                     release_grace_s=grace_s, force_complete_s=force_s)


def instance_ids(db, job) -> set[str]:
    with db.session() as session:
        return {i.sop_instance_uid for i in session.query(Instance).filter(Instance.job_id == job.id)}


def test_a_released_study_is_complete_after_the_grace_not_the_quiet_period(state):
    db, audit = state
    arrivals = Arrivals()
    add_instance(db, "1.1", "1.1.1", age_s=0)
    arrivals.stored("a", "1.1")
    scheduler_with(db, audit, arrivals, grace_s=60).tick()
    assert jobs(db) == []  # not released yet, and the quiet period is a minute
    arrivals.released("a")
    scheduler_with(db, audit, arrivals, grace_s=60).tick()
    assert jobs(db) == []  # released, but within the grace
    scheduler_with(db, audit, arrivals, grace_s=0).tick()
    [job] = jobs(db)
    assert instance_ids(db, job) == {"1.1.1"}
    assert arrivals.due(timedelta(0)) == {}  # queued: forgotten


def test_a_study_another_open_association_still_brings_waits_for_it(state):
    db, audit = state
    arrivals = Arrivals()
    add_instance(db, "1.1", "1.1.1", age_s=0)
    add_instance(db, "1.1", "1.1.2", age_s=0)
    arrivals.stored("a", "1.1")
    arrivals.stored("b", "1.1")
    arrivals.released("b")
    scheduler_with(db, audit, arrivals).tick()
    assert jobs(db) == []  # "a" is still sending the study
    arrivals.released("a")
    scheduler_with(db, audit, arrivals).tick()
    [job] = jobs(db)
    assert instance_ids(db, job) == {"1.1.1", "1.1.2"}  # one job, not two


def test_an_aborted_association_completes_nothing_and_the_quiet_period_does(state):
    db, audit = state
    arrivals = Arrivals()
    add_instance(db, "1.1", "1.1.1", age_s=2)
    arrivals.stored("a", "1.1")
    arrivals.ended("a")
    scheduler_with(db, audit, arrivals, quiet_s=60).tick()
    assert jobs(db) == []
    scheduler_with(db, audit, arrivals, quiet_s=1).tick()
    assert len(jobs(db)) == 1


def test_a_study_that_never_goes_quiet_is_forced_complete(state):
    db, audit = state
    arrivals = Arrivals()
    add_instance(db, "1.1", "1.1.1", age_s=30)
    add_instance(db, "1.1", "1.1.2", age_s=0)  # still arriving: never quiet for a minute
    arrivals.stored("a", "1.1")  # its association is still open
    scheduler_with(db, audit, arrivals, force_s=None).tick()
    assert jobs(db) == []
    scheduler_with(db, audit, arrivals, force_s=20).tick()
    [job] = jobs(db)
    assert instance_ids(db, job) == {"1.1.1", "1.1.2"}


def test_the_scp_reports_released_studies_and_not_aborted_ones(start_scp, tmp_path):
    scp = start_scp()
    for study, end in (("1.2.3.1", "release"), ("1.2.3.2", "abort")):
        write_cr(tmp_path / f"{study}.dcm", study_uid=study)
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
        assert int(assoc.send_c_store(tmp_path / f"{study}.dcm").Status) == 0
        getattr(assoc, end)()
    wait_for(lambda: scp.active_associations() == 0, 10, "both associations to end")
    assert set(scp.arrivals.due(timedelta(0))) == {"1.2.3.1"}


def test_serve_queues_a_study_when_its_association_is_released(node_factory, tmp_path):
    """The quiet period set to a minute: the job is there long before it, made on the release."""
    node = node_factory({"scheduler": {"study_quiet_seconds": 60, "release_grace_s": 0.3}}).start()
    study = str(generate_uid())
    for index in range(3):
        write_cr(tmp_path / "study" / f"{index}.dcm", study_uid=study, seed=index)
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "+sd", "127.0.0.1",
                    str(node.port), str(tmp_path / "study"))
    assert sent.returncode == 0, sent.stderr
    [job] = wait_for(lambda: node.jobs(study), 30, "the study's job, made on the release")
    assert len(node.rows(Instance, Instance.job_id == job.id)) == 3
    assert "Queued job %d for study %s (3 instances, released)" % (job.id, study) in node.log.read_text()


def test_a_study_is_complete_once_its_routes_expected_series_have_arrived(state, tmp_path):
    db, audit = state
    router = Router([Route(name="chest-pa-lat", pipelines=["chest_xray"], expected_series=[
        {"tags": [{"tag": "ViewPosition", "equals": ["PA"]}]},
        {"tags": [{"tag": "ViewPosition", "equals": ["LL", "RL"]}]}])], "chest_xray", [])
    scheduler = Scheduler(db, audit, Broker().publish, quiet_seconds=60, poll_seconds=1, router=router)

    def arrive(name: str, view: str) -> None:
        path = tmp_path / f"{name}.dcm"
        ds = write_cr(path, study_uid="1.9", sop_uid=f"1.9.{name}", series_uid=f"1.9.{name}.1")
        ds.ViewPosition = view
        ds.save_as(path, enforce_file_format=True)
        with db.session() as session:
            session.add(Instance(sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                                 study_instance_uid="1.9", series_instance_uid=ds.SeriesInstanceUID,
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(path), size_bytes=1,
                                 calling_ae="PACS"))

    arrive("1", "PA")
    scheduler.tick()
    assert jobs(db) == []  # the lateral has not arrived, and the study is not quiet
    arrive("2", "LL")
    scheduler.tick()
    [job] = jobs(db)
    assert instance_ids(db, job) == {"1.9.1", "1.9.2"}


def test_a_worker_publishes_what_it_queues_as_its_transaction_commits(state):
    """The fast path: a message due now goes to the broker at commit, not at the scheduler's next tick;
    one the broker refuses, or one due later, stays in the outbox for the scheduler."""
    db, _ = state
    broker = Broker()
    db.publish_at_commit(broker.publish)
    with db.session() as session:
        queue_message(session, Task.DELIVER, 7)
        queue_message(session, Task.DELIVER, 8, not_before=utcnow() + timedelta(minutes=5))
        assert broker.sent == []  # not before the commit
    assert broker.sent == [("deliver", 7)]
    broker.up = False
    with db.session() as session:
        queue_message(session, Task.DELIVER, 9)
    with db.session() as session:
        unpublished = session.scalars(select(OutboxMessage.target_id).where(OutboxMessage.published_at.is_(None)))
        assert sorted(unpublished) == [8, 9]
    with pytest.raises(RuntimeError), db.session() as session:  # a rolled-back transaction publishes nothing
        queue_message(session, Task.DELIVER, 10)
        raise RuntimeError("rolled back")
    assert broker.sent == [("deliver", 7)]
