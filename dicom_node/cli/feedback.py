"""``feedback agree|disagree|export|add-user``: radiologists' verdicts from the shell, their CSV, and
the feedback page's users.

Verdicts are :mod:`dicom_node.feedback.store`'s, audited with the OS user as actor.
"""

from __future__ import annotations

from pathlib import Path

import click

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.cli.common import node_errors_as_click, os_user, settings_from
from dicom_node.db import NodeDatabase
from dicom_node.db import FeedbackVerdict
from dicom_node.feedback.store import export_csv, record_verdict
from dicom_node.feedback.users import set_user, users_file


@click.group("feedback")
def feedback() -> None:
    """Radiologists' verdicts on findings, their export, and the feedback page's users."""


def _record(ctx: click.Context, verdict: FeedbackVerdict, job_id: int, finding: str, reason: str | None,
            instance: str | None) -> None:
    settings = settings_from(ctx)
    db, audit = NodeDatabase(settings.node_database_url), AuditTrail.from_settings(settings)
    try:
        row = record_verdict(db, audit, settings.results_dir, job_id=job_id, finding=finding, verdict=verdict,
                             user=os_user(), reason=reason, sop_uid=instance)
    finally:
        audit.close()
        db.dispose()
    click.echo(f"job {job_id} {finding} ({row.sop_instance_uid}): {verdict.value} recorded")


def _verdict_command(verdict: FeedbackVerdict) -> click.Command:
    @click.argument("job_id", type=int)
    @click.argument("finding")
    @click.option("--reason", help="Why (free text; no patient names or IDs).")
    @click.option("--instance", help="SOP Instance UID, when several instances of the job have FINDING.")
    @click.pass_context
    @node_errors_as_click
    def command(ctx: click.Context, job_id: int, finding: str, reason: str | None, instance: str | None) -> None:
        _record(ctx, verdict, job_id, finding, reason, instance)

    command.__doc__ = f"Record that you {verdict.value} with FINDING (its name, e.g. covid19) of job JOB_ID; audited."
    return feedback.command(verdict.value)(command)


agree = _verdict_command(FeedbackVerdict.AGREE)
disagree = _verdict_command(FeedbackVerdict.DISAGREE)


@feedback.command("export")
@click.option("--out", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), required=True,
              help="CSV file to write (replaced); '-' for standard output.")
@click.pass_context
@node_errors_as_click
def export(ctx: click.Context, out: Path) -> None:
    """Write every verdict as CSV: id, time, user, job, instance UID, finding, verdict, reason; audited."""
    settings = settings_from(ctx)
    db, audit = NodeDatabase(settings.node_database_url), AuditTrail.from_settings(settings)
    try:
        with click.open_file(str(out), "w", atomic=str(out) != "-") as stream:
            count = export_csv(db, stream)
        audit.record(AuditEvent.FEEDBACK_EXPORTED, actor=os_user(), detail=f"{count} verdicts exported as CSV")
    finally:
        audit.close()
        db.dispose()
    if str(out) != "-":
        click.echo(f"{count} verdicts written to {out}")


@feedback.command("add-user")
@click.argument("name")
@click.password_option(prompt="Password", help="Read from a hidden prompt (or standard input) when absent.")
@click.pass_context
@node_errors_as_click
def add_user(ctx: click.Context, name: str, password: str) -> None:
    """Add user NAME to the feedback page's users file, or set their password; audited."""
    settings = settings_from(ctx)
    path = users_file(settings)
    new = set_user(path, name, password)
    audit = AuditTrail.from_settings(settings)
    try:
        audit.record(AuditEvent.FEEDBACK_USER_SET, actor=os_user(),
                     detail=f"feedback user {name} {'added' if new else 'given a new password'}")
    finally:
        audit.close()
    click.echo(f"user {name} {'added to' if new else 'updated in'} {path}")
