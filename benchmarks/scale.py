"""Analysis throughput: what overlapping jobs gives one host, and what a second host gives, in the same run.

One `serve --no-worker` receives; `dicom-node worker --lane analysis` processes are started beside it in
four phases:

1. one worker on every core, one job at a time (the solo pool, batches of one image: read, decode, model,
   write, then the next);
2. one worker on every core, on its defaults (jobs overlapped on the threads pool, their reading, decoding
   and writing beside the model's batched runs);
3. one worker pinned to half the cores, on its defaults: a host;
4. two workers, each pinned to its own half: two hosts.

A worker's defaults follow the cores it may use (torch gets half of them, at least one; it runs up to three
jobs at once, no more than its cores). Each phase first sends one-image warm-up studies until every worker
of the phase has analysed one (its model loaded, its consumer running), then a burst of N one-image studies
(copies of RG1_UNCI.dcm with new UIDs) in one association. Throughput is N over the time from the burst's
first job start to its last job end (the jobs' own timestamps). No destination is configured: results are
written, not sent. Targets: two hosts ≥ 1.8 × one; overlapped ≥ one job at a time.

    python benchmarks/scale.py --count 20 [--broker-url redis://127.0.0.1:6379/12]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from sqlalchemy import select

from dicom_node.db import Job, JobStatus, NodeDatabase
from latency import free_port, make_studies

TARGET_RATIO = 1.8
ONE_JOB_AT_A_TIME = {"DICOM_NODE_WORKER__POOL": "solo", "DICOM_NODE_WORKER__BATCH_SIZE": "1"}


class Bench:
    """The node (`serve --no-worker`), its workers and the studies sent to it, under ``root``."""

    def __init__(self, root: Path, broker_url: str | None) -> None:
        self.root = root
        self.port = free_port()
        self.config = root / "node.yaml"
        settings = {
            "state_dir": str(root / "state"), "log_level": "WARNING",
            "scp": {"host": "127.0.0.1", "port": self.port, "min_free_disk_mb": 100},
            "scheduler": {"poll_seconds": 0.1},
            "worker": {"device": "cpu", "embedded": False},
            **({"broker": {"url": broker_url}} if broker_url else {}),
        }
        self.config.write_text(yaml.safe_dump(settings))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        self.node = self._dicom_node("serve", "--no-worker")
        self.db = NodeDatabase(f"sqlite:///{root / 'state' / 'node.db'}")
        self.sent = 0

    def _dicom_node(self, *args: str, env: dict[str, str] | None = None,
                    cores: set[int] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "dicom_node", "--config", str(self.config), *args],
                                env={**self.env, **(env or {})}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)

    def send(self, count: int) -> list[str]:
        """Send ``count`` new one-image studies in one association; return their Study Instance UIDs."""
        studies = make_studies(self.root / f"batch-{self.sent}", count)
        self.sent += count
        while subprocess.run(["/usr/bin/echoscu", "-aec", "DICOM_NODE", "127.0.0.1", str(self.port)],
                             capture_output=True).returncode != 0:
            time.sleep(0.2)
        subprocess.run(["/usr/bin/storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(self.port),
                        *(str(path) for path, _ in studies)], check=True, capture_output=True)
        return [study for _, study in studies]

    def finished(self, studies: list[str], timeout: float = 1800) -> list[Job]:
        """Wait until the jobs of ``studies`` are finished; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db.session() as session:
                jobs = list(session.scalars(select(Job).where(Job.study_instance_uid.in_(studies))))
            if len(jobs) == len(studies) and all(j.status.finished for j in jobs):
                return jobs
            time.sleep(0.1)
        raise RuntimeError(f"{len(studies)} studies not analysed within {timeout:.0f} s")

    def images_per_s(self, hosts: list[set[int]], count: int, settings: dict[str, str] | None = None) -> float:
        """Start one analysis worker on each of ``hosts`` (its cores; ``settings`` in its environment), warm
        them up, time a burst of ``count``; stop them."""
        processes = [self._dicom_node("worker", "--lane", "analysis", env=settings, cores=cores) for cores in hosts]
        try:
            warmed: set[str] = set()
            while len(warmed) < len(hosts):  # every worker has analysed an image: all of them consume
                warmed |= {job.worker for job in self.finished(self.send(1))}
            jobs = self.finished(self.send(count))
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(120)
        not_done = [j for j in jobs if j.status is not JobStatus.DONE]
        if not_done:
            raise RuntimeError(f"{len(not_done)} of the burst's jobs did not end done: {not_done[0].reason}")
        span = max(j.finished_at for j in jobs) - min(j.started_at for j in jobs)
        return count / span.total_seconds()

    def close(self) -> None:
        self.db.dispose()
        self.node.send_signal(signal.SIGTERM)
        self.node.wait(120)


def main() -> None:
    """Parse the command line, measure the four phases, print them and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="one-image studies in each phase's burst")
    parser.add_argument("--broker-url", help="default: the node's own (SQLite in the state folder)")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        parser.exit(2, "benchmarks/scale.py needs two cores or more: each of two workers stands for a host\n")
    half = len(cores) // 2
    machine, hosts = set(cores), [set(cores[:half]), set(cores[half:2 * half])]
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        bench = Bench(Path(tmp), args.broker_url)
        try:
            sequential = bench.images_per_s([machine], args.count, ONE_JOB_AT_A_TIME)
            overlapped = bench.images_per_s([machine], args.count)
            one_host = bench.images_per_s(hosts[:1], args.count)
            two_hosts = bench.images_per_s(hosts, args.count)
        finally:
            bench.close()
    ratio = two_hosts / one_host
    print(f"{args.count} one-image studies (RG1, 1955x1841 CR) per phase, {len(cores)} CPU cores, "
          f"broker {args.broker_url or 'SQLite (default)'}")
    print(f"  1 worker, {len(cores)} cores, one job at a time   {sequential:6.2f} images/s")
    print(f"  1 worker, {len(cores)} cores, jobs overlapped     {overlapped:6.2f} images/s  "
          f"({overlapped / sequential:.2f} x one job at a time)")
    print(f"  1 worker, {half} core(s) (a host)           {one_host:6.2f} images/s")
    print(f"  2 workers, {half} core(s) each (two hosts)  {two_hosts:6.2f} images/s  ({ratio:.2f} x one host; "
          f"target >= {TARGET_RATIO:.1f} x: {'met' if ratio >= TARGET_RATIO else 'not met'})")


if __name__ == "__main__":
    main()
