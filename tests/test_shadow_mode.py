"""Shadow mode: a shadow route's results are written and kept, their deliveries held and nothing
sent, until ``dicom-node jobs release`` sends a job's, or those of the jobs finished in a time
range; the audit trail says which results were held and who released them. End to end through
`serve`, DCMTK's storescu sending and a pynetdicom SCP as the destination; retention on real files."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.audit import AuditEvent
from dicom_node.cli import main
from dicom_node.db import (
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    NodeDatabase,
)
from dicom_node.retention import sweep_data
from tests.audit_fixtures import make_node, patient_dataset, store_instance
from tests.conftest import NodeProcess, dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import write_mg
from tests.receiving_scp import ReceivingSCP

ROUTES = [{"name": "trial", "when": {"calling_ae": ["TRIAL"]}, "pipelines": ["bright"], "shadow": True},
          {"name": "live", "pipelines": ["bright"]}]
HELD_DETAIL = "held: its route runs in shadow mode (route trial)"


def _analysed(node: NodeProcess, folder: Path, calling_ae: str) -> Job:
    """Send a new one-image MG study from ``calling_ae`` with storescu; return its job once finished."""
    study = str(generate_uid())
    write_mg(folder / f"{study}.dcm", study)
    sent = run_tool(dcmtk_tool("storescu"), "-aet", calling_ae, "-aec", "DICOM_NODE", "127.0.0.1",
                    str(node.port), str(folder / f"{study}.dcm"))
    assert sent.returncode == 0, sent.stderr
    job = wait_for(lambda: (jobs := node.jobs(study)) and jobs[-1].status.finished and jobs[-1], 120,
                   f"the job of {study} to finish")
    assert job.status is JobStatus.DONE, job.reason
    return job


def _statuses(node: NodeProcess, job: Job) -> set[DeliveryStatus]:
    return {delivery.status for delivery in node.deliveries(job.id)}


def _events(node: NodeProcess, event: AuditEvent) -> list[dict[str, object]]:
    return json.loads(node.cli("audit", "list", "--event", event.value, "--format", "json"))


def _refused(node: NodeProcess, *args: str) -> str:
    """Run a CLI command that must fail; return what it said."""
    result = CliRunner().invoke(main, ["--config", str(node.config), *args])
    assert result.exit_code != 0, result.output
    return result.output


@pytest.mark.timeout(300)
def test_a_shadow_route_holds_its_results_until_jobs_release_sends_them(bright_installed, node_factory, tmp_path):
    pacs = ReceivingSCP("PACS").start()
    try:
        node = node_factory({
            "scp": {"allowed_peers": [{"ae_title": "STORESCU"}, {"ae_title": "TRIAL"}]},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
            "routes": ROUTES}).start()
        first, second = _analysed(node, tmp_path, "TRIAL"), _analysed(node, tmp_path, "TRIAL")
        live = _analysed(node, tmp_path, "STORESCU")
        wait_for(lambda: _statuses(node, live) == {DeliveryStatus.DELIVERED}, 60, "the live route's results sent")

        # Shadow: analysed and kept, nothing sent, audited as held.
        held = node.deliveries(first.id) + node.deliveries(second.id)
        assert len(held) == 6 and {d.status for d in held} == {DeliveryStatus.HELD}
        assert all(Path(d.path).is_file() for d in held)
        assert set(pacs.stored) == {d.sop_instance_uid for d in node.deliveries(live.id)}
        held_events = _events(node, AuditEvent.RESULT_HELD)
        assert sorted((e["job_id"], e["sop_uid"]) for e in held_events) == sorted(
            (d.job_id, d.sop_instance_uid) for d in held)
        assert {str(e["detail"]).split(" ", 3)[3] for e in held_events} == {HELD_DETAIL}
        listed = json.loads(node.cli("jobs", "list", "--status", "held", "--format", "json"))
        assert [(row["id"], row["deliveries"]) for row in listed] == [(second.id, {"held": 3}), (first.id, {"held": 3})]
        assert f"`dicom-node jobs release {first.id}` sends them" in node.cli("jobs", "show", str(first.id))
        assert "results are held (shadow mode)" in _refused(node, "jobs", "resend", str(first.id))

        # A date range of finish times: the first job's finish up to (not including) the second's.
        released = node.cli("jobs", "release", "--since", first.finished_at.isoformat(),
                            "--until", second.finished_at.isoformat())
        assert released.strip() == f"3 held deliveries of 1 job(s) released: {first.id}"
        wait_for(lambda: _statuses(node, first) == {DeliveryStatus.DELIVERED}, 60, "the first job's results sent")
        assert _statuses(node, second) == {DeliveryStatus.HELD}

        # One job by its id.
        assert node.cli("jobs", "release", str(second.id)).strip() == (
            f"3 held deliveries of 1 job(s) released: {second.id}")
        wait_for(lambda: _statuses(node, second) == {DeliveryStatus.DELIVERED}, 60, "the second job's results sent")
        assert "holds no results" in _refused(node, "jobs", "release", str(second.id))
        assert "either JOB_ID or --since" in _refused(node, "jobs", "release")

        released_events = _events(node, AuditEvent.RESULT_RELEASED)
        assert sorted((e["job_id"], e["sop_uid"]) for e in released_events) == sorted(
            (d.job_id, d.sop_instance_uid) for d in held)
        assert {(e["actor"], e["detail"].split(" ", 3)[3]) for e in released_events} == {
            (getpass.getuser(), "released by an administrator (jobs release)")}
    finally:
        pacs.stop()
    assert set(pacs.stored) == {d.sop_instance_uid for job in (first, second, live) for d in node.deliveries(job.id)}
    assert sum(pacs.received.values()) == 9  # each result sent once


def test_retention_purges_held_results_after_data_days_and_keeps_released_ones_until_sent(tmp_path):
    node = make_node(tmp_path)
    db = NodeDatabase(node.settings.node_database_url)
    long_ago = datetime.now(UTC) - timedelta(days=node.settings.retention.data_days + 1)
    spooled = {}
    for suffix, status in ((1, DeliveryStatus.HELD), (2, DeliveryStatus.PENDING)):
        ds = patient_dataset(sop_suffix=suffix)
        spooled[status], _ = store_instance(node, db, ds, finished_at=long_ago)
        with db.session() as session:
            job_id = session.scalar(select(Instance.job_id).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
            session.add(Delivery(job_id=job_id, source_sop_instance_uid=ds.SOPInstanceUID, destination="pacs",
                                 kind="sc", sop_instance_uid=f"2.25.{suffix}", path="sc.dcm", status=status))

    assert sweep_data(node.settings, node.trail, db).instances == 1
    assert not spooled[DeliveryStatus.HELD].exists() and spooled[DeliveryStatus.PENDING].exists()
    db.dispose()
