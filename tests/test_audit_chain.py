"""Tamper evidence: ``dicom-node audit verify`` against rows edited with the sqlite3 tool."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_node.audit import AuditEvent
from dicom_node.audit.chain import purge_before, verify_chain
from tests.audit_fixtures import Node, make_node, patient_dataset, record_reception


@pytest.fixture
def node(tmp_path: Path) -> Node:
    node = make_node(tmp_path)
    for number in range(1, 6):  # rows 1-10
        record_reception(node.trail, patient_dataset(sop_suffix=number))
    node.trail.close()
    return node


def sqlite3(node: Node, sql: str) -> None:
    subprocess.run(["sqlite3", str(node.settings.state_dir / "audit.db"), sql], check=True)


def test_untouched_store_verifies(node: Node) -> None:
    result = node.cli("audit", "verify")
    assert result.exit_code == 0, result.output
    assert "intact: 10 events verified (rows 1-10)" in result.output


@pytest.mark.parametrize("sql", [
    "UPDATE audit_events SET detail = 'status 0xA700' WHERE id = 4",
    "UPDATE audit_events SET actor = 'OTHER_AE' WHERE id = 4",
    "UPDATE audit_events SET time = '2020-01-01 00:00:00.000000' WHERE id = 4",
    "UPDATE audit_events SET pseudonym = NULL WHERE id = 4",
    "UPDATE audit_events SET hash = (SELECT hash FROM audit_events WHERE id = 3) WHERE id = 4",
])
def test_edited_row_is_named(node: Node, sql: str) -> None:
    sqlite3(node, sql)
    result = node.cli("audit", "verify")
    assert result.exit_code == 1
    assert "row 4: row was altered" in result.output
    assert "first bad row 4" in result.output


@pytest.mark.parametrize(("row", "message"), [
    (1, "row 1: row 1 deleted (the next row is 2)"),
    (6, "row 6: row 6 deleted (the next row is 7)"),
    (10, "row 10: row 10 deleted at the end of the chain"),
])
def test_deleted_row_is_named(node: Node, row: int, message: str) -> None:
    sqlite3(node, f"DELETE FROM audit_events WHERE id = {row}")
    result = node.cli("audit", "verify")
    assert result.exit_code == 1
    assert message in result.output
    assert f"first bad row {row}" in result.output


def test_verification_is_itself_audited(node: Node) -> None:
    node.cli("audit", "verify")
    last = node.cli_json("audit", "list", "--limit", "1")[0]
    assert last["event"] == AuditEvent.AUDIT_QUERIED
    assert last["detail"] == "verify: 10 rows, 0 problems"


def test_purged_chain_verifies_from_the_first_kept_row(tmp_path: Path) -> None:
    fresh = make_node(tmp_path)
    for number in range(1, 4):
        record_reception(fresh.trail, patient_dataset(sop_suffix=number))  # rows 1-6
    cutoff = datetime.now(UTC)
    record_reception(fresh.trail, patient_dataset(sop_suffix=4))  # rows 7-8
    assert purge_before(fresh.trail, cutoff, actor="admin") == 6
    report = verify_chain(fresh.trail)
    assert report.ok, report.problems
    assert (report.first_id, report.last_id) == (7, 9)  # 9: the DATA_PURGED event

    fresh.trail.close()
    sqlite3(fresh, "DELETE FROM audit_events WHERE id = 7")
    result = fresh.cli("audit", "verify")
    assert result.exit_code == 1 and "row 7: row 7 deleted" in result.output


def test_purge_command_keeps_the_chain_verifiable(node: Node) -> None:
    result = node.cli("audit", "purge", "--older-than", "3650d")
    assert result.exit_code == 0, result.output
    assert "deleted 0 audit events older than 3650 days" in result.output
    assert node.cli("audit", "verify").exit_code == 0


def test_moved_anchor_is_detected(tmp_path: Path) -> None:
    fresh = make_node(tmp_path)
    record_reception(fresh.trail, patient_dataset())  # rows 1-2
    assert purge_before(fresh.trail, datetime.now(UTC), actor="admin") == 2  # DATA_PURGED: 3
    record_reception(fresh.trail, patient_dataset(sop_suffix=2))  # rows 4-5
    fresh.trail.close()
    # Someone hides rows 3-4 by pretending a purge took them.
    sqlite3(fresh, "UPDATE audit_chain SET anchor_id = 4, anchor_hash = "
                   "(SELECT hash FROM audit_events WHERE id = 4); "
                   "DELETE FROM audit_events WHERE id <= 4")
    result = fresh.cli("audit", "verify")
    assert result.exit_code == 1
    assert "row 4: the chain anchor is not the one a purge recorded" in result.output


def test_purge_rejects_a_bad_age(node: Node) -> None:
    for age in ("0d", "ten years", "-5d"):
        result = node.cli("audit", "purge", "--older-than", age)
        assert result.exit_code == 2, age


def test_purge_of_nothing_old_deletes_nothing(node: Node) -> None:
    assert purge_before(node.trail, datetime.now(UTC) - timedelta(days=1), actor="x") == 0
