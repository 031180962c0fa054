"""Scale-out with the pipeline doing work: `serve --no-worker` on the receiving host, PostgreSQL for node
state and audit, Redis or RabbitMQ as the broker, and two `dicom-node worker` processes on one shared spool,
each in its own network and UTS namespace: two hosts (their own hostname, their own network stack) on a
bridge to this one, where the services, which listen on loopback only, are forwarded by `socat` on the
bridge's address. A burst of real chest radiographs (RG1 with new UIDs, one study each) goes to the node;
one worker is killed (SIGKILL) in the middle of an analysis once it has finished some; every image must be
analysed exactly once, every result delivered once, the audit chain stay intact, and the killed worker's
job be finished by the other. Each worker runs two jobs at once and sends results beside them (`--lane
both`), so the victim may also die holding a delivery's message: the survivor sends it once the node finds
the message lost (short settings below keep that within the test's wait). The kill comes while no result
is being sent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from dicom_node.db import (
    Delivery, DeliveryStatus, Instance, InstanceVerdict, Job, JobStatus, NodeDatabase, utcnow,
)
from dicom_node.tasks import QUEUES
from tests.conftest import dcmtk_tool, in_namespace, run_tool, wait_for
from tests.dicom_factory import write_rg1_study
from tests.receiving_scp import ReceivingSCP

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("DICOM_NODE_TEST_REDIS", "redis://127.0.0.1:6379/11")
RABBITMQ_URL = os.environ.get("DICOM_NODE_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES = os.environ.get("DICOM_NODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1/")
BURST = 40
FINISHED_BEFORE_KILL = 3
"""Jobs the victim finishes before it is killed."""
JOB_LEASE_S = 9
"""The workers' job lease: a killed worker's job is queued again this long after its last renewal."""
TAKEOVER_S = 60
"""How long the surviving worker may take to finish the killed worker's job once the rest are done."""
DELIVERY_TIMEOUT_S = 10
"""The destination's timeout: a delivery a killed worker held is claimable again 2 × this + 30 s after."""
LOST_MESSAGE_AFTER_S = 10
"""A delivery whose message the killed worker took is queued again this long after it is due."""
DELIVERED_S = 2 * DELIVERY_TIMEOUT_S + 30 + 2 * LOST_MESSAGE_AFTER_S + 60
"""How long every result may take to be delivered once every job is done: the send lease, two lost-message
checks and the sends themselves."""


@pytest.fixture
def redis_url() -> str:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL} (.ci/run starts one)")
    client.flushdb()
    return REDIS_URL


@pytest.fixture
def rabbitmq_url() -> str:
    """RabbitMQ's URL, the node's queues emptied; skips without a RabbitMQ to log in to."""
    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
            for queue in QUEUES.values():
                channel = connection.channel()
                try:
                    channel.queue_purge(queue)
                except Exception:  # not declared yet
                    pass
                finally:
                    channel.close()
    except Exception:
        pytest.skip(f"no RabbitMQ at {urlsplit(RABBITMQ_URL).netloc.rsplit('@', 1)[-1]} (.ci/run starts one)")
    return RABBITMQ_URL


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def postgres_url():
    psycopg = pytest.importorskip("psycopg")
    name = f"dicom_node_{uuid.uuid4().hex[:12]}"
    dsn = POSTGRES.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(dsn + "postgres", autocommit=True)
    except psycopg.OperationalError:
        pytest.skip(f"no PostgreSQL at {POSTGRES} (.ci/run starts one)")
    admin.execute(f'CREATE DATABASE "{name}"')
    yield POSTGRES + name
    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()


