"""The writers on pydicom's RG1 chest radiograph (1955 x 1841 CR, MONOCHROME1, Pixel Spacing 0\\0):
every object passes dciodvfy without errors and reads back, with pydicom and highdicom,
with the values written; UIDs and series numbers are deterministic.

Cases: ``flagged`` is RG1_UNCI with COVID-19 flagged (0.93, with a region) and an
experimental pneumothorax head (0.12); ``no_flag`` is the JPEG 2000 RG1_J2KR read
*without* its pixel data (the writers use only ``display``) and nothing flagged.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.writers import AI_DISCLAIMER, OutputKind, write_not_analysed, write_results
from dicom_node.writers.common import PATIENT_STUDY_TYPE2, series_description
from pipelines.base import GateVerdict, pixel_spacing
from dicom_node.writers.render import viewing_contrast
from dicom_node.writers.sc import _shown_heat
from pipelines.chest_xray.overlay import render_overlay
from tests.writers_fixtures import (
    ALGORITHM, HOT_SPOT, LUNGS, dciodvfy, display_of, put_raw, read_source, synthetic_result,
)

#: dciodvfy warnings left, and why:
#: - Referring Physician's Name "ward" is a "retired person name form": copied verbatim
#:   from the source's patient/study modules, which the writers must not alter;
#: - the private coding scheme 99DCMNODE (SR "AI flag" / "Experimental model" concepts,
#:   which no public terminology has) is "unrecognized": dciodvfy knows only registered
#:   schemes; the SR declares it in the Coding Scheme Identification Sequence.
ACCEPTED_WARNINGS = (
    re.compile(r"Referring Physician's Name .*<ward> - Retired Person Name form"),
    re.compile(r"Unrecognized defined term <99DCMNODE> .*Coding Scheme Designator"),
)
KINDS = (OutputKind.SC, OutputKind.SEG, OutputKind.SR)
pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")


class Case:
    """One source, its result and display, the objects written and their files."""

    def __init__(self, directory: Path, name: str, flagged: bool, with_pixels: bool) -> None:
        full = read_source(name)
        self.source = full if with_pixels else pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
        self.display = display_of(full)
        self.result = synthetic_result(full, flagged=flagged)
        self.outputs = write_results(self.source, self.result, self.display, ALGORITHM)
        self.paths = {}
        for kind, dataset in self.outputs.items():
            self.paths[kind] = directory / f"{kind}.dcm"
            dataset.save_as(self.paths[kind], enforce_file_format=True)

    def read(self, kind: OutputKind) -> pydicom.Dataset:
        return pydicom.dcmread(self.paths[kind])


@pytest.fixture(scope="module")
def flagged(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(tmp_path_factory.mktemp("flagged"), "RG1_UNCI.dcm", flagged=True, with_pixels=True)


@pytest.fixture(scope="module")
def no_flag(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(tmp_path_factory.mktemp("no_flag"), "RG1_J2KR.dcm", flagged=False, with_pixels=False)


@pytest.fixture(scope="module", params=["flagged", "no_flag"])
def case(request: pytest.FixtureRequest) -> Case:
    return request.getfixturevalue(request.param)


# --- validity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_reports_no_error(case: Case, kind: OutputKind) -> None:
    errors, warnings = dciodvfy(case.paths[kind])
    assert errors == []
    unexplained = [w for w in warnings if not any(p.search(w) for p in ACCEPTED_WARNINGS)]
    assert unexplained == []


def test_not_analysed_note_passes_dciodvfy(tmp_path: Path) -> None:
    source = pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"), stop_before_pixels=True)
    note = write_not_analysed(source, "lateral view", ALGORITHM)
    path = tmp_path / "note.dcm"
    note.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    assert errors == []
    assert [w for w in warnings if not any(p.search(w) for p in ACCEPTED_WARNINGS)] == []
    back = pydicom.dcmread(path)
    assert back.SeriesDescription == "AI CXR: not analysed: lateral view [note]"
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.pixel_array.shape == (480, 640, 3)
    assert back.ImageComments == AI_DISCLAIMER
    again = write_not_analysed(source, "lateral view", ALGORITHM)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (back.SOPInstanceUID, back.SeriesInstanceUID)


# --- what every object carries ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_patient_study_equipment_and_flag(case: Case, kind: OutputKind) -> None:
    ds = case.read(kind)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "AccessionNumber", "StudyID"):
        assert ds[keyword].value == case.source[keyword].value, keyword
    assert ds.SeriesInstanceUID != case.source.SeriesInstanceUID
    assert ds.Manufacturer == "dicom-node"
    assert list(ds.SoftwareVersions) == ["chest-xray 1.0", "lung-unet 1.0", "covid19-densenet 1.0"]
    ours = [item for item in ds.ContributingEquipmentSequence if item.Manufacturer == "dicom-node"]
    assert len(ours) == 1  # beside highdicom's own item and the source's acquisition equipment
    purpose = ours[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert ours[0].ManufacturerModelName == "chest-xray"
    assert list(ours[0].SoftwareVersions) == list(ds.SoftwareVersions)
    expected = "AI CXR: SUSPECTED COVID-19 (0.93)" if case.result.flagged else "AI CXR: no flagged finding"
    assert ds.SeriesDescription.startswith(expected)


def test_series_description_keeps_kind_within_64_characters() -> None:
    headline = "AI CXR: SUSPECTED " + ", ".join(f"VERY LONG FINDING NAME {i} (0.9{i})" for i in range(4))
    text = series_description(headline, OutputKind.SEG)
    assert len(text) <= 64 and text.startswith("AI CXR: SUSPECTED VERY LONG") and text.endswith(" [SEG]")


# --- Secondary Capture -----------------------------------------------------------------------------

def _image_rows(pixels: np.ndarray, image: np.ndarray) -> int:
    """Return the row at which ``image`` lies, whole and unchanged, inside ``pixels``; fail if nowhere."""
    for top in range(pixels.shape[0] - image.shape[0] + 1):
        if np.array_equal(pixels[top], image[0]) and np.array_equal(pixels[top:top + image.shape[0]], image):
            return top
    pytest.fail("the overlay image is not found whole in the SC: text covers part of it")


def test_sc_shows_every_source_pixel_between_text_bands(case: Case) -> None:
    sc = case.read(OutputKind.SC)
    pixels = sc.pixel_array
    assert (sc.PhotometricInterpretation, sc.BurnedInAnnotation, sc.Modality) == ("RGB", "YES", "CR")
    assert sc.ImageComments == AI_DISCLAIMER
    assert sc.PatientOrientation == case.source.PatientOrientation
    assert "PixelSpacing" not in sc  # the source's 0\0 is not a spacing
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == case.source.SOPInstanceUID

    findings = case.result.flagged
    heat = _shown_heat(case.result, ALGORITHM.output)[0]
    image = render_overlay(viewing_contrast(case.display), case.result.masks["lungs"], heat,
                           [f.region for f in findings if f.region is not None])
    top = _image_rows(pixels, image)
    assert top > 0 and pixels.shape[0] > top + image.shape[0]  # bands above and below, none over the image
    assert pixels.shape[1] == case.source.Columns
    assert (pixels[:4] == 0).all()  # the top band is opaque black
    # Text keeps to the middle of the width: the corners, where viewers write, stay black.
    corner = int(0.18 * pixels.shape[1]) - 1
    assert (pixels[:top, :corner] == 0).all() and (pixels[:top, -corner:] == 0).all()

    r, c, _ = HOT_SPOT
    red, green, blue = (int(v) for v in pixels[top + r, c])
    if findings:  # the hot end of the flagged findings' heat-map
        assert red > green + 60 and red > blue + 60
    else:  # an unflagged finding's heat-map is not drawn
        assert heat is None and red == green == blue
    row, col, _, b = LUNGS[0]
    edge = pixels[top + row, col - b: col - b + 8]
    assert any(px[1] > 200 and px[0] < 50 for px in edge)  # green lung contour


def test_a_flat_full_range_window_is_stretched_for_viewing() -> None:
    flat = np.linspace(60, 140, 256 * 256).reshape(256, 256).astype(np.uint8)  # 80 grey levels in use
    stretched = viewing_contrast(flat)
    assert stretched.min() == 0 and stretched.max() == 255
    full = np.linspace(0, 255, 256 * 256).reshape(256, 256).astype(np.uint8)
    assert viewing_contrast(full) is full


# --- SEG -------------------------------------------------------------------------------------------

def test_seg_reads_back_with_segments_and_masks(case: Case) -> None:
    seg = hd.seg.segread(case.paths[OutputKind.SEG])
    findings = [f for f in case.result.findings if f.flagged]
    assert (seg.SegmentationType, seg.SegmentationFractionalType) == ("FRACTIONAL", "OCCUPANCY")
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == (
        ["Lungs"] + [f.display_name for f in findings])
    lung = seg.get_segment_description(1)
    assert lung.segmented_property_type == hd.sr.CodedConcept("39607008", "SCT", "Lung")
    assert lung.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = lung.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("chest-xray", "1.0")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    masks = seg.get_pixels_by_source_instance([case.source.SOPInstanceUID], combine_segments=False)[0]
    np.testing.assert_array_equal(masks[..., 0] > 0.5, case.result.masks["lungs"])
    for n, finding in enumerate(findings, start=1):
        description = seg.get_segment_description(n + 1)
        assert (description.segmented_property_category.value, description.segmented_property_type.value) == (
            "309825002", "130403")  # Spatial and Relational Concept / Gradient-weighted class activation
        assert description.segment_label == finding.display_name
        np.testing.assert_array_equal(masks[..., n] > 0.5, finding.region)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert "PixelMeasuresSequence" not in shared  # RG1's Pixel Spacing is 0\0: no valid spacing to give
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    assert seg.PatientOrientation == case.source.PatientOrientation


def test_seg_of_a_calibrated_image_carries_its_pixel_measures(tmp_path: Path) -> None:
    source = read_source("RG1_UNCI.dcm")
    source.PixelSpacing = [0.168, 0.171]
    seg = write_results(source, synthetic_result(source), display_of(source), ALGORITHM)[OutputKind.SEG]
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy(path)[0] == []
    measures = hd.seg.segread(path).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [0.168, 0.171]


# --- SR --------------------------------------------------------------------------------------------

def _yes_no(flag: bool) -> str:
    return "Yes" if flag else "No"


def _box(mask: np.ndarray) -> np.ndarray:
    """The closed box around ``mask`` as the SR writes it: pixel edges, (column, row)."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return np.array([(left, top), (right, top), (right, bottom), (left, bottom), (left, top)], np.float32)


