"""Feedback verdicts: stored in the node database, audited, listed beside the jobs they judge,
exported as CSV.

A verdict names a finding of one analysed instance of a job (its name in ``findings.json``, see
:mod:`dicom_node.results`). Each verdict is a new row: a user who changes their mind adds one, and
the newest counts. Rows hold UIDs, finding names, verdicts, reasons and user names; never a
patient's name or ID.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.db import (
    Feedback,
    FeedbackVerdict,
    Instance,
    InstanceVerdict,
    Job,
    JobStatus,
    NodeDatabase,
)
from dicom_node.errors import NodeError, NoSuchJobError
from dicom_node.results import result_dir

logger = logging.getLogger(__name__)

MAX_REASON = 1000
OVERLAY_MAX_SIDE = 1024
CSV_COLUMNS = ("id", "created_at", "user", "job_id", "sop_instance_uid", "finding", "verdict", "reason")


class FeedbackError(NodeError):
    """A verdict that cannot be recorded, or an overlay that is not there."""


@dataclass
class ReviewedFinding:
    """A finding as the page shows it, with the viewing user's newest verdict."""

    name: str
    display_name: str
    probability: float
    threshold: float
    flagged: bool
    experimental: bool
    verdict: FeedbackVerdict | None = None
    reason: str | None = None


@dataclass
class ReviewedInstance:
    sop_instance_uid: str
    pipeline: str
    overlay: bool
    findings: list[ReviewedFinding]


@dataclass
class ReviewedJob:
    """A finished job as the page lists it: no patient name or ID, the study's date and modality."""

    job_id: int
    finished_at: datetime | None
    study_date: str
    modality: str
    instances: list[ReviewedInstance] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return any(f.flagged for i in self.instances for f in i.findings)


def pipeline_results(results_root: Path, instance: Instance) -> list[tuple[str, dict[str, object]]]:
    """Return (pipeline, findings.json content) for each pipeline that analysed ``instance``, by name."""
    folder = result_dir(results_root, instance.study_instance_uid, instance.sop_instance_uid)
    found = []
    for summary in sorted(folder.glob("*/findings.json")):
        try:
            found.append((summary.parent.name, json.loads(summary.read_text())))
        except (OSError, ValueError):
            logger.warning("Unreadable findings of instance %s (%s)", instance.sop_instance_uid,
                           summary.parent.name)
    return found


def _findings(summary: dict[str, object]) -> list[ReviewedFinding]:
    return [ReviewedFinding(name=str(f["name"]), display_name=str(f.get("display_name") or f["name"]),
                            probability=float(f["probability"]), threshold=float(f["threshold"]),
                            flagged=bool(f["flagged"]), experimental=bool(f.get("experimental")))
            for f in summary.get("findings", [])]  # type: ignore[union-attr]


def _analysed(session: Session, job_id: int) -> list[Instance]:
    return list(session.scalars(select(Instance).where(Instance.job_id == job_id,
                                                       Instance.verdict == InstanceVerdict.ANALYSED)
                                .order_by(Instance.id)))


def record_verdict(db: NodeDatabase, audit: AuditTrail, results_root: Path, *, job_id: int, finding: str,
                   verdict: FeedbackVerdict | str, user: str, reason: str | None = None, sop_uid: str | None = None,
                   remote: str | None = None) -> Feedback:
    """Store and audit ``user``'s verdict on ``finding`` of job ``job_id``; return the row.

    ``sop_uid`` names the instance when several of the job's instances have that finding. Raises
    :class:`NoSuchJobError` for an unknown job, :class:`FeedbackError` for a finding no analysed
    instance of the job has (or several, without ``sop_uid``) or a reason longer than
    :data:`MAX_REASON`, ``ValueError`` for an unknown verdict.
    """
    verdict = FeedbackVerdict(verdict)
    reason = (reason or "").strip() or None
    if reason is not None and len(reason) > MAX_REASON:
        raise FeedbackError(f"a reason is at most {MAX_REASON} characters")
    with db.session() as session:
        if session.get(Job, job_id) is None:
            raise NoSuchJobError(f"no job {job_id}")
        candidates = [i for i in _analysed(session, job_id)
                      if (sop_uid is None or i.sop_instance_uid == sop_uid)
                      and any(f.name == finding for _, summary in pipeline_results(results_root, i)
                              for f in _findings(summary))]
        if not candidates:
            raise FeedbackError(f"no analysed instance of job {job_id} has a finding '{finding}'"
                                + (" (in that instance)" if sop_uid else ""))
        if len(candidates) > 1:
            raise FeedbackError(f"{len(candidates)} instances of job {job_id} have a finding '{finding}': "
                                "name one (--instance SOP_INSTANCE_UID)")
        [instance] = candidates
        row = Feedback(job_id=job_id, sop_instance_uid=instance.sop_instance_uid, finding=finding,
                       verdict=verdict, reason=reason, user=user)
        session.add(row)
        study, pseudonym = instance.study_instance_uid, instance.patient_pseudonym
    audit.record(AuditEvent.FEEDBACK_RECORDED, actor=user, remote=remote, pseudonym=pseudonym,
                 study_uid=study, sop_uid=row.sop_instance_uid, job_id=job_id,
                 detail=f"{finding}: {verdict.value}" + (" with a reason" if reason else ""))
    return row


