"""``dicom-node db``: the schema revisions of the node database and the audit store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from dicom_node import migrations
from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.audit.store import make_audit_engine
from dicom_node.audit.store import upgrade_schema as upgrade_audit_schema
from dicom_node.cli.common import node_errors_as_click, os_user, settings_from
from dicom_node.config import Settings, redact_url
from dicom_node.db import make_engine
from dicom_node.db import upgrade_schema as upgrade_node_schema
from dicom_node.state_lock import StateLock

Target = tuple[migrations.Schema, str, Callable[[str], Engine], Callable[[Engine], migrations.SchemaState]]


@click.group()
def db() -> None:
    """Schema revisions of the node database and the audit store."""


def _targets(settings: Settings) -> list[Target]:
    """The databases the settings use, the audit store first (a disabled one is left out)."""
    node: Target = (migrations.NODE, settings.node_database_url, make_engine, upgrade_node_schema)
    if not settings.audit.enabled:
        return [node]
    return [(migrations.AUDIT, settings.audit_database_url, make_audit_engine, upgrade_audit_schema),
            node]


def _missing_file(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and not (
        parsed.database and parsed.database != ":memory:" and Path(parsed.database).exists())


@db.command()
@click.pass_context
@node_errors_as_click
def status(ctx: click.Context) -> None:
    """Print each database's schema revision and whether it is current; exit 1 when one is not."""
    current = True
    for schema, url, make, _ in _targets(settings_from(ctx)):
        where = f"{schema.name} {redact_url(url)}"
        if _missing_file(url):
            click.echo(f"{where}: not created yet (the node creates it at {migrations.head(schema)})")
            continue
        engine = make(url)
        try:
            with engine.connect() as connection:
                found = migrations.state(connection, schema)
        except SQLAlchemyError as exc:
            raise click.ClickException(f"cannot read the {schema.name}: {_reason(exc)}") from exc
        finally:
            engine.dispose()
        current = current and (found.current or found.revision is None)
        click.echo(f"{where}: {_describe(found)}")
    if not current:
        click.echo(f"run `{migrations.UPGRADE_COMMAND}` with the node's processes stopped", err=True)
        ctx.exit(1)


def _describe(found: migrations.SchemaState) -> str:
    if found.revision is None:
        return f"empty (the node creates it at {found.head})"
    if found.unversioned:
        return f"made before migrations (recognised as {found.revision}); needs {found.head}, recorded"
    if found.current:
        return f"revision {found.revision}, current"
    if not migrations.known(found.revision):
        return f"revision {found.revision}, unknown to this dicom-node (newest {found.head})"
    return f"revision {found.revision}; needs {found.head}"


@db.command()
@click.pass_context
@node_errors_as_click
def upgrade(ctx: click.Context) -> None:
    """Upgrade the audit store and the node database to the newest schema revision.

    An empty database is created; one made before migrations is recognised and stamped
    first. Stop the node's processes first (this holds the state folder's lock). Each
    change is audited as schema-upgraded.
    """
    settings = settings_from(ctx)
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = StateLock(settings.state_dir)
    lock.acquire()
    try:
        changes = []
        for schema, url, make, upgrade_schema in _targets(settings):
            engine = make(url)
            try:
                found = upgrade_schema(engine)
            except SQLAlchemyError as exc:
                raise click.ClickException(f"cannot upgrade the {schema.name}: {_reason(exc)}") from exc
            finally:
                engine.dispose()
            done = _done(found)
            click.echo(f"{schema.name} {redact_url(url)}: {done}")
            if not found.current:
                changes.append(f"{schema.name}: {done}")
        trail = AuditTrail.from_settings(settings)  # keys a chain head the upgrade left unkeyed
        try:
            for change in changes:
                trail.record(AuditEvent.SCHEMA_UPGRADED, actor=os_user(), detail=change)
        finally:
            trail.close()
    finally:
        lock.release()


def _done(found: migrations.SchemaState) -> str:
    if found.revision is None:
        return f"created at {found.head}"
    if found.current:
        return f"already at {found.head}"
    if found.unversioned:
        return f"made before migrations, stamped {found.revision}, upgraded to {found.head}" \
            if found.revision != found.head else f"made before migrations, stamped {found.head}"
    return f"upgraded {found.revision} -> {found.head}"


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's message without SQL or parameters."""
    return str(exc.orig if isinstance(exc, DBAPIError) else exc)
