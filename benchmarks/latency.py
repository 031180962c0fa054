"""Arrival to result, and the trigger that starts it: the node before and after study completion
on release, Orthanc's stable-study trigger, and the bare analysis, all measured in the same run.

Each of N one-image studies (copies of RG1_UNCI.dcm, 1955 x 1841 CR, with new UIDs) is sent
by DCMTK storescu, one after another, as a PACS would:

- **the node before** (``scheduler.release_grace_s: null``: the 5 s quiet period; the solo pool and
  batches of one image: one job at a time), **on release, one job at a time**, and **after** (the
  defaults: complete on release, jobs overlapped, batched inference): the *trigger* is the time
  from storescu's acknowledgement to the study's job being made (node.db); *arrival to result* the
  time from the acknowledgement to a pynetdicom destination's receipt of all three results (SC,
  SEG, SR); the mean of each stage (the node's metrics) over the studies after the first;
- **Orthanc** (Debian's, default ``StableAge``): the trigger is the time from the
  acknowledgement to the study's ``StableStudy`` change, which is when an Orthanc-based
  set-up starts its analysis (run in a network namespace: Orthanc 1.10 cannot bind loopback
  only; skipped without root and iproute2);
- **reference**: decode + pipeline + writers of one image in one process (best of 3), the
  least a node spends.

Prints median and 95th percentile of each, the node's overhead (arrival to result minus the
reference) and the ratios. Targets: trigger <= 1 s after the release, overhead <= 1 s on CPU.

    python benchmarks/latency.py --count 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.request import urlopen

import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

ROOT = Path(__file__).resolve().parent.parent
STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ONE_JOB_AT_A_TIME = {"pool": "solo", "batch_size": 1}
BEFORE, AFTER = "node, quiet period, one job at a time (before)", "node, on release, jobs overlapped (after)"
CONFIGURATIONS = [(BEFORE, {"release_grace_s": None}, ONE_JOB_AT_A_TIME),
                  ("node, on release, one job at a time", {}, ONE_JOB_AT_A_TIME),
                  (AFTER, {}, {})]
"""(name, scheduler settings, worker settings): the node as it was, completion on release alone, the defaults."""
#: The node's stages in the order of the data flow (dicom_node/metrics.py).
STAGES = ["store", "audit", "complete", "decode", "inference_wait", "pipeline", "writers", "deliver"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} s   p95 {percentile(values, 0.95):6.2f} s"


class Destination:
    """A pynetdicom SCP that notes when each study's results arrived (wall clock)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ExplicitVRLittleEndian)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        with self.lock:
            self.arrivals.setdefault(str(event.dataset.StudyInstanceUID), []).append(time.time())
        return 0x0000

    def complete(self, study: str) -> float | None:
        with self.lock:
            times = self.arrivals.get(study, [])
            return max(times) if len(times) >= 3 else None


