"""Ingest throughput: our SCP against DCMTK's storescp, measured in the same run.

N distinct-UID copies of the ~7 MB CR `RG1_UNCI.dcm` are sent by DCMTK `storescu`
over 1 and over 4 concurrent associations to (a) `dicom-node serve` with the audit
trail on, (b) the same with the audit trail off, and (c) DCMTK `storescp`.
Prints images/s for each (median of the runs), ours / storescp, and the audit cost as
the median over runs (audit on and off measured back to back) of the throughput lost
with the audit on, and of the extra CPU time the node spends per image.

    python benchmarks/ingest.py --count 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

TARGETS = ("storescp", "dicom-node", "dicom-node-no-audit")
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_copies(folder: Path, count: int, streams: int) -> list[Path]:
    """Write ``count`` copies of RG1_UNCI.dcm with distinct UIDs into ``streams`` sub-folders."""
    source = dcmread(get_testdata_file("RG1_UNCI.dcm"))
    study = generate_uid()
    for index in range(count):
        source.SOPInstanceUID = generate_uid()
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        source.StudyInstanceUID = study
        target = folder / str(index % streams) / f"{index}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        source.save_as(target)
    return sorted(folder.iterdir())


def wait_listening(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run([
            "/usr/bin/echoscu", "-aet", "BENCH", "-aec", "DICOM_NODE", "127.0.0.1", str(port)],
            capture_output=True)
        if result.returncode == 0:
            return
        time.sleep(0.3)
    raise RuntimeError(f"nothing answered on port {port}")


def send(port: int, folders: list[Path]) -> float:
    """Send every folder over its own association at once; return the wall time in seconds."""
    start = time.perf_counter()
    senders = [subprocess.Popen([STORESCU, "-aet", "BENCH", "-aec", "DICOM_NODE", "+sd", "+r",
                                 "127.0.0.1", str(port), str(folder)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for folder in folders]
    for sender in senders:
        _, error = sender.communicate()
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {error.decode()[-500:]}")
    return time.perf_counter() - start


def start_storescp(root: Path, port: int) -> subprocess.Popen[bytes]:
    out = root / "storescp"
    out.mkdir()
    process = subprocess.Popen([STORESCP, "-aet", "DICOM_NODE", "-od", str(out), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return process


def start_node(root: Path, port: int, audit: bool) -> subprocess.Popen[bytes]:
    config = root / "node.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(root / "state"),
        "log_level": "WARNING",
        "scp": {"host": "127.0.0.1", "port": port, "min_free_disk_mb": 100},
        "worker": {"embedded": False},
        "audit": {"enabled": audit},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    process = subprocess.Popen([sys.executable, "-m", "dicom_node", "--config", str(config),
                                "serve"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env)
    wait_listening(port)
    return process


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time a process has used so far, all its threads together."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(target: str, folders: list[Path], count: int, streams: int, work: Path,
            run: int) -> tuple[float, float]:
    """Return the images/s of one run against a fresh receiver, and its CPU ms per image."""
    root = work / f"{target}-{streams}-{run}"
    root.mkdir()
    port = free_port()
    if target == "storescp":
        process = start_storescp(root, port)
    else:
        process = start_node(root, port, audit=(target == "dicom-node"))
    os.sync()  # the previous run's unwritten pages must not slow this one down
    try:
        cpu_before = cpu_seconds(process.pid)
        seconds = send(port, folders[:streams] if streams > 1 else [folders[0].parent])
        cpu = cpu_seconds(process.pid) - cpu_before
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    shutil.rmtree(root)
    return count / seconds, 1000 * cpu / count


def paired_ratio(on: list[float], off: list[float]) -> tuple[float, float, float]:
    """Return the median and quartiles, over runs, of on / off (runs measured back to back)."""
    ratios = [a / b for a, b in zip(on, off)]
    quartiles = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), quartiles[0], quartiles[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="images per run")
    parser.add_argument("--repeats", type=int, default=9,
                        help="runs per cell, interleaved across receivers; the median counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        work = Path(tmp)
        folders = make_copies(work / "images", args.count, 4)
        print(f"{args.count} x {folders[0].joinpath('0.dcm').stat().st_size / 1e6:.1f} MB CR,"
              f" median of {args.repeats} interleaved runs")
        print(f"{'associations':>12} {'storescp':>10} {'dicom-node':>11} {'no audit':>9}"
              f" {'ours/storescp':>14} {'audit: throughput lost (IQR)':>29} {'extra CPU per image (IQR)':>27}")
        for streams in (1, 4):
            rates: dict[str, list[float]] = {target: [] for target in TARGETS}
            cpu: dict[str, list[float]] = {target: [] for target in TARGETS}
            for run in range(args.repeats):  # interleaved, order alternating, so drift hits all alike
                for target in TARGETS if run % 2 == 0 else reversed(TARGETS):
                    rate, cpu_ms = measure(target, folders, args.count, streams, work, run)
                    rates[target].append(rate)
                    cpu[target].append(cpu_ms)
            median = {target: statistics.median(values) for target, values in rates.items()}
            ratio = median["dicom-node"] / median["storescp"]
            kept = paired_ratio(rates["dicom-node"], rates["dicom-node-no-audit"])
            lost = (1 - kept[0], 1 - kept[2], 1 - kept[1])  # throughput lost to the audit
            busier = [ratio - 1 for ratio in paired_ratio(cpu["dicom-node"], cpu["dicom-node-no-audit"])]
            print(f"{streams:>12} {median['storescp']:>8.1f}/s {median['dicom-node']:>9.1f}/s"
                  f" {median['dicom-node-no-audit']:>7.1f}/s {ratio:>14.2f}"
                  f" {lost[0]:>13.1%} ({lost[1]:.1%} to {lost[2]:.1%})"
                  f" {busier[0]:>11.1%} ({busier[1]:.1%} to {busier[2]:.1%})")


if __name__ == "__main__":
    main()
