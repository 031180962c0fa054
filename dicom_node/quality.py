"""What the node did over a window, as figures: scores and flags per finding, gate skip reasons,
arrival-to-result latency, volume per sending AE, and each finding's drift from its validation
reference (population stability index).

Read from the node database (instances received in the window) and each analysed instance's
``findings.json`` (:mod:`dicom_node.results`); nothing here names a patient. The reference of a
finding comes from its pipeline's weights manifest (:func:`reference_of`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import func, select

from dicom_node.db import (
    Delivery,
    Feedback,
    FeedbackVerdict,
    Instance,
    InstanceVerdict,
    NodeDatabase,
    utcnow,
)
from dicom_node.metrics import FLAG_RATE, SCORE_PSI, WINDOW_SCORES
from dicom_node.plugins import pipeline_plugin, plugin_options
from dicom_node.results import result_dir
from dicom_node.routing import Router

if TYPE_CHECKING:
    from dicom_node.config import Settings

logger = logging.getLogger(__name__)

#: A bin's share below this counts as this in the index (an empty bin would make it infinite).
PSI_FLOOR = 1e-4
#: The usual reading of the index: below 0.1 stable, 0.1 to 0.25 a moderate shift, above a major one.
PSI_MODERATE, PSI_MAJOR = 0.1, 0.25
FINDINGS_FILE = "findings.json"
#: The bins of a window's scores against another window's: 10 of 0.1; and the fewest scores in
#: each window that make the comparison worth showing.
WINDOW_EDGES = tuple(i / 10 for i in range(11))
MIN_WINDOW_SCORES = 20
#: Half an image added to each bin of both windows, so that a tail bin holding one score in one
#: window and none in the other does not read as drift.
WINDOW_SMOOTHING = 0.5
#: The window of the drift gauges that ``serve`` keeps.
DRIFT_WINDOW = timedelta(days=7)


@dataclass(frozen=True)
class Reference:
    """The share of a finding's scores in each bin ``[edges[i], edges[i+1])`` expected from its
    validation, and where that comes from (a fixed text)."""

    edges: tuple[float, ...]
    shares: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.shares) + 1 or len(self.shares) < 2:
            raise ValueError("A reference needs two or more bins and one more edge than bins.")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("A reference's bin edges must increase.")
        if any(s < 0 for s in self.shares) or not math.isclose(sum(self.shares), 1.0, abs_tol=1e-6):
            raise ValueError("A reference's shares must be non-negative and sum to 1.")


def bin_shares(scores: Sequence[float], edges: Sequence[float], *, smoothing: float = 0.0) -> list[float]:
    """Return the share of ``scores`` in each bin of ``edges`` (the last bin holds its upper edge;
    scores outside the edges count in the nearest bin), each bin's count plus ``smoothing``."""
    counts = [smoothing] * (len(edges) - 1)
    for score in scores:
        index = sum(1 for edge in edges[1:-1] if score >= edge)
        counts[index] += 1
    total = sum(counts) or 1
    return [count / total for count in counts]


def psi(observed: Sequence[float], expected: Sequence[float]) -> float:
    """Return the population stability index of the bin shares ``observed`` against ``expected``:
    the sum of (o - e) ln(o / e), shares floored at :data:`PSI_FLOOR`. 0 for identical shares."""
    if len(observed) != len(expected):
        raise ValueError("The observed and expected shares need the same bins.")
    total = 0.0
    for o, e in zip(observed, expected):
        o, e = max(o, PSI_FLOOR), max(e, PSI_FLOOR)
        total += (o - e) * math.log(o / e)
    return total


def reference_of(finding: Mapping[str, Any]) -> Reference | None:
    """Return the validation reference of a manifest's finding entry, or None when it has none.

    ``validation.score_histogram`` (``edges`` and ``counts``) is used as it is. Without it, the
    reference is two bins split at the threshold, the share above it being what the validation
    split's figures imply: (sensitivity × positives + (1 − specificity) × negatives) / images.
    """
    validation = finding.get("validation") or {}
    histogram = validation.get("score_histogram")
    if histogram:
        counts = [float(c) for c in histogram["counts"]]
        return Reference(tuple(float(e) for e in histogram["edges"]), tuple(c / sum(counts) for c in counts),
                         f"validation score histogram ({int(sum(counts))} images)")
    needed = ("images", "positives", "sensitivity", "specificity")
    threshold = finding.get("threshold")
    if threshold is None or any(validation.get(key) is None for key in needed):
        return None
    images, positives = float(validation["images"]), float(validation["positives"])
    above = (validation["sensitivity"] * positives
             + (1 - validation["specificity"]) * (images - positives)) / images
    return Reference((0.0, float(threshold), 1.0), (1 - above, above),
                     f"validation share above the threshold ({int(images)} images, "
                     f"{int(positives)} positive), two bins")


def manifest_references(manifest: Path) -> dict[str, Reference]:
    """Return the references of a weights manifest's findings, by finding name (those it can give);
    an unreadable manifest gives none, logged."""
    try:
        entries = (yaml.safe_load(manifest.read_text()) or {}).get("findings") or []
        return {entry["name"]: ref for entry in entries if (ref := reference_of(entry)) is not None}
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as exc:
        logger.warning("No validation references from the manifest %s: %s", manifest, type(exc).__name__)
        return {}


