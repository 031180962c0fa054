"""The tag half of the quality gate: what a data set's attributes say about the image.

Every attribute that can say "not a frontal adult chest radiograph" is read, in the
forms real modalities and feeds write (coded views and anatomy, ``TORAX``, ``17Y``,
``045``, birth dates against every date of the study). A value that contradicts the
rule skips, whatever else is missing; a missing value proves nothing, and the image
content check (:mod:`pipelines.chest_xray.plausibility`) has to prove it instead.
An age that cannot be told is decided by the ``unknown_age`` policy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date
from enum import StrEnum

from pydicom import Dataset

from pipelines.base import GateVerdict

PROJECTION_MODALITIES = {"CR", "DX"}
FRONTAL_VIEWS = {"PA", "AP"}
GRAYSCALE = {"MONOCHROME1", "MONOCHROME2"}
#: Words for the chest in BodyPartExamined, as modalities write it (several languages).
CHEST_WORDS = {"CHEST", "THORAX", "THORACIC", "TORAX", "TORACE", "TORACICO", "THORAKS", "TORAKS", "BRUST",
               "BRUSTKORB", "POITRINE", "PECHO", "LUNG", "LUNGS", "PULMON", "PULMAO", "CXR"}
LATERAL_WORDS = {"LAT", "LATERAL", "LL", "RL", "OBL", "OBLIQUE"}
#: Coded frontal views (CID 4010): SNOMED CT and the retired SNOMED RT codes.
FRONTAL_VIEW_CODES = {"399348003", "272479007", "399300004", "R-10206", "R-10214"}
#: Coded chest anatomy (CID 4031): thorax, chest, lung, chest cavity.
CHEST_REGION_CODES = {"51185008", "816094009", "39607008", "43799004", "302551006", "T-D3000", "T-28000"}
_FRONTAL_MEANINGS = ("postero-anterior", "antero-posterior", "posteroanterior", "anteroposterior")
_CHEST_MEANINGS = ("chest", "thorax", "lung")
_NOT_FRONTAL_MEANINGS = ("lateral", "oblique", "lordotic", "decubitus")
_AGE = re.compile(r"^0*(\d{1,3})\s*([YMWD])?$")
_PER_YEAR = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
AGE_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
DEFAULT_MAX_MEGAPIXELS = 25.0
"""The pixel budget (Rows x Columns x frames, in millions) when none is given: the node's
``scp.max_image_megapixels``."""


class UnknownAge(StrEnum):
    """What the gate does with an image whose patient age cannot be told."""

    ANALYSE = "analyse"
    SKIP = "skip"


#: The caveat an accepted image with an unknown age carries into the SC banner and the SR.
AGE_UNKNOWN = "age unknown"


def _text(dataset: Dataset, keyword: str) -> str:
    return str(dataset.get(keyword, "") or "").strip()


def parse_age(value: object) -> float | None:
    """Return a PatientAge value in years, leniently (``045Y``, ``17Y``, ``00010M``, ``045``), or None."""
    match = _AGE.match(str(value or "").strip().upper())
    if match is None:
        return None
    return int(match.group(1)) / _PER_YEAR[match.group(2) or "Y"]


def parse_date(value: object) -> date | None:
    """Return a DA value (``YYYYMMDD``, also with ``.`` or ``-`` separators) as a date, or None."""
    text = re.sub(r"[.\-/ ]", "", str(value or ""))
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def patient_ages(dataset: Dataset) -> list[float]:
    """Return every age in years the data set states: PatientAge, and PatientBirthDate against
    each of StudyDate, SeriesDate, AcquisitionDate and ContentDate (later than the birth)."""
    ages = []
    if (stated := parse_age(dataset.get("PatientAge"))) is not None:
        ages.append(stated)
    birth = parse_date(dataset.get("PatientBirthDate"))
    if birth is not None:
        for keyword in AGE_DATES:
            seen = parse_date(dataset.get(keyword))
            if seen is not None and seen >= birth:
                ages.append((seen - birth).days / 365.25)
    return ages


def patient_age_years(dataset: Dataset) -> float | None:
    """Return the lowest age the data set states, in years, or None when it states none."""
    ages = patient_ages(dataset)
    return min(ages) if ages else None


def _codes(dataset: Dataset, keyword: str) -> list[tuple[str, str]]:
    """Return (code value, lower-case meaning) of every item of a code sequence, nested modifiers included."""
    found = []
    for item in dataset.get(keyword, None) or []:
        value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip()
        found.append((value, str(item.get("CodeMeaning", "") or "").strip().lower()))
        found += _codes(item, "ViewModifierCodeSequence")
    return found


def _words(text: str) -> set[str]:
    return set(re.split(r"[^A-Z]+", text.upper())) - {""}


def body_part_is_chest(value: str) -> bool:
    """Return whether a BodyPartExamined value names the chest (``CHEST``, ``Thorax``, ``TORAX``, ``chest pa``...)."""
    return bool(_words(value) & CHEST_WORDS)


def is_chest(dataset: Dataset) -> bool:
    """Return whether ``dataset`` says it shows the chest (BodyPartExamined or AnatomicRegionSequence)."""
    return body_part_is_chest(_text(dataset, "BodyPartExamined")) or any(
        value in CHEST_REGION_CODES or any(word in meaning for word in _CHEST_MEANINGS)
        for value, meaning in _codes(dataset, "AnatomicRegionSequence"))


def _view_reason(dataset: Dataset) -> str | None:
    view = _text(dataset, "ViewPosition").upper()
    if view and view not in FRONTAL_VIEWS:
        return f"view position {view} is not frontal (PA/AP)"
    for value, meaning in _codes(dataset, "ViewCodeSequence"):
        if value not in FRONTAL_VIEW_CODES and not any(word in meaning for word in _FRONTAL_MEANINGS):
            return f"view code {value or '?'} ({meaning or 'no meaning'}) is not frontal (PA/AP)"
    for value, meaning in [*_codes(dataset, "ViewModifierCodeSequence")]:
        if any(word in meaning for word in _NOT_FRONTAL_MEANINGS):
            return f"view modifier {value or '?'} ({meaning}) is not a frontal view"
    return None


def _anatomy_reason(dataset: Dataset) -> str | None:
    body_part = _text(dataset, "BodyPartExamined")
    if body_part and not body_part_is_chest(body_part):
        return f"body part {body_part.upper()} is not chest"
    if body_part and _words(body_part) & LATERAL_WORDS:
        return f"body part {body_part.upper()} names a lateral or oblique view"
    for value, meaning in _codes(dataset, "AnatomicRegionSequence"):
        if value not in CHEST_REGION_CODES and not any(word in meaning for word in _CHEST_MEANINGS):
            return f"anatomic region {value or '?'} ({meaning or 'no meaning'}) is not chest"
    return None


def _first(reasons: Iterable[str | None]) -> str | None:
    return next((reason for reason in reasons if reason), None)


def _dimension(dataset: Dataset, keyword: str) -> int:
    try:
        return max(int(dataset.get(keyword) or 0), 0)
    except (TypeError, ValueError):
        return 0


def _size_reason(dataset: Dataset, max_megapixels: float) -> str | None:
    """Return why decoding the image would cost more than ``max_megapixels``, read from its attributes
    only (Rows, Columns, NumberOfFrames), or None."""
    rows, columns = _dimension(dataset, "Rows"), _dimension(dataset, "Columns")
    frames = max(_dimension(dataset, "NumberOfFrames"), 1)
    megapixels = rows * columns * frames / 1e6
    if megapixels <= max_megapixels:
        return None
    return (f"image of {megapixels:.1f} megapixels ({rows} x {columns} x {frames} frame(s)) exceeds the "
            f"pixel budget of {max_megapixels:g} (scp.max_image_megapixels); not decoded")


def check_chest_radiograph(dataset: Dataset, *, min_age_years: float = 18.0,
                           unknown_age: UnknownAge | str = UnknownAge.ANALYSE,
                           max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> GateVerdict:
    """Return the tag verdict for ``dataset``: a single-frame grayscale frontal (PA/AP) chest CR/DX
    of a patient of at least ``min_age_years``, of at most ``max_megapixels`` (Rows x Columns x
    frames, in millions: larger images are skipped before anything decodes them).

    A stated value that contradicts the rule skips (the reason names it); a missing
    one does not, except the age under ``unknown_age=skip``. An accepted image of
    unknown age carries the caveat :data:`AGE_UNKNOWN`.
    """
    modality = _text(dataset, "Modality").upper()
    if modality not in PROJECTION_MODALITIES:
        return GateVerdict.skip(f"modality {modality or 'missing'} is not CR or DX")
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        return GateVerdict.skip("no pixel data")
    if reason := _size_reason(dataset, max_megapixels):
        return GateVerdict.skip(reason)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    photometric = _text(dataset, "PhotometricInterpretation").upper()
    reason = _first([
        _anatomy_reason(dataset),
        _view_reason(dataset),
        f"{frames} frames; a single frame is required" if frames != 1 else None,
        None if photometric in GRAYSCALE else f"photometric interpretation {photometric or 'missing'} is not grayscale",
    ])
    if reason:
        return GateVerdict.skip(reason)
    age = patient_age_years(dataset)
    if age is not None and age < min_age_years:
        return GateVerdict.skip(f"patient younger than {min_age_years:g} years (by PatientAge or PatientBirthDate)")
    if age is None:
        if UnknownAge(unknown_age) is UnknownAge.SKIP:
            return GateVerdict.skip("patient age unknown (no valid PatientAge or PatientBirthDate) and gate.unknown_age is skip")
        return GateVerdict.accept(caveats=(AGE_UNKNOWN,))
    return GateVerdict.accept()
