"""Site calibration: how one finding's scores separate a site's own labelled cases, and the
threshold that meets a target sensitivity there, written as a site override that the
pipeline then uses (:mod:`pipelines.site_override`).

Cases are (score, label) pairs. :func:`site_cases` makes them from a labels file (CSV with a
``label`` column of 1/0 and a ``sop_instance_uid`` or ``accession_number`` column) and the
node's analysed instances (scores from their results' ``findings.json``; accession numbers
from their spooled headers, read and never shown). An accession labels a study, so its case
scores as the study's highest-scoring image (the study is flagged when any image is). Other
sources of labels (radiologists' feedback) give their pairs to :func:`assess` directly.

The proposed threshold is the highest whose sensitivity's lower 95 % bootstrap bound on the
site's cases reaches the target: a threshold whose point sensitivity just reaches it falls
short on the next cases about half of the time, and a flag that misses findings is the
harm to guard against; the price is specificity, which the figures show.
Confidence intervals are percentile intervals of a bootstrap that resamples positives and
negatives apart (their counts fixed), with a fixed seed: the same cases give the same figures.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.config import Settings
from dicom_node.db import Feedback, FeedbackVerdict, Instance, InstanceVerdict, NodeDatabase
from dicom_node.errors import NodeError
from dicom_node.results import result_dir
from pipelines.site_override import (
    newest_override,
    override_folder,
    override_versions,
    read_override,
)

logger = logging.getLogger(__name__)

#: The bootstrap's seed: the same cases always give the same intervals and threshold.
SEED = 31
#: The columns a labels file may key its cases by.
KEY_COLUMNS = ("sop_instance_uid", "accession_number")
RULE = "highest threshold whose sensitivity's lower 95 % bootstrap bound reaches the target"


class CalibrationError(NodeError):
    """Calibration cannot be done: unreadable labels, too few cases, no scores."""


@dataclass(frozen=True)
class Estimate:
    """A figure on the site's cases and its 95 % bootstrap interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} (95 % CI {self.low:.3f}-{self.high:.3f})"


@dataclass(frozen=True)
class OperatingPoint:
    """Sensitivity and specificity when scores at or above ``threshold`` are flagged."""

    threshold: float
    sensitivity: Estimate
    specificity: Estimate


@dataclass(frozen=True)
class Assessment:
    """What the site's cases say of one finding: counts, AUROC, the current and proposed operating points."""

    positives: int
    negatives: int
    target_sensitivity: float
    auroc: Estimate
    current: OperatingPoint | None
    proposed: OperatingPoint

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rule": RULE}


