"""Schema migrations: databases made by the release before migrations are refused by `serve`
until `dicom-node db upgrade`, then work; empty ones are created at the newest revision, on
SQLite and PostgreSQL; a newer revision is refused; the revisions build what the models say."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from dicom_node import migrations
from dicom_node.audit import AuditTrail
from dicom_node.audit.chain import verify_chain
from dicom_node.audit.keys import AuditKeys
from dicom_node.audit.store import GENESIS_HASH
from dicom_node.audit.store import metadata as audit_metadata
from dicom_node.db import Base, Instance, JobStatus, NodeDatabase
from dicom_node.errors import SchemaVersionError
from tests.audit_fixtures import insert_chained_starts
from tests.conftest import dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import write_cr
from tests.test_scale_out import postgres_url  # noqa: F401  (a fixture: a scratch database)

SECRET = b"test-secret"  # NodeProcess's audit.secret

# `sqlite3 FILE .schema` of the databases the release before migrations (4838bd7) made.
NODE_DDL = """
CREATE TABLE jobs (id INTEGER NOT NULL, study_instance_uid VARCHAR(64) NOT NULL,
  status VARCHAR(16) NOT NULL, created_at DATETIME NOT NULL, started_at DATETIME,
  finished_at DATETIME, worker VARCHAR(128), reason TEXT, PRIMARY KEY (id));
CREATE INDEX ix_jobs_study_instance_uid ON jobs (study_instance_uid);
CREATE INDEX ix_jobs_status ON jobs (status);
CREATE TABLE outbox (id INTEGER NOT NULL, task VARCHAR(64) NOT NULL, target_id INTEGER NOT NULL,
  created_at DATETIME NOT NULL, not_before DATETIME, published_at DATETIME, PRIMARY KEY (id));
CREATE INDEX ix_outbox_published_at ON outbox (published_at);
CREATE TABLE instances (id INTEGER NOT NULL, sop_instance_uid VARCHAR(64) NOT NULL,
  sop_class_uid VARCHAR(64) NOT NULL, study_instance_uid VARCHAR(64) NOT NULL,
  series_instance_uid VARCHAR(64) NOT NULL, transfer_syntax_uid VARCHAR(64) NOT NULL,
  path TEXT NOT NULL, size_bytes INTEGER NOT NULL, calling_ae VARCHAR(16) NOT NULL,
  patient_pseudonym VARCHAR(40), received_at DATETIME NOT NULL, job_id INTEGER,
  verdict VARCHAR(16), verdict_reason TEXT, PRIMARY KEY (id), UNIQUE (sop_instance_uid),
  FOREIGN KEY(job_id) REFERENCES jobs (id));
CREATE INDEX ix_instances_job_id ON instances (job_id);
CREATE INDEX ix_instances_received_at ON instances (received_at);
CREATE INDEX ix_instances_study_instance_uid ON instances (study_instance_uid);
CREATE INDEX ix_instances_patient_pseudonym ON instances (patient_pseudonym);
CREATE TABLE deliveries (id INTEGER NOT NULL, job_id INTEGER NOT NULL,
  source_sop_instance_uid VARCHAR(64) NOT NULL, destination VARCHAR(32) NOT NULL,
  kind VARCHAR(16) NOT NULL, sop_instance_uid VARCHAR(64) NOT NULL, path TEXT NOT NULL,
  status VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, created_at DATETIME NOT NULL,
  next_attempt_at DATETIME, delivered_at DATETIME, last_status INTEGER, last_error TEXT,
  PRIMARY KEY (id), UNIQUE (destination, sop_instance_uid), FOREIGN KEY(job_id) REFERENCES jobs (id));
CREATE INDEX ix_deliveries_job_id ON deliveries (job_id);
CREATE INDEX ix_deliveries_status ON deliveries (status);
CREATE INDEX ix_deliveries_source_sop_instance_uid ON deliveries (source_sop_instance_uid);
INSERT INTO jobs VALUES (1, '1.2.3', 'done', '2026-01-01 00:00:00.000000', NULL,
  '2026-01-01 00:01:00.000000', 'w', NULL);
INSERT INTO instances VALUES (1, '1.2.3.4', '1.2.840.10008.5.1.4.1.1.1', '1.2.3', '1.2.3.5',
  '1.2.840.10008.1.2.1', '/gone.dcm', 10, 'STORESCU', NULL, '2026-01-01 00:00:00.000000', 1,
  'skipped', 'not a chest');
