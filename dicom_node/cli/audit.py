"""``dicom-node audit``: query, verify and prune the audit trail; GDPR access and erasure.

Every read is itself audited with the OS user as actor. A patient ID is read from a hidden
prompt, or one line of standard input, never from the command line (where ``ps`` and the
shell's history would show it); it is only ever turned into the patient's pseudonym and is
neither stored nor logged.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from dicom_node.audit import AuditEvent, AuditTrail, Outcome
from dicom_node.audit.chain import verify_chain
from dicom_node.audit.query import EventFilter, get_event, list_events, plain, summarize
from dicom_node.audit.trail import audit_secret
from dicom_node.cli.common import node_errors_as_click, os_user, settings_from
from dicom_node.db import NodeDatabase
from dicom_node.retention import purge_audit
from dicom_node.subjects import erase_subject, export_subject

F = TypeVar("F", bound=Callable[..., Any])
AGE = re.compile(r"^(\d+)([smhdw])$")
AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
TABLE_COLUMNS = ("id", "time", "event", "outcome", "actor", "remote", "pseudonym",
                 "study_uid", "sop_uid", "job_id", "detail")
CSV_COLUMNS = ("id", "time", "event", "event_id", "outcome", "actor", "remote", "pseudonym",
               "study_uid", "series_uid", "sop_uid", "job_id", "detail")
FORMAT_OPTION = click.option("--format", "output", type=click.Choice(["table", "json", "csv"]),
                             default="table", show_default=True, help="Output format.")
ISSUER_OPTION = click.option(
    "--issuer", help="Issuer of Patient ID (0010,0021) as the PACS sent it; a patient ID "
                     "sent with an issuer is only found with it.")
NO_WRAP = {"id", "time", "event", "outcome", "key", "events", "failures"}
PIPED_WIDTH = 240


class Age(click.ParamType):
    """A duration such as ``90m``, ``24h``, ``30d`` or ``52w``."""

    name = "age"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = AGE.match(str(value).strip())
        if not match or int(match[1]) == 0:
            self.fail(f"{value!r} is not an age like 30d, 24h or 52w", param, ctx)
        return timedelta(**{AGE_UNITS[match[2]]: int(match[1])})


class Moment(click.ParamType):
    """A point in time: ISO 8601 (UTC unless it says otherwise) or an age before now."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        if AGE.match(text):
            return datetime.now(UTC) - Age().convert(text, param, ctx)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{value!r} is neither an ISO 8601 time nor an age like 24h", param, ctx)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@contextmanager
def _trail(ctx: click.Context) -> Iterator[AuditTrail]:
    settings = settings_from(ctx)
    # Even with auditing disabled for the node, its administrator reads the store.
    trail = AuditTrail(settings.audit_database_url, audit_secret(settings))
    try:
        yield trail
    finally:
        trail.close()


