"""The audit trail on PostgreSQL: advisory-locked appends from several processes.

Starts a throw-away cluster with ``initdb``/``pg_ctl``; skipped where PostgreSQL or
psycopg is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.audit.chain import purge_before, verify_chain
from dicom_node.audit.query import EventFilter, summarize
from tests.test_audit_concurrency import SECRET, append_from_four_processes, appended_by_writer

pytest.importorskip("psycopg")
pytestmark = pytest.mark.skipif(not shutil.which("initdb") or not shutil.which("pg_ctl"),
                                reason="PostgreSQL server binaries not installed")


def as_postgres(*command: str) -> list[str]:
    """Return ``command`` run as the postgres user when we are root (PostgreSQL refuses root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    # Not pytest's tmp (root-only), nor tempfile's default: a started SCP points that at its spool.
    home = Path(tempfile.mkdtemp(prefix="dicom-node-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    data = home / "data"
    for command in (("initdb", "-D", str(data), "-A", "trust", "-U", "postgres"),
                    ("pg_ctl", "-D", str(data), "-l", str(home / "log"), "-w",
                     "-o", f"-k {home} -c listen_addresses='' -c fsync=off", "start")):
        done = subprocess.run(as_postgres(*command), capture_output=True, text=True)
        if done.returncode != 0:
            log = (home / "log").read_text() if (home / "log").exists() else ""
            pytest.fail(f"{command[0]} failed: {done.stderr}{done.stdout}\n{log}")
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={home}"
    finally:
        subprocess.run(as_postgres("pg_ctl", "-D", str(data), "-m", "immediate", "stop"),
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_processes_append_one_chain_on_postgres(postgres_url: str) -> None:
    append_from_four_processes(postgres_url, 250)
    trail = AuditTrail(postgres_url, SECRET)
    report = verify_chain(trail)
    assert report.ok, report.problems
    assert report.rows_checked == 1000
    assert all(sequence == list(range(250)) for sequence in appended_by_writer(trail).values())

    by_day = summarize(trail, "day", EventFilter(), actor="admin")
    assert by_day[0]["key"] == datetime.now(UTC).date().isoformat()
    assert purge_before(trail, datetime.now(UTC), actor="admin") == 1001
    assert verify_chain(trail).ok
    trail.record(AuditEvent.NODE_STOPPED, actor="host")
    assert verify_chain(trail).rows_checked == 2
    trail.close()
