"""Analysis throughput with one and with two inference workers, in the same run on the same machine.

One `serve --no-worker` receives; `dicom-node worker --lane analysis` processes are started beside it,
one, then two. Each phase first sends one-image warm-up studies until every worker of the phase has
analysed one (its model loaded, its consumer running), then a burst of N one-image studies (copies of
RG1_UNCI.dcm with new UIDs) in one association. Throughput is N over the time from the burst's first job
start to its last job end (the jobs' own timestamps). No destination is configured: results are written,
not sent. Each worker gets ``--threads`` torch threads (default: the cores divided by two), in both phases,
so that two workers do not oversubscribe the machine. Target: two workers ≥ 1.8 × one.

    python benchmarks/scale.py --count 20 [--threads N] [--broker-url redis://127.0.0.1:6379/12]
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


class Bench:
    """The node (`serve --no-worker`), its workers and the studies sent to it, under ``root``."""

    def __init__(self, root: Path, broker_url: str | None, threads: int) -> None:
        self.root = root
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

    def _dicom_node(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "dicom_node", "--config", str(self.config), *args],
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

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

    def images_per_s(self, workers: int, count: int) -> float:
        """Start ``workers`` analysis workers, warm them up, time a burst of ``count``; stop them."""
        processes = [self._dicom_node("worker", "--lane", "analysis") for _ in range(workers)]
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
    """Parse the command line, measure one and two workers, print both and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="one-image studies in each phase's burst")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch CPU threads per worker (default: cores / 2)")
    parser.add_argument("--broker-url", help="default: the node's own (SQLite in the state folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        bench = Bench(Path(tmp), args.broker_url, args.threads)
        try:
            one, two = (bench.images_per_s(workers, args.count) for workers in (1, 2))
        finally:
            bench.close()
    ratio = two / one
    print(f"{args.count} one-image studies (RG1, 1955x1841 CR) per phase, {args.threads} torch thread(s) "
          f"per worker, {os.cpu_count()} CPU cores, broker {args.broker_url or 'SQLite (default)'}")
    print(f"  1 worker   {one:6.2f} images/s")
    print(f"  2 workers  {two:6.2f} images/s")
    print(f"  ratio      {ratio:6.2f} x (target >= {TARGET_RATIO:.1f} x: {'met' if ratio >= TARGET_RATIO else 'not met'})")


if __name__ == "__main__":
    main()