"""
AUDIT_DDL = """
CREATE TABLE audit_events (id INTEGER NOT NULL, time DATETIME NOT NULL, event VARCHAR(32) NOT NULL,
  event_id VARCHAR(16) NOT NULL, outcome VARCHAR(16) NOT NULL, actor VARCHAR(128),
  remote VARCHAR(128), pseudonym VARCHAR(40), study_uid VARCHAR(64), series_uid VARCHAR(64),
  sop_uid VARCHAR(64), job_id INTEGER, detail TEXT NOT NULL, hash VARCHAR(64) NOT NULL,
  PRIMARY KEY (id));
CREATE INDEX ix_audit_events_actor ON audit_events (actor);
CREATE INDEX ix_audit_events_study_uid ON audit_events (study_uid);
CREATE INDEX ix_audit_events_time ON audit_events (time);
CREATE INDEX ix_audit_events_pseudonym ON audit_events (pseudonym);
CREATE INDEX ix_audit_events_event ON audit_events (event);
CREATE TABLE audit_pseudonyms ("key" VARCHAR(64) NOT NULL, pseudonym VARCHAR(40) NOT NULL,
  created_at DATETIME NOT NULL, PRIMARY KEY ("key"), UNIQUE (pseudonym));
CREATE TABLE audit_chain (id INTEGER NOT NULL, head_id INTEGER NOT NULL,
  head_hash VARCHAR(64) NOT NULL, anchor_id INTEGER NOT NULL, anchor_hash VARCHAR(64) NOT NULL,
  head_mac VARCHAR(64), PRIMARY KEY (id));
