"""Analysis throughput of one worker running one job at a time, of one worker overlapping jobs, and of two
workers, in the same run on the same machine.

One `serve --no-worker` receives; `dicom-node worker --lane analysis` processes are started beside it in
three phases: one worker with the solo pool and batches of one image (one job at a time: read, decode,
model, write, then the next); one worker on its defaults (three jobs at once on the threads pool, their
reading, decoding and writing overlapping the model's batched runs); two such workers. Each phase first sends one-image warm-up studies until every worker of the phase has
analysed one (its model loaded, its consumer running), then a burst of N one-image studies (copies of
RG1_UNCI.dcm with new UIDs) in one association. Throughput is N over the time from the burst's first job
start to its last job end (the jobs' own timestamps). No destination is configured: results are written,
not sent. Each worker stands for a host of half the machine: it is pinned to its own half of the cores
(``--no-pin``: all workers share all cores) and gets that many torch threads (``--threads``). Target: two
workers ≥ 1.8 × one (on its defaults).

    python benchmarks/scale.py --count 20 [--threads N] [--no-pin] [--broker-url redis://127.0.0.1:6379/12]
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

    def __init__(self, root: Path, broker_url: str | None, threads: int, pin: bool) -> None:
        self.root = root
        cores = sorted(os.sched_getaffinity(0))
        half = max(1, len(cores) // 2)
        self.hosts = [set(cores[:half]), set(cores[half:half * 2] or cores[:half])] if pin else [set(cores)] * 2
        self.port = free_port()
        self.config = root / "node.yaml"
        settings = {
            "state_dir": str(root / "state"), "log_level": "WARNING",
            "scp": {"host": "127.0.0.1", "port": self.port, "min_free_disk_mb": 100},
            "scheduler": {"poll_seconds": 0.1},
            "worker": {"device": "cpu", "embedded": False, "torch_threads": threads},
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

    def images_per_s(self, workers: int, count: int, settings: dict[str, str] | None = None) -> float:
        """Start ``workers`` analysis workers (with ``settings`` in their environment), warm them up, time
        a burst of ``count``; stop them."""
        processes = [self._dicom_node("worker", "--lane", "analysis", env=settings, cores=self.hosts[index])
                     for index in range(workers)]
        try:
            warmed: set[str] = set()
            while len(warmed) < workers:  # every worker has analysed an image: all of them consume
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
    """Parse the command line, measure the three phases, print them and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="one-image studies in each phase's burst")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch CPU threads per worker (default: cores / 2)")
    parser.add_argument("--broker-url", help="default: the node's own (SQLite in the state folder)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let every worker use every core (default: each its own half)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        bench = Bench(Path(tmp), args.broker_url, args.threads, args.pin)
        try:
            sequential = bench.images_per_s(1, args.count, ONE_JOB_AT_A_TIME)
            one, two = (bench.images_per_s(workers, args.count) for workers in (1, 2))
        finally:
            bench.close()
    ratio = two / one
    print(f"{args.count} one-image studies (RG1, 1955x1841 CR) per phase, {args.threads} torch thread(s) "
          f"per worker, {os.cpu_count()} CPU cores, "
          f"{'each worker on its own half of them' if args.pin else 'every worker on all of them'}, "
          f"broker {args.broker_url or 'SQLite (default)'}")
    print(f"  1 worker, one job at a time    {sequential:6.2f} images/s")
    print(f"  1 worker, jobs overlapped      {one:6.2f} images/s  ({one / sequential:.2f} x one job at a time)")
    print(f"  2 workers, jobs overlapped     {two:6.2f} images/s  ({ratio:.2f} x one worker; target >= "
          f"{TARGET_RATIO:.1f} x: {'met' if ratio >= TARGET_RATIO else 'not met'})")


if __name__ == "__main__":
    main()