def patient_id_refused(usage: str) -> Callable[[F], F]:
    """Return a hidden ``--patient-id`` option that refuses any value, saying to run ``usage``
    and type the ID at its prompt or give it on standard input instead."""

    def refuse(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            raise click.UsageError(
                "a patient ID is not taken from the command line, where ps and the shell "
                f"history show it: run 'dicom-node {usage}' and type it at the prompt, or give "
                f"it as one line on standard input ('dicom-node {usage} < patient-id.txt')", ctx)

    return click.option("--patient-id", hidden=True, expose_value=False, is_eager=True,
                        callback=refuse)


def read_patient_id() -> str:
    """Return the patient ID typed at a hidden prompt when standard input is a terminal,
    else its first line. Raises ``click.UsageError`` when it is empty."""
    if sys.stdin.isatty():
        patient_id = click.prompt("Patient ID", hide_input=True, err=True)
    else:
        patient_id = sys.stdin.readline().rstrip("\r\n")
    if not patient_id.strip():
        raise click.UsageError("no patient ID given: type it at the prompt or give it as one "
                               "line on standard input")
    return patient_id


def _emit(rows: Sequence[dict[str, Any]], output: str, columns: Sequence[str],
          title: str, csv_columns: Sequence[str] | None = None) -> None:
    """Print ``rows`` as JSON (every field), CSV (``csv_columns``, default ``columns``)
    or a rich table of ``columns``."""
    data = [plain(row) for row in rows]
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "csv":
        writer = csv.DictWriter(click.get_text_stream("stdout"),
                                fieldnames=list(csv_columns or columns),
                                extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(data)
    else:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, overflow="fold", no_wrap=column in NO_WRAP)
        for row in data:
            table.add_row(*(_cell(column, row.get(column)) for column in columns))
        _console().print(table)


def _cell(column: str, value: object) -> str:
    if value is None:
        return ""
    if column == "time":
        return str(value)[:19].replace("T", " ")  # to the second, UTC
    return str(value)


def _console() -> Console:
    """Return a console for tables; as wide as the terminal, or wide when piped."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_WIDTH)


@click.group("audit")
def audit() -> None:
    """Query and verify the audit trail; GDPR subject access, erasure and retention."""


@audit.command("list")
@click.option("--since", type=Moment(), help="From this time (ISO 8601, or an age: 24h, 7d).")
@click.option("--until", type=Moment(), help="Before this time (ISO 8601, or an age).")
@click.option("--event", "events", multiple=True, type=click.Choice([e.value for e in AuditEvent]),
              help="Only this event type (repeatable).")
@click.option("--ae", help="Only events whose actor is this calling AE (or user, or host).")
@click.option("--study", help="Only events about this Study Instance UID.")
@click.option("--patient", is_flag=True,
              help="Only events about one patient (looked up by pseudonym), whose ID is read "
                   "from a hidden prompt or one line of standard input.")
@patient_id_refused("audit list --patient")
@ISSUER_OPTION
@click.option("--outcome", "outcomes", multiple=True,
              type=click.Choice([o.value for o in Outcome]), help="Only this outcome (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the newest N events.")
@FORMAT_OPTION
@click.pass_context
@node_errors_as_click
def list_command(ctx: click.Context, since: datetime | None, until: datetime | None,
                 events: tuple[str, ...], ae: str | None, study: str | None,
                 patient: bool, issuer: str | None, outcomes: tuple[str, ...],
                 limit: int | None, output: str) -> None:
    """List events, oldest first."""
    criteria = EventFilter(since=since, until=until,
                           events=tuple(AuditEvent(e) for e in events), ae=ae,
                           study_uid=study, patient_id=read_patient_id() if patient else None,
                           issuer=issuer,
                           outcomes=tuple(Outcome(o) for o in outcomes), limit=limit)
    with _trail(ctx) as trail:
        rows = list_events(trail, criteria, actor=os_user())
    _emit(rows, output, TABLE_COLUMNS, f"{len(rows)} audit events", CSV_COLUMNS)


@audit.command("show")
@click.argument("event_id", metavar="ID", type=int)
@click.option("--format", "output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@click.pass_context
@node_errors_as_click
def show_command(ctx: click.Context, event_id: int, output: str) -> None:
    """Show every field of one event, its A.5 codes and its chain hash."""
    with _trail(ctx) as trail:
        row = get_event(trail, event_id, actor=os_user())
    if row is None:
        raise click.ClickException(f"no audit event {event_id}")
    event = AuditEvent(row["event"])
    shown = {**plain(row), "event_id": event.dicom_event_id._asdict(),
             "event_action": event.dicom_action,
             "outcome_indicator": Outcome(row["outcome"]).dicom_indicator}
    if output == "json":
        click.echo(json.dumps(shown, indent=2))
        return
    shown["event_id"] = "{} ({}, {})".format(*event.dicom_event_id)
    table = Table(title=f"audit event {event_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in shown.items():
        table.add_row(key, "" if value is None else str(value))
    _console().print(table)


@audit.command("summary")
@click.option("--by", type=click.Choice(["day", "event", "ae"]), default="day",
              show_default=True, help="Group the events by this.")
@click.option("--since", type=Moment(), help="From this time (ISO 8601, or an age: 24h, 7d).")
@click.option("--until", type=Moment(), help="Before this time (ISO 8601, or an age).")
@FORMAT_OPTION
@click.pass_context
@node_errors_as_click
def summary_command(ctx: click.Context, by: str, since: datetime | None,
                    until: datetime | None, output: str) -> None:
    """Count events, and failed ones, per day, event type or calling AE."""
    with _trail(ctx) as trail:
        rows = summarize(trail, by, EventFilter(since=since, until=until),  # type: ignore[arg-type]
                         actor=os_user())
    _emit(rows, output, ("key", "events", "failures"), f"audit events by {by}")


@audit.command("verify")
@click.pass_context
@node_errors_as_click
def verify_command(ctx: click.Context) -> None:
    """Check the hash chain; exit 1 naming each altered or deleted row."""
    with _trail(ctx) as trail:
        report = verify_chain(trail)
        trail.record(AuditEvent.AUDIT_QUERIED, actor=os_user(),
                     outcome=Outcome.SUCCESS if report.ok else Outcome.SERIOUS_FAILURE,
                     detail=f"verify: {report.rows_checked} rows, "
                            f"{len(report.problems)} problems")
    if report.ok:
        span = f" (rows {report.first_id}-{report.last_id})" if report.rows_checked else ""
        click.echo(f"audit trail intact: {report.rows_checked} events verified{span}")
        return
    for problem in report.problems:
        click.echo(f"BROKEN {problem}", err=True)
    raise click.ClickException(
        f"audit trail altered: first bad row {report.problems[0].row_id} "
        f"({len(report.problems)} problems in {report.rows_checked} rows)")


@audit.command("purge")
@click.option("--older-than", type=Age(), required=True,
              help="Delete events older than this age, e.g. 3650d.")
@click.pass_context
@node_errors_as_click
def purge_command(ctx: click.Context, older_than: timedelta) -> None:
    """Delete old events; the chain stays verifiable from the first kept one. With the syslog export
    on, events the audit repository has not taken yet are kept."""
    export_on = settings_from(ctx).audit.syslog.enabled
    with _trail(ctx) as trail:
        deleted = purge_audit(trail, older_than, actor=os_user(), keep_unexported=export_on)
    click.echo(f"deleted {deleted} audit events older than {older_than.days} days"
               if older_than.days else f"deleted {deleted} audit events older than {older_than}")


@audit.group("subject")
def subject() -> None:
    """GDPR duties towards one person, whose patient ID is read from a hidden prompt or one
    line of standard input."""


@subject.command("export")
@patient_id_refused("audit subject export")
@ISSUER_OPTION
@click.pass_context
@node_errors_as_click
def export_command(ctx: click.Context, issuer: str | None) -> None:
    """Print, as JSON, every event about the person and the images still held."""
    patient_id = read_patient_id()
    settings = settings_from(ctx)
    db = NodeDatabase(settings.node_database_url)
    try:
        with _trail(ctx) as trail:
            export = export_subject(trail, db, patient_id, issuer, actor=os_user())
    finally:
        db.dispose()
    click.echo(json.dumps(export, indent=2))


@subject.command("erase")
@patient_id_refused("audit subject erase")
@ISSUER_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@node_errors_as_click
def erase_command(ctx: click.Context, issuer: str | None, yes: bool) -> None:
    """Delete the person's images, results, jobs and deliveries and unlink their audit events
    (a confirmation, unless --yes, follows the patient ID)."""
    patient_id = read_patient_id()
    if not yes:
        click.confirm("Erase this person's images and results, and unlink their audit "
                      "events? This cannot be undone", abort=True)
    settings = settings_from(ctx)
    db = NodeDatabase(settings.node_database_url)
    try:
        with _trail(ctx) as trail:
            erasure = erase_subject(settings, trail, db, patient_id, issuer, actor=os_user())
    finally:
        db.dispose()
    if erasure.pseudonym is None:
        click.echo("no record of this patient: nothing to erase")
    else:
        click.echo(f"erased pseudonym {erasure.pseudonym}: deleted {erasure.removed}")