@dataclass(frozen=True)
class Score:
    """One finding's score of one analysed image."""

    received_at: datetime
    probability: float
    threshold: float
    flagged: bool
    experimental: bool


@dataclass
class FindingFigures:
    """A finding's scores over the window, its reference and its drift from it."""

    pipeline: str
    name: str
    display_name: str
    scores: list[Score] = field(default_factory=list)
    reference: Reference | None = None

    @property
    def probabilities(self) -> list[float]:
        return [s.probability for s in self.scores]

    @property
    def flag_rate(self) -> float:
        return sum(s.flagged for s in self.scores) / len(self.scores) if self.scores else 0.0

    @property
    def above_threshold_rate(self) -> float:
        return sum(s.probability >= s.threshold for s in self.scores) / len(self.scores) if self.scores else 0.0

    @property
    def experimental(self) -> bool:
        return any(s.experimental for s in self.scores)

    @property
    def psi(self) -> float | None:
        """The drift of the window's scores from the reference; None without either."""
        if self.reference is None or not self.scores:
            return None
        return psi(bin_shares(self.probabilities, self.reference.edges), self.reference.shares)

    def psi_against(self, earlier: FindingFigures | None) -> float | None:
        """The drift of the window's scores from an ``earlier`` window's, over :data:`WINDOW_EDGES`
        with :data:`WINDOW_SMOOTHING`; None when either has fewer than :data:`MIN_WINDOW_SCORES` scores."""
        if earlier is None or min(len(self.scores), len(earlier.scores)) < MIN_WINDOW_SCORES:
            return None
        return psi(bin_shares(self.probabilities, WINDOW_EDGES, smoothing=WINDOW_SMOOTHING),
                   bin_shares(earlier.probabilities, WINDOW_EDGES, smoothing=WINDOW_SMOOTHING))


@dataclass
class Window:
    """Everything the report and the drift gauges show of the instances received in ``[since, until)``."""

    since: datetime
    until: datetime
    findings: dict[tuple[str, str], FindingFigures]
    verdicts: Counter[str]
    skip_reasons: Counter[str]
    volume_by_ae: Counter[str]
    #: Arrival time and seconds from arrival to its last result delivered, of each analysed instance
    #: with a delivered result.
    latencies: list[tuple[datetime, float]]


def scores_of(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Return the findings of each pipeline's ``findings.json`` under an instance's result folder,
    by pipeline name, each as name, display_name, probability, threshold, flagged and experimental;
    a file that is missing, unreadable or lacks one of these gives nothing for its pipeline (logged)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob(f"*/{FINDINGS_FILE}")):
        try:
            found[path.parent.name] = [
                {"name": str(entry["name"]), "display_name": str(entry.get("display_name") or entry["name"]),
                 "probability": float(entry["probability"]), "threshold": float(entry["threshold"]),
                 "flagged": bool(entry["flagged"]), "experimental": bool(entry.get("experimental"))}
                for entry in json.loads(path.read_text())["findings"]]
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("Unreadable %s under %s", FINDINGS_FILE, path.parent)
    return found


class ScoreCache:
    """The findings of analysed instances, each file read once while its instance's verdict stays
    the same (a job run again records another): what keeps the drift gauges cheap when they are
    recomputed every minute."""

    def __init__(self, results_root: Path) -> None:
        self.results_root = results_root
        self._read: dict[tuple[int, str | None], dict[str, list[dict[str, Any]]]] = {}

    def findings(self, instances: Iterable[Instance]) -> dict[int, dict[str, list[dict[str, Any]]]]:
        """Return the findings of ``instances`` by id, forgetting those of any other instance."""
        kept = {}
        for instance in instances:
            key = (instance.id, instance.verdict_reason)
            kept[key] = self._read.get(key) or scores_of(
                result_dir(self.results_root, instance.study_instance_uid, instance.sop_instance_uid))
        self._read = kept
        return {instance_id: found for (instance_id, _), found in kept.items()}


