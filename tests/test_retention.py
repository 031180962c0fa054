"""Retention: spooled images and results go after ``data_days``; audit events after their age."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_node.audit.chain import verify_chain
from dicom_node.db import Instance, NodeDatabase
from dicom_node.retention import purge_audit, sweep, sweep_data
from tests.audit_fixtures import make_node, patient_dataset, record_reception, store_instance


def test_sweep_deletes_only_data_whose_job_finished_long_enough_ago(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    db = NodeDatabase(node.settings.node_database_url)
    now = datetime.now(UTC)
    old = store_instance(node, db, patient_dataset(sop_suffix=1),
                         finished_at=now - timedelta(days=31))
    recent = store_instance(node, db, patient_dataset(sop_suffix=2),
                            finished_at=now - timedelta(days=29))
    waiting = store_instance(node, db, patient_dataset(sop_suffix=3))  # no job yet

    removed = sweep_data(node.settings, node.trail, db, now=now)
    assert (removed.instances, removed.files, removed.result_folders) == (1, 1, 1)
    assert not old[0].exists() and not old[1].exists()
    assert all(path.exists() for path in (*recent, *waiting))
    with db.session() as session:
        assert session.query(Instance).count() == 2
    purged = node.cli_json("audit", "list", "--event", "data-purged")
    assert [row["sop_uid"] for row in purged] == [patient_dataset(sop_suffix=1).SOPInstanceUID]
    assert purged[0]["pseudonym"] == node.trail.lookup_pseudonym(
        patient_dataset().PatientID, patient_dataset().IssuerOfPatientID)
    assert sweep_data(node.settings, node.trail, db, now=now).instances == 0
    db.dispose()


def test_sweep_with_retention_off_keeps_everything(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    node.settings.retention.data_days = None
    node.settings.retention.audit_days = None
    db = NodeDatabase(node.settings.node_database_url)
    spooled, _ = store_instance(node, db, patient_dataset(),
                                finished_at=datetime.now(UTC) - timedelta(days=9999))
    record_reception(node.trail, patient_dataset())
    sweep(node.settings, node.trail, db)
    assert spooled.exists() and verify_chain(node.trail).rows_checked == 2
    db.dispose()


def test_purge_audit_keeps_recent_events_and_a_verifiable_chain(tmp_path: Path) -> None:
    trail = make_node(tmp_path).trail
    record_reception(trail, patient_dataset())  # rows 1-2
    later = datetime.now(UTC) + timedelta(days=10)
    assert purge_audit(trail, timedelta(days=1), actor="admin") == 0
    assert purge_audit(trail, timedelta(days=1), actor="admin", now=later) == 3
    report = verify_chain(trail)
    assert report.ok and (report.first_id, report.rows_checked) == (4, 1)
    with pytest.raises(ValueError):
        purge_audit(trail, timedelta(0), actor="admin")
