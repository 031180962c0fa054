"""The whole node as a PACS sees it: `serve` with its worker, DCMTK storescu in, results out.

RG1 (a frontal chest CR) is analysed and its SC, SEG and SR arrive at the
destination; RG3 (a CR of a leg) is stored, then skipped by the gate. Every step is
in the audit trail, in order, and no patient name or ID is in it or in the logs.
"""

from __future__ import annotations

import json
import urllib.request
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from dicom_node.db import DeliveryStatus, Job, JobStatus
from tests.conftest import dcmtk_tool, free_port, run_tool, sample_file, wait_for
from tests.receiving_scp import ReceivingSCP

pytestmark = pytest.mark.slow

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def pacs(tmp_path):
    scp = ReceivingSCP(folder=tmp_path / "pacs").start()
    yield scp
    scp.stop()


def study_uid(name: str) -> str:
    return str(dcmread(sample_file(name), stop_before_pixels=True).StudyInstanceUID)


def job_of(node, study: str) -> Job | None:
    jobs = node.jobs(study)
    return jobs[-1] if jobs else None


def all_delivered(node, job_id: int) -> bool:
    rows = node.deliveries(job_id)
    return len(rows) == 3 and all(d.status is DeliveryStatus.DELIVERED for d in rows)


def test_rg1_is_analysed_and_delivered_rg3_is_skipped(node_factory, pacs):
    ports = {name: free_port() for name in ("serve_port", "worker_port", "delivery_port")}
    node = node_factory({"destinations": [
        {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}], "metrics": ports})
    node.start()
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                    "127.0.0.1", str(node.port), str(sample_file("RG1_UNCI.dcm")),
                    str(sample_file("RG3_UNCI.dcm")))
    assert sent.returncode == 0, sent.stderr
    rg1, rg3 = study_uid("RG1_UNCI.dcm"), study_uid("RG3_UNCI.dcm")

    skipped = wait_for(lambda: (job := job_of(node, rg3)) and job.status.finished and job, 180,
                       "RG3's job to finish")
    assert skipped.status is JobStatus.SKIPPED
    assert "EXTREMITY" in skipped.reason

    job = wait_for(lambda: (job := job_of(node, rg1)) and job.status.finished and job, 300,
                   "RG1's job to finish")
    assert job.status is JobStatus.DONE, job.reason
    wait_for(lambda: all_delivered(node, job.id), 120, "SC, SEG and SR to be delivered")
    first_uids = set(pacs.stored)
    assert sorted(pacs.stored.values()) == sorted(
        [SECONDARY_CAPTURE, SEGMENTATION, COMPREHENSIVE_3D_SR])
    for uid in first_uids:
        received = dcmread(pacs.folder / f"{uid}.dcm")
        assert received.StudyInstanceUID == rg1
        assert received.SeriesDescription.startswith("AI CXR: ")

    # The audit trail tells the story of each study, in order.
    events = [e["event"] for e in json.loads(node.cli("audit", "list", "--study", rg1,
                                                 "--format", "json"))]
    assert events[:4] == ["instance-received", "job-queued", "job-started", "job-completed"]
    assert events[4:] == ["result-sent"] * 3
    events = [e["event"] for e in json.loads(node.cli("audit", "list", "--study", rg3,
                                                 "--format", "json"))]
    assert events == ["instance-received", "job-queued", "job-started", "job-skipped"]

    # Each process counts its own stages: serve the completed studies, the analysis worker the
    # jobs, the delivery worker the deliveries.
    metrics = {name: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
               for name, port in ports.items()}
    assert 'dicom_node_stage_seconds_count{stage="complete"} 2.0' in metrics["serve_port"]
    assert 'dicom_node_jobs_total{status="done"} 1.0' in metrics["worker_port"]
    assert 'dicom_node_deliveries_total{status="delivered"} 3.0' in metrics["delivery_port"]

    # Running the job again delivers the same three objects, replacing the first ones.
    node.cli("jobs", "retry", str(job.id))
    wait_for(lambda: sum(pacs.received.values()) == 6, 300, "the re-run's deliveries")
    assert set(pacs.received) == first_uids
    assert all(count == 2 for count in pacs.received.values())
    assert node.stop() == 0

    # No patient name or ID in the audit store or the logs.
    for secret in (b"CompressedSamples", b"9RG1", b"11RG3"):
        for path in [*node.state_dir.glob("audit.db*"), node.log]:
            assert secret not in path.read_bytes(), f"{secret!r} found in {path.name}"


def test_status_shows_the_node(node_factory):
    node = node_factory({"worker": {"embedded": False}}).start()
    report = json.loads(node.cli("status", "--format", "json"))
    assert report["broker_reachable"] is True
    assert report["free_disk_bytes"] > 0
    assert node.stop() == 0


def test_altered_weights_stop_the_start(node_factory, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(Path(__file__).resolve().parent.parent / "weights", weights)
    manifest = yaml.safe_load((weights / "manifest.yaml").read_text())
    altered = weights / manifest["lung"]["file"]
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    node = node_factory({"pipeline": {"manifest": str(weights / "manifest.yaml")}})
    result = subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(node.config),
                             "serve"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "weights file altered" in result.stderr and manifest["lung"]["file"] in result.stderr
    worker = subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(node.config),
                             "worker"], capture_output=True, text=True, timeout=120)
    assert worker.returncode == 1 and "weights file altered" in worker.stderr
