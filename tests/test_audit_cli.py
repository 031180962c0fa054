"""``dicom-node audit list/show/summary``: filters, formats, and the audit of every query."""

from __future__ import annotations

import csv
import getpass
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_node.audit import AuditEvent, Outcome
from tests.audit_fixtures import (
    ISSUER,
    PATIENT_ID,
    STUDY_UID,
    Node,
    make_node,
    patient_dataset,
    record_reception,
)

OTHER_STUDY = "1.2.826.0.1.3680043.8.498.2002"


@pytest.fixture
def node(tmp_path: Path) -> Node:
    """A trail of 7 events: two receptions (rows 1-4), then a job of another patient (5-7)."""
    node = make_node(tmp_path)
    record_reception(node.trail, patient_dataset(sop_suffix=1))
    record_reception(node.trail, patient_dataset(sop_suffix=2), calling_ae="MODALITY")
    other = node.trail.pseudonym("someone-else", ISSUER)
    node.trail.record(AuditEvent.JOB_QUEUED, actor="scheduler", pseudonym=other,
                      study_uid=OTHER_STUDY, job_id=3)
    node.trail.record(AuditEvent.JOB_STARTED, actor="worker-host", study_uid=OTHER_STUDY, job_id=3)
    node.trail.record(AuditEvent.JOB_FAILED, outcome=Outcome.SERIOUS_FAILURE, actor="worker-host",
                      study_uid=OTHER_STUDY, job_id=3, detail="model error")
    return node


def ids(rows: list[dict[str, object]]) -> list[object]:
    return [row["id"] for row in rows]


def test_list_filters(node: Node) -> None:
    assert ids(node.cli_json("audit", "list")) == [1, 2, 3, 4, 5, 6, 7]
    assert ids(node.cli_json("audit", "list", "--study", STUDY_UID)) == [2, 4]
    assert ids(node.cli_json("audit", "list", "--event", "job-started",
                             "--event", "job-failed")) == [6, 7]
    assert ids(node.cli_json("audit", "list", "--ae", "MODALITY")) == [3, 4]
    assert ids(node.cli_json("audit", "list", "--outcome", "serious-failure")) == [7]
    assert ids(node.cli_json("audit", "list", "--patient", "--issuer", ISSUER,
                             input=f"{PATIENT_ID}\n")) == [2, 4]
    assert ids(node.cli_json("audit", "list", "--patient", input="unknown-person\n")) == []
    assert ids(node.cli_json("audit", "list", "--limit", "2", "--event", "instance-received",
                             "--event", "job-queued")) == [4, 5]


def test_list_time_window(node: Node) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert ids(node.cli_json("audit", "list", "--since", "1h", "--event", "job-failed")) == [7]
    assert ids(node.cli_json("audit", "list", "--since", later)) == []
    assert ids(node.cli_json("audit", "list", "--until", "2000-01-01")) == []
    bad = node.cli("audit", "list", "--since", "yesterday-ish")
    assert bad.exit_code == 2 and "neither an ISO 8601 time nor an age" in bad.output


def test_list_formats(node: Node) -> None:
    rows = node.cli_json("audit", "list", "--study", STUDY_UID)
    assert rows[0]["event"] == "instance-received" and rows[0]["event_id"] == "110104"
    assert datetime.fromisoformat(str(rows[0]["time"])).tzinfo is not None

    as_csv = node.cli("audit", "list", "--study", STUDY_UID, "--format", "csv")
    parsed = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert [row["sop_uid"] for row in parsed] == [row["sop_uid"] for row in rows]
    assert "detail" in parsed[0] and "hash" not in parsed[0]

    table = node.cli("audit", "list", "--study", STUDY_UID, "--format", "table")
    assert table.exit_code == 0 and "2 audit events" in table.output
    assert "instance-received" in table.output


def test_show(node: Node) -> None:
    shown = json.loads(node.cli("audit", "show", "7", "--format", "json").output)
    assert shown["detail"] == "model error" and shown["outcome_indicator"] == 8
    assert shown["event_id"] == {"value": "110103", "scheme": "DCM",
                                 "meaning": "DICOM Instances Accessed"}
    table = node.cli("audit", "show", "7")
    assert table.exit_code == 0 and "job-failed" in table.output
    assert "110103 (DCM, DICOM Instances Accessed)" in table.output
    missing = node.cli("audit", "show", "999")
    assert missing.exit_code == 1 and "no audit event 999" in missing.output


def test_summary(node: Node) -> None:
    by_event = {row["key"]: row for row in node.cli_json("audit", "summary", "--by", "event")}
    assert by_event["instance-received"]["events"] == 2
    assert by_event["job-failed"]["failures"] == 1
    by_ae = {row["key"]: row["events"] for row in node.cli_json("audit", "summary", "--by", "ae")}
    assert by_ae["PACS"] == 2 and by_ae["worker-host"] == 2
    by_day = node.cli_json("audit", "summary", "--by", "day")
    assert by_day[0]["key"] == datetime.now(UTC).date().isoformat()
    assert node.cli("audit", "summary", "--by", "week").exit_code == 2


def test_every_query_is_audited_with_the_os_user(node: Node) -> None:
    node.cli("audit", "list", "--patient", "--issuer", ISSUER, input=f"{PATIENT_ID}\n")
    node.cli("audit", "show", "3")
    node.cli("audit", "summary", "--by", "ae")
    queries = node.cli_json("audit", "list", "--event", "audit-queried")
    assert [row["actor"] for row in queries] == [getpass.getuser()] * 3
    assert [str(row["detail"]).split()[0] for row in queries] == ["list", "show", "summary"]
    assert "patient-id=given" in str(queries[0]["detail"])
    assert queries[0]["pseudonym"] == node.trail.lookup_pseudonym(PATIENT_ID, ISSUER)
    assert PATIENT_ID not in json.dumps(queries)
