"""The audit trail as the SCP, the scheduler and the workers use it."""

from __future__ import annotations

import logging
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import Connection, event, func, select
from sqlalchemy.exc import OperationalError

from dicom_node.audit import AuditEvent, AuditTrail, Outcome
from dicom_node.audit import trail as trail_module
from dicom_node.audit.chain import verify_chain
from dicom_node.audit.store import events
from dicom_node.config import load_settings
from dicom_node.errors import AuditError
from tests.audit_fixtures import (
    ISSUER,
    PATIENT_ID,
    PATIENT_NAME,
    make_node,
    patient_dataset,
    record_reception,
)
from tests.conftest import dcmtk_tool
from tests.dicom_factory import write_cr


def count_events(trail: AuditTrail) -> int:
    with trail.connect() as connection:
        return connection.execute(select(func.count()).select_from(events)).scalar_one()


def test_every_event_maps_to_a_dicom_a5_event_id() -> None:
    assert AuditEvent.INSTANCE_RECEIVED.dicom_event_id == ("110104", "DCM",
                                                           "DICOM Instances Transferred")
    assert AuditEvent.AUDIT_QUERIED.dicom_event_id.value == "110101"
    assert AuditEvent.SUBJECT_ERASED.dicom_action == "D"
    assert all(event.dicom_event_id.scheme == "DCM" for event in AuditEvent)
    assert [o.dicom_indicator for o in Outcome] == [0, 4, 8, 12]
    assert AuditEvent("job-failed") is AuditEvent.JOB_FAILED


def test_pseudonym_is_stable_random_and_depends_on_the_issuer(tmp_path: Path) -> None:
    trail = make_node(tmp_path).trail
    first = trail.pseudonym(PATIENT_ID, ISSUER)
    assert first is not None and len(first) == 32
    assert trail.pseudonym(PATIENT_ID, ISSUER) == first
    assert trail.pseudonym(f" {PATIENT_ID} ", ISSUER) == first  # DICOM padding is not identity
    assert trail.pseudonym(PATIENT_ID, "OTHER-HOSPITAL") != first
    assert trail.pseudonym(PATIENT_ID) != first
    assert trail.pseudonym("") is None and trail.pseudonym(None) is None
    assert trail.lookup_pseudonym("never-seen") is None


