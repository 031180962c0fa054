"""Arrival-to-result latency of the whole node, against the bare analysis in the same run.

For each of N one-image studies (copies of RG1_UNCI.dcm with new UIDs): the time
from DCMTK storescu's acknowledgement of the image to the destination's receipt
of all three results (SC, SEG, SR), minus the quiet period. The reference is the
same work without the node: decode + pipeline + writers in one process. Prints
both, and their ratio (the node's overhead). Target: ≤ 2 s on CPU.

    python benchmarks/latency.py --count 5
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

QUIET_S = 1.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Destination:
    """A pynetdicom SCP that notes when each study's results arrived."""

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
        study = str(event.dataset.StudyInstanceUID)
        with self.lock:
            self.arrivals.setdefault(study, []).append(time.perf_counter())
        return 0x0000

    def complete(self, study: str) -> float | None:
        with self.lock:
            times = self.arrivals.get(study, [])
            return max(times) if len(times) >= 3 else None


def make_study(folder: Path, index: int) -> tuple[Path, str]:
    ds = dcmread(get_testdata_file("RG1_UNCI.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"{index}.dcm"
    ds.save_as(path)
    return path, str(ds.StudyInstanceUID)


def reference_seconds(path: Path) -> float:
    """Decode, analyse and write the three results in-process; return the best of 3 runs."""
    from dicom_node.writers import AlgorithmIdentity, write_results
    from pipelines.chest_xray.pipeline import ChestXrayPipeline
    from pipelines.chest_xray.plugin import ChestXrayPlugin

    pipeline = ChestXrayPipeline.from_manifest(
        Path(__file__).resolve().parent.parent / "weights" / "manifest.yaml", device="cpu")
    algorithm = AlgorithmIdentity.of(pipeline, ChestXrayPlugin())
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dataset = dcmread(path)
        image = pipeline.load(dataset)
        result = pipeline.run([image])[0]
        write_results(dataset, result, image.display, algorithm)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5, help="one-image studies to send")
    args = parser.parse_args()
    destination = Destination()
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        root = Path(tmp)
        port = free_port()
        config = root / "node.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(root / "state"), "log_level": "WARNING",
            "scp": {"host": "127.0.0.1", "port": port, "min_free_disk_mb": 100},
            "scheduler": {"study_quiet_seconds": QUIET_S, "poll_seconds": 0.1},
            "worker": {"device": "cpu"},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                              "port": destination.port}],
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        node = subprocess.Popen([sys.executable, "-m", "dicom_node", "--config", str(config),
                                 "serve"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            studies = [make_study(root, i) for i in range(args.count + 1)]
            latencies = []
            for index, (path, study) in enumerate(studies):
                while subprocess.run(["/usr/bin/echoscu", "-aec", "DICOM_NODE", "127.0.0.1",
                                      str(port)], capture_output=True).returncode != 0:
                    time.sleep(0.5)
                subprocess.run(["/usr/bin/storescu", "-aec", "DICOM_NODE", "127.0.0.1",
                                str(port), str(path)], check=True, capture_output=True)
                acknowledged = time.perf_counter()
                deadline = acknowledged + 600
                while (done := destination.complete(study)) is None:
                    if time.perf_counter() > deadline:
                        raise RuntimeError("results did not arrive within 10 minutes")
                    time.sleep(0.02)
                if index:  # the first study also waits for the worker to load its model
                    latencies.append(done - acknowledged - QUIET_S)
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(120)
            destination.server.shutdown()
        reference = reference_seconds(studies[0][0])
    median = statistics.median(latencies)
    print(f"{args.count} one-image studies (RG1, 1955x1841 CR), quiet period {QUIET_S:g} s "
          "subtracted")
    print(f"node, arrival to SC+SEG+SR acknowledged: median {median:.2f} s, "
          f"max {max(latencies):.2f} s (target <= 2 s)")
    print(f"reference, decode + pipeline + writers in-process: {reference:.2f} s")
    print(f"ratio node / reference: {median / reference:.2f}")


if __name__ == "__main__":
    main()
