"""A study's SRs (see :mod:`dicom_node.writers.sr`) as one FHIR R4 transaction Bundle.

One DiagnosticReport for the study: status ``final``, category imaging, coded as the
SRs' procedure reported, its subject the patient by identifier (PatientID as the source
had it), the ImagingStudy by its Study Instance UID, each SR's SOP Instance UID as an
identifier, and a conclusion that starts with the "not for diagnosis" marking and names
the flagged findings. One Observation per finding of each SR: the finding's code, its
probability as ``valueQuantity``, interpretation ``A`` (abnormal) when flagged, and its
threshold as the upper end of the reference range.

Each entry is a conditional update keyed on its identifier (an Observation's is its
measurement group's Tracking UID), so sending a study again replaces its resources
instead of duplicating them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.writers.common import LOCAL_SCHEME

#: FHIR code systems of the DICOM coding schemes our SRs use; any other scheme gets a URN.
CODE_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "UMLS": "http://www.nlm.nih.gov/research/umls",
}
DICOM_UID_SYSTEM = "urn:dicom:uid"
IMAGING = {"coding": [
    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
     "display": "Imaging"},
    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"},
]}
ABNORMAL = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "A", "display": "Abnormal"}]}
#: A probability is a ratio: UCUM unit "1".
PROBABILITY_UNIT = {"unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"}
DISCLAIMER = "AI result, not for diagnosis."
FLAG_MEANING = "FLAGGED"
EXPERIMENTAL_MEANING = "EXPERIMENTAL"
#: Namespace of the entries' fullUrl UUIDs (derived from their identifiers: stable across sends).
ENTRY_NAMESPACE = uuid.UUID("8d1c6f0e-4b1a-5b0e-9a52-2f3c1d0e7a41")


@dataclass(frozen=True)
class ReportedFinding:
    """One finding's measurement group of an SR."""

    tracking_uid: str
    name: str
    code: dict[str, str]
    probability: float
    threshold: float
    flagged: bool
    experimental: bool


def coding(item: Dataset) -> dict[str, str]:
    """Return a FHIR Coding of a DICOM code sequence item: SNOMED CT, DCM, LOINC, UCUM and UMLS
    by their FHIR systems, the node's local scheme and any other as ``urn:dicom-node:scheme:<designator>``."""
    scheme = str(item.CodingSchemeDesignator)
    return {"system": CODE_SYSTEMS.get(scheme, f"urn:dicom-node:scheme:{scheme}"),
            "code": str(item.CodeValue), "display": str(item.CodeMeaning)}


def _concept(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return str(name.CodingSchemeDesignator), str(name.CodeValue)


def _is(item: Dataset, code: Any) -> bool:
    return _concept(item) == (code.scheme_designator, code.value)


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def procedure_coding(sr: Dataset) -> dict[str, str] | None:
    """Return the Coding of the SR's procedure reported, or None when it has none."""
    for item in _children(sr):
        if _is(item, codes.DCM.ProcedureReported):
            return coding(item.ConceptCodeSequence[0])
    return None


def reported_findings(sr: Dataset) -> list[ReportedFinding]:
    """Return the findings of an SR of ours: its measurement groups that carry a probability
    (the segments' groups carry none), in their order."""
    findings = []
    for container in _children(sr):
        if not _is(container, codes.DCM.ImagingMeasurements):
            continue
        for group in _children(container):
            items = _children(group)
            numbers = {_concept(i)[1]: float(i.MeasuredValueSequence[0].NumericValue)
                       for i in items if i.ValueType == "NUM"}
            if codes.DCM.Probability.value not in numbers:
                continue
            text = {_concept(i)[1]: str(i.TextValue) for i in items if i.ValueType == "TEXT"}
            uid = next(str(i.UID) for i in items if i.ValueType == "UIDREF")
            found = next(i.ConceptCodeSequence[0] for i in items if _is(i, codes.DCM.Finding))
            yes = {_concept(i)[1]: str(i.ConceptCodeSequence[0].CodeValue) == codes.SCT.Yes.value
                   for i in items if i.ValueType == "CODE" and _concept(i)[0] == LOCAL_SCHEME}
            findings.append(ReportedFinding(
                tracking_uid=uid, name=text.get(codes.DCM.TrackingIdentifier.value, str(found.CodeMeaning)),
                code=coding(found), probability=numbers[codes.DCM.Probability.value],
                threshold=numbers.get(codes.DCM.ThresholdValue.value, 1.0),
                flagged=yes.get(FLAG_MEANING, False), experimental=yes.get(EXPERIMENTAL_MEANING, False)))
    return findings


def _uid_identifier(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    """Return the transaction entry that creates or replaces ``resource`` by its first identifier."""
    kind, key = resource["resourceType"], resource["identifier"][0]
    token = f"{key['system']}|{key['value']}"
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid5(ENTRY_NAMESPACE, f'{kind}|{token}')}",
        "resource": resource,
        "request": {"method": "PUT", "url": f"{kind}?{urlencode({'identifier': token})}"},
    }