@dataclass
class Lan:
    """A bridge in this network namespace at ``address`` (a /24), with ``hosts``: network namespaces on
    it at .2, .3, ... Services of this host that listen on loopback are reached from the hosts at
    ``address`` through :meth:`forward`."""

    bridge: str
    address: str
    hosts: list[str] = field(default_factory=list)
    forwarders: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add_host(self) -> str:
        """Make a namespace plugged into the bridge; return its name."""
        index = len(self.hosts) + 2
        name = f"{self.bridge}-h{index}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.hosts.append(name)
        host_end = f"{self.bridge}v{index}"
        subprocess.run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name],
                       check=True)
        subprocess.run(["ip", "link", "set", host_end, "master", self.bridge, "up"], check=True)
        address = self.address.rsplit(".", 1)[0] + f".{index}"
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{address}/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "up"]):
            subprocess.run(in_namespace(name, *command), check=True)
        return name

    def forward(self, port: int) -> None:
        """Make ``port`` of this host's loopback reachable at the bridge's address."""
        process = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{port},bind={self.address},fork,reuseaddr", f"TCP:127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.forwarders.append(process)
        wait_for(lambda: _accepts(self.address, port), 10, f"socat to forward port {port}")

    def url(self, url: str) -> str:
        """Return ``url`` (of this host's loopback) as the hosts reach it."""
        return url.replace("127.0.0.1", self.address)


DEFAULT_PORTS = {"redis": 6379, "amqp": 5672, "postgresql+psycopg": 5432}


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or DEFAULT_PORTS[parts.scheme]


