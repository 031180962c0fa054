"""Orthanc as the PACS: an image uploaded into Orthanc comes back into its study as SC + SEG + SR.

Orthanc (Debian's 1.10) cannot listen on loopback only, so it runs, with the node, inside
a network namespace this test makes and removes: nothing listens outside it. Orthanc is
configured with ``examples/orthanc/orthanc.json`` and forwards stable CR/DX series with
``examples/orthanc/forward-to-dicom-node.lua``, the files a site would use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import OrthancInNamespace, free_port, in_namespace, sample_file, wait_for

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "orthanc"


def example_orthanc(namespace: str, root: Path, node_port: int) -> OrthancInNamespace:
    """Return Orthanc configured from the example files, forwarding to the node on ``node_port``."""
    lua = root / "forward-to-dicom-node.lua"
    shutil.copy(EXAMPLES / "forward-to-dicom-node.lua", lua)
    config = json.loads((EXAMPLES / "orthanc.json").read_text())
    config.update({"StableAge": 1, "DicomModalities": {"dicom-node": ["DICOM_NODE", "127.0.0.1", node_port]},
                   "LuaScripts": [str(lua)], "Plugins": []})
    return OrthancInNamespace(namespace, root, config)


def _series_of(orthanc: OrthancInNamespace, study_id: str) -> dict[str, str]:
    """Return the study's series ids by kind: "source", or the label our series descriptions end with
    ("overlay", "SEG", "SR"; the SC has the source's Modality)."""
    series = orthanc.get(f"/studies/{study_id}/series") or []
    kinds = {}
    for item in series:
        description = item["MainDicomTags"].get("SeriesDescription", "")
        kind = description.rsplit("[", 1)[-1].rstrip("]") if description.startswith("AI CXR: ") else "source"
        kinds[kind] = item["ID"]
    return kinds


def test_an_image_sent_to_orthanc_comes_back_into_its_study(node_factory, namespace, tmp_path):
    node_port = free_port()
    orthanc = example_orthanc(namespace, tmp_path, node_port)
    node = node_factory({
        "scp": {"port": node_port, "allowed_peers": [{"ae_title": "ORTHANC"}]},
        "destinations": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                          "port": orthanc.dicom_port}],
    })
    node.command = in_namespace(namespace, *node.command)
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

        series = wait_for(lambda: (s := _series_of(orthanc, study_id)) and {"source", "overlay", "SEG", "SR"} <= set(s)
                          and s, 300, "SC, SEG and SR in the Orthanc study")
        for kind in ("overlay", "SEG", "SR"):
            [instance] = orthanc.get(f"/series/{series[kind]}/instances")
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
