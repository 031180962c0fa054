"""Schema versions of the node database and the audit store (Alembic).

Each database is one branch of revisions (``versions/node_*``, ``versions/audit_*``) with a
version table of its own, so both may live in one PostgreSQL database. A database is checked
once, when the node opens it: an empty one is created at the newest revision; one at another
revision is refused, naming ``dicom-node db upgrade`` (:func:`upgrade`). A database of the
release before migrations (the tables, no version table) is recognised by its tables.

A schema change is a new file in ``versions/`` whose ``down_revision`` is its branch's head.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect

from dicom_node.config import redact_url
from dicom_node.errors import SchemaVersionError

logger = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # its notes at every open; ours say what changed

UPGRADE_COMMAND = "dicom-node db upgrade"


@dataclass(frozen=True)
class Schema:
    """One database's branch of revisions."""

    name: str
    branch: str
    version_table: str
    tables: frozenset[str]
    """The tables of the branch's first revision: how an unversioned database is recognised."""
    unversioned_revision: Callable[[Connection], str]
    """The revision an unversioned database of the release before migrations is at."""


def _audit_unversioned_revision(connection: Connection) -> str:
    columns = {column["name"] for column in inspect(connection).get_columns("audit_chain")}
    return "audit_0002" if "head_mac" in columns else "audit_0001"


NODE = Schema("node database", "node", "node_alembic_version",
              frozenset({"instances", "jobs", "deliveries", "outbox"}), lambda _: "node_0001")
AUDIT = Schema("audit store", "audit", "audit_alembic_version",
               frozenset({"audit_events", "audit_pseudonyms", "audit_chain"}),
               _audit_unversioned_revision)


class SchemaState(NamedTuple):
    """Where a database stands: its revision (None: empty; the revision it is recognised at
    when ``unversioned``) and the newest revision this code knows."""

    revision: str | None
    head: str
    unversioned: bool

    @property
    def current(self) -> bool:
        return self.revision == self.head and not self.unversioned


def state(connection: Connection, schema: Schema) -> SchemaState:
    """Return where the database on ``connection`` stands.

    Raises :class:`SchemaVersionError` for a database holding only some of the tables.
    """
    newest = head(schema)
    names = set(inspect(connection).get_table_names())
    if schema.version_table in names:
        revision = MigrationContext.configure(
            connection, opts={"version_table": schema.version_table}).get_current_revision()
        return SchemaState(revision, newest, unversioned=False)
    present = schema.tables & names
    if not present:
        return SchemaState(None, newest, unversioned=False)
    if present != schema.tables:
        raise SchemaVersionError(
            f"the {schema.name} {_where(connection)} has the tables {', '.join(sorted(present))} but not "
            f"{', '.join(sorted(schema.tables - present))}: it is not one this node made")
    return SchemaState(schema.unversioned_revision(connection), newest, unversioned=True)


def prepare(connection: Connection, schema: Schema) -> None:
    """Create an empty database at the newest revision; accept one at it.

    Run it in a transaction holding the database's schema lock. Raises
    :class:`SchemaVersionError` for a database at another revision, unversioned or newer
    than this code.
    """
    found, where = state(connection, schema), _where(connection)
    if found.revision is None:
        _upgrade(connection, schema)
        logger.info("created the %s %s at revision %s", schema.name, where, found.head)
        return
    _refuse_unknown(found, schema, where)
    if not found.current:
        version = "no recorded version (made before migrations)" if found.unversioned else \
            f"revision {found.revision}"
        raise SchemaVersionError(
            f"the {schema.name} {where} has {version}; this dicom-node needs revision "
            f"{found.head}: stop the node's processes and run `{UPGRADE_COMMAND}`")


def upgrade(connection: Connection, schema: Schema) -> SchemaState:
    """Bring the database to the newest revision: an empty one is created, an unversioned one
    is stamped at the revision it is recognised at first. Returns where it stood before.

    Run it in a transaction holding the database's schema lock. Raises
    :class:`SchemaVersionError` for a database newer than this code.
    """
    found = state(connection, schema)
    _refuse_unknown(found, schema, _where(connection))
    if found.unversioned:
        command.stamp(_config(connection, schema), found.revision)
    if found.revision != found.head:
        _upgrade(connection, schema)
    return found


def _refuse_unknown(found: SchemaState, schema: Schema, where: str) -> None:
    if found.revision is not None and not known(found.revision):
        raise SchemaVersionError(
            f"the {schema.name} {where} is at revision {found.revision}, which this dicom-node "
            f"does not know (its newest is {found.head}): a newer dicom-node made it; run that "
            "version")


def _upgrade(connection: Connection, schema: Schema) -> None:
    command.upgrade(_config(connection, schema), f"{schema.branch}@head")


def _where(connection: Connection) -> str:
    """The database's URL for a message, its password and secret query values hidden."""
    return redact_url(connection.engine.url.render_as_string(hide_password=False))


def known(revision: str) -> bool:
    """Return whether ``revision`` is one of this code's."""
    try:
        return _script().get_revision(revision) is not None
    except CommandError:
        return False


def head(schema: Schema) -> str:
    """Return the newest revision of ``schema`` this code knows."""
    revision = _script().get_revision(f"{schema.branch}@head")
    assert revision is not None
    return revision.revision


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config(None, NODE))


def _config(connection: Connection | None, schema: Schema) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes.update(connection=connection, version_table=schema.version_table)
    return config
