"""The ``dicom-node`` command line."""

from __future__ import annotations

import os
from pathlib import Path

import click

from dicom_node import __version__
from dicom_node.cli.analyze import analyze
from dicom_node.cli.audit import audit
from dicom_node.cli.calibrate import calibrate
from dicom_node.cli.config import config
from dicom_node.cli.db import db
from dicom_node.cli.feedback import feedback
from dicom_node.cli.jobs import jobs
from dicom_node.cli.network import echo, send
from dicom_node.cli.report import report
from dicom_node.cli.rules import rules
from dicom_node.cli.serve import serve, worker
from dicom_node.cli.status import status
from dicom_node.logs import configure_logging
from dicom_node.private_state import UMASK


@click.group()
@click.version_option(__version__, prog_name="dicom-node")
@click.option("--config", "-c", type=click.Path(path_type=Path), envvar="DICOM_NODE_CONFIG",
              help="YAML settings file (default: $DICOM_NODE_CONFIG, else built-in defaults).")
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """A DICOM node that analyses chest X-rays beside a PACS."""
    configure_logging()
    # Whatever the command creates (state folder, databases, spool, results) is private;
    # the umask is restored when the command ends, for callers that run it in-process.
    previous = os.umask(UMASK)
    ctx.call_on_close(lambda: os.umask(previous))


for command in (serve, worker, status, jobs, echo, send, config, rules, audit, analyze, db, calibrate, report,
                feedback):
    main.add_command(command)
