"""The audit trail against someone who can write audit.db but lacks the key, and against
patient data in exception text: real `serve` runs, real SQLite files edited with sqlite3."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from sqlalchemy import create_engine, text

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.audit.chain import verify_chain
from dicom_node.audit.failures import failure_text, traceback_text
from dicom_node.audit.keys import AuditKeys
from dicom_node.audit.store import GENESIS_HASH, events, make_audit_engine, pseudonyms, upgrade_schema
from dicom_node.audit.trail import audit_secret
from dicom_node.config import load_settings
from dicom_node.db import JobStatus
from pipelines.errors import InputError
from tests.audit_fixtures import insert_chained_starts
from tests.conftest import NodeProcess, dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import TEST_PATIENT_ID, TEST_PATIENT_NAME, write_cr, write_rg1_study

pytestmark = pytest.mark.slow

MALFORMED_BIRTH_DATE = "01.02.1970"
WINDOW_CENTER = 0x00281050
TRUNCATE_AND_REWIND = (
    "DELETE FROM audit_events WHERE id > (SELECT MAX(id) - 3 FROM audit_events); "
    "UPDATE audit_chain SET head_id = (SELECT MAX(id) FROM audit_events), "
    "head_hash = (SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1)")


def edit(database: Path, sql: str) -> None:
    """Change ``database`` as an attacker would: with the sqlite3 tool."""
    subprocess.run(["sqlite3", str(database), sql], check=True, timeout=30)


def verify(node: NodeProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(node.config),
                           "audit", "verify"], capture_output=True, text=True, timeout=120)


def send(node: NodeProcess, *files: Path) -> None:
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                    "127.0.0.1", str(node.port), *map(str, files))
    assert sent.returncode == 0, sent.stderr


def finished_job(node: NodeProcess, study: str, timeout: float = 120):
    return wait_for(lambda: next((j for j in node.jobs(study) if j.status.finished), None),
                    timeout, "the study's job to finish")


def test_deleting_the_newest_rows_and_rewinding_the_head_fails_verify(node_factory, tmp_path):
    node = node_factory().start()
    skipped = write_cr(tmp_path / "hand.dcm", body_part="HAND")  # the gate skips it: quick
    send(node, tmp_path / "hand.dcm")
    finished_job(node, skipped.StudyInstanceUID)
    assert node.stop() == 0
    intact = verify(node)
    assert intact.returncode == 0 and "audit trail intact" in intact.stdout, intact.stderr
    audit_db = node.state_dir / "audit.db"
    rows_before = sqlite3.connect(audit_db).execute("SELECT MAX(id) FROM audit_events").fetchone()[0]

    edit(audit_db, TRUNCATE_AND_REWIND)
    cut = verify(node)
    assert cut.returncode == 1, cut.stdout
    assert (f"BROKEN row {rows_before - 3}: chain head not signed by the key: rows after it "
            "may have been deleted at the end of the chain") in cut.stderr
    # verify's own audit row did not heal the cut: it went after a CHAIN_HEAD_UNSIGNED row
    again = verify(node)
    assert again.returncode == 1
    assert (f"BROKEN row {rows_before - 2}: appended to a chain head not signed by the key: "
            f"rows after row {rows_before - 3} may have been deleted") in again.stderr


def test_key_file_outside_the_state_folder(node_factory, tmp_path):
    key_file = tmp_path / "keys" / "audit.key"
    key_file.parent.mkdir()
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o600)
    node = node_factory({"audit": {"secret": None, "key_file": str(key_file)}}).start()
    assert node.stop() == 0
    assert not (node.state_dir / "audit.key").exists()
    intact = verify(node)
    assert intact.returncode == 0, intact.stderr

    key_file.write_text(os.urandom(32).hex())  # someone forges with a key of their own
    forged = verify(node)
    assert forged.returncode == 1
    assert "BROKEN row 1: row was altered (hash mismatch)" in forged.stderr
    assert "chain head not signed by the key" in forged.stderr


def test_a_configured_key_file_that_is_missing_stops_serve(node_factory, tmp_path):
    key_file = tmp_path / "keys" / "audit.key"
    node = node_factory({"audit": {"secret": None, "key_file": str(key_file)}})
    with pytest.raises(pytest.fail.Exception, match="serve exited with 1"):
        node.start()
    assert f"the audit key file {key_file} (audit.key_file) does not exist" in node.log.read_text()
    assert not key_file.exists() and not (node.state_dir / "audit.key").exists()


def test_no_patient_data_from_malformed_attributes_reaches_the_databases(node_factory, tmp_path):
    """A malformed birth date (highdicom quoted it: ``Unable to convert '01.02.1970' to 'DA'``)
    and a WindowCenter holding the patient ID (a malformed DS; Python quoted it: ``could not
    convert string to float: 'PID-...'``): the image is analysed, the window ignored, and
    neither value reaches a row or the log."""
    node = node_factory().start()
    ds = write_rg1_study(tmp_path / "rg1.dcm", PatientBirthDate=MALFORMED_BIRTH_DATE,
                         PatientName=TEST_PATIENT_NAME, PatientID=TEST_PATIENT_ID)
    ds[WINDOW_CENTER] = RawDataElement(Tag(WINDOW_CENTER), "DS", len(TEST_PATIENT_ID),
                                       TEST_PATIENT_ID.encode(), 0, True, True)
    ds.save_as(tmp_path / "rg1.dcm")
    send(node, tmp_path / "rg1.dcm")
    job = finished_job(node, ds.StudyInstanceUID, timeout=300)
    assert node.stop() == 0
    assert job.status is JobStatus.DONE, job.reason

    for name in ("audit.db", "node.db"):
        connection = sqlite3.connect(node.state_dir / name)
        dump = "\n".join(connection.iterdump())
        connection.close()
        for secret in (MALFORMED_BIRTH_DATE, TEST_PATIENT_NAME, TEST_PATIENT_ID):
            assert secret not in dump, f"{secret!r} in {name}"
    log = node.log.read_text()
    for secret in (MALFORMED_BIRTH_DATE, TEST_PATIENT_NAME, TEST_PATIENT_ID):
        assert secret not in log, f"{secret!r} in the log"


def test_a_library_error_is_described_by_its_type_and_a_fixed_text():
    """What the analyzer stores and logs for an unexpected error: the type and our own text,
    the traceback's frames without the library's message; the node's own errors as they are."""
    try:
        try:
            float(TEST_PATIENT_ID)
        except ValueError as cause:
            raise RuntimeError(f"wrapping {TEST_PATIENT_ID}") from cause
    except RuntimeError as error:
        stored = failure_text(error, "unexpected error in the pipeline")
        logged = traceback_text(error)
    assert stored == "RuntimeError: unexpected error in the pipeline"
    assert TEST_PATIENT_ID not in logged and "float(TEST_PATIENT_ID)" in logged
    assert "ValueError: (message withheld" in logged and "RuntimeError: (message withheld" in logged
    assert failure_text(InputError("no lungs found"), "x") == "InputError: no lungs found"


