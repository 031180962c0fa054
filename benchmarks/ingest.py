"""Ingest throughput: our SCP against DCMTK's storescp, measured in the same run.

N distinct-UID copies of the ~7 MB CR `RG1_UNCI.dcm` are sent by DCMTK `storescu`
over 1 and over 4 concurrent associations to (a) `dicom-node serve` with the audit
trail on, (b) the same with the audit trail off, twice, and (c) DCMTK `storescp`.
Prints images/s for each (median of the runs), ours / storescp, and the audit cost as
the median over runs (audit on and off measured in the same run) of the throughput lost
with the audit on and of the extra CPU time the node spends per image, and, from the
node's own metrics, the share of each association's time per image spent in audit calls
(the precise figure: the A/B figures carry the run-to-run noise of a shared machine, which
the A/A pair, audit off against audit off, shows).

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
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

NODES = ("dicom-node", "dicom-node-no-audit", "dicom-node-no-audit-again")
TARGETS = ("storescp", *NODES)
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


def start_node(root: Path, port: int, metrics_port: int, audit: bool) -> subprocess.Popen[bytes]:
    config = root / "node.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(root / "state"),
        "log_level": "WARNING",
        "scp": {"host": "127.0.0.1", "port": port, "min_free_disk_mb": 100},
        "worker": {"embedded": False},
        "audit": {"enabled": audit},
        "acknowledged_risks": [] if audit else ["audit-disabled"],
        "metrics": {"host": "127.0.0.1", "serve_port": metrics_port},
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


def audit_seconds(metrics_port: int) -> float:
    """Return the seconds the node's threads have spent in audit calls so far (its metrics)."""
    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
    return sum(sample.value for family in families for sample in family.samples
               if sample.name == "dicom_node_stage_seconds_sum" and sample.labels.get("stage") == "audit")


@dataclass
class Run:
    """One run against one receiver: images/s, its CPU ms per image, the node's audit ms per image."""

    rate: float
    cpu_ms: float
    audit_ms: float = 0.0


def measure(target: str, folders: list[Path], count: int, streams: int, work: Path, run: int) -> Run:
    """Return one run against a fresh receiver."""
    root = work / f"{target}-{streams}-{run}"
    root.mkdir()
    port, metrics_port = free_port(), free_port()
    if target == "storescp":
        process = start_storescp(root, port)
    else:
        process = start_node(root, port, metrics_port, audit=(target == "dicom-node"))
    os.sync()  # the previous run's unwritten pages must not slow this one down
    try:
        cpu_before = cpu_seconds(process.pid)
        audit_before = audit_seconds(metrics_port) if target != "storescp" else 0.0
        seconds = send(port, folders[:streams] if streams > 1 else [folders[0].parent])
        cpu = cpu_seconds(process.pid) - cpu_before
        audit = audit_seconds(metrics_port) - audit_before if target != "storescp" else 0.0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    shutil.rmtree(root)
    return Run(count / seconds, 1000 * cpu / count, 1000 * audit / count)


def run_order(run: int) -> tuple[str, ...]:
    """Return the receivers of run ``run`` in order: storescp, then the nodes rotated by one a run.

    Over three runs each node runs first, second and third once (a Latin square), so what
    a position brings (following storescp's 700 MB write, drift) hits every node alike.
    """
    shift = run % len(NODES)
    return ("storescp", *NODES[shift:], *NODES[:shift])


def paired_ratio(on: list[float], off: list[float]) -> tuple[float, float, float]:
    """Return the median and quartiles, over runs, of on / off (both measured in each run)."""
    ratios = [a / b for a, b in zip(on, off)]
    quartiles = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), quartiles[0], quartiles[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="images per run")
    parser.add_argument("--repeats", type=int, default=9,
                        help="runs per cell (a multiple of 3 balances the order); the median counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        work = Path(tmp)
        folders = make_copies(work / "images", args.count, 4)
        print(f"{args.count} x {folders[0].joinpath('0.dcm').stat().st_size / 1e6:.1f} MB CR,"
              f" median of {args.repeats} runs, nodes in rotated order")
        print(f"{'associations':>12} {'storescp':>10} {'dicom-node':>11} {'no audit':>9}"
              f" {'ours/storescp':>14} {'audit: throughput lost (IQR)':>29}"
              f" {'extra CPU/image (IQR)':>23} {'audit time share':>17} {'A/A noise (IQR)':>24}")
        for streams in (1, 4):
            runs: dict[str, list[Run]] = {target: [] for target in TARGETS}
            for run in range(args.repeats):
                for target in run_order(run):
                    runs[target].append(measure(target, folders, args.count, streams, work, run))
            rates = {target: [r.rate for r in values] for target, values in runs.items()}
            median = {target: statistics.median(values) for target, values in rates.items()}
            ratio = median["dicom-node"] / median["storescp"]
            kept = paired_ratio(rates["dicom-node"], rates["dicom-node-no-audit"])
            lost = (1 - kept[0], 1 - kept[2], 1 - kept[1])  # throughput lost to the audit
            same = paired_ratio(rates["dicom-node-no-audit-again"], rates["dicom-node-no-audit"])
            noise = (1 - same[0], 1 - same[2], 1 - same[1])
            cpu = [ratio - 1 for ratio in paired_ratio([r.cpu_ms for r in runs["dicom-node"]],
                                                       [r.cpu_ms for r in runs["dicom-node-no-audit"]])]
            # Audit time on the C-STORE path against each association's time per image.
            share = statistics.median(r.audit_ms * r.rate / (1000 * streams) for r in runs["dicom-node"])
            print(f"{streams:>12} {median['storescp']:>8.1f}/s {median['dicom-node']:>9.1f}/s"
                  f" {median['dicom-node-no-audit']:>7.1f}/s {ratio:>14.2f}"
                  f" {lost[0]:>13.1%} ({lost[1]:.1%} to {lost[2]:.1%})"
                  f" {cpu[0]:>7.1%} ({cpu[1]:.1%} to {cpu[2]:.1%}) {share:>17.2%}"
                  f" {noise[0]:>8.1%} ({noise[1]:.1%} to {noise[2]:.1%})")


if __name__ == "__main__":
    main()
