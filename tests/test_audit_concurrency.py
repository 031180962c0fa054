"""Appends from several processes and threads at once keep one unbroken chain."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from sqlalchemy import event, select

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.audit.chain import verify_chain
from dicom_node.audit.store import events

SECRET = b"concurrency-test-secret"
WRITER = """
import sys
from dicom_node.audit import AuditEvent, AuditTrail
url, writer, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
trail = AuditTrail(url, {secret!r})
pseudonym = trail.pseudonym(f"patient-{{writer}}")
for number in range(count):
    trail.record(AuditEvent.INSTANCE_RECEIVED, actor=f"WRITER{{writer}}", pseudonym=pseudonym,
                 sop_uid=f"{{writer}}.{{number}}")
trail.close()
""".format(secret=SECRET)


def appended_by_writer(trail: AuditTrail) -> dict[str, list[int]]:
    """Return, per actor, the sequence numbers of its events in chain order."""
    by_writer: dict[str, list[int]] = defaultdict(list)
    with trail.connect() as connection:
        for actor, sop_uid in connection.execute(
                select(events.c.actor, events.c.sop_uid).order_by(events.c.id)):
            by_writer[actor].append(int(sop_uid.split(".")[1]))
    return by_writer


def append_from_four_processes(url: str, events_each: int, timeout: float = 300) -> None:
    """Run four writer processes appending ``events_each`` events to ``url``; assert they succeed."""
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(n), str(events_each)])
               for n in range(4)]
    assert [writer.wait(timeout=timeout) for writer in writers] == [0, 0, 0, 0]


def test_four_processes_append_a_thousand_events_each(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    AuditTrail(url, SECRET).close()  # creating the store in a race: see the last test
    append_from_four_processes(url, 1000)

    trail = AuditTrail(url, SECRET)
    report = verify_chain(trail)
    assert report.ok, report.problems
    assert (report.rows_checked, report.first_id, report.last_id) == (4000, 1, 4000)
    by_writer = appended_by_writer(trail)
    assert sorted(by_writer) == [f"WRITER{n}" for n in range(4)]
    assert all(sequence == list(range(1000)) for sequence in by_writer.values())


def test_threads_of_one_process_share_a_trail(tmp_path: Path) -> None:
    trail = AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}", SECRET)

    def append(writer: int) -> None:
        pseudonym = trail.pseudonym("the same patient")
        for number in range(200):
            trail.record(AuditEvent.JOB_STARTED, actor=f"THREAD{writer}",
                         pseudonym=pseudonym, sop_uid=f"{writer}.{number}")

    threads = [threading.Thread(target=append, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = verify_chain(trail)
    assert report.ok and report.rows_checked == 800
    assert all(sequence == list(range(200)) for sequence in appended_by_writer(trail).values())
    with trail.connect() as connection:
        assert len(set(connection.execute(select(events.c.pseudonym)).scalars())) == 1


def test_records_waiting_on_a_locked_store_are_committed_together(tmp_path: Path) -> None:
    database = tmp_path / "audit.db"
    trail = AuditTrail(f"sqlite:///{database}", SECRET)
    commits: list[int] = []
    event.listen(trail.engine, "commit", lambda connection: commits.append(1))
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process's transaction holds the write lock
    returned: list[int] = []

    def append(writer: int) -> None:
        trail.record(AuditEvent.INSTANCE_RECEIVED, actor=f"THREAD{writer}", sop_uid=f"{writer}.0")
        returned.append(writer)

    threads = [threading.Thread(target=append, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    assert returned == []  # nobody returns before its event is committed
    blocker.rollback()
    for thread in threads:
        thread.join()
    assert sorted(returned) == list(range(6))
    # The first caller's transaction waited on the lock; the other five were grouped behind it.
    assert len(commits) == 2
    report = verify_chain(trail)
    assert report.ok and report.rows_checked == 6


def test_processes_creating_the_store_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'audit.db'}"
    append_from_four_processes(url, 20, timeout=120)
    report = verify_chain(AuditTrail(url, SECRET))
    assert report.ok and report.rows_checked == 80
