"""Orthanc as the PACS: an image uploaded into Orthanc comes back into its study as SC + SEG + SR.

Orthanc (Debian's 1.10) cannot listen on loopback only, so it runs, with the node, inside
a network namespace this test makes and removes: nothing listens outside it. Orthanc is
configured with ``examples/orthanc/orthanc.json`` and forwards stable CR/DX series with
``examples/orthanc/forward-to-dicom-node.lua``, the files a site would use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import free_port, sample_file, wait_for

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "orthanc"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


@pytest.fixture
def namespace():
    """A fresh network namespace with only its loopback up; removed at teardown."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip (Orthanc 1.10 cannot bind to loopback only)")
    if not Path(ORTHANC).exists():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    name = f"dn-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


class OrthancInNamespace:
    """Orthanc started from the example configuration, inside ``namespace``."""

    def __init__(self, namespace: str, root: Path, node_port: int) -> None:
        self.namespace = namespace
        self.http_port, self.dicom_port = free_port(), free_port()
        config = json.loads((EXAMPLES / "orthanc.json").read_text())
        storage = root / "orthanc-db"
        lua = root / "forward-to-dicom-node.lua"
        shutil.copy(EXAMPLES / "forward-to-dicom-node.lua", lua)
        config.update({
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "StableAge": 1,
            "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": {"dicom-node": ["DICOM_NODE", "127.0.0.1", node_port]},
            "LuaScripts": [str(lua)], "Plugins": [],
        })
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.log = root / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OrthancInNamespace:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(["ip", "netns", "exec", self.namespace, ORTHANC, str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.get("/system") is not None, 60, "Orthanc to answer")
        return self

    def _rest(self, method: str, path: str, body: bytes | None = None) -> object | None:
        """Call Orthanc's REST API from inside the namespace; None when it does not answer."""
        script = ("import sys, urllib.request; r = urllib.request.Request("
                  f"'http://127.0.0.1:{self.http_port}{path}', data=sys.stdin.buffer.read() or None, "
                  f"method='{method}'); sys.stdout.write(urllib.request.urlopen(r, timeout=20).read().decode())")
        run = subprocess.run(["ip", "netns", "exec", self.namespace, sys.executable, "-c", script],
                             input=body or b"", capture_output=True, timeout=60)
        return json.loads(run.stdout) if run.returncode == 0 else None

    def get(self, path: str) -> object | None:
        return self._rest("GET", path)

    def post(self, path: str, body: bytes) -> object | None:
        return self._rest("POST", path, body)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None


def _series_of(orthanc: OrthancInNamespace, study_id: str) -> dict[str, str]:
    series = orthanc.get(f"/studies/{study_id}/series") or []
    return {s["MainDicomTags"].get("Modality", ""): s["ID"] for s in series}


def test_an_image_sent_to_orthanc_comes_back_into_its_study(node_factory, namespace, tmp_path):
    node_port = free_port()
    orthanc = OrthancInNamespace(namespace, tmp_path, node_port)
    node = node_factory({
        "scp": {"port": node_port, "allowed_peers": [{"ae_title": "ORTHANC"}]},
        "destinations": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                          "port": orthanc.dicom_port}],
    })
    node.command = ["ip", "netns", "exec", namespace, *node.command]
    node.port = node_port
    orthanc.start()
    try:
        node.start()
        source = dcmread(sample_file("RG1_UNCR.dcm"))
        source.PixelSpacing = [0.171, 0.171]  # RG1's 0\0 makes viewers draw it black
        upload = tmp_path / "rg1.dcm"
        source.save_as(upload)
        stored = orthanc.post("/instances", upload.read_bytes())
        assert stored is not None and stored["Status"] == "Success", stored
        study_id = stored["ParentStudy"]

        series = wait_for(lambda: (s := _series_of(orthanc, study_id)) and {"CR", "OT", "SEG", "SR"} <= set(s) and s,
                          300, "SC, SEG and SR in the Orthanc study")
        for modality in ("OT", "SEG", "SR"):
            [instance] = orthanc.get(f"/series/{series[modality]}/instances")
            tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
            assert tags["StudyInstanceUID"] == source.StudyInstanceUID
            assert tags["SeriesDescription"].startswith("AI CXR: ")
            assert tags["Manufacturer"] == "dicom-node"
        events = [e["event"] for e in json.loads(node.cli("audit", "list", "--study", source.StudyInstanceUID,
                                                              "--format", "json"))]
        assert events == ["instance-received", "job-queued", "job-started", "job-completed", *["result-sent"] * 3]
        # No loop: the results are not forwarded back, and the CR went to the node once.
        wait_for(lambda: "Forwarding CR series" in orthanc.log.read_text(), 10, "Orthanc's forwarding line")
        assert orthanc.log.read_text().count("Forwarding") == 1
        assert events.count("instance-received") == 1
        assert len(orthanc.get(f"/studies/{study_id}/series")) == 4
        assert node.stop() == 0
    finally:
        orthanc.stop()