def _study_facts(*paths: Path) -> tuple[str, str]:
    """Return (StudyDate, Modality) from the first of ``paths`` that can be read; blanks otherwise."""
    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=["StudyDate", "Modality"])
        except (OSError, InvalidDicomError):
            continue
        return str(header.get("StudyDate", "") or ""), str(header.get("Modality", "") or "")
    return "", ""


def jobs_to_review(db: NodeDatabase, results_root: Path, *, user: str, limit: int,
                   flagged_only: bool = False) -> list[ReviewedJob]:
    """Return those of the newest ``limit`` finished jobs that have analysed instances (with
    ``flagged_only``, a flagged finding), flagged ones first, with their findings and ``user``'s
    newest verdict (and its reason) on each."""
    with db.session() as session:
        jobs = list(session.scalars(select(Job).where(Job.status == JobStatus.DONE)
                                    .order_by(Job.finished_at.desc(), Job.id.desc()).limit(limit)))
        instances = {job.id: _analysed(session, job.id) for job in jobs}
        verdicts = {(row.sop_instance_uid, row.finding): (row.verdict, row.reason) for row in session.scalars(
            select(Feedback).where(Feedback.user == user, Feedback.job_id.in_([j.id for j in jobs]))
            .order_by(Feedback.id))}
    reviewed = []
    for job in jobs:
        item = ReviewedJob(job.id, job.finished_at, "", "")
        for instance in instances[job.id]:
            for pipeline, summary in pipeline_results(results_root, instance):
                findings = _findings(summary)
                for finding in findings:
                    finding.verdict, finding.reason = verdicts.get((instance.sop_instance_uid, finding.name),
                                                                   (None, None))
                folder = result_dir(results_root, instance.study_instance_uid, instance.sop_instance_uid, pipeline)
                item.instances.append(ReviewedInstance(instance.sop_instance_uid, pipeline,
                                                       (folder / "sc.dcm").is_file(), findings))
                if not item.study_date:
                    item.study_date, item.modality = _study_facts(Path(instance.path), folder / "sc.dcm")
        if item.instances and (item.flagged or not flagged_only):
            reviewed.append(item)
    return sorted(reviewed, key=lambda job: not job.flagged)


def overlay_png(db: NodeDatabase, results_root: Path, *, job_id: int, sop_uid: str, pipeline: str) -> bytes:
    """Return the overlay Secondary Capture of one instance's results as a PNG, its longer side at
    most :data:`OVERLAY_MAX_SIDE` pixels.

    Raises :class:`FeedbackError` when the instance is not an analysed instance of the job, or the
    pipeline wrote no overlay of it.
    """
    with db.session() as session:
        instance = next((i for i in _analysed(session, job_id) if i.sop_instance_uid == sop_uid), None)
    if instance is None:
        raise FeedbackError(f"job {job_id} has no analysed instance {sop_uid}")
    folders = {name: result_dir(results_root, instance.study_instance_uid, sop_uid, name)
               for name, _ in pipeline_results(results_root, instance)}
    if pipeline not in folders or not (folders[pipeline] / "sc.dcm").is_file():
        raise FeedbackError(f"no overlay of instance {sop_uid} by pipeline {pipeline}")
    pixels = dcmread(folders[pipeline] / "sc.dcm").pixel_array
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    image.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def export_csv(db: NodeDatabase, out: IO[str]) -> int:
    """Write every verdict, oldest first, as CSV (:data:`CSV_COLUMNS`) to ``out``; return how many."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = 0
    with db.session() as session:
        for row in session.scalars(select(Feedback).order_by(Feedback.id)):
            writer.writerow([row.id, row.created_at.isoformat(timespec="seconds"), row.user, row.job_id or "",
                             row.sop_instance_uid, row.finding, row.verdict.value, row.reason or ""])
            count += 1
    return count