def test_generated_key_and_store_are_private_and_reused(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    first = node.trail.pseudonym(PATIENT_ID)
    private = [node.settings.state_dir / name for name in ("audit.key", "audit.db", "audit.db-wal")]
    assert [stat.S_IMODE(path.stat().st_mode) for path in private] == [0o600] * 3
    node.trail.close()
    assert AuditTrail.from_settings(node.settings).pseudonym(PATIENT_ID) == first


def test_configured_secret_is_used_and_no_key_file_written(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, audit={"secret": "s3cret"})
    AuditTrail.from_settings(settings).record(AuditEvent.NODE_STARTED, actor="host")
    assert not (tmp_path / "audit.key").exists()


def test_record_stores_the_event_with_its_codes(tmp_path: Path) -> None:
    trail = make_node(tmp_path).trail
    trail.record("job-failed", outcome="serious-failure", actor="worker-1", job_id=7,
                 study_uid="1.2.3", detail="model error: shape mismatch")
    with trail.connect() as connection:
        row = connection.execute(select(events)).mappings().one()
    assert (row["event"], row["event_id"], row["outcome"], row["job_id"]) == (
        "job-failed", "110103", "serious-failure", 7)
    assert row["time"].tzinfo is not None and len(row["hash"]) == 64
    with pytest.raises(ValueError):
        trail.record("instance-teleported")


def test_disabled_trail_records_nothing(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, audit={"enabled": False}, acknowledged_risks=["audit-disabled"])
    trail = AuditTrail.from_settings(settings)
    assert trail.pseudonym(PATIENT_ID) is None
    trail.record(AuditEvent.INSTANCE_RECEIVED, actor="PACS")
    trail.close()
    assert not (tmp_path / "audit.db").exists() and not (tmp_path / "audit.key").exists()


def test_patient_name_and_id_are_stored_nowhere(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    node = make_node(tmp_path)
    for number in range(1, 4):
        record_reception(node.trail, patient_dataset(sop_suffix=number))
    node.cli("audit", "list", "--patient", "--issuer", ISSUER, input=f"{PATIENT_ID}\n")
    node.cli("audit", "subject", "export", "--issuer", ISSUER, input=f"{PATIENT_ID}\n")
    stored = b"".join(path.read_bytes() for path in node.settings.state_dir.glob("audit.db*"))
    assert len(list(node.settings.state_dir.glob("audit.db-wal"))) == 1
    assert count_events(node.trail) == 8
    for secret in (PATIENT_ID, PATIENT_NAME, "Testperson", "Jolanda", "19610203"):
        for encoding in ("ascii", "utf-16-le"):
            assert secret.encode(encoding) not in stored, secret
        assert secret not in caplog.text, secret


def test_append_takes_about_a_millisecond(tmp_path: Path) -> None:
    trail = make_node(tmp_path).trail
    pseudonym = trail.pseudonym(PATIENT_ID)
    trail.record(AuditEvent.NODE_STARTED)  # warm the connection pool
    count = 300
    started = time.perf_counter()
    for number in range(count):
        trail.record(AuditEvent.INSTANCE_RECEIVED, actor="PACS", remote="10.0.0.1",
                     pseudonym=pseudonym, study_uid="1.2.3", sop_uid=f"1.2.3.{number}")
    per_append_ms = (time.perf_counter() - started) / count * 1000
    assert per_append_ms < 5, f"{per_append_ms:.2f} ms per append"  # ~0.35 ms unloaded


def test_appends_are_short_transactions_on_one_held_connection(tmp_path: Path) -> None:
    trail = AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}", b"secret")
    statements: list[str] = []
    checkouts: list[object] = []
    event.listen(trail.engine, "connect", lambda dbapi_connection, _record:
                 dbapi_connection.set_trace_callback(statements.append))
    event.listen(trail.engine, "checkout", lambda *args: checkouts.append(args))
    trail.engine.dispose()  # connections opened from here on are traced
    for number in range(3):
        trail.record(AuditEvent.INSTANCE_RECEIVED, actor="PACS", sop_uid=f"1.2.3.{number}")
    assert len(checkouts) == 1  # the writer connection is held, not taken from the pool each time
    # Each event: take the lock, read the head, insert, move the head, commit; nothing else.
    assert [statement.split()[0] for statement in statements] == [
        "BEGIN", "SELECT", "INSERT", "UPDATE", "COMMIT"] * 3
    assert statements[0] == "BEGIN IMMEDIATE"
    assert verify_chain(trail).ok


def test_write_retries_while_locked_then_gives_up(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trail_module, "FIRST_BACKOFF_S", 0)
    trail = make_node(tmp_path).trail
    locked = OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked"))
    attempts: list[int] = []

    def busy_twice(connection: Connection) -> str:
        attempts.append(1)
        if len(attempts) <= 2:
            raise locked
        return "written"

    def always_busy(connection: Connection) -> None:
        raise locked

    assert trail.write(busy_twice) == "written" and len(attempts) == 3
    with pytest.raises(AuditError, match="cannot be written"):
        trail.write(always_busy)


def test_unopenable_store_raises_audit_error(tmp_path: Path) -> None:
    (tmp_path / "audit.db").write_text("not a database")
    with pytest.raises(AuditError, match="cannot open the audit store"):
        AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}", b"secret")


def test_the_scp_looks_a_patient_up_once_per_association(start_scp, tmp_path, monkeypatch) -> None:
    scp = start_scp()
    lookups: list[str] = []
    pseudonym = scp.audit.pseudonym
    monkeypatch.setattr(scp.audit, "pseudonym", lambda patient_id, issuer=None: (
        lookups.append(patient_id) or pseudonym(patient_id, issuer)))
    first = [write_cr(tmp_path / "first" / f"{n}.dcm", patient_id="PAT-A") for n in range(3)]
    write_cr(tmp_path / "first" / "other.dcm", patient_id="PAT-B")
    write_cr(tmp_path / "second" / "0.dcm", patient_id="PAT-A")

    for folder in ("first", "second"):
        subprocess.run([dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "+sd",
                        "127.0.0.1", str(scp.port), str(tmp_path / folder)], check=True, timeout=60)

    assert sorted(lookups) == ["PAT-A", "PAT-A", "PAT-B"]  # once per patient and association
    with scp.audit.connect() as connection:
        received = dict(connection.execute(
            select(events.c.sop_uid, events.c.pseudonym)
            .where(events.c.event == AuditEvent.INSTANCE_RECEIVED.value)).all())
    assert len(received) == 5
    assert len({received[ds.SOPInstanceUID] for ds in first}) == 1
    assert received[first[0].SOPInstanceUID] == pseudonym("PAT-A")