def test_sr_reads_back_with_scores_flags_and_references(case: Case) -> None:
    sr = hd.sr.srread(case.paths[OutputKind.SR])
    seg_uid = case.outputs[OutputKind.SEG].SOPInstanceUID
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")

    evidence = {sop.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}
    assert evidence == {case.source.SOPInstanceUID, seg_uid}

    assert not sr.content.get_image_measurement_groups()  # one template for every group: TID 1410
    groups = {g.tracking_identifier: g for g in sr.content.get_planar_roi_measurement_groups()}
    assert list(groups) == ["lungs", *(f.name for f in case.result.findings)]
    seg_tracking = {d.tracking_id: d.tracking_uid for d in hd.seg.segread(case.paths[OutputKind.SEG]).SegmentSequence}
    for name, group in groups.items():
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == case.source.SOPInstanceUID
        if name in seg_tracking:  # the SEG segment of the same object shares its tracking UID
            assert group.tracking_uid == seg_tracking[name]
    np.testing.assert_array_equal(groups["lungs"].roi.value, _box(case.result.masks["lungs"]))

    for finding in case.result.findings:
        group = groups[finding.name]
        assert group.finding_type.value == ("840539006" if finding.name == "covid19" else "36118008")
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values == {"Probability": pytest.approx(finding.probability, abs=5e-5),
                          "Threshold Value": pytest.approx(finding.threshold, abs=5e-5)}
        evaluations = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
        assert evaluations["AI flag"] == _yes_no(finding.flagged)
        assert evaluations["Experimental model"] == _yes_no(finding.experimental)
        outlined = finding.region if finding.flagged else case.result.masks["lungs"]
        np.testing.assert_array_equal(group.roi.value, _box(outlined))

    library = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028")
    [image] = library.ContentSequence[0].ContentSequence
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == case.source.SOPInstanceUID

    texts = [item.TextValue for item in sr.ContentSequence[-1].ContentSequence]
    assert texts == [AI_DISCLAIMER]