def make_studies(folder: Path, count: int) -> list[tuple[Path, str]]:
    """Write ``count`` one-image studies of RG1 with new UIDs; return (file, study UID) each."""
    folder.mkdir(parents=True)
    studies = []
    for index in range(count):
        ds = dcmread(get_testdata_file("RG1_UNCI.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{index}.dcm"
        ds.save_as(path)
        studies.append((path, str(ds.StudyInstanceUID)))
    return studies


def send(port: int, path: Path, prefix: list[str] | None = None) -> float:
    """C-STORE ``path`` with DCMTK storescu; return the wall-clock time it was acknowledged."""
    subprocess.run([*(prefix or []), STORESCU, "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                    str(port), str(path)], check=True, capture_output=True)
    return time.time()


def job_made_at(database: Path, study: str) -> float | None:
    """Return when the study's first job was made (node.db), as a wall-clock time."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as connection:
        row = connection.execute("SELECT min(created_at) FROM jobs WHERE study_instance_uid = ?",
                                 (study,)).fetchone()
    if row is None or row[0] is None:
        return None
    made = datetime.fromisoformat(str(row[0]))
    return (made if made.tzinfo else made.replace(tzinfo=timezone.utc)).timestamp()


def wait(what: str, probe, timeout: float = 600):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while (value := probe()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.01)
    return value


def stage_totals(ports: list[int]) -> dict[str, tuple[float, float]]:
    """Return each stage's (seconds, count) so far from the processes' Prometheus metrics."""
    totals: dict[str, tuple[float, float]] = {}
    for port in ports:
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            for index, suffix in enumerate(("_sum", "_count")):
                prefix = f"dicom_node_stage_seconds{suffix}{{stage=\""
                if line.startswith(prefix):
                    stage, value = line[len(prefix):].split('"}', 1)
                    total = list(totals.get(stage, (0.0, 0.0)))
                    total[index] += float(value)
                    totals[stage] = (total[0], total[1])
    return totals


def stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Return each stage's mean seconds between two :func:`stage_totals`."""
    means = {}
    for stage, (seconds, count) in after.items():
        seconds_before, count_before = before.get(stage, (0.0, 0.0))
        if count > count_before:
            means[stage] = (seconds - seconds_before) / (count - count_before)
    return means


def run_node(root: Path, studies: list[tuple[Path, str]], scheduler: dict,
             worker: dict) -> tuple[list[float], list[float], dict[str, float]]:
    """Send ``studies`` to a node with ``scheduler`` and ``worker`` settings; return (trigger, arrival to
    result) per study but the first (which also waits for the worker to load its models), and the mean
    seconds of each stage over those studies."""
    destination = Destination()
    port = free_port()
    metrics = {"serve_port": free_port(), "worker_port": free_port(), "delivery_port": free_port()}
    config = root / "node.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(root / "state"), "log_level": "WARNING",
        "scp": {"host": "127.0.0.1", "port": port, "min_free_disk_mb": 100,
                "allowed_peers": [{"ae_title": "STORESCU"}, {"ae_title": "ECHOSCU"}]},
        "scheduler": scheduler, "worker": {"device": "cpu", **worker}, "metrics": metrics,
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": destination.port}],
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    node = subprocess.Popen([sys.executable, "-m", "dicom_node", "--config", str(config), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    triggers, results = [], []
    try:
        wait("the node to listen", lambda: subprocess.run(
            [ECHOSCU, "-aet", "ECHOSCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port)],
            capture_output=True).returncode == 0 or None, 120)
        warmed: dict[str, tuple[float, float]] = {}
        for index, (path, study) in enumerate(studies):
            if index == 1:
                warmed = stage_totals(list(metrics.values()))
            acknowledged = send(port, path)
            done = wait("the results", lambda s=study: destination.complete(s))
            made = wait("the job", lambda s=study: job_made_at(root / "state" / "node.db", s))
            if index:
                triggers.append(made - acknowledged)
                results.append(done - acknowledged)
        stages = stage_means(warmed, stage_totals(list(metrics.values())))
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(120)
        destination.server.shutdown()
    return triggers, results, stages


def run_orthanc(root: Path, studies: list[tuple[Path, str]]) -> list[float] | None:
    """Send ``studies`` to Orthanc (default StableAge) in a network namespace; return the trigger
    delays (acknowledgement to StableStudy), or None when namespaces cannot be made here."""
    if os.geteuid() != 0 or shutil.which("ip") is None or not Path(ORTHANC).exists():
        print("Orthanc: skipped (needs root, iproute2 and Debian's orthanc)")
        return None
    namespace = f"dn-bench-{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", namespace], capture_output=True).returncode != 0:
        print("Orthanc: skipped (cannot make a network namespace here)")
        return None
    inside = ["ip", "netns", "exec", namespace]
    orthanc = None
    try:
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        root.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port = free_port(), free_port()
        (root / "orthanc.json").write_text(json.dumps({
            "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "DICOM_NODE",
            "StorageDirectory": str(root / "orthanc"), "IndexDirectory": str(root / "orthanc"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False}))
        orthanc = subprocess.Popen([*inside, ORTHANC, str(root / "orthanc.json")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def rest(path: str):  # type: ignore[no-untyped-def]
            script = (f"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("
                      f"'http://127.0.0.1:{http_port}{path}', timeout=10).read().decode())")
            done = subprocess.run([*inside, sys.executable, "-c", script], capture_output=True, text=True)
            return json.loads(done.stdout) if done.returncode == 0 else None

        wait("Orthanc to answer", lambda: rest("/system"), 60)
        acknowledged = {study: send(dicom_port, path, inside) for path, study in studies}
        stable: dict[str, float] = {}

        def all_stable() -> bool | None:
            changes = rest("/changes?limit=1000") or {"Changes": []}
            now = time.time()
            for change in changes["Changes"]:
                if change["ChangeType"] == "StableStudy":
                    study = (rest(f"/studies/{change['ID']}") or {}).get("MainDicomTags", {}).get("StudyInstanceUID")
                    if study in acknowledged and study not in stable:
                        stable[study] = now
            return True if len(stable) == len(acknowledged) else None

        wait("Orthanc's stable studies", all_stable, 300)
        return [stable[study] - acknowledged[study] for study in acknowledged]
    finally:
        if orthanc is not None:
            orthanc.terminate()
            orthanc.wait(30)
        subprocess.run(["ip", "netns", "del", namespace], check=False)


def reference_seconds(path: Path) -> float:
    """Decode, analyse and write the three results in-process; return the best of 3 runs."""
    from dicom_node.writers import AlgorithmIdentity, write_results
    from pipelines.chest_xray.pipeline import ChestXrayPipeline
    from pipelines.chest_xray.plugin import DEFAULT_MANIFEST, ChestXrayPlugin

    pipeline = ChestXrayPipeline.from_manifest(DEFAULT_MANIFEST, device="cpu")
    algorithm = AlgorithmIdentity.of(pipeline, ChestXrayPlugin())
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dataset = dcmread(path)
        image = pipeline.load(dataset)
        write_results(dataset, pipeline.run([image])[0], image.display, algorithm)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=8, help="one-image studies per configuration")
    parser.add_argument("--no-orthanc", action="store_true", help="leave Orthanc's trigger out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        root = Path(tmp)
        reference = reference_seconds(make_studies(root / "reference", 1)[0][0])
        nodes = {}
        for index, (name, scheduler, worker) in enumerate(CONFIGURATIONS):
            folder = root / f"node-{index}"
            nodes[name] = run_node(folder, make_studies(folder / "studies", args.count + 1), scheduler, worker)
        orthanc = None if args.no_orthanc else run_orthanc(root / "orthanc-run",
                                                            make_studies(root / "orthanc-studies", args.count))
    print(f"{args.count} one-image studies per configuration (RG1, 1955x1841 CR), sent one after another")
    print(f"reference, decode + pipeline + writers in one process: {reference:.2f} s")
    for name, (triggers, results, stages) in nodes.items():
        print(f"{name}:")
        print(f"  trigger (acknowledged -> job made):          {summary(triggers)}")
        print(f"  arrival to SC+SEG+SR received:               {summary(results)}")
        print(f"  overhead beyond the reference (median):      {statistics.median(results) - reference:6.2f} s")
        print("  mean per stage: " + ", ".join(f"{stage} {seconds:.3f} s" for stage, seconds in sorted(
            stages.items(), key=lambda item: STAGES.index(item[0]) if item[0] in STAGES else len(STAGES))))
    if orthanc:
        print(f"Orthanc, acknowledged -> StableStudy:          {summary(orthanc)}")
    after_triggers, after_results, _ = nodes[AFTER]
    before_triggers, before_results, _ = nodes[BEFORE]
    print(f"trigger, after / before: {statistics.median(after_triggers) / statistics.median(before_triggers):.3f}")
    print(f"arrival to result, after / before: {statistics.median(after_results) / statistics.median(before_results):.3f}")
    if orthanc:
        print(f"trigger, node after / Orthanc stable study: "
              f"{statistics.median(after_triggers) / statistics.median(orthanc):.4f}")
    print(f"arrival to result, node after / reference: {statistics.median(after_results) / reference:.2f}")
    print("targets: trigger <= 1 s after the release; arrival to result <= reference + 1 s")


if __name__ == "__main__":
    main()
