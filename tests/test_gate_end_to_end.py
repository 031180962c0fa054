"""The quality gate as a hostile sender meets it: a real `serve`, DCMTK storescu, a receiving PACS.

Each data set below is a copy of pydicom-data's RG1 (a frontal chest CR) or RG3 (a hand
CR) altered the way broken or hostile feeds alter them, in a study of its own. Every one
but the adult without a birth date must be skipped with its reason, in `jobs show`, the
audit trail and the "not analysed" note, and nothing of it may reach the destination;
the adult's SC, SEG and SR must, and the library warnings about its names must reach
the log without the names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dicom_node.db import DeliveryStatus, Job
from tests.conftest import dcmtk_tool, run_tool, sample_file, wait_for
from tests.receiving_scp import ReceivingSCP

pytestmark = pytest.mark.slow

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _coded(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _hand_without_tags(ds: Dataset) -> None:
    # RG3's AcquisitionDate (1992) makes its patient 13, which the tag gate alone skips: without
    # it the patient is 25 at the study, and only the pixels can tell that this is a hand.
    del ds.BodyPartExamined, ds.ViewPosition, ds.AcquisitionDate


def _lateral_by_code(ds: Dataset) -> None:
    del ds.ViewPosition
    ds.ViewCodeSequence = [_coded("399198007", "SCT", "right lateral")]


def _child(age: str) -> object:
    def alter(ds: Dataset) -> None:
        ds.PatientAge = age
        ds.PatientBirthDate = ""
    return alter


def _blank(ds: Dataset) -> None:
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16).tobytes()


def _zero_slope(ds: Dataset) -> None:
    ds.RescaleSlope, ds.RescaleIntercept = 0, 100


#: One-component person names, which highdicom warns about quoting them: they must not reach the log.
PATIENT_NAME, REFERRING_NAME = "Vanderzwaluw", "Drkrabbendam"


def _adult_without_birth_date(ds: Dataset) -> None:
    del ds.PatientBirthDate
    ds.PatientAge = "064Y"
    ds.PixelSpacing = [0.171, 0.171]
    ds.PatientName, ds.ReferringPhysicianName = PATIENT_NAME, REFERRING_NAME


#: name → (source file, alteration, expected skip reason or None for "analysed")
CASES = {
    "hand-without-tags": ("RG3_UNCR.dcm", _hand_without_tags, "does not look like a frontal chest radiograph"),
    "lateral-by-code": ("RG1_UNCR.dcm", _lateral_by_code, "view code 399198007 (right lateral) is not frontal"),
    "child-00010M": ("RG1_UNCR.dcm", _child("00010M"), "patient younger than 18 years"),
    "child-17Y": ("RG1_UNCR.dcm", _child("17Y"), "patient younger than 18 years"),
    "blank": ("RG1_UNCR.dcm", _blank, "image content: blank or near-constant image"),
    "rescale-slope-0": ("RG1_UNCR.dcm", _zero_slope, "image content: blank or near-constant image"),
    "adult-without-birth-date": ("RG1_UNCR.dcm", _adult_without_birth_date, None),
}


def _write_cases(folder: Path) -> dict[str, Dataset]:
    folder.mkdir()
    written = {}
    for name, (source, alter, _) in CASES.items():
        ds = dcmread(sample_file(source))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        alter(ds)
        ds.save_as(folder / f"{name}.dcm")
        written[name] = ds
    return written


def _finished_job(node, study: str) -> Job | None:
    jobs = node.jobs(study)
    return jobs[0] if jobs and jobs[0].status.finished else None


@pytest.fixture
def pacs(tmp_path):
    scp = ReceivingSCP(folder=tmp_path / "pacs").start()
    yield scp
    scp.stop()


def test_what_cannot_prove_it_is_a_frontal_adult_chest_is_skipped_with_its_reason(node_factory, pacs, tmp_path):
    node = node_factory({
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        "outputs": {"not_analysed_note": True},
    }).start()
    cases = _write_cases(tmp_path / "cases")
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                    str(node.port), *(str(tmp_path / "cases" / f"{name}.dcm") for name in cases))
    assert sent.returncode == 0, sent.stderr

    for name, (_, _, reason) in CASES.items():
        ds = cases[name]
        job = wait_for(lambda: _finished_job(node, ds.StudyInstanceUID), 300, f"the job of {name}")
        shown = json.loads(node.cli("jobs", "show", str(job.id), "--format", "json"))
        [instance] = shown["instances"]
        events = json.loads(node.cli("audit", "list", "--study", ds.StudyInstanceUID, "--format", "json"))
        if reason is None:
            assert job.status.value == "done", (name, job.reason)
            assert instance["verdict"] == "analysed" and "covid19=" in instance["reason"]
            assert [e["event"] for e in events][:4] == ["instance-received", "job-queued", "job-started",
                                                         "job-completed"]
            continue
        assert job.status.value == "skipped", (name, job.reason)
        assert instance["verdict"] == "skipped" and reason in instance["reason"], (name, instance["reason"])
        assert reason in job.reason
        skipped = [e for e in events if e["event"] == "job-skipped"]
        assert len(skipped) == 1 and reason in skipped[0]["detail"], (name, events)
        # A "not analysed" note is the one thing a skipped image may yield, and only where it says chest.
        kinds = {d.kind for d in node.deliveries(job.id)}
        assert kinds == ({"not-analysed"} if "BodyPartExamined" in ds else set()), (name, kinds)

    adult = cases["adult-without-birth-date"]
    adult_job = _finished_job(node, adult.StudyInstanceUID)
    expected = 3 + sum("BodyPartExamined" in cases[name] for name, case in CASES.items() if case[2])
    wait_for(lambda: len(pacs.stored) == expected, 120, "the adult's SC, SEG and SR and the notes")
    assert all(d.status is DeliveryStatus.DELIVERED for d in node.deliveries(adult_job.id))
    received: dict[str, list[Dataset]] = {}
    for uid in pacs.stored:
        ds = dcmread(pacs.folder / f"{uid}.dcm")
        received.setdefault(ds.StudyInstanceUID, []).append(ds)
    assert sorted(ds.SOPClassUID for ds in received.pop(adult.StudyInstanceUID)) == sorted(
        [SECONDARY_CAPTURE, "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"])
    for name, (_, _, reason) in CASES.items():
        if reason is None:
            continue
        notes = received.pop(cases[name].StudyInstanceUID, [])
        if "BodyPartExamined" not in cases[name]:
            assert notes == [], name
            continue
        [note] = notes
        assert note.SOPClassUID == SECONDARY_CAPTURE
        assert note.SeriesDescription.startswith("AI CXR: not analysed: " + reason[:20]), note.SeriesDescription
    assert received == {}
    assert node.stop() == 0
    log = node.log.read_text()
    assert "UserWarning raised in" in log  # highdicom did warn about the names ...
    assert PATIENT_NAME not in log and REFERRING_NAME not in log  # ... without quoting them