# --- determinism -----------------------------------------------------------------------------------

def _identity(ds: pydicom.Dataset) -> tuple[str, str, int]:
    return ds.SOPInstanceUID, ds.SeriesInstanceUID, int(ds.SeriesNumber)


def test_writing_again_gives_the_same_uids_and_series_numbers(flagged: Case) -> None:
    again = write_results(flagged.source, flagged.result, flagged.display, ALGORITHM)
    assert {k: _identity(ds) for k, ds in again.items()} == {k: _identity(ds) for k, ds in flagged.outputs.items()}


def test_uids_and_series_numbers_differ_by_source_kind_and_version(flagged: Case, no_flag: Case) -> None:
    identities = [_identity(ds) for case in (flagged, no_flag) for ds in case.outputs.values()]
    for position in range(3):
        assert len({identity[position] for identity in identities}) == len(identities)
    assert {int(ds.SeriesNumber) % 10 for ds in flagged.outputs.values()} == {1, 2, 3}

    newer = replace(ALGORITHM, version="1.1")
    sc = write_results(flagged.source, flagged.result, flagged.display, newer)[OutputKind.SC]
    assert _identity(sc)[:2] != _identity(flagged.outputs[OutputKind.SC])[:2]


def _uids(outputs) -> set[str]:
    return {uid for ds in outputs.values() for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID)}


