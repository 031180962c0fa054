"""Shared fixtures: real DICOM test files, DCMTK tools, free ports, a `serve` subprocess, Orthanc in a
network namespace."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import select

from dicom_node.audit import AuditTrail
from dicom_node.config import TlsSettings, load_settings
from dicom_node.db import Delivery, Job, NodeDatabase
from dicom_node.plugins import kept_sop_classes
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from pipelines.base import GROUP as PIPELINES_GROUP
from training.chest_xray.datasets import hash_split

DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def sample_file(name: str) -> Path:
    """Return the path of a file shipped by pydicom-data or pydicom (e.g. RG1_UNCI.dcm)."""
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"test file {name} not found: install the dev extra (pydicom-data)")
    return Path(path)


def dcmtk_tool(name: str) -> str:
    """Return the path of a DCMTK program (not pynetdicom's app of the same name)."""
    for folder in DCMTK_DIRS:
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    pytest.skip(f"DCMTK {name} is not installed (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def stems_in_split(prefix: str, split: str, count: int = 1) -> list[str]:
    """Return the first ``count`` file stems ``prefix0``, ``prefix1``, ... that the hash split puts into ``split``."""
    stems = (f"{prefix}{n}" for n in itertools.count() if hash_split(f"{prefix}{n}") == split)
    return list(itertools.islice(stems, count))


def dataset_bytes(path: Path) -> bytes:
    """Return the bytes of a DICOM file after its preamble and file meta information."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a DICOM file"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


class NodeProcess:
    """`dicom-node serve` started as a subprocess on a free loopback port."""

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.root = root
        self.port = free_port()
        self.state_dir = root / "state"
        base = {
            "state_dir": str(self.state_dir),
            "scp": {"host": "127.0.0.1", "port": self.port,
                    "allowed_peers": [{"ae_title": "STORESCU"}, {"ae_title": "ECHOSCU"},
                                      {"ae_title": "TESTSCU"}]},
            "scheduler": {"study_quiet_seconds": 1, "poll_seconds": 0.2},
            "audit": {"secret": "test-secret"},
        }
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump(_merge(base, settings)))
        self.log = root / "serve.log"
        #: What starts the node; a test may prefix it (``ip netns exec NS``).
        self.command = [sys.executable, "-m", "dicom_node", "--config", str(self.config), "serve"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> NodeProcess:
        self.log.write_bytes(b"")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        wait_for(self._listening, timeout, "the SCP to listen")
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"serve exited with {self.process.returncode}:\n{self.log.read_text()}")
        return b"listening on" in self.log.read_bytes()

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM the node and return its exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL the node and every process it started."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group has exited already
            pass
        self.process.wait()
        self.process = None

    def db(self) -> NodeDatabase:
        return NodeDatabase(f"sqlite:///{self.state_dir / 'node.db'}")

    def rows(self, model: type[Any], *where: Any) -> list[Any]:
        """Return the node's rows of ``model`` (a table of :mod:`dicom_node.db`) matching ``where``, by id."""
        db = self.db()
        try:
            with db.session() as session:
                return list(session.scalars(select(model).where(*where).order_by(model.id)))
        finally:
            db.dispose()

    def jobs(self, study: str | None = None) -> list[Job]:
        """Return the node's jobs (of ``study`` when given), oldest first."""
        return self.rows(Job, *([Job.study_instance_uid == study] if study else []))

    def deliveries(self, job_id: int | None = None) -> list[Delivery]:
        """Return the node's deliveries (of ``job_id`` when given)."""
        return self.rows(Delivery, *([Delivery.job_id == job_id] if job_id is not None else []))

    def cli(self, *args: str) -> str:
        """Run ``dicom-node --config … ARGS`` and return its output; fails the test on a non-zero exit."""
        result = subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(self.config), *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Make `serve` subprocesses; whatever is left running is killed at teardown."""
    nodes: list[NodeProcess] = []

    def make(settings: dict[str, Any] | None = None, name: str = "node") -> NodeProcess:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        node = NodeProcess(root, settings or {})
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.process is not None:
            node.kill()


@pytest.fixture
def bright_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install the test pipeline :class:`tests.plugins.bright.BrightPlugin` as ``bright``: a
    distribution's entry point on the path of this process and of `serve` subprocesses (PYTHONPATH)."""
    site = tmp_path / "site"
    info = site / "bright_pipeline-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bright-pipeline\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{PIPELINES_GROUP}]\nbright = tests.plugins.bright:BrightPlugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(Path(__file__).resolve().parent.parent)]))
    return site


@pytest.fixture
def certificate(tmp_path: Path) -> TlsSettings:
    """A self-signed certificate and key for 127.0.0.1 (its own CA), made by openssl; skips without openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=dicom-node-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return TlsSettings(certificate=cert, private_key=key, ca_certificates=cert)

class DcmtkStoreSCP:
    """DCMTK's storescp, bit-preserving: a real peer. It accepts every transfer syntax (``+xa``),
    or with ``accept_all=False`` only those of DCMTK's defaults (uncompressed ones), as many
    older PACS do."""

    def __init__(self, root: Path, ae_title: str = "RECEIVER", port: int | None = None,
                 accept_all: bool = True) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.accept_all = accept_all
        self.folder = root / f"received-{self.port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DcmtkStoreSCP:
        self.process = subprocess.Popen(
            [dcmtk_tool("storescp"), "+B", *(["+xa"] if self.accept_all else []), "-aet", self.ae_title,
             "-od", str(self.folder), str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: run_tool(dcmtk_tool("echoscu"), "-aec", self.ae_title, "127.0.0.1",
                                  str(self.port), timeout=10).returncode == 0,
                 30, "storescp to listen")
        return self

    def received(self, sop_instance_uid: str) -> Path | None:
        found = sorted(self.folder.glob(f"*{sop_instance_uid}*"))
        return found[0] if found else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[..., DcmtkStoreSCP]]:
    peers: list[DcmtkStoreSCP] = []

    def make(**kwargs: Any) -> DcmtkStoreSCP:
        peer = DcmtkStoreSCP(tmp_path, **kwargs)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[Callable[..., StorageSCP]]:
    """Start an in-process SCP with its real spool, SQLite state and audit trail."""
    started: list[StorageSCP] = []

    def start(*, db_busy_timeout_s: float = 60.0, **scp_settings: object) -> StorageSCP:
        settings = load_settings(None, state_dir=tmp_path / "state", audit={"secret": "s"},
                                 scp={"host": "127.0.0.1", "port": free_port(), **scp_settings})
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        spool = Spool(settings.spool_dir,
                      min_free_bytes=int(settings.scp.min_free_disk_mb * 2**20),
                      max_dataset_bytes=int(settings.scp.max_dataset_mb * 2**20))
        scp = StorageSCP(settings.scp, NodeDatabase(settings.node_database_url, busy_timeout_s=db_busy_timeout_s),
                         spool, AuditTrail.from_settings(settings), kept_sop_classes=kept_sop_classes(settings))
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop(grace_seconds=1)


@pytest.fixture
def mount_tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """Mount a tmpfs of a given size (``"60m"``) on a folder; unmounted at teardown. Skips the test
    where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    path = shutil.which("dciodvfy")
    if path is None:
        pytest.skip("dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
    return path


@pytest.fixture
def namespace() -> Iterator[str]:
    """A fresh network namespace with only its loopback up; removed at teardown. Skips the test where
    namespaces cannot be made (Orthanc 1.10 cannot bind to loopback only: it runs in one)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    name = f"dn-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
    subprocess.run(in_namespace(name, "ip", "link", "set", "lo", "up"), check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def in_namespace(namespace: str, *command: str) -> list[str]:
    """Return ``command`` run inside the network namespace ``namespace``."""
    return ["ip", "netns", "exec", namespace, *command]


class OrthancInNamespace:
    """Debian's Orthanc inside ``namespace``, on free ports, storing under ``root``, without
    authentication; ``config`` holds the rest of its configuration. Skips the test without Orthanc."""

    def __init__(self, namespace: str, root: Path, config: dict[str, Any]) -> None:
        if not Path(ORTHANC).exists():
            pytest.skip("Orthanc is not installed (apt-get install orthanc)")
        self.namespace = namespace
        self.http_port, self.dicom_port = free_port(), free_port()
        storage = root / "orthanc-db"
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            **config, "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        }))
        self.log = root / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OrthancInNamespace:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(in_namespace(self.namespace, ORTHANC, str(self.config)),
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.get("/system") is not None, 60, "Orthanc to answer")
        return self

    def _rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        """Call Orthanc's REST API from inside the namespace; None when it does not answer."""
        script = ("import sys, urllib.request; r = urllib.request.Request("
                  f"'http://127.0.0.1:{self.http_port}{path}', data=sys.stdin.buffer.read() or None, "
                  f"method='{method}'); sys.stdout.write(urllib.request.urlopen(r, timeout=20).read().decode())")
        run = subprocess.run(in_namespace(self.namespace, sys.executable, "-c", script),
                             input=body or b"", capture_output=True, timeout=60)
        return json.loads(run.stdout) if run.returncode == 0 else None

    def get(self, path: str) -> Any:
        return self._rest("GET", path)

    def post(self, path: str, body: bytes) -> Any:
        return self._rest("POST", path, body)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None


class LinkedNamespaces:
    """Two network namespaces joined by a veth pair: ``node`` at ``node_address`` and ``peer`` at
    ``peer_address`` (a /30), each with its loopback up. A node run in ``node`` sees a peer in
    ``peer`` as another host."""

    def __init__(self, node: str, peer: str, node_address: str, peer_address: str) -> None:
        self.node, self.peer = node, peer
        self.node_address, self.peer_address = node_address, peer_address


@pytest.fixture
def linked_namespaces() -> Iterator[LinkedNamespaces]:
    """Make two namespaces joined by a veth pair (10.231.N.1/30 and .2/30); removed at teardown.
    Skips the test where namespaces or veth pairs cannot be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    tag = uuid.uuid4().hex[:8]
    made: list[str] = []
    try:
        for name in (f"dn-node-{tag}", f"dn-peer-{tag}"):
            done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make a network namespace here: {done.stderr.strip()}")
            made.append(name)
            subprocess.run(in_namespace(name, "ip", "link", "set", "lo", "up"), check=True)
        node, peer = made
        link = subprocess.run(["ip", "link", "add", "dn0", "netns", node, "type", "veth",
                               "peer", "name", "dn1", "netns", peer], capture_output=True, text=True)
        if link.returncode != 0:
            pytest.skip(f"cannot make a veth pair here: {link.stderr.strip()}")
        subnet = int(tag[:2], 16)
        pair = LinkedNamespaces(node, peer, f"10.231.{subnet}.1", f"10.231.{subnet}.2")
        for name, device, address in ((node, "dn0", pair.node_address), (peer, "dn1", pair.peer_address)):
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/30", "dev", device], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", device, "up"], check=True)
        yield pair
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def store_as_is(port: int, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """C-STORE ``path`` to the SCP on ``port`` as a CR over ``transfer_syntax``, calling AE
    TESTSCU; return the status it answers."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()
