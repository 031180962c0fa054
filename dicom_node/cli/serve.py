"""``serve`` and ``worker``: run the node, whole or split across machines."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from dicom_node.cli.common import node_errors_as_click, settings_from

logger = logging.getLogger(__name__)


@click.command()
@click.option("--host", help="Address to listen on (scp.host).")
@click.option("--port", type=int, help="Port to listen on (scp.port).")
@click.option("--ae-title", help="This node's AE title (scp.ae_title).")
@click.option("--state-dir", type=click.Path(path_type=Path),
              help="Folder of the spool, results and databases (state_dir).")
@click.option("--no-worker", is_flag=True,
              help="Do not start the embedded worker (run `dicom-node worker` elsewhere).")
@click.pass_context
@node_errors_as_click
def serve(ctx: click.Context, host: str | None, port: int | None, ae_title: str | None,
          state_dir: Path | None, no_worker: bool) -> None:
    """Receive studies, queue jobs and (unless --no-worker) analyse them.

    SIGTERM or Ctrl-C: stop accepting, finish the associations in flight, stop the
    worker after its current task, exit 0.
    """
    from dicom_node.service import Node

    overrides = {"state_dir": state_dir, "scp": {"host": host, "port": port, "ae_title": ae_title}}
    overrides["scp"] = {k: v for k, v in overrides["scp"].items() if v is not None}
    settings = settings_from(ctx, **overrides)
    node = Node(settings, run_worker=settings.worker.embedded and not no_worker,
                config_file=ctx.find_root().params.get("config"), overrides=overrides)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    node.start()
    click.echo(f"dicom-node {settings.scp.ae_title} listening on "
               f"{settings.scp.host}:{node.scp.port}", err=True)
    stopping.wait()
    node.stop()


@click.command()
@click.option("--state-dir", type=click.Path(path_type=Path), help="state_dir")
@click.option("--lane", type=click.Choice(["both", "analysis", "delivery"]), default="both", show_default=True,
              help="analysis: analyse jobs (the models loaded once, now); delivery: send results "
                   "(no model, delivery.threads threads); both: one process for both queues.")
@click.pass_context
@node_errors_as_click
def worker(ctx: click.Context, state_dir: Path | None, lane: str) -> None:
    """Run one worker: analysis, delivery or both."""
    from dicom_node.tasks import start_worker

    start_worker(settings_from(ctx, state_dir=state_dir), lane=lane)
