"""A job whose results do not fit on the disk fails cleanly and runs again when there is room."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.analysis import Analyzer
from dicom_node.audit import AuditTrail
from dicom_node.db import Delivery, Instance, Job, JobStatus, NodeDatabase, OutboxMessage, utcnow
from dicom_node.config import DimseDestination
from dicom_node.routing import Router
from pipelines.chest_xray.pipeline import ChestXrayPipeline
from pipelines.chest_xray.plugin import ChestXrayPlugin
from tests.conftest import dcmtk_tool, run_tool, sample_file, wait_for
from tests.test_pipeline import MANIFEST


@pytest.fixture
def small_results_disk(tmp_path, mount_tmpfs):
    """A 4 MiB tmpfs as the results folder (an SC of RG1 alone is 10 MiB)."""
    return mount_tmpfs(tmp_path / "results", "4m")


def test_a_full_results_disk_defers_the_job_until_there_is_room(small_results_disk, tmp_path):
    source = tmp_path / "rg1.dcm"
    shutil.copy(sample_file("RG1_UNCR.dcm"), source)
    ds = dcmread(source, stop_before_pixels=True)
    db = NodeDatabase(f"sqlite:///{tmp_path / 'node.db'}")
    audit = AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}", b"secret")
    with db.session() as session:
        job = Job(study_instance_uid=ds.StudyInstanceUID, status=JobStatus.QUEUED)
        session.add(job)
        session.flush()
        session.add(Instance(sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                             study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                             transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(source),
                             size_bytes=source.stat().st_size, calling_ae="TESTSCU", job_id=job.id))
        job_id = job.id
    pipeline = ChestXrayPipeline.from_manifest(MANIFEST, device="cpu")
    destination = DimseDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=11113)
    analyzer = Analyzer(db, audit, {"chest_xray": (ChestXrayPlugin(), pipeline)},
                        Router([], "chest_xray", [destination]), small_results_disk, worker="test-worker")

    assert analyzer.run(job_id) is JobStatus.QUEUED
    with db.session() as session:
        job = session.get(Job, job_id)
        [instance] = session.scalars(select(Instance)).all()
        [message] = session.scalars(select(OutboxMessage).where(OutboxMessage.task == "analyze")).all()
        assert job.status is JobStatus.QUEUED and job.reason == "the results disk is full"
        assert instance.verdict is None  # decided when it runs again
        assert message.target_id == job_id and message.not_before > utcnow()
        assert session.scalars(select(Delivery)).all() == []
    assert not list(small_results_disk.rglob("*.partial"))
    events = [(e["event"], e["outcome"], e["detail"]) for e in audit_events(audit)]
    assert ("job-failed", "minor-failure", "the results disk is full; queued to run again") in events

    # Room again (the results folder back on the big disk): the same job completes.
    subprocess.run(["umount", "-l", str(small_results_disk)], check=True)
    assert analyzer.run(job_id) is JobStatus.DONE
    with db.session() as session:
        assert {d.kind for d in session.scalars(select(Delivery))} == {"sc", "seg", "sr"}
    audit.close()
    db.dispose()


def audit_events(audit: AuditTrail) -> list[dict[str, str]]:
    with audit.connect() as connection:
        rows = connection.exec_driver_sql("SELECT event, outcome, detail FROM audit_events ORDER BY id").all()
    return [{"event": e, "outcome": o, "detail": d} for e, o, d in rows]


@pytest.mark.slow
def test_serve_stops_cleanly_with_a_job_deferred_for_space_and_finishes_it_later(node_factory, mount_tmpfs, tmp_path):
    """Through ``serve``: the job deferred for a full results disk leaves no job running, SIGTERM
    exits 0, and once there is room the next ``serve`` finishes it without help."""
    node = node_factory()
    results = mount_tmpfs(node.state_dir / "results", "4m")
    node.start()
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                    str(node.port), str(sample_file("RG1_UNCR.dcm")))
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: (jobs := node.jobs()) and jobs[0].reason == "the results disk is full"
             and jobs[0].status is JobStatus.QUEUED, 180, "the job to be deferred for space")
    assert node.stop() == 0
    subprocess.run(["umount", "-l", str(results)], check=True)
    node.start()
    wait_for(lambda: node.jobs()[0].status is JobStatus.DONE, 240, "the deferred job to finish")
    assert node.stop() == 0
