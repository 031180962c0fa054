"""Retention: deleting spooled images and results once kept long enough, and old audit events.

Audit events outlive the data they describe: they hold pseudonyms, never patient data. Those
not yet exported to the audit repository are kept until they are.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.audit.chain import purge_before
from dicom_node.audit.syslog_export import unexported_since
from dicom_node.config import Settings
from dicom_node.db import (
    Delivery, DeliveryStatus, Instance, Job, JobStatus, NodeDatabase, OutboxMessage, Task,
)
from dicom_node.errors import DataRemovalError
from dicom_node.results import result_dir

logger = logging.getLogger(__name__)

FINISHED = [status.value for status in JobStatus if status.finished]
UNFINISHED_DELIVERIES = [status.value for status in DeliveryStatus if not status.finished]


@dataclass(frozen=True)
class Removed:
    """What deleting instances' data took away."""

    instances: int = 0
    files: int = 0
    result_folders: int = 0
    jobs: int = 0
    deliveries: int = 0

    def __add__(self, other: Removed) -> Removed:
        return Removed(self.instances + other.instances, self.files + other.files,
                       self.result_folders + other.result_folders, self.jobs + other.jobs,
                       self.deliveries + other.deliveries)

    def __str__(self) -> str:
        text = (f"{self.instances} instances, {self.files} spooled files, "
                f"{self.result_folders} result folders")
        return text + (f", {self.jobs} jobs, {self.deliveries} deliveries"
                       if self.jobs or self.deliveries else "")


def delete_instance_data(settings: Settings, instance: Instance) -> Removed:
    """Delete the spooled file and the results folder of ``instance``; return what went.

    Empty study and series folders left behind are removed too. Raises
    :class:`DataRemovalError` when a recorded path lies outside the spool or results folder.
    """
    spooled = _inside(Path(instance.path), settings.spool_dir)
    results = _inside(result_dir(settings.results_dir, instance.study_instance_uid,
                                 instance.sop_instance_uid), settings.results_dir)
    had_file, had_results = spooled.is_file(), results.is_dir()
    spooled.unlink(missing_ok=True)
    shutil.rmtree(results, ignore_errors=True)
    _remove_empty_parents(spooled.parent, settings.spool_dir)
    _remove_empty_parents(results.parent, settings.results_dir)
    return Removed(1, int(had_file), int(had_results))


def delete_instance_records(session: Session, instances: Sequence[Instance]) -> Removed:
    """Delete the rows that name ``instances``: their deliveries, the jobs left with no other
    instance (with those jobs' deliveries), the outbox messages about any of these, and the
    instance rows; return the jobs and deliveries deleted.

    Call :func:`delete_instance_data` for each instance first: this removes rows only.
    """
    sop_uids = [instance.sop_instance_uid for instance in instances]
    job_ids = {instance.job_id for instance in instances if instance.job_id is not None}
    session.execute(delete(Instance).where(Instance.id.in_([i.id for i in instances])))
    emptied = list(session.scalars(select(Job.id).where(
        Job.id.in_(job_ids), ~exists().where(Instance.job_id == Job.id))))
    deliveries = list(session.scalars(select(Delivery.id).where(
        Delivery.source_sop_instance_uid.in_(sop_uids) | Delivery.job_id.in_(emptied))))
    session.execute(delete(OutboxMessage).where(
        ((OutboxMessage.task == Task.DELIVER) & OutboxMessage.target_id.in_(deliveries))
        | ((OutboxMessage.task == Task.ANALYZE) & OutboxMessage.target_id.in_(emptied))))
    session.execute(delete(Delivery).where(Delivery.id.in_(deliveries)))
    session.execute(delete(Job).where(Job.id.in_(emptied)))
    return Removed(jobs=len(emptied), deliveries=len(deliveries))


def sweep_data(settings: Settings, trail: AuditTrail, db: NodeDatabase, *,
               now: datetime | None = None) -> Removed:
    """Delete the images, results and rows of instances whose job finished ``data_days`` ago
    and whose results are all delivered, committed or dead-lettered: a result stored to a
    destination that commits storage, not yet committed, keeps its instance.

    Records DATA_PURGED per instance. Returns what was removed; nothing when retention
    is off (``retention.data_days`` null).
    """
    if settings.retention.data_days is None:
        return Removed()
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.retention.data_days)
    removed = Removed()
    with db.session() as session:
        expired = session.scalars(
            select(Instance).join(Job, Instance.job_id == Job.id)
            .where(Job.status.in_(FINISHED), Job.finished_at < cutoff)
            .where(~exists().where(Delivery.source_sop_instance_uid == Instance.sop_instance_uid,
                                   Delivery.status.in_(UNFINISHED_DELIVERIES)))
        ).all()
        for instance in expired:
            removed += delete_instance_data(settings, instance)
            session.delete(instance)
            trail.record(AuditEvent.DATA_PURGED, actor="retention",
                         pseudonym=instance.patient_pseudonym,
                         study_uid=instance.study_instance_uid,
                         series_uid=instance.series_instance_uid,
                         sop_uid=instance.sop_instance_uid, job_id=instance.job_id,
                         detail=f"image and results deleted after {settings.retention.data_days:g} "
                                "days of retention")
    if removed.instances:
        logger.info("retention removed %s", removed)
    return removed


def purge_audit(trail: AuditTrail, older_than: timedelta, *, actor: str,
                now: datetime | None = None, keep_unexported: bool = True) -> int:
    """Delete audit events older than ``older_than``; return how many.

    With ``keep_unexported`` (the default), events the audit repository has not yet taken stay
    (see :func:`~dicom_node.audit.syslog_export.unexported_since`). The chain stays verifiable
    from the first kept event. Raises ``ValueError`` for a non-positive age,
    :class:`AuditError` when the store stays locked.
    """
    if older_than <= timedelta(0):
        raise ValueError("The retention age must be positive.")
    cutoff = (now or datetime.now(UTC)) - older_than
    if keep_unexported:
        with trail.connect() as connection:
            oldest = unexported_since(connection)
        if oldest is not None and oldest < cutoff:
            logger.warning("audit events since %s are kept: not yet exported to the audit "
                           "repository", oldest.isoformat())
            cutoff = oldest
    deleted = purge_before(trail, cutoff, actor=actor)
    logger.info("purged %d audit events older than %s", deleted, older_than)
    return deleted


def sweep(settings: Settings, trail: AuditTrail, db: NodeDatabase) -> None:
    """Apply every configured retention: images and results, then audit events."""
    sweep_data(settings, trail, db)
    if settings.retention.audit_days is not None:
        purge_audit(trail, timedelta(days=settings.retention.audit_days), actor="retention",
                    keep_unexported=settings.audit.syslog.enabled)


def _inside(path: Path, root: Path) -> Path:
    resolved, base = path.resolve(), root.resolve()
    if not resolved.is_relative_to(base) or resolved == base:
        raise DataRemovalError(f"refusing to delete {resolved}: it is not inside {base}")
    return resolved


def _remove_empty_parents(folder: Path, root: Path) -> None:
    base = root.resolve()
    while folder != base and folder.is_relative_to(base):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty, or already gone
        folder = folder.parent