@pytest.mark.parametrize("change", [
    pytest.param(lambda c: (replace(c.result, findings=[replace(c.result.findings[0], threshold=0.6),
                                                        *c.result.findings[1:]]), ALGORITHM, ()), id="threshold"),
    pytest.param(lambda c: (c.result, replace(ALGORITHM, model_versions="lung-unet 1.0; covid19-densenet 1.1"), ()),
                 id="weights"),
    pytest.param(lambda c: (c.result, ALGORITHM, ("age unknown",)), id="caveat"),
])
def test_any_content_input_changed_gives_new_uids_for_every_object_it_changes(flagged: Case, change) -> None:
    """What decides the content decides the UIDs: a PACS that keeps the first object under a
    known UID must never be handed different content under it."""
    result, algorithm, caveats = change(flagged)
    changed = write_results(flagged.source, result, flagged.display, algorithm, caveats)
    affected = {k for k in KINDS if not (k is OutputKind.SEG and caveats)}  # the SEG shows no caveat
    for kind in KINDS:
        same = _identity(changed[kind])[:2] == _identity(flagged.outputs[kind])[:2]
        assert same == (kind not in affected), kind
    assert _uids(write_results(flagged.source, result, flagged.display, algorithm, caveats)) == _uids(changed)


# --- argument checks -------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    (lambda c: (replace(c.result, masks={"lungs": c.result.masks["lungs"][:-1]}), c.display),
     "mask 'lungs' has shape"),
    (lambda c: (c.result, c.display[:, :-1]), "display has shape"),
    (lambda c: (c.result, c.display.astype(np.float32)), "display must be uint8"),
    (lambda c: (replace(c.result, sop_instance_uid="1.2.3"), c.display), "not for the source"),
    (lambda c: (replace(c.result, findings=[replace(c.result.findings[0], probability=1.5)]), c.display),
     "outside"),
    (lambda c: (replace(c.result, findings=[c.result.findings[0]] * 2), c.display), "unique"),
    (lambda c: (replace(c.result, findings=[replace(c.result.findings[0], experimental=True)]), c.display),
     "experimental"),
    (lambda c: (replace(c.result, findings=[replace(c.result.findings[0], region=np.zeros((4, 4), bool))]),
                c.display), "region has shape"),
    (lambda c: (replace(c.result, findings=[], verdict=GateVerdict.skip("image content: no lungs found")), c.display),
     "skipped .*no result objects"),
])
def test_bad_arguments_are_rejected(flagged: Case, change, message: str) -> None:
    result, display = change(flagged)
    with pytest.raises(ValueError, match=message):
        write_results(flagged.source, result, display, ALGORITHM)


def test_not_analysed_needs_a_reason(flagged: Case) -> None:
    with pytest.raises(ValueError, match="reason"):
        write_not_analysed(flagged.source, " ", ALGORITHM)


# --- sources that lack Type 2 patient / study attributes, and gate caveats ----------------------------

def test_absent_type2_patient_and_study_attributes_are_written_empty(tmp_path: Path) -> None:
    """Anonymised feeds omit birth date, sex, IDs, accession number, study ID, date and time."""
    source = read_source("RG1_UNCI.dcm")
    for keyword in PATIENT_STUDY_TYPE2:
        delattr(source, keyword)
    outputs = write_results(source, synthetic_result(source), display_of(source), ALGORITHM)
    for kind, dataset in outputs.items():
        path = tmp_path / f"{kind}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy(path)
        assert errors == [], (kind, errors)
        read = pydicom.dcmread(path)
        for keyword in PATIENT_STUDY_TYPE2:
            assert keyword in read and not read[keyword].value, (kind, keyword)
    assert hd.seg.segread(tmp_path / "seg.dcm").number_of_segments == 2
    assert hd.sr.srread(tmp_path / "sr.dcm").SOPInstanceUID == outputs[OutputKind.SR].SOPInstanceUID