class _Bootstrap:
    """Stratified resamples of the positives' and negatives' scores, each row sorted."""

    def __init__(self, positives: np.ndarray, negatives: np.ndarray, resamples: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.positives = np.sort(rng.choice(positives, (resamples, positives.size)), axis=1)
        self.negatives = np.sort(rng.choice(negatives, (resamples, negatives.size)), axis=1)

    def sensitivities(self, thresholds: np.ndarray) -> np.ndarray:
        """Return resamples x thresholds sensitivities."""
        below = np.stack([np.searchsorted(row, thresholds, side="left") for row in self.positives])
        return 1.0 - below / self.positives.shape[1]

    def specificities(self, threshold: float) -> np.ndarray:
        return np.array([np.searchsorted(row, threshold, side="left") for row in self.negatives]) / self.negatives.shape[1]

    def aurocs(self) -> np.ndarray:
        return np.array([_auroc(p, n) for p, n in zip(self.positives, self.negatives, strict=True)])


def _auroc(positives: np.ndarray, sorted_negatives: np.ndarray) -> float:
    """Return P(positive > negative) + P(tie) / 2, the Mann-Whitney AUROC."""
    below = np.searchsorted(sorted_negatives, positives, side="left")
    not_above = np.searchsorted(sorted_negatives, positives, side="right")
    return float((below + not_above).sum() / 2 / (positives.size * sorted_negatives.size))


def _estimate(value: float, resampled: np.ndarray) -> Estimate:
    low, high = np.percentile(resampled, [2.5, 97.5])
    return Estimate(round(float(value), 4), round(float(low), 4), round(float(high), 4))


def assess(pairs: Iterable[tuple[float, int]], *, target_sensitivity: float, current_threshold: float | None,
           min_positives: int = 20, min_negatives: int = 20, resamples: int = 2000,
           seed: int = SEED) -> Assessment:
    """Return the assessment of (score, label) pairs (label 1 positive, 0 negative) and the threshold
    proposed for ``target_sensitivity`` (see the module's rule).

    Raises :class:`CalibrationError` when the target is not in (0, 1), a label is not 0/1, or
    there are fewer than ``min_positives`` positives or ``min_negatives`` negatives.
    """
    if not 0 < target_sensitivity < 1:
        raise CalibrationError(f"the target sensitivity must lie between 0 and 1, got {target_sensitivity}")
    cases = list(pairs)
    if any(label not in (0, 1) for _, label in cases):
        raise CalibrationError("every label must be 1 (positive) or 0 (negative)")
    scores = np.array([score for score, _ in cases], dtype=float)
    labels = np.array([label for _, label in cases], dtype=int)
    positives, negatives = scores[labels == 1], np.sort(scores[labels == 0])
    if positives.size < min_positives or negatives.size < min_negatives:
        raise CalibrationError(
            f"too few cases to say anything: {positives.size} positive and {negatives.size} negative, "
            f"at least {min_positives} and {min_negatives} needed (calibration.min_positives/min_negatives)")
    boot = _Bootstrap(positives, negatives, resamples, seed)

    candidates = np.unique(positives)
    lower = np.percentile(boot.sensitivities(candidates), 2.5, axis=0)
    proposed = float(candidates[lower >= target_sensitivity].max())

    def point(threshold: float) -> OperatingPoint:
        sensitivity = float((positives >= threshold).mean())
        specificity = float((negatives < threshold).mean())
        return OperatingPoint(round(threshold, 6),
                              _estimate(sensitivity, boot.sensitivities(np.array([threshold]))[:, 0]),
                              _estimate(specificity, boot.specificities(threshold)))

    return Assessment(int(positives.size), int(negatives.size), target_sensitivity,
                      _estimate(_auroc(positives, negatives), boot.aurocs()),
                      None if current_threshold is None else point(current_threshold), point(proposed))


def read_labels(path: Path) -> tuple[str, dict[str, int]]:
    """Return the key column of the labels CSV at ``path`` and its labels by key.

    Raises :class:`CalibrationError` naming the line (never a key: keys identify patients' studies)
    when the file is unreadable, has no ``label`` and key column, a label is not 0/1, or a key
    is labelled both ways.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            header = [str(name).strip().lower() for name in reader.fieldnames or []]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CalibrationError(f"the labels file cannot be read: {type(exc).__name__}") from exc
    keys = [column for column in KEY_COLUMNS if column in header]
    if "label" not in header or len(keys) != 1:
        raise CalibrationError("the labels file needs a header with a 'label' column and one of "
                               f"{', '.join(KEY_COLUMNS)}")
    labels: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        fields = {str(name).strip().lower(): (value or "").strip() for name, value in row.items()}
        key, label = fields[keys[0]], fields["label"]
        if label not in ("0", "1") or not key:
            raise CalibrationError(f"line {line} of the labels file: a key and a label of 1 or 0 expected")
        if labels.setdefault(key, int(label)) != int(label):
            raise CalibrationError(f"line {line} of the labels file labels a case the other way than before")
    return keys[0], labels


@dataclass(frozen=True)
class SiteCases:
    """The labelled cases found among the analysed instances: (score, label) pairs of one model
    version, the threshold in force on its newest case, and how many labels matched nothing."""

    pairs: list[tuple[float, int]]
    model_version: str
    current_threshold: float
    labelled: int
    unmatched: int
    other_models: int


@dataclass(frozen=True)
class _Scored:
    key: str
    score: float
    threshold: float
    model_version: str
    written: float


def _scored_instances(settings: Settings, pipeline: str, finding: str, key_column: str,
                      keys: Mapping[str, int]) -> list[_Scored]:
    """Return the analysed instances with a score of ``finding`` whose key is labelled."""
    db = NodeDatabase(settings.node_database_url)
    try:
        with db.session() as session:
            instances = session.scalars(select(Instance).where(Instance.verdict == InstanceVerdict.ANALYSED)).all()
    finally:
        db.dispose()
    found = []
    for instance in instances:
        findings_file = result_dir(settings.results_dir, instance.study_instance_uid, instance.sop_instance_uid,
                                   pipeline) / "findings.json"
        try:
            summary = json.loads(findings_file.read_text())
            key = instance.sop_instance_uid if key_column == "sop_instance_uid" else str(
                dcmread(instance.path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
                .get("AccessionNumber", "")).strip()
        except (OSError, ValueError, InvalidDicomError):  # purged by retention, or never written: not a case
            continue
        scored = [f for f in summary.get("findings", []) if f.get("name") == finding]
        if key in keys and scored:
            found.append(_Scored(key, float(scored[0]["probability"]), float(scored[0]["threshold"]),
                                 str(summary.get("model_version", "")), findings_file.stat().st_mtime))
    return found


def feedback_labels(settings: Settings, pipeline: str, finding: str) -> dict[str, int]:
    """Return a label by SOP Instance UID from the readers' feedback on ``finding``: the newest verdict
    on each image, an agreement keeping ``pipeline``'s flag of it, a disagreement reversing it (images
    whose results are gone are left out)."""
    db = NodeDatabase(settings.node_database_url)
    try:
        with db.session() as session:
            rows = session.execute(
                select(Feedback.sop_instance_uid, Feedback.verdict, Instance.study_instance_uid)
                .join(Instance, Instance.sop_instance_uid == Feedback.sop_instance_uid)
                .where(Feedback.finding == finding).order_by(Feedback.id)).all()
    finally:
        db.dispose()
    newest = {sop: (verdict, study) for sop, verdict, study in rows}
    labels = {}
    for sop, (verdict, study) in newest.items():
        try:
            summary = json.loads((result_dir(settings.results_dir, study, sop, pipeline) / "findings.json").read_text())
        except (OSError, ValueError):
            continue
        flags = [bool(f.get("flagged")) for f in summary.get("findings", []) if f.get("name") == finding]
        if flags:
            labels[sop] = int(flags[0] == (verdict is FeedbackVerdict.AGREE))
    return labels


def feedback_digest(labels: Mapping[str, int]) -> str:
    """Return the sha256 of feedback labels, recorded in the override as a labels file's would be."""
    return hashlib.sha256("".join(f"{sop},{label}\n" for sop, label in sorted(labels.items())).encode()).hexdigest()


