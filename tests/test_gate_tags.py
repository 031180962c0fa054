"""The tag half of the quality gate, on data sets written as real modalities and feeds write them."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from pipelines.chest_xray.gate import AGE_UNKNOWN, check_chest_radiograph, parse_age
from tests.dicom_factory import make_cr


def coded(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def adult(**attributes: object) -> Dataset:
    """Return a frontal chest CR of an adult (born 1970, studied 2026) with ``attributes`` set or deleted (None)."""
    dataset = make_cr()
    for keyword, value in attributes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    return dataset


def test_a_stated_adult_frontal_chest_is_accepted() -> None:
    verdict = check_chest_radiograph(adult())
    assert verdict.accepted and verdict.caveats == ()


@pytest.mark.parametrize("body_part", ["CHEST", "chest", " THORAX ", "TORAX", "Thorax", "CHEST PA", "LUNG"])
def test_body_part_in_the_forms_modalities_write(body_part: str) -> None:
    assert check_chest_radiograph(adult(BodyPartExamined=body_part)).accepted


@pytest.mark.parametrize(("body_part", "reason"), [("HAND", "body part HAND is not chest"),
                                                   ("EXTREMITY", "not chest"), ("CHEST LAT", "lateral")])
def test_body_part_that_contradicts_skips(body_part: str, reason: str) -> None:
    verdict = check_chest_radiograph(adult(BodyPartExamined=body_part))
    assert not verdict.accepted and reason in verdict.reason


def test_lateral_stated_only_by_view_code_skips() -> None:
    dataset = adult(ViewPosition=None)
    dataset.ViewCodeSequence = [coded("399198007", "SCT", "right lateral")]
    verdict = check_chest_radiograph(dataset)
    assert not verdict.accepted and "view code 399198007 (right lateral) is not frontal" in verdict.reason


@pytest.mark.parametrize("code", [coded("399348003", "SCT", "antero-posterior"),
                                  coded("R-10214", "SRT", "postero-anterior"),
                                  coded("272479007", "SCT", "postero-anterior")])
def test_frontal_view_codes_are_accepted(code: Dataset) -> None:
    dataset = adult(ViewPosition=None)
    dataset.ViewCodeSequence = [code]
    assert check_chest_radiograph(dataset).accepted


def test_an_oblique_or_decubitus_view_modifier_skips() -> None:
    dataset = adult()
    view = coded("399348003", "SCT", "antero-posterior")
    view.ViewModifierCodeSequence = [coded("32185000", "SCT", "lateral decubitus")]
    dataset.ViewCodeSequence = [view]
    verdict = check_chest_radiograph(dataset)
    assert not verdict.accepted and "lateral decubitus" in verdict.reason


def test_anatomic_region_code_other_than_chest_skips_without_body_part() -> None:
    dataset = adult(BodyPartExamined=None)
    dataset.AnatomicRegionSequence = [coded("85562004", "SCT", "Hand")]
    assert "anatomic region 85562004 (hand) is not chest" in check_chest_radiograph(dataset).reason
    dataset.AnatomicRegionSequence = [coded("51185008", "SCT", "Thorax")]
    assert check_chest_radiograph(dataset).accepted


@pytest.mark.parametrize(("text", "years"), [("045Y", 45), ("17Y", 17), ("00010M", 10 / 12), ("045", 45),
                                             (" 30Y ", 30), ("52W", 52 / 52.1775), ("abc", None), ("", None)])
def test_ages_in_the_forms_real_feeds_carry(text: str, years: float | None) -> None:
    assert parse_age(text) == (pytest.approx(years) if years is not None else None)


@pytest.mark.parametrize("age", ["00010M", "17Y", "012"])
def test_children_with_malformed_ages_and_an_empty_birth_date_are_skipped(age: str) -> None:
    verdict = check_chest_radiograph(adult(PatientAge=age, PatientBirthDate=""))
    assert not verdict.accepted and "younger than 18 years" in verdict.reason


@pytest.mark.parametrize("date_keyword", ["StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"])
def test_birth_date_against_any_date_of_the_study_tells_a_child(date_keyword: str) -> None:
    dataset = adult(PatientBirthDate="20200101", StudyDate=None)
    setattr(dataset, date_keyword, "20260101")
    assert "younger than 18" in check_chest_radiograph(dataset).reason


def test_a_contradicting_value_skips_whatever_else_says_adult() -> None:
    # PatientAge says adult, the birth date says a child of 6: the lower one decides.
    assert not check_chest_radiograph(adult(PatientAge="045Y", PatientBirthDate="20200101")).accepted


def test_unknown_age_is_analysed_with_a_caveat_or_skipped_by_policy() -> None:
    dataset = adult(PatientBirthDate="")
    verdict = check_chest_radiograph(dataset)
    assert verdict.accepted and verdict.caveats == (AGE_UNKNOWN,)
    skipped = check_chest_radiograph(dataset, unknown_age="skip")
    assert not skipped.accepted and "age unknown" in skipped.reason
    del dataset.PatientBirthDate
    assert check_chest_radiograph(dataset).caveats == (AGE_UNKNOWN,)


def test_missing_view_and_body_part_do_not_skip_on_tags() -> None:
    # The image content check decides those (tests/test_gate_content.py).
    assert check_chest_radiograph(adult(ViewPosition=None, BodyPartExamined=None)).accepted