def test_an_unknown_age_is_said_in_the_sc_banner_and_the_sr(tmp_path: Path) -> None:
    source = read_source("RG1_UNCI.dcm")
    result = synthetic_result(source)
    outputs = write_results(source, result, display_of(source), ALGORITHM, caveats=("age unknown",))
    plain = write_results(source, result, display_of(source), ALGORITHM)
    assert not np.array_equal(outputs[OutputKind.SC].pixel_array, plain[OutputKind.SC].pixel_array)
    from dicom_node.writers.sc import banner_text
    assert any("age unknown" in notice for notice in banner_text(result, ALGORITHM, ("age unknown",)).notices)
    outputs[OutputKind.SR].save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    texts = [item.TextValue for item in hd.sr.srread(tmp_path / "sr.dcm").ContentSequence[-1].ContentSequence
             if item.ValueType == "TEXT"]
    assert texts == [AI_DISCLAIMER, "age unknown"]
    errors, _ = dciodvfy(tmp_path / "sr.dcm")
    assert errors == []


def test_series_dates_study_description_timezone_and_contribution_time(tmp_path: Path) -> None:
    source = read_source("RG1_UNCI.dcm")
    source.StudyDescription, source.TimezoneOffsetFromUTC = "THORAX PA", "+0100"
    for kind, dataset in write_results(source, synthetic_result(source), display_of(source), ALGORITHM).items():
        path = tmp_path / f"{kind}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        assert dciodvfy(path)[0] == [], kind
        read = pydicom.dcmread(path)
        assert (read.StudyDescription, read.TimezoneOffsetFromUTC) == ("THORAX PA", "+0100"), kind
        assert (read.SeriesDate, read.SeriesTime) == (read.ContentDate, read.ContentTime), kind
        [ours] = [e for e in read.ContributingEquipmentSequence if e.Manufacturer == "dicom-node"]
        assert ours.ContributionDateTime, kind
        if kind is OutputKind.SEG:
            assert read.DeviceSerialNumber != ALGORITHM.version


# --- sources with awkward values: analysed, never a traceback -----------------------------------------

def _reread(source: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    """Return ``source`` as read back from a file: its raw values unconverted, as the node reads them."""
    source.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


@pytest.mark.parametrize(("value", "spacing"), [
    (b"0.2\\0.3", (0.2, 0.3)), (b"a\\b", None), (b"0\\0", None), (b"-0.2\\0.2", None), (b"nan\\0.2", None),
    (b"inf\\0.2", None), (b"0.2", None), (b"0.2\\0.2\\0.2", None), (b"", None),
])
def test_an_unusable_pixel_spacing_is_no_spacing(tmp_path: Path, value: bytes, spacing) -> None:
    source = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    put_raw(source, "PixelSpacing", "DS", value)
    source = _reread(source, tmp_path / "source.dcm")
    assert pixel_spacing(source) == spacing
    source.ImagerPixelSpacing = [0.15, 0.16]  # the fallback, where Pixel Spacing is unusable
    assert pixel_spacing(source) == (spacing or (0.15, 0.16))


#: Source values highdicom refused (the instance failed with a traceback), as raw bytes, and what the
#: objects carry instead.
AWKWARD_SOURCES = {
    "spacing a\\b": (("PixelSpacing", "DS", b"a\\b"), "PixelSpacing", None),
    "charset ISO_IR 999": (("SpecificCharacterSet", "CS", b"ISO_IR 999"), "PatientName", "CompressedSamples^RG1"),
    "birth date 01.02.1970": (("PatientBirthDate", "DA", b"01.02.1970"), "PatientBirthDate", ""),
    "patient sex X": (("PatientSex", "CS", b"X"), "PatientSex", ""),
    "Latin-1 name": (("PatientName", "PN", "Müller^Jörg".encode("latin-1")), "PatientName", "Müller^Jörg"),
}


@pytest.mark.parametrize("awkward", AWKWARD_SOURCES.values(), ids=AWKWARD_SOURCES.keys())
def test_awkward_source_values_give_valid_utf8_objects(tmp_path: Path, awkward) -> None:
    """Invalid copied values are left empty (type 2) or out; text is decoded from the source's character
    set, leniently, into UTF-8 (ISO_IR 192); every object passes dciodvfy."""
    raw, keyword, expected = awkward
    source = read_source("RG1_UNCI.dcm")
    source.PixelSpacing = [0.171, 0.171]
    put_raw(source, *raw)
    source = _reread(source, tmp_path / "source.dcm")
    for kind, dataset in write_results(source, synthetic_result(source), display_of(source), ALGORITHM).items():
        path = tmp_path / f"{kind}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        errors, warnings = dciodvfy(path)
        assert errors == [], (kind, errors)
        assert [w for w in warnings if not any(p.search(w) for p in ACCEPTED_WARNINGS)] == [], kind
        read = pydicom.dcmread(path)
        assert read.SpecificCharacterSet == "ISO_IR 192", kind
        if expected is None:
            assert keyword not in read, kind
        else:
            assert read[keyword].value == expected, kind
