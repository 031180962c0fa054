"""GDPR subject access and erasure through ``dicom-node audit subject``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.audit import AuditEvent
from dicom_node.db import Feedback, FeedbackVerdict, Instance, NodeDatabase
from dicom_node.errors import DataRemovalError
from dicom_node.subjects import erase_subject
from tests.audit_fixtures import (
    ISSUER,
    PATIENT_ID,
    PATIENT_NAME,
    SERIES_UID,
    Node,
    make_node,
    patient_dataset,
    record_reception,
    store_instance,
)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return make_node(tmp_path)


@pytest.fixture
def db(node: Node) -> Iterator[NodeDatabase]:
    db = NodeDatabase(node.settings.node_database_url)
    yield db
    db.dispose()


def instance_count(db: NodeDatabase) -> int:
    with db.session() as session:
        return session.query(Instance).count()


def test_export_lists_the_persons_events_and_held_images(node: Node, db: NodeDatabase) -> None:
    for number in (1, 2):
        record_reception(node.trail, patient_dataset(sop_suffix=number))
        store_instance(node, db, patient_dataset(sop_suffix=number))
    record_reception(node.trail, patient_dataset("someone-else", "Other^Person", sop_suffix=3))

    result = node.cli("audit", "subject", "export", "--issuer", ISSUER, input=f"{PATIENT_ID}\n")
    assert result.exit_code == 0, result.output
    export = json.loads(result.output)
    assert export["pseudonym"] == node.trail.lookup_pseudonym(PATIENT_ID, ISSUER)
    assert [e["sop_uid"] for e in export["events"]] == [
        patient_dataset(sop_suffix=n).SOPInstanceUID for n in (1, 2)]
    assert len(export["instances"]) == 2
    assert PATIENT_NAME not in result.output

    exported = node.cli_json("audit", "list", "--event", "subject-exported")
    assert exported[0]["pseudonym"] == export["pseudonym"]
    assert exported[0]["detail"] == "2 events, 2 instances exported"


def test_export_of_an_unknown_person_is_empty(node: Node) -> None:
    result = node.cli("audit", "subject", "export", input="nobody\n")
    assert result.exit_code == 0
    assert json.loads(result.output) == {"pseudonym": None, "events": [], "instances": []}
    assert node.trail.lookup_pseudonym("nobody") is None  # a query creates no pseudonym


def test_erase_unlinks_events_and_deletes_images_and_results(node: Node,
                                                              db: NodeDatabase) -> None:
    kept = store_instance(node, db, patient_dataset("someone-else", sop_suffix=9))
    files = []
    for number in (1, 2):
        record_reception(node.trail, patient_dataset(sop_suffix=number))
        files.append(store_instance(node, db, patient_dataset(sop_suffix=number)))
    pseudonym = node.trail.lookup_pseudonym(PATIENT_ID, ISSUER)
    with db.session() as session:  # a radiologist's verdicts on both persons' images
        session.add_all([Feedback(sop_instance_uid=sop, finding="covid19", verdict=FeedbackVerdict.DISAGREE,
                                  reason="free text", user="dr") for sop in (f"{SERIES_UID}.1", f"{SERIES_UID}.9")])
    events_before = node.cli_json("audit", "list", "--patient", "--issuer", ISSUER,
                                  input=f"{PATIENT_ID}\n")
    assert len(events_before) == 2

    refused = node.cli("audit", "subject", "erase", "--issuer", ISSUER, input=f"{PATIENT_ID}\nn\n")
    assert refused.exit_code == 1 and node.trail.lookup_pseudonym(PATIENT_ID, ISSUER)

    result = node.cli("audit", "subject", "erase", "--issuer", ISSUER, "--yes",
                      input=f"{PATIENT_ID}\n")
    assert result.exit_code == 0, result.output
    assert f"erased pseudonym {pseudonym}: deleted 2 instances, 2 spooled files, " \
           "2 result folders" in result.output

    assert node.cli_json("audit", "list", "--patient", "--issuer", ISSUER,
                         input=f"{PATIENT_ID}\n") == []
    still_there = [row for row in node.cli_json("audit", "list")
                   if row["pseudonym"] == pseudonym]
    assert [row["id"] for row in still_there[:2]] == [row["id"] for row in events_before]
    assert still_there[-1]["event"] == AuditEvent.SUBJECT_ERASED
    for spooled, results in files:
        assert not spooled.exists() and not results.exists()
    assert kept[0].exists() and kept[1].exists() and instance_count(db) == 1
    with db.session() as session:  # the erased person's feedback is gone, the other's kept
        assert list(session.scalars(select(Feedback.sop_instance_uid))) == [f"{SERIES_UID}.9"]
    assert node.cli("audit", "verify").exit_code == 0

    again = node.cli("audit", "subject", "export", "--issuer", ISSUER, input=f"{PATIENT_ID}\n")
    assert json.loads(again.output)["events"] == []


def test_erase_of_an_unknown_person_changes_nothing(node: Node, db: NodeDatabase) -> None:
    store_instance(node, db, patient_dataset("someone-else"))
    result = node.cli("audit", "subject", "erase", "--yes", input="nobody\n")
    assert result.exit_code == 0 and "nothing to erase" in result.output
    assert instance_count(db) == 1


def test_erase_refuses_paths_outside_the_spool(node: Node, db: NodeDatabase,
                                               tmp_path: Path) -> None:
    store_instance(node, db, patient_dataset())
    outside = tmp_path / "precious.txt"
    outside.write_text("not the node's")
    with db.session() as session:
        session.query(Instance).update({Instance.path: str(outside)})
    with pytest.raises(DataRemovalError, match="not inside"):
        erase_subject(node.settings, node.trail, db, PATIENT_ID, ISSUER, actor="admin")
    assert outside.exists() and node.trail.lookup_pseudonym(PATIENT_ID, ISSUER)
    result = node.cli("audit", "subject", "erase", "--issuer", ISSUER, "--yes",
                      input=f"{PATIENT_ID}\n")
    assert result.exit_code == 1 and "refusing to delete" in result.output
