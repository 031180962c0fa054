"""``jobs list|show|retry|resend|release``: look at jobs and their deliveries, and act on them.

The commands parse and print; what they change is :mod:`dicom_node.workflow`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from dicom_node import workflow
from dicom_node.audit import AuditTrail
from dicom_node.cli.audit import Moment
from dicom_node.cli.common import node_errors_as_click, os_user, settings_from
from dicom_node.db import Delivery, DeliveryStatus, Job, JobStatus, NodeDatabase

#: ``jobs list --status`` values that select jobs by a delivery's status.
DELIVERY_FILTERS = {"dead-letter": DeliveryStatus.DEAD, "held": DeliveryStatus.HELD}


@contextmanager
def _db(ctx: click.Context) -> Iterator[NodeDatabase]:
    db = NodeDatabase(settings_from(ctx).node_database_url)
    try:
        yield db
    finally:
        db.dispose()


@contextmanager
def _audit(ctx: click.Context) -> Iterator[AuditTrail]:
    trail = AuditTrail.from_settings(settings_from(ctx))
    try:
        yield trail
    finally:
        trail.close()


def _when(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _job_row(job: Job, deliveries: list[Delivery]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for delivery in deliveries:
        counts[delivery.status.value] = counts.get(delivery.status.value, 0) + 1
    return {"id": job.id, "study_instance_uid": job.study_instance_uid, "status": job.status.value,
            "created_at": _when(job.created_at), "finished_at": _when(job.finished_at),
            "reason": job.reason, "deliveries": counts}


def _delivery_row(delivery: Delivery) -> dict[str, Any]:
    return {"id": delivery.id, "kind": delivery.kind, "destination": delivery.destination,
            "sop_instance_uid": delivery.sop_instance_uid, "status": delivery.status.value,
            "attempts": delivery.attempts, "last_status": (f"0x{delivery.last_status:04X}"
                                                           if delivery.last_status is not None
                                                           else None),
            "last_error": delivery.last_error, "next_attempt_at": _when(delivery.next_attempt_at),
            "delivered_at": _when(delivery.delivered_at)}


@click.group("jobs")
def jobs() -> None:
    """Jobs, their instances and their result deliveries."""


@jobs.command("list")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice([s.value for s in JobStatus] + list(DELIVERY_FILTERS)),
              help="Only jobs in this state (repeatable); dead-letter: a delivery gave up; "
                   "held: results held by a shadow route.")
@click.option("--limit", default=50, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
@node_errors_as_click
def list_jobs(ctx: click.Context, statuses: tuple[str, ...], limit: int, fmt: str) -> None:
    """List the newest jobs with their delivery counts."""
    with _db(ctx) as db:
        jobs_found = workflow.list_jobs(
            db, statuses=[JobStatus(s) for s in statuses if s not in DELIVERY_FILTERS],
            delivery_statuses=[DELIVERY_FILTERS[s] for s in statuses if s in DELIVERY_FILTERS], limit=limit)
    rows = [_job_row(job, deliveries) for job, deliveries in jobs_found]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("id", "status", "study", "finished", "deliveries", "reason", title="jobs")
    for row in rows:
        table.add_row(str(row["id"]), row["status"], row["study_instance_uid"],
                      row["finished_at"] or "", " ".join(f"{k}:{v}" for k, v in
                                                         sorted(row["deliveries"].items())),
                      (row["reason"] or "")[:60])
    Console(width=200).print(table)


@jobs.command("show")
@click.argument("job_id", type=int)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
@node_errors_as_click
def show(ctx: click.Context, job_id: int, fmt: str) -> None:
    """Show one job: its instances with their verdicts, and every delivery."""
    with _db(ctx) as db:
        job, instances, deliveries = workflow.job_details(db, job_id)
    report = _job_row(job, deliveries)
    report["instances"] = [
        {"sop_instance_uid": i.sop_instance_uid, "verdict": i.verdict and i.verdict.value,
         "reason": i.verdict_reason} for i in instances]
    report["deliveries"] = [_delivery_row(d) for d in deliveries]
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
        return
    console = Console(width=200)
    console.print(f"job {report['id']} [bold]{report['status']}[/] study "
                  f"{report['study_instance_uid']} — {report['reason'] or ''}")
    instances = Table("instance", "verdict", "reason")
    for item in report["instances"]:
        instances.add_row(item["sop_instance_uid"], item["verdict"] or "", item["reason"] or "")
    console.print(instances)
    deliveries_table = Table("id", "kind", "destination", "status", "attempts", "last status",
                             "next attempt", "error")
    for d in report["deliveries"]:
        deliveries_table.add_row(str(d["id"]), d["kind"], d["destination"], d["status"],
                                 str(d["attempts"]), d["last_status"] or "",
                                 d["next_attempt_at"] or "", (d["last_error"] or "")[:50])
    console.print(deliveries_table)
    if any(d["status"] == DeliveryStatus.HELD for d in report["deliveries"]):
        console.print(f"held: its route runs in shadow mode; `dicom-node jobs release {report['id']}` sends them")


@jobs.command("retry")
@click.argument("job_id", type=int)
@click.pass_context
@node_errors_as_click
def retry(ctx: click.Context, job_id: int) -> None:
    """Analyse a finished job again (its outputs keep their UIDs and replace the old ones); audited."""
    with _db(ctx) as db, _audit(ctx) as audit:
        job = workflow.retry_job(db, audit, job_id, actor=os_user())
    click.echo(f"job {job.id} queued again")


@jobs.command("resend")
@click.argument("job_id", type=int)
@click.pass_context
@node_errors_as_click
def resend(ctx: click.Context, job_id: int) -> None:
    """Send every result of a job again, dead-lettered ones included; audited per result."""
    with _db(ctx) as db, _audit(ctx) as audit:
        deliveries = workflow.resend_job(db, audit, job_id, actor=os_user())
    click.echo(f"{len(deliveries)} deliveries of job {job_id} queued again")


@jobs.command("release")
@click.argument("job_id", type=int, required=False)
@click.option("--since", type=Moment(), help="Jobs finished from this time (ISO 8601, UTC unless it "
              "says otherwise, or an age: 24h, 7d).")
@click.option("--until", type=Moment(), help="Jobs finished before this time (default: now).")
@click.pass_context
@node_errors_as_click
def release(ctx: click.Context, job_id: int | None, since: datetime | None, until: datetime | None) -> None:
    """Send the results a shadow route held: of JOB_ID, or of the jobs finished in --since/--until;
    audited per result."""
    if (job_id is None) == (since is None):
        raise click.UsageError("give either JOB_ID or --since (with --until), not both")
    if job_id is not None and until is not None:
        raise click.UsageError("--until goes with --since, not with JOB_ID")
    with _db(ctx) as db, _audit(ctx) as audit:
        if job_id is not None:
            released = workflow.release_job(db, audit, job_id, actor=os_user())
        elif since is not None:
            try:
                released = workflow.release_finished_between(
                    db, audit, since, until or datetime.now(UTC), actor=os_user())
            except ValueError as exc:
                raise click.UsageError(str(exc)) from exc
    jobs_released = sorted({d.job_id for d in released})
    click.echo(f"{len(released)} held deliveries of {len(jobs_released)} job(s) released"
               + (f": {', '.join(map(str, jobs_released))}" if jobs_released else ""))
