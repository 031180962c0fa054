"""What the ``analyze`` task does with one job: gate each instance, analyse, store results.

Each instance gets a verdict (analysed / skipped with the gate's reason / failed
with the error's type and a fixed text, never a library's message) and the job a
final status. A job that is not queued any more is left alone, so a message
delivered twice does nothing the second time. The jobs' state changes are
:mod:`dicom_node.workflow`'s.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update

from dicom_node.audit import AuditEvent, AuditTrail, Outcome
from dicom_node.audit.failures import failure_text, traceback_text
from dicom_node.config import Settings
from dicom_node.db import Instance, InstanceVerdict, Job, JobStatus, NodeDatabase
from dicom_node.metrics import JOBS, STAGE_SECONDS
from dicom_node.notifications import notify_flagged
from dicom_node.results import findings_summary, result_dir, save_findings
from dicom_node.workflow import (
    claim_job, defer_job, finish_job, queue_results, renew_job_lease, requeue_interrupted_jobs,
)
from dicom_node.inference import InferenceBatcher
from dicom_node.writers import AlgorithmIdentity, OutputKind, write_not_analysed, write_results
from dicom_node.plugins import build_pipelines
from dicom_node.routing import NO_ROUTE_REASON, RouteDecision, Router
from pipelines.base import GateVerdict, ImageInput, ImageResult, Pipeline, PipelinePlugin
from pipelines.errors import PipelineError

logger = logging.getLogger(__name__)

VERDICT_EVENTS = {InstanceVerdict.ANALYSED: AuditEvent.JOB_COMPLETED,
                  InstanceVerdict.SKIPPED: AuditEvent.JOB_SKIPPED,
                  InstanceVerdict.FAILED: AuditEvent.JOB_FAILED}
NO_SPACE_RETRY = timedelta(minutes=1)
"""A job whose results did not fit on the disk runs again after this long."""


class ResultsDiskFull(Exception):
    """The results of an instance could not be written: its disk is full."""


@dataclass
class InstanceOutcome:
    verdict: InstanceVerdict
    reason: str


Finish = Callable[[], InstanceOutcome]
"""Waits for a started instance (or one pipeline's part of it) and returns its outcome."""


@dataclass(frozen=True)
class RoutedPipeline:
    """A pipeline the routes run: its plug-in, the pipeline, and the identity its results carry."""

    plugin: PipelinePlugin
    pipeline: Pipeline
    algorithm: AlgorithmIdentity

    @classmethod
    def of(cls, plugin: PipelinePlugin, pipeline: Pipeline) -> RoutedPipeline:
        return cls(plugin, pipeline, AlgorithmIdentity.of(pipeline, plugin))


class Analyzer:
    """Runs jobs through the routes, the quality gate and the pipelines in one worker process.

    Each pipeline's model runs on its :class:`~dicom_node.inference.InferenceBatcher`'s thread, on the
    images of every job the worker runs at once; within a job, up to ``batch_size`` images are read and
    decoded ahead of the one whose results are being written.
    """

    def __init__(self, db: NodeDatabase, audit: AuditTrail,
                 pipelines: Mapping[str, tuple[PipelinePlugin, Pipeline]], router: Router,
                 results_root: Path, *, worker: str, note_skipped: bool = False,
                 job_lease: timedelta = timedelta(seconds=30), batch_size: int = 1,
                 batch_wait_s: float = 0.0) -> None:
        self.db = db
        self.job_lease = job_lease
        self.audit = audit
        self.pipelines = {name: RoutedPipeline.of(*built) for name, built in pipelines.items()}
        self.batchers = {name: InferenceBatcher(pipeline, name=name, batch_size=batch_size,
                                                batch_wait_s=batch_wait_s)
                         for name, (_, pipeline) in pipelines.items()}
        self.read_ahead = batch_size
        self.router = router
        self.results_root = results_root
        self.worker = worker
        self.note_skipped = note_skipped

    @classmethod
    def from_settings(cls, settings: Settings, db: NodeDatabase, audit: AuditTrail, *,
                      worker: str) -> Analyzer:
        """Build the analyzer with every pipeline the routes run; loads their weights now and raises
        :class:`pipelines.errors.WeightsError` if any is bad (ConfigError for an unknown pipeline)."""
        return cls(db, audit, build_pipelines(settings), Router.from_settings(settings), settings.results_dir,
                   worker=worker, note_skipped=settings.outputs.not_analysed_note,
                   job_lease=timedelta(seconds=settings.worker.job_lease_s),
                   batch_size=settings.worker.batch_size, batch_wait_s=settings.worker.batch_wait_ms / 1000)

    def requeue_interrupted(self) -> list[int]:
        """Queue again the jobs dead workers left, this worker's name included (see
        :func:`~dicom_node.workflow.requeue_interrupted_jobs`); return their ids."""
        return requeue_interrupted_jobs(self.db, worker=self.worker)

    def run(self, job_id: int) -> JobStatus | None:
        """Analyse the job's instances, its lease renewed meanwhile; return its final status, or
        None if nothing to do."""
        job = claim_job(self.db, job_id, worker=self.worker, lease=self.job_lease)
        if job is None:
            logger.info("Job %d is not queued: nothing to do", job_id)
            return None
        with _lease_kept(self.db, job_id, worker=self.worker, lease=self.job_lease):
            return self._run(job)

    def _run(self, job: Job) -> JobStatus:
        job_id = job.id
        with self.db.session() as session:
            instances = session.scalars(
                select(Instance).where(Instance.job_id == job_id).order_by(Instance.id)).all()
        self.audit.record(AuditEvent.JOB_STARTED, actor=self.worker, job_id=job_id,
                          study_uid=job.study_instance_uid,
                          pseudonym=instances[0].patient_pseudonym if instances else None,
                          detail=f"{len(instances)} instance(s)")
        outcomes = []
        for instance, finish in self._started(job_id, instances):
            try:
                outcome = finish()
            except ResultsDiskFull as exc:
                return self._defer(job, instance, exc)
            if instance.verdict is None:
                self._record_verdict(instance, outcome)
            self._audit_verdict(job_id, instance, outcome)
            outcomes.append(outcome)
        status, reason = _job_status(outcomes)
        finish_job(self.db, job_id, status, reason)
        JOBS.labels(status.value).inc()
        logger.info("Job %d %s", job_id, status.value)
        return status

    def _defer(self, job: Job, instance: Instance, error: ResultsDiskFull) -> JobStatus:
        """Queue the job again for :data:`NO_SPACE_RETRY` from now (its undecided instances are
        analysed then); audit that it could not finish. Returns QUEUED."""
        defer_job(self.db, job.id, reason=str(error), delay=NO_SPACE_RETRY)
        logger.warning("Job %d: %s; it runs again in %s", job.id, error, NO_SPACE_RETRY)
        self.audit.record(AuditEvent.JOB_FAILED, outcome=Outcome.MINOR_FAILURE, actor=self.worker,
                          job_id=job.id, pseudonym=instance.patient_pseudonym,
                          study_uid=instance.study_instance_uid, sop_uid=instance.sop_instance_uid,
                          detail=f"{error}; queued to run again")
        return JobStatus.QUEUED

    def _started(self, job_id: int, instances: Sequence[Instance]) -> Iterator[tuple[Instance, Finish]]:
        """Yield each instance in order with the call that finishes it, having started up to
        ``read_ahead`` instances (read, gated, decoded, handed to inference) by then."""
        started: deque[tuple[Instance, Finish]] = deque()
        for instance in instances:
            started.append((instance, self._start_instance(job_id, instance)))
            if len(started) >= self.read_ahead:
                yield started.popleft()
        yield from started

    def _start_instance(self, job_id: int, instance: Instance) -> Finish:
        """Route one instance and start it through each pipeline of its route; return the call that
        waits for them and returns its verdict: failed when a pipeline failed, else analysed when one
        analysed it, else skipped. An instance decided before its job was interrupted keeps its verdict.

        The call raises :class:`ResultsDiskFull` when the results do not fit on the disk (nothing of them is kept).
        """
        if instance.verdict is not None:
            return partial(InstanceOutcome, instance.verdict, instance.verdict_reason or "")
        try:
            dataset = dcmread(instance.path)
            decision = self.router.route(dataset, instance.calling_ae)
        except Exception as exc:
            return partial(self._failed, job_id, instance, exc, "reading the instance")
        if decision is None or not decision.pipelines:
            reason = NO_ROUTE_REASON if decision is None else f"route {decision.route} runs no pipeline"
            return partial(InstanceOutcome, InstanceVerdict.SKIPPED, reason)
        runs = {name: self._start_pipeline(job_id, instance, dataset, name, decision) for name in decision.pipelines}
        return lambda: _instance_outcome({name: finish() for name, finish in runs.items()})

    def _start_pipeline(self, job_id: int, instance: Instance, dataset: Dataset, name: str,
                        decision: RouteDecision) -> Finish:
        """Gate one instance for one pipeline (tags), decode it and hand it to the pipeline's model;
        return the call that waits for the result, writes the outputs and returns the verdict."""
        routed = self.pipelines[name]
        stage = "the quality gate"
        try:
            gate = routed.pipeline.accepts(dataset)
            if not gate.accepted:
                return partial(self._finish_pipeline, job_id, instance, dataset, routed, decision, gate, None, None)
            stage = "the pipeline"
            with STAGE_SECONDS.labels("decode").time():
                image = routed.pipeline.load(dataset)
            result = self.batchers[name].submit(image)
        except Exception as exc:
            return partial(self._failed, job_id, instance, exc, stage)
        return partial(self._finish_pipeline, job_id, instance, dataset, routed, decision, gate, image, result)

    def _finish_pipeline(self, job_id: int, instance: Instance, dataset: Dataset, routed: RoutedPipeline,
                         decision: RouteDecision, gate: GateVerdict, image: ImageInput | None,
                         result: Future[ImageResult] | None) -> InstanceOutcome:
        """Return one instance's verdict for one pipeline once its model answered (the image
        content check included), its outputs or "not analysed" note written and queued for delivery.
        Raises :class:`ResultsDiskFull`."""
        folder = result_dir(self.results_root, instance.study_instance_uid, instance.sop_instance_uid,
                            routed.plugin.name)
        stage = "the not-analysed note"
        try:
            if image is None or result is None:
                return self._skip(job_id, instance, dataset, folder, routed, decision, gate.reason)
            stage = "the pipeline"
            answer = result.result()
            if not answer.verdict.accepted:
                stage = "the not-analysed note"
                return self._skip(job_id, instance, dataset, folder, routed, decision, answer.verdict.reason)
            stage = "the writers"
            with STAGE_SECONDS.labels("writers").time():
                outputs = write_results(dataset, answer, image.display, routed.algorithm, caveats=gate.caveats)
                with _disk_full_deferred(folder):
                    save_findings(folder, answer, routed.algorithm.label)
                self._queue_outputs(job_id, instance, folder, outputs, decision)
            notify_flagged(self.db, instance, answer)
            scores = ", ".join(f"{f['name']}={f['probability']:.2f}{' FLAGGED' if f['flagged'] else ''}"
                               for f in findings_summary(answer))
            return InstanceOutcome(InstanceVerdict.ANALYSED, "; ".join([scores, *gate.caveats]))
        except ResultsDiskFull:
            raise
        except Exception as exc:
            return self._failed(job_id, instance, exc, stage)

    @staticmethod
    def _failed(job_id: int, instance: Instance, error: Exception, stage: str) -> InstanceOutcome:
        """Return the failed outcome of ``error``: bad input in one line, its reason; a model or node
        bug (a recorded failure, not a retry) with its traceback logged, library messages withheld."""
        if isinstance(error, PipelineError | InvalidDicomError):
            reason = failure_text(error, "not a readable DICOM file")
            logger.warning("Job %d: instance %s failed: %s", job_id, instance.sop_instance_uid, reason)
        else:
            reason = failure_text(error, f"unexpected error in {stage}")
            logger.error("Job %d: instance %s failed: %s\n%s", job_id, instance.sop_instance_uid,
                         reason, traceback_text(error))
        return InstanceOutcome(InstanceVerdict.FAILED, reason)

    def _skip(self, job_id: int, instance: Instance, dataset: Dataset, folder: Path, routed: RoutedPipeline,
              decision: RouteDecision, reason: str) -> InstanceOutcome:
        """Return the skipped outcome; queue the "not analysed" note when configured and the data set
        says it is an image the pipeline is meant for (the chest's: a chest)."""
        if self.note_skipped and routed.plugin.addresses(dataset):
            note = write_not_analysed(dataset, reason, routed.algorithm)
            self._queue_outputs(job_id, instance, folder, {OutputKind.NOT_ANALYSED: note}, decision)
        return InstanceOutcome(InstanceVerdict.SKIPPED, reason)

    def _record_verdict(self, instance: Instance, outcome: InstanceOutcome) -> None:
        with self.db.session() as session:
            session.execute(update(Instance).where(Instance.id == instance.id).values(
                verdict=outcome.verdict, verdict_reason=outcome.reason))

    def _audit_verdict(self, job_id: int, instance: Instance, outcome: InstanceOutcome) -> None:
        """Record the verdict's event unless a run interrupted after recording it did so.

        The verdict is committed first: a crash between the two leaves the event to
        the job's next run, so each verdict is audited exactly once.
        """
        event = VERDICT_EVENTS[outcome.verdict]
        if instance.verdict is not None and self.audit.has_event(
                event, job_id=job_id, sop_uid=instance.sop_instance_uid):
            return
        self.audit.record(
            event, outcome=Outcome.SERIOUS_FAILURE if outcome.verdict is InstanceVerdict.FAILED
            else Outcome.SUCCESS, actor=self.worker, job_id=job_id,
            pseudonym=instance.patient_pseudonym, study_uid=instance.study_instance_uid,
            series_uid=instance.series_instance_uid, sop_uid=instance.sop_instance_uid,
            detail=outcome.reason)

    def _queue_outputs(self, job_id: int, instance: Instance, folder: Path,
                       outputs: dict[OutputKind, Dataset], decision: RouteDecision) -> None:
        """Write each output object durably, then queue its deliveries to the route's destinations in
        one transaction (held, on a shadow route)."""
        written = []
        with _disk_full_deferred(folder):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            for kind, dataset in outputs.items():
                path = folder / f"{kind.value}.dcm"
                partial = path.with_suffix(".partial")
                dataset.save_as(partial, enforce_file_format=True)
                os.replace(partial, path)
                written.append((kind.value, str(dataset.SOPInstanceUID), path))
        queue_results(self.db, self.audit, job_id=job_id, source=instance, outputs=written,
                      decision=decision, actor=self.worker)


@contextmanager
def _lease_kept(db: NodeDatabase, job_id: int, *, worker: str, lease: timedelta) -> Iterator[None]:
    """Renew ``worker``'s lease of the job every third of ``lease`` on a thread, while the block runs."""
    done = threading.Event()

    def renew() -> None:
        while not done.wait(lease.total_seconds() / 3):
            try:
                if not renew_job_lease(db, job_id, worker=worker, lease=lease):
                    logger.warning("Job %d is no longer this worker's: its lease was taken over", job_id)
                    return
            except Exception as exc:  # a busy database: the next renewal tries again
                logger.warning("Job %d: its lease could not be renewed (%s)", job_id, type(exc).__name__)

    keeper = threading.Thread(target=renew, name=f"lease-{job_id}", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        done.set()
        keeper.join()


@contextmanager
def _disk_full_deferred(folder: Path) -> Iterator[None]:
    """Turn a full disk while writing into ``folder`` into :class:`ResultsDiskFull`, removing the
    partial files (other write errors pass through)."""
    try:
        yield
    except OSError as exc:
        if not _disk_full(exc):
            raise
        for leftover in folder.glob("*.partial"):
            leftover.unlink(missing_ok=True)
        raise ResultsDiskFull("the results disk is full") from exc


def _disk_full(error: BaseException | None) -> bool:
    """Return whether ``error`` or an error it was raised from is ENOSPC / EDQUOT (pydicom
    re-raises a write error as an OSError of its own, naming the element)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _instance_outcome(outcomes: Mapping[str, InstanceOutcome]) -> InstanceOutcome:
    """Return one instance's outcome from its pipelines': failed when one failed, else analysed when
    one analysed it, else skipped; the reason is the only pipeline's, or each one's by name."""
    verdicts = [o.verdict for o in outcomes.values()]
    verdict = next(v for v in (InstanceVerdict.FAILED, InstanceVerdict.ANALYSED, InstanceVerdict.SKIPPED)
                   if v in verdicts)
    if len(outcomes) == 1:
        return InstanceOutcome(verdict, next(iter(outcomes.values())).reason)
    return InstanceOutcome(verdict, " | ".join(f"{name}: {o.verdict.value}: {o.reason}" for name, o in outcomes.items()))


def _job_status(outcomes: list[InstanceOutcome]) -> tuple[JobStatus, str]:
    verdicts = [o.verdict for o in outcomes]
    if InstanceVerdict.FAILED in verdicts:
        failed = sum(v == InstanceVerdict.FAILED for v in verdicts)
        return JobStatus.FAILED, f"{failed} of {len(verdicts)} instance(s) failed"
    if InstanceVerdict.ANALYSED in verdicts:
        return JobStatus.DONE, f"{verdicts.count(InstanceVerdict.ANALYSED)} instance(s) analysed"
    reasons = sorted({o.reason for o in outcomes})
    return JobStatus.SKIPPED, "; ".join(reasons) or "no instances"