def _accepts(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def lan() -> Iterator[Lan]:
    """A :class:`Lan` on 10.232.N.0/24; its namespaces, bridge and forwarders removed at teardown. Skips
    where namespaces, bridges or socat are not available."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("network namespaces need root, iproute2's ip and util-linux's unshare")
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (apt-get install socat)")
    tag = uuid.uuid4().hex[:6]
    bridge = f"dn{tag}"
    made = subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a bridge here: {made.stderr.strip()}")
    lan = Lan(bridge, f"10.232.{int(tag[:2], 16)}.1")
    try:
        subprocess.run(["ip", "addr", "add", f"{lan.address}/24", "dev", bridge], check=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        yield lan
    finally:
        for process in lan.forwarders:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for name in lan.hosts:
            subprocess.run(["ip", "netns", "del", name], check=False)
        subprocess.run(["ip", "link", "del", bridge], check=False)


class WorkerHost:
    """`dicom-node worker --lane both` in a namespace of the LAN, as host ``hostname`` (one torch thread,
    ``worker.torch_threads``: two workers on a two-core machine do not oversubscribe it)."""

    def __init__(self, namespace: str, hostname: str, config: Path, log: Path) -> None:
        command = [sys.executable, "-m", "dicom_node", "--config", str(config), "worker", "--lane", "both"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        with log.open("wb") as out:  # `ip netns exec`, `unshare` and `sh` exec: the pid is the worker's
            self.process = subprocess.Popen(
                in_namespace(namespace, "unshare", "--uts", "sh", "-c", f'hostname {hostname} && exec "$@"',
                             "sh", *command), stdout=out, stderr=subprocess.STDOUT, env=env)
        self.name = f"dicom-node-{self.process.pid}@{hostname}"
        self.log = log

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


@dataclass
class State:
    """What the node's database says about the burst."""

    jobs: list[Job]
    instances: list[Instance]
    deliveries: list[Delivery]

    def finished(self, *, worker: str | None = None) -> list[Job]:
        return [j for j in self.jobs if j.status.finished and worker in (None, j.worker)]

    def undecided_without_deliveries(self, worker: str) -> Job | None:
        """Return a job ``worker`` is analysing when every job it runs is before its image's verdict
        and its results' deliveries, and no delivery is being sent (claimed, by either worker): a
        kill now interrupts analyses only. (A job cut short after its results were queued runs again
        and queues them again, and a send cut short after the destination stored the object is made
        again: the destination would get those objects twice, under their one UIDs.)"""
        now = utcnow()
        if any(d.status in (DeliveryStatus.PENDING, DeliveryStatus.RETRYING) and d.next_attempt_at is not None
               and d.next_attempt_at > now for d in self.deliveries):
            return None
        queued = {d.job_id for d in self.deliveries}
        undecided = {i.job_id for i in self.instances if i.verdict is None}
        running = [j for j in self.jobs if j.status is JobStatus.RUNNING and j.worker == worker]
        if not running or any(j.id not in undecided or j.id in queued for j in running):
            return None
        return running[0]


def state(db: NodeDatabase) -> State:
    with db.session() as session:
        return State(*(list(session.scalars(select(model).order_by(model.id)))
                       for model in (Job, Instance, Delivery)))


def test_two_worker_hosts_analyse_a_burst_exactly_once_and_take_over_a_killed_one(
        node_factory, broker_url, postgres_url, lan, tmp_path):
    pacs = ReceivingSCP().start()
    for port in (_port(broker_url), _port(postgres_url), pacs.port):
        lan.forward(port)
    node = node_factory({"broker": {"url": lan.url(broker_url)}, "database_url": lan.url(postgres_url),
                         "audit": {"database_url": lan.url(postgres_url)},
                         "worker": {"embedded": False, "torch_threads": 1, "job_lease_s": JOB_LEASE_S},
                         "delivery": {"timeout_s": DELIVERY_TIMEOUT_S},
                         "scheduler": {"lost_message_after_s": LOST_MESSAGE_AFTER_S},
                         "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": lan.address,
                                           "port": pacs.port}]})
    node.command.append("--no-worker")
    node.start()
    workers = [WorkerHost(lan.add_host(), f"worker-{n}", node.config, tmp_path / f"worker-{n}.log")
               for n in (1, 2)]
    victim, survivor = workers
    db = NodeDatabase(postgres_url)
    try:
        files = [tmp_path / "burst" / f"{n}.dcm" for n in range(BURST)]
        for path in files:
            path.parent.mkdir(exist_ok=True)
            write_rg1_study(path)
        sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                        str(node.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr

        def victim_mid_analysis() -> Job | None:
            now = state(db)
            if len(now.finished(worker=victim.name)) < FINISHED_BEFORE_KILL:
                return None
            return now.undecided_without_deliveries(victim.name)

        claimed = wait_for(victim_mid_analysis, 240, f"{victim.name} to finish {FINISHED_BEFORE_KILL} "
                           "jobs and be analysing another", interval=0.05)
        victim.kill()
        wait_for(lambda: len(state(db).finished()) >= BURST - 1, 240, "the survivor to finish the other jobs")
        after = wait_for(lambda: (now := state(db)) and len(now.finished()) == BURST and now, TAKEOVER_S,
                         f"the survivor to take over job {claimed.id} of the killed worker")

        done = after.finished()
        assert {j.status for j in done} == {JobStatus.DONE}, [(j.id, j.status, j.reason) for j in done]
        assert {j.worker for j in done} >= {victim.name, survivor.name}  # both hosts did work
        analysed = [i for i in after.instances if i.job_id in {j.id for j in done}]
        assert len(analysed) == len(done) and {i.verdict for i in analysed} == {InstanceVerdict.ANALYSED}
        verdicts = Counter(e["sop_uid"] for e in json.loads(node.cli(
            "audit", "list", "--event", "job-completed", "--event", "job-skipped", "--event", "job-failed",
            "--format", "json")))
        assert verdicts == Counter({i.sop_instance_uid: 1 for i in analysed})  # each image decided once

        delivered = wait_for(lambda: (now := state(db).deliveries) and len(now) == 3 * len(done) and all(
            d.status is DeliveryStatus.DELIVERED for d in now) and now, DELIVERED_S, "every result to be delivered")
        assert pacs.received == Counter({d.sop_instance_uid: 1 for d in delivered})  # each sent once
        node.cli("audit", "verify")
        assert next(j for j in done if j.id == claimed.id).worker == survivor.name  # taken over
    finally:
        db.dispose()
        for worker in workers:
            worker.stop()
        pacs.stop()
    assert node.stop() == 0
