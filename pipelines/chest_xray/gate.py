"""The input quality gate: which data sets the chest X-ray pipeline analyses."""

from __future__ import annotations

from datetime import date

from pydicom import Dataset

from pipelines.base import Verdict

PROJECTION_MODALITIES = {"CR", "DX"}
FRONTAL_VIEWS = {"PA", "AP"}
GRAYSCALE = {"MONOCHROME1", "MONOCHROME2"}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG"}


def patient_age_years(dataset: Dataset) -> float | None:
    """Return the patient's age at the study in years, or None when it cannot be told.

    PatientAge (``nnnY/M/W/D``) is used when present, otherwise the difference
    between PatientBirthDate and StudyDate (or AcquisitionDate).
    """
    age = str(dataset.get("PatientAge", "") or "").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in "YMWD":
        per_year = {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[age[3]]
        return int(age[:3]) / per_year
    birth = _parse_date(dataset.get("PatientBirthDate"))
    seen = _parse_date(dataset.get("StudyDate")) or _parse_date(dataset.get("AcquisitionDate"))
    if birth is None or seen is None or seen < birth:
        return None
    return (seen - birth).days / 365.25


def _parse_date(value: object) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def is_chest(dataset: Dataset) -> bool:
    """Return whether ``dataset`` says it shows the chest (BodyPartExamined)."""
    return str(dataset.get("BodyPartExamined", "") or "").upper() in CHEST_BODY_PARTS


def check_chest_radiograph(dataset: Dataset, *, min_age_years: float = 18.0) -> Verdict:
    """Accept a single-frame grayscale frontal (PA/AP) chest CR/DX of an adult.

    Missing optional attributes (ViewPosition, BodyPartExamined, age) do not skip
    an image; a value that contradicts the rule does. Returns a :class:`Verdict`
    whose reason names the first rule that failed.
    """
    modality = str(dataset.get("Modality", "")).upper()
    if modality not in PROJECTION_MODALITIES:
        return Verdict.skip(f"modality {modality or 'missing'} is not CR or DX")
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        return Verdict.skip("no pixel data")
    body_part = str(dataset.get("BodyPartExamined", "") or "").upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        return Verdict.skip(f"body part {body_part} is not chest")
    view = str(dataset.get("ViewPosition", "") or "").upper()
    if view and view not in FRONTAL_VIEWS:
        return Verdict.skip(f"view position {view} is not frontal (PA/AP)")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        return Verdict.skip(f"{frames} frames; a single frame is required")
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    if photometric not in GRAYSCALE:
        return Verdict.skip(f"photometric interpretation {photometric or 'missing'} is not grayscale")
    age = patient_age_years(dataset)
    if age is not None and age < min_age_years:
        return Verdict.skip(f"patient younger than {min_age_years:g} years")
    return Verdict.accept()
