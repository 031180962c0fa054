"""The broker stops while studies arrive and comes back: the embedded SQLite broker held locked
by another process, and a Redis broker killed (losing every message it held) and restarted.
Every acknowledged image is analysed once and its results delivered once, without a hand restart."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.db import DeliveryStatus, JobStatus, OutboxMessage
from tests.conftest import NodeProcess, dcmtk_tool, free_port, run_tool, wait_for
from tests.dicom_factory import write_rg1_study
from tests.receiving_scp import ReceivingSCP

pytestmark = pytest.mark.slow

OUTAGE_S = 30


class RedisServer:
    """A redis-server of the test's own, on a free loopback port, without persistence."""

    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: run_tool("redis-cli", "-p", str(self.port), "ping", timeout=5).stdout.strip()
                 == "PONG", 30, "redis-server to answer")
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(30)
            self.process = None


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def pacs() -> Iterator[ReceivingSCP]:
    scp = ReceivingSCP().start()
    yield scp
    scp.stop()


def studies(folder: Path, count: int) -> list[Path]:
    """Write ``count`` one-image chest studies (RG1 under new UIDs)."""
    start = len(list(folder.glob("*.dcm")))  # a second call adds to the first one's files
    paths = [folder / f"{start + n}.dcm" for n in range(count)]
    for path in paths:
        write_rg1_study(path)
    return paths


def send(node: NodeProcess, paths: list[Path]) -> None:
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                    str(node.port), *map(str, paths))
    assert sent.returncode == 0, sent.stderr + sent.stdout


def assert_all_done_once(node: NodeProcess, pacs: ReceivingSCP, images: int) -> None:
    def settled() -> bool:
        jobs = node.jobs()
        return (len(jobs) == images and all(j.status.finished for j in jobs)
                and all(d.status is DeliveryStatus.DELIVERED for d in node.deliveries())
                and len(node.deliveries()) == 3 * images)

    wait_for(settled, 420, f"{images} jobs analysed and their results delivered")
    assert {j.status for j in node.jobs()} == {JobStatus.DONE}
    decided = Counter(e["sop_uid"] for e in json.loads(node.cli(
        "audit", "list", "--event", "job-completed", "--event", "job-skipped", "--event", "job-failed",
        "--format", "json")))
    assert len(decided) == images and set(decided.values()) == {1}  # each image decided once
    assert len(pacs.received) == 3 * images and set(pacs.received.values()) == {1}  # no duplicates


def destination(pacs: ReceivingSCP) -> dict:
    return {"destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                              "port": pacs.port}],
            "delivery": {"first_retry_s": 2, "max_retry_interval_s": 5},
            "scheduler": {"lost_message_after_s": 5}}


def wait_until_busy(node: NodeProcess) -> None:
    """Until one job runs and another waits in the broker: the outage then hits work in flight."""
    wait_for(lambda: {JobStatus.RUNNING, JobStatus.QUEUED} <= {j.status for j in node.jobs()}
             and all(m.published_at for m in node.rows(OutboxMessage, OutboxMessage.task == "analyze")),
             240, "a job running and another published")


def test_embedded_broker_locked_then_released(node_factory, pacs, tmp_path):
    node = node_factory(destination(pacs)).start()
    send(node, studies(tmp_path, 3))
    wait_until_busy(node)
    broker = sqlite3.connect(node.state_dir / "broker.db", timeout=5, isolation_level=None)
    broker.execute("BEGIN EXCLUSIVE")  # nobody reads or writes the broker now
    try:
        send(node, studies(tmp_path, 2))  # acknowledged while the broker is unavailable
        time.sleep(OUTAGE_S)
    finally:
        broker.execute("ROLLBACK")
        broker.close()
    assert_all_done_once(node, pacs, 5)
    assert node.stop() == 0


def test_redis_broker_killed_and_restarted(node_factory, pacs, redis_server, tmp_path):
    redis_server.start()
    node = node_factory({**destination(pacs), "broker": {"url": redis_server.url}}).start()
    send(node, studies(tmp_path, 3))
    wait_until_busy(node)
    redis_server.kill()  # with every message it held
    send(node, studies(tmp_path, 2))
    time.sleep(OUTAGE_S)
    redis_server.start()
    assert_all_done_once(node, pacs, 5)
    assert node.stop() == 0