def legacy_store(path: Path, secret: bytes, rows: int) -> None:
    """Write an audit store as the node wrote it before the head was keyed: no head_mac, a
    chain starting from zeros."""
    engine = create_engine(f"sqlite:///{path}")
    keys = AuditKeys(secret)
    with engine.begin() as connection:
        events.create(connection)
        pseudonyms.create(connection)
        connection.execute(text(
            "CREATE TABLE audit_chain (id INTEGER PRIMARY KEY, head_id INTEGER NOT NULL, "
            "head_hash VARCHAR(64) NOT NULL, anchor_id INTEGER NOT NULL, "
            "anchor_hash VARCHAR(64) NOT NULL)"))
        previous = insert_chained_starts(connection, keys, GENESIS_HASH, rows)
        connection.execute(text(
            "INSERT INTO audit_chain VALUES (1, :id, :hash, 0, :genesis)"),
            {"id": rows, "hash": previous, "genesis": GENESIS_HASH})
    engine.dispose()


def upgrade(path: Path) -> None:
    """Bring the store's schema to the newest revision, as `dicom-node db upgrade` does."""
    engine = make_audit_engine(f"sqlite:///{path}")
    upgrade_schema(engine)
    engine.dispose()


def test_a_store_of_the_previous_version_is_keyed_at_open(tmp_path, caplog):
    path = tmp_path / "audit.db"
    legacy_store(path, b"secret", 5)
    upgrade(path)  # adds head_mac, which the trail fills in at open
    with caplog.at_level("WARNING"):
        trail = AuditTrail(f"sqlite:///{path}", b"secret")
    assert "audit chain head (row 5) keyed from now on" in caplog.text
    report = verify_chain(trail)
    assert report.ok and report.rows_checked == 6, report.problems
    trail.close()
    AuditTrail(f"sqlite:///{path}", b"secret").close()  # keyed once, not again
    assert sqlite3.connect(path).execute(
        "SELECT COUNT(*) FROM audit_events WHERE event = 'chain-head-keyed'").fetchone() == (1,)

    edit(path, TRUNCATE_AND_REWIND)
    assert not verify_chain(AuditTrail(f"sqlite:///{path}", b"secret")).ok


def test_removing_the_head_mac_does_not_pass_for_an_old_store(tmp_path):
    path = tmp_path / "audit.db"
    trail = AuditTrail(f"sqlite:///{path}", b"secret")
    for number in range(6):
        trail.record(AuditEvent.NODE_STARTED, actor="host", detail=f"start {number}")
    trail.close()
    edit(path, f"{TRUNCATE_AND_REWIND}; ALTER TABLE audit_chain DROP COLUMN head_mac; "
         "DROP TABLE audit_export_cursors; UPDATE audit_alembic_version SET version_num = 'audit_0001'")
    upgrade(path)  # adds head_mac again, empty
    report = verify_chain(AuditTrail(f"sqlite:///{path}", b"secret"))
    assert [str(p) for p in report.problems] == [
        "row 3: chain head not signed by the key: rows after it may have been deleted at the "
        "end of the chain"]


def test_key_file_permissions_are_checked_and_the_secret_setting_wins(tmp_path, caplog):
    key_file = tmp_path / "audit.key"
    key_file.write_text("k" * 64)
    key_file.chmod(0o644)
    settings = load_settings(state_dir=tmp_path / "state", audit={"key_file": str(key_file)})
    with caplog.at_level("WARNING"):
        assert audit_secret(settings) == b"k" * 64
    assert f"the audit key {key_file} is readable by others (mode 0644)" in caplog.text
    caplog.clear()
    key_file.chmod(0o600)
    audit_secret(settings)
    assert "readable" not in caplog.text
    key_file.unlink()
    assert audit_secret(load_settings(state_dir=tmp_path / "state", audit={
        "key_file": str(key_file), "secret": "s3cret"})) == b"s3cret"
    assert not (tmp_path / "state" / "audit.key").exists()