def _subject(sr: Dataset) -> dict[str, Any] | None:
    """Return the patient as a logical reference by PatientID, or None when the SR has none."""
    patient_id = str(sr.get("PatientID") or "")
    if not patient_id:
        return None
    identifier: dict[str, Any] = {"value": patient_id}
    if sr.get("IssuerOfPatientID"):
        identifier["assigner"] = {"display": str(sr.IssuerOfPatientID)}
    return {"type": "Patient", "identifier": identifier}


def _observation(finding: ReportedFinding, subject: dict[str, Any] | None, study: dict[str, Any],
                 device: str) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [_uid_identifier(finding.tracking_uid)],
        "status": "final",
        "category": [IMAGING],
        "code": {"coding": [finding.code], "text": finding.name},
        "derivedFrom": [study],
        "valueQuantity": {"value": finding.probability, **PROBABILITY_UNIT},
        "referenceRange": [{"high": {"value": finding.threshold, **PROBABILITY_UNIT},
                            "text": f"flagged at or above {finding.threshold:g}"}],
        "device": {"display": device},
    }
    if subject:
        observation["subject"] = subject
    if finding.flagged:
        observation["interpretation"] = [ABNORMAL]
    if finding.experimental:
        observation["note"] = [{"text": "Experimental model: reported, never flagged."}]
    return observation


def _conclusion(findings: Sequence[ReportedFinding]) -> str:
    flagged = [f for f in findings if f.flagged]
    if not flagged:
        return f"{DISCLAIMER} No finding flagged."
    return f"{DISCLAIMER} Flagged: " + "; ".join(
        f"{f.code['display']} {f.probability:.2f} (threshold {f.threshold:g})" for f in flagged) + "."


def report_bundle(srs: Sequence[Dataset]) -> dict[str, Any]:
    """Return the transaction Bundle of ``srs``, the SRs of one study (see the module).

    Raises ValueError when there is none, when they are of several studies, or when one is
    not an SR of ours (no procedure reported).
    """
    if not srs:
        raise ValueError("At least one SR is required.")
    studies = {str(sr.StudyInstanceUID) for sr in srs}
    if len(studies) != 1:
        raise ValueError(f"The SRs must be of one study, got {len(studies)}.")
    procedures = [procedure_coding(sr) for sr in srs]
    if None in procedures:
        raise ValueError("Each SR must report its procedure (a TID 1500 Measurement Report).")
    study_uid = studies.pop()
    study = {"type": "ImagingStudy", "identifier": _uid_identifier(study_uid)}
    subject = _subject(srs[0])
    entries = []
    findings: list[ReportedFinding] = []
    for sr in srs:
        device = f"{sr.get('Manufacturer', '')} {sr.get('ManufacturerModelName', '')}".strip() or "dicom-node"
        for finding in reported_findings(sr):
            findings.append(finding)
            entries.append(_entry(_observation(finding, subject, study, device)))
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [_uid_identifier(str(sr.SOPInstanceUID)) for sr in sorted(
            srs, key=lambda sr: str(sr.SOPInstanceUID))],
        "status": "final",
        "category": [IMAGING],
        "code": {"coding": [procedures[0]]},
        "imagingStudy": [study],
        "result": [{"reference": entry["fullUrl"], "type": "Observation"} for entry in entries],
        "conclusion": _conclusion(findings),
    }
    if subject:
        report["subject"] = subject
    return {"resourceType": "Bundle", "type": "transaction", "entry": [_entry(report), *entries]}