def collect(db: NodeDatabase, results_root: Path, references: Mapping[str, Mapping[str, Reference]], *,
            since: datetime, until: datetime | None = None, cache: ScoreCache | None = None) -> Window:
    """Return the figures of the instances received from ``since`` to ``until`` (default now);
    ``references`` holds each pipeline's references by finding name."""
    until = until or utcnow()
    in_window = (Instance.received_at >= since, Instance.received_at < until)
    with db.session() as session:
        instances = session.scalars(select(Instance).where(*in_window).order_by(Instance.id)).all()
        delivered = dict(session.execute(
            select(Instance.id, func.max(Delivery.delivered_at))
            .join(Delivery, Delivery.source_sop_instance_uid == Instance.sop_instance_uid)
            .where(*in_window, Instance.verdict == InstanceVerdict.ANALYSED, Delivery.delivered_at.is_not(None))
            .group_by(Instance.id)).all())
    analysed = [i for i in instances if i.verdict is InstanceVerdict.ANALYSED]
    by_instance = (cache or ScoreCache(results_root)).findings(analysed)
    findings: dict[tuple[str, str], FindingFigures] = {}
    for instance in analysed:
        for pipeline, entries in by_instance[instance.id].items():
            for entry in entries:
                key = (pipeline, entry["name"])
                figures = findings.get(key)
                if figures is None:
                    figures = findings[key] = FindingFigures(pipeline, entry["name"], entry["display_name"],
                                                             reference=references.get(pipeline, {}).get(entry["name"]))
                figures.scores.append(Score(instance.received_at, entry["probability"], entry["threshold"],
                                            entry["flagged"], entry["experimental"]))
    received = {i.id: i.received_at for i in analysed}
    return Window(
        since=since, until=until, findings=dict(sorted(findings.items())),
        verdicts=Counter(i.verdict.value if i.verdict else "pending" for i in instances),
        skip_reasons=Counter(i.verdict_reason or "no reason recorded"
                             for i in instances if i.verdict is InstanceVerdict.SKIPPED),
        volume_by_ae=Counter(i.calling_ae for i in instances),
        latencies=sorted((received[iid], (at - received[iid]).total_seconds()) for iid, at in delivered.items()),
    )


@dataclass(frozen=True)
class ReaderAgreement:
    """A reader's agreement with one finding's result of one image (from the feedback records)."""

    pipeline: str
    finding: str
    flagged: bool
    agrees: bool


def reader_agreements(db: NodeDatabase, results_root: Path, *, since: datetime,
                      until: datetime | None = None) -> list[ReaderAgreement]:
    """Return each reader's newest verdict, given from ``since`` to ``until``, on a finding of an image
    whose results are still there (the finding's flag read from them); older ones are left out."""
    until = until or utcnow()
    with db.session() as session:
        rows = session.execute(
            select(Feedback, Instance.study_instance_uid)
            .join(Instance, Instance.sop_instance_uid == Feedback.sop_instance_uid)
            .where(Feedback.created_at >= since, Feedback.created_at < until)
            .order_by(Feedback.id)).all()
    newest = {(f.user, f.sop_instance_uid, f.finding): (f, study) for f, study in rows}
    agreements = []
    for feedback, study in newest.values():
        for pipeline, entries in scores_of(result_dir(results_root, study, feedback.sop_instance_uid)).items():
            for entry in entries:
                if entry["name"] == feedback.finding:
                    agreements.append(ReaderAgreement(pipeline, feedback.finding, entry["flagged"],
                                                      feedback.verdict is FeedbackVerdict.AGREE))
    return agreements


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100) of sorted ``values``, linearly interpolated."""
    if not values:
        raise ValueError("A percentile needs one or more values.")
    position = (len(values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def time_buckets(since: datetime, until: datetime) -> tuple[timedelta, list[datetime]]:
    """Return the bucket width of the time series (an hour for windows up to two days, else a day)
    and the starts of the buckets covering ``[since, until)``, the first at the whole hour or UTC
    midnight at or before ``since``."""
    hourly = until - since <= timedelta(days=2)
    width = timedelta(hours=1) if hourly else timedelta(days=1)
    start = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    start = start if hourly else start.replace(hour=0)
    starts = []
    while start < until:
        starts.append(start)
        start += width
    return width, starts


def pipeline_references(settings: Settings) -> dict[str, dict[str, Reference]]:
    """Return the validation references of the findings of each pipeline the routes run, from its
    weights manifest (a plug-in with none gives none). Raises ConfigError for an unknown pipeline."""
    references = {}
    for name in Router.from_settings(settings).pipeline_names():
        options = plugin_options(pipeline_plugin(name, settings), settings)
        manifest = getattr(options, "manifest_path", None) or options.manifest
        references[name] = manifest_references(Path(manifest)) if manifest else {}
    return references


class DriftGauges:
    """Keeps the drift gauges (:data:`~dicom_node.metrics.SCORE_PSI`, ``FLAG_RATE``,
    ``WINDOW_SCORES``) at the figures of the instances received over the last ``window``."""

    def __init__(self, db: NodeDatabase, results_root: Path, references: Mapping[str, Mapping[str, Reference]],
                 window: timedelta = DRIFT_WINDOW) -> None:
        self.db, self.references, self.window = db, references, window
        self.cache = ScoreCache(results_root)
        self._labels: set[tuple[str, str]] = set()

    def update(self) -> None:
        """Recompute the gauges; a finding no longer scored in the window loses its series."""
        figures = collect(self.db, self.cache.results_root, self.references, since=utcnow() - self.window,
                          cache=self.cache).findings
        for labels in self._labels - figures.keys():
            for gauge in (SCORE_PSI, FLAG_RATE, WINDOW_SCORES):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        for labels, finding in figures.items():
            FLAG_RATE.labels(*labels).set(finding.flag_rate)
            WINDOW_SCORES.labels(*labels).set(len(finding.scores))
            if (value := finding.psi) is not None:
                SCORE_PSI.labels(*labels).set(value)
        self._labels = set(figures)