def site_cases(settings: Settings, pipeline: str, finding: str, key_column: str,
               labels: Mapping[str, int]) -> SiteCases:
    """Return the cases ``labels`` names (by ``key_column``: sop_instance_uid or accession_number) among
    ``pipeline``'s results of ``finding``, scored by the model version of the newest result (results
    of other versions are left out and counted).

    Raises :class:`CalibrationError` when no labelled case has a score.
    """
    scored = _scored_instances(settings, pipeline, finding, key_column, labels)
    if not scored:
        raise CalibrationError(f"none of the {len(labels)} labelled cases has a {pipeline} result with a "
                               f"'{finding}' score")
    newest = max(scored, key=lambda s: s.written)
    current = [s for s in scored if s.model_version == newest.model_version]
    by_key: dict[str, float] = {}
    for case in current:  # a study (accession) scores as its highest-scoring image
        by_key[case.key] = max(case.score, by_key.get(case.key, 0.0))
    return SiteCases([(score, labels[key]) for key, score in by_key.items()], newest.model_version,
                     newest.threshold, len(labels), len(labels) - len({s.key for s in scored}),
                     len({s.key for s in scored} - set(by_key)))


def labels_digest(path: Path) -> str:
    """Return the sha256 of the labels file, recorded in the override in place of its content."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_override(settings: Settings, pipeline: str, finding: str, assessment: Assessment, cases: SiteCases,
                   *, labels_sha256: str, actor: str) -> Path:
    """Write the next version of ``pipeline``'s site override: ``finding`` at the proposed threshold,
    with its figures, the labels' digest, the time and ``actor``, over the newest override's other
    findings when it was calibrated on the same model; audit it. Return the file's path.

    Raises :class:`pipelines.errors.WeightsError` when the newest override is unreadable.
    """
    folder = override_folder(settings.state_dir, pipeline)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous_path = newest_override(folder)
    previous = read_override(previous_path) if previous_path else None
    thresholds: dict[str, float] = {}
    calibrations: dict[str, Any] = {}
    if previous is not None and previous.model_version == cases.model_version:
        thresholds = previous.thresholds
        calibrations = yaml.safe_load(previous.path.read_text(encoding="utf-8")).get("calibrations") or {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    calibration = {**assessment.as_dict(), "previous_threshold": cases.current_threshold,
                   "labels_sha256": labels_sha256, "written_at": now, "written_by": actor}
    content = {"pipeline": pipeline, "model_version": cases.model_version,
               "thresholds": {**thresholds, finding: assessment.proposed.threshold},
               "calibrations": {**calibrations, finding: calibration}}
    draft = folder / f".override-{os.getpid()}.yaml"
    draft.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    try:
        version = max(override_versions(folder), default=0) + 1
        while True:  # link, not rename: a version another writer took meanwhile is never replaced
            path = folder / f"override-v{version}.yaml"
            try:
                os.link(draft, path)
                break
            except FileExistsError:
                version += 1
    finally:
        draft.unlink()
    trail = AuditTrail.from_settings(settings)
    try:
        trail.record(AuditEvent.CALIBRATION_WRITTEN, actor=actor,
                     detail=f"{pipeline} {finding}: threshold {cases.current_threshold:g} -> "
                            f"{assessment.proposed.threshold:g} ({path.name})")
    finally:
        trail.close()
    logger.info("Site override %s written", path)
    return path
