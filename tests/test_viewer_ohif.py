"""OHIF v3 shows what the node writes: RG1's SC, SEG and SR, made by `serve`, stored in Orthanc and
opened in OHIF 3.13.2 in Debian's Chromium, load without a page error; the SEG's segments are listed
and the SR's measurement groups drawn.

Everything listens on loopback inside a network namespace this test makes: Orthanc with its
DICOMweb plugin, ``tests/viewer/serve.py`` (the built viewer and Orthanc's DICOMweb at one origin)
and ``tests/viewer/drive.js`` (playwright-core driving Chromium headless). The viewer and
playwright-core come from npm into the ignored ``.cache/viewer/`` the first time. Screenshots stay
in the test's tmp_path, and are copied into ``$TEST_ARTEFACTS_DIR`` when it is set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from dicom_node.db import JobStatus
from tests.conftest import (
    NodeProcess, OrthancInNamespace, dcmtk_tool, free_port, in_namespace, run_tool, wait_for,
)
from tests.dicom_factory import write_rg1_study

pytestmark = pytest.mark.slow

OHIF_VERSION = "3.13.2"
PLAYWRIGHT_VERSION = "1.65.1"
CHROMIUM = Path("/usr/bin/chromium")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
CACHE = REPOSITORY / ".cache" / "viewer"


def viewer_cache() -> Path:
    """Return ``.cache/viewer/``, holding OHIF's built viewer (``ohif-VERSION/dist``) and playwright-core,
    fetched with npm when missing. Skips the test without node, npm or the packages."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to drive the viewer (apt-get install nodejs npm)")
    dist = CACHE / f"ohif-{OHIF_VERSION}" / "dist"
    tarball = CACHE / f"ohif-app-{OHIF_VERSION}.tgz"
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (dist / "index.html").is_file():
        if not tarball.is_file():
            _npm("pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(CACHE))
        with tarfile.open(tarball) as archive:
            archive.extractall(dist.parent, members=[m for m in archive if m.name.startswith("package/dist/")],
                               filter="data")
        (dist.parent / "package" / "dist").rename(dist)
        (dist.parent / "package").rmdir()
    if not (CACHE / "node_modules" / "playwright-core").is_dir():
        _npm("install", "--prefix", str(CACHE), f"playwright-core@{PLAYWRIGHT_VERSION}")
    return CACHE


def _npm(*args: str) -> None:
    done = subprocess.run(["npm", *args], cwd=CACHE, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"npm {args[0]} {args[1]} failed: {done.stderr.strip()[-300:]}")


def flagging_weights(tmp_path: Path) -> Path:
    """Return a copy of the bundled weights whose COVID-19 threshold is 0.001, which RG1 passes, so
    its results carry a flagged finding, a localized region and a second SEG segment for the viewer."""
    weights = tmp_path / "weights"
    shutil.copytree(REPOSITORY / "weights", weights)
    manifest = yaml.safe_load((weights / "manifest.yaml").read_text())
    [covid] = [entry for entry in manifest["findings"] if entry["name"] == "covid19"]
    covid["threshold"] = 0.001
    (weights / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return weights / "manifest.yaml"


def node_results(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Return RG1 with a valid Pixel Spacing and new UIDs, and the SC, SEG and SR that `serve` made of it
    with COVID-19 flagged (:func:`flagging_weights`), by kind ("sc", "seg", "sr")."""
    path = tmp_path / "rg1.dcm"
    source = write_rg1_study(path, PixelSpacing=[0.168, 0.168])  # RG1's 0\0 makes OHIF draw it black
    node = node_factory({"pipeline": {"manifest": str(flagging_weights(tmp_path))}})
    node.start()
    sent = run_tool(dcmtk_tool("storescu"), "-aec", "DICOM_NODE", "127.0.0.1", str(node.port), str(path))
    assert sent.returncode == 0, sent.stderr
    job = wait_for(lambda: next((j for j in node.jobs(source.StudyInstanceUID)
                                 if j.status not in (JobStatus.QUEUED, JobStatus.RUNNING)), None),
                   300, "the node to analyse RG1")
    assert job.status is JobStatus.DONE, job.reason
    assert node.stop() == 0
    folder = node.state_dir / "results" / source.StudyInstanceUID / source.SOPInstanceUID / "chest_xray"
    return path, {kind: folder / f"{kind}.dcm" for kind in ("sc", "seg", "sr")}


class ViewerServer:
    """``tests/viewer/serve.py`` inside ``namespace``: the viewer in ``dist`` and Orthanc's DICOMweb at one origin."""

    def __init__(self, namespace: str, root: Path, dist: Path, orthanc: OrthancInNamespace) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.command = in_namespace(namespace, sys.executable, str(HERE / "viewer" / "serve.py"), str(port), str(dist),
                                    str(HERE / "viewer" / "app-config.js"), f"http://127.0.0.1:{orthanc.http_port}")
        self.log = root / "viewer.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ViewerServer:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: b"serving" in self.log.read_bytes(), 30, "the viewer's server to listen")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None


def drive_viewer(namespace: str, cache: Path, url: str, study: str, series: dict[str, int],
                 shots: Path) -> dict[str, dict[str, Any]]:
    """Run ``tests/viewer/drive.js`` in ``namespace`` on each series (kind → Series Number); return its report
    (also written to ``shots/report.json`` beside the screenshots)."""
    shots.mkdir()
    run = subprocess.run(
        in_namespace(namespace, "node", str(HERE / "viewer" / "drive.js"), url, study, str(shots),
                     *(f"{kind}={number}" for kind, number in series.items())),
        capture_output=True, text=True, timeout=600, env={**os.environ, "NODE_PATH": str(cache / "node_modules")})
    assert run.returncode == 0, run.stderr[-2000:]
    (shots / "report.json").write_text(run.stdout)
    return json.loads(run.stdout)


def keep_artefacts(shots: Path) -> None:
    """Copy ``shots`` into ``$TEST_ARTEFACTS_DIR/viewer-ohif`` when that variable is set."""
    if folder := os.environ.get("TEST_ARTEFACTS_DIR"):
        shutil.copytree(shots, Path(folder) / "viewer-ohif", dirs_exist_ok=True)


def test_ohif_opens_the_sc_seg_and_sr_without_error(node_factory: Callable[..., NodeProcess], namespace: str,
                                                     tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    cache = viewer_cache()
    orthanc = OrthancInNamespace(namespace, tmp_path, {"Plugins": [DICOMWEB_PLUGIN]})
    source, results = node_results(node_factory, tmp_path)
    segment_labels = [s.SegmentLabel for s in dcmread(results["seg"]).SegmentSequence]
    assert len(segment_labels) == 2, segment_labels  # the lungs and the flagged finding's region
    series = {kind: int(dcmread(path, stop_before_pixels=True).SeriesNumber) for kind, path in results.items()}
    viewer = ViewerServer(namespace, tmp_path, cache / f"ohif-{OHIF_VERSION}" / "dist", orthanc)
    orthanc.start()
    try:
        for path in (source, *results.values()):
            stored = orthanc.post("/instances", path.read_bytes())
            assert stored is not None and stored["Status"] == "Success", stored
        viewer.start()
        shots = tmp_path / "viewer-shots"
        report = drive_viewer(namespace, cache, viewer.url, str(dcmread(source, stop_before_pixels=True).StudyInstanceUID), series, shots)
    finally:
        viewer.stop()
        orthanc.stop()
    keep_artefacts(shots)

    problems = [f"{kind}: {report[kind].get('failed') or report[kind]['pageErrors']}" for kind in series
                if report[kind].get("failed") or report[kind]["pageErrors"]]
    if report["seg"].get("segmentsListed") != segment_labels:
        problems.append(f"seg: panel lists {report['seg'].get('segmentsListed')}, the SEG has {segment_labels}")
    if report["seg"].get("segmentsDrawn") != len(segment_labels):
        problems.append(f"seg: {report['seg'].get('segmentsDrawn')} segments drawn of {len(segment_labels)}")
    groups = report["sr"].get("groupsListed") or []
    if not groups or report["sr"].get("groupsDrawn") != len(groups):
        problems.append(f"sr: {report['sr'].get('groupsDrawn')} measurement groups drawn of {groups}")
    assert problems == [], f"{problems}; screenshots and report.json in {shots}"