"""


def released_databases(state_dir: Path, *, head_mac: bool = True) -> None:
    """Write node.db and audit.db as the release before migrations left them, with a job, an
    instance and three chained audit events (``head_mac=False``: the audit store of the
    releases before the chain head was keyed, its chain starting from zeros)."""
    state_dir.mkdir(mode=0o700)
    with sqlite3.connect(state_dir / "node.db") as connection:
        connection.executescript(NODE_DDL)
    ddl = AUDIT_DDL if head_mac else AUDIT_DDL.replace(",\n  head_mac VARCHAR(64)", "")
    with sqlite3.connect(state_dir / "audit.db") as connection:
        connection.executescript(ddl)
    keys = AuditKeys(SECRET)
    genesis = keys.genesis_hash() if head_mac else GENESIS_HASH
    engine = create_engine(f"sqlite:///{state_dir / 'audit.db'}")
    with engine.begin() as connection:
        previous = insert_chained_starts(connection, keys, genesis, 3)
        values = {"id": 3, "hash": previous, "genesis": genesis}
        if head_mac:
            connection.execute(text("INSERT INTO audit_chain VALUES (1, :id, :hash, 0, :genesis, :mac)"),
                               {**values, "mac": keys.head_mac(3, previous, 0, genesis)})
        else:
            connection.execute(text("INSERT INTO audit_chain VALUES (1, :id, :hash, 0, :genesis)"),
                               values)
    engine.dispose()


def dicom_node(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def audit_rows(state_dir: Path, event: str) -> list[tuple[str, str]]:
    with sqlite3.connect(state_dir / "audit.db") as connection:
        return connection.execute("SELECT actor, detail FROM audit_events WHERE event = ? "
                                  "ORDER BY id", (event,)).fetchall()


@pytest.mark.slow
def test_databases_of_the_release_before_migrations_are_upgraded(node_factory, tmp_path):
    node = node_factory()
    released_databases(node.state_dir)

    with pytest.raises(pytest.fail.Exception, match="serve exited with 1"):
        node.start()
    assert ("has no recorded version (made before migrations); this dicom-node needs revision "
            "audit_0003: stop the node's processes and run `dicom-node db upgrade`") in node.log.read_text()
    status = dicom_node(node.config, "db", "status")
    assert status.returncode == 1 and "made before migrations" in status.stdout, status.stderr

    upgraded = dicom_node(node.config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "audit store sqlite:///" in upgraded.stdout
    assert "made before migrations, stamped audit_0002, upgraded to audit_0003" in upgraded.stdout
    assert "made before migrations, stamped node_0001" in upgraded.stdout
    assert [detail for _, detail in audit_rows(node.state_dir, "schema-upgraded")] == [
        "audit store: made before migrations, stamped audit_0002, upgraded to audit_0003",
        "node database: made before migrations, stamped node_0001, upgraded to node_0004"]
    status = dicom_node(node.config, "db", "status")
    assert status.returncode == 0 and status.stdout.count(", current") == 2, status.stdout
    again = dicom_node(node.config, "db", "upgrade")
    assert again.stdout.count("already at") == 2 and len(
        audit_rows(node.state_dir, "schema-upgraded")) == 2

    node.start()
    hand = write_cr(tmp_path / "hand.dcm", body_part="HAND")
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                    "127.0.0.1", str(node.port), str(tmp_path / "hand.dcm"))
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: node.rows(Instance, Instance.sop_instance_uid == hand.SOPInstanceUID),
             60, "the instance to be stored")
    assert node.stop() == 0
    assert [(job.id, job.status) for job in node.jobs("1.2.3")] == [(1, JobStatus.DONE)]
    verified = dicom_node(node.config, "audit", "verify")
    assert verified.returncode == 0 and "audit trail intact" in verified.stdout, verified.stderr


def test_an_audit_store_from_before_the_head_was_keyed_is_upgraded_then_keyed(tmp_path):
    state_dir = tmp_path / "state"
    released_databases(state_dir, head_mac=False)
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {state_dir}\naudit: {{secret: {SECRET.decode()}}}\n")
    with pytest.raises(SchemaVersionError, match="needs revision audit_0003"):
        AuditTrail(f"sqlite:///{state_dir / 'audit.db'}", SECRET)

    upgraded = dicom_node(config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "stamped audit_0001, upgraded to audit_0003" in upgraded.stdout
    assert len(audit_rows(state_dir, "chain-head-keyed")) == 1  # keyed when the trail opened it
    trail = AuditTrail(f"sqlite:///{state_dir / 'audit.db'}", SECRET)
    report = verify_chain(trail)
    trail.close()
    assert report.ok and report.rows_checked == 6, report.problems  # 3 + keyed + 2 upgrades
    assert len(audit_rows(state_dir, "chain-head-keyed")) == 1


def test_a_database_of_a_newer_revision_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    NodeDatabase(url).dispose()
    with sqlite3.connect(tmp_path / "node.db") as connection:
        connection.execute(f"UPDATE {migrations.NODE.version_table} SET version_num = 'node_0099'")
    with pytest.raises(SchemaVersionError, match="at revision node_0099, which this dicom-node does "
                                                 "not know \\(its newest is node_0004\\)"):
        NodeDatabase(url)


def test_a_new_database_is_created_at_head_on_sqlite_and_matches_the_models(tmp_path):
    NodeDatabase(f"sqlite:///{tmp_path / 'node.db'}").dispose()
    AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}", SECRET).close()
    for name, schema, metadata in (("node.db", migrations.NODE, Base.metadata),
                                   ("audit.db", migrations.AUDIT, audit_metadata)):
        assert_matches_models(f"sqlite:///{tmp_path / name}", schema, metadata)


def test_db_upgrade_creates_both_databases_in_one_postgresql_database(tmp_path, postgres_url):  # noqa: F811
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ndatabase_url: {postgres_url}\n"
                      f"audit: {{secret: s, database_url: {postgres_url}}}\n")
    upgraded = dicom_node(config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "audit store postgresql" in upgraded.stdout and "created at audit_0003" in upgraded.stdout
    assert "node database postgresql" in upgraded.stdout and "created at node_0004" in upgraded.stdout
    status = dicom_node(config, "db", "status")
    assert status.returncode == 0 and status.stdout.count(", current") == 2, status.stdout
    NodeDatabase(postgres_url).dispose()
    for schema, metadata in ((migrations.NODE, Base.metadata), (migrations.AUDIT, audit_metadata)):
        assert_matches_models(postgres_url, schema, metadata)


def assert_matches_models(url: str, schema: migrations.Schema, metadata) -> None:
    """The database's schema is what ``metadata`` describes (its other tables aside)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={
                "version_table": schema.version_table,
                "include_name": lambda name, kind, _: kind != "table" or name in metadata.tables})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()
