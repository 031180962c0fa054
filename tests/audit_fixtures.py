"""Shared helpers of the audit, subject and retention tests: a node state folder, a patient,
and the CLI driven the way an administrator runs it (``dicom-node -c FILE audit ...``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from click.testing import CliRunner, Result
from pydicom import Dataset

from sqlalchemy import Connection

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.audit.keys import AuditKeys
from dicom_node.audit.store import events
from dicom_node.cli import main
from dicom_node.config import Settings, load_settings
from dicom_node.db import Instance, Job, JobStatus, NodeDatabase

PATIENT_NAME = "Testperson^Jolanda^Quirina"
PATIENT_ID = "PID-4711-ZQX"
ISSUER = "HOSPITAL-A"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1001.1"


@dataclass
class Node:
    """A node's state folder with its config file, settings and audit trail."""

    config: Path
    settings: Settings
    trail: AuditTrail

    def cli(self, *args: str, input: str | None = None) -> Result:
        """Run ``dicom-node -c <config> <args>`` in-process; return click's result."""
        return CliRunner().invoke(main, ["-c", str(self.config), *args], input=input)

    def cli_json(self, *args: str, input: str | None = None) -> list[dict[str, object]]:
        result = self.cli(*args, "--format", "json", input=input)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)


def make_node(tmp_path: Path) -> Node:
    """Return a node whose state lives in ``tmp_path/state``, configured by a YAML file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))
    settings = load_settings(config)
    return Node(config, settings, AuditTrail.from_settings(settings))


def patient_dataset(patient_id: str = PATIENT_ID, name: str = PATIENT_NAME,
                    sop_suffix: int = 1) -> Dataset:
    """Return the header of a chest radiograph of a named patient."""
    ds = Dataset()
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = ISSUER
    ds.PatientBirthDate = "19610203"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.SOPInstanceUID = f"{SERIES_UID}.{sop_suffix}"
    return ds


def record_reception(trail: AuditTrail, ds: Dataset, *, calling_ae: str = "PACS") -> str | None:
    """Record what the SCP records for one received instance; return the pseudonym used."""
    pseudonym = trail.pseudonym(ds.PatientID, ds.get("IssuerOfPatientID"))
    trail.record(AuditEvent.ASSOCIATION_ACCEPTED, actor=calling_ae, remote="127.0.0.1")
    trail.record(AuditEvent.INSTANCE_RECEIVED, actor=calling_ae, remote="127.0.0.1",
                 pseudonym=pseudonym, study_uid=ds.StudyInstanceUID,
                 series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
                 detail="status 0x0000")
    return pseudonym


def store_instance(node: Node, db: NodeDatabase, ds: Dataset, *,
                   finished_at: datetime | None = None) -> tuple[Path, Path]:
    """Spool ``ds`` with its results folder and rows; return (spooled file, results folder).

    With ``finished_at``, the instance belongs to a job that finished then.
    """
    settings = node.settings
    pseudonym = node.trail.pseudonym(ds.PatientID, ds.get("IssuerOfPatientID"))
    spooled = (settings.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
               / f"{ds.SOPInstanceUID}.dcm").resolve()
    spooled.parent.mkdir(parents=True, exist_ok=True)
    spooled.write_bytes(b"\0" * 128 + b"DICM")
    results = settings.results_dir / ds.StudyInstanceUID / ds.SOPInstanceUID
    results.mkdir(parents=True, exist_ok=True)
    (results / "findings.json").write_text("{}")
    with db.session() as session:
        job = None
        if finished_at is not None:
            job = Job(study_instance_uid=ds.StudyInstanceUID, status=JobStatus.DONE,
                      finished_at=finished_at)
            session.add(job)
            session.flush()
        session.add(Instance(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(spooled), size_bytes=132,
            calling_ae="PACS", patient_pseudonym=pseudonym, received_at=datetime.now(UTC),
            job_id=job.id if job else None))
    return spooled, results


def insert_chained_starts(connection: Connection, keys: AuditKeys, previous: str, count: int) -> str:
    """Insert ``count`` node-started rows (ids 1..count) chained from ``previous``, as a node of
    an earlier version wrote them; return the last row's hash."""
    for number in range(1, count + 1):
        row = {"id": number, "time": datetime(2026, 1, 1, tzinfo=UTC), "event": "node-started",
               "event_id": "110100", "outcome": "success", "actor": "host", "remote": None,
               "pseudonym": None, "study_uid": None, "series_uid": None, "sop_uid": None,
               "job_id": None, "detail": f"start {number}"}
        previous = keys.chain_hash(previous, row)
        connection.execute(events.insert().values(**row, hash=previous))
    return previous
