"""The ``dicom-node`` command line."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from dicom_node import __version__


@click.group()
@click.version_option(__version__, prog_name="dicom-node")
@click.option("--config", "-c", type=click.Path(path_type=Path), envvar="DICOM_NODE_CONFIG",
              help="YAML settings file (default: $DICOM_NODE_CONFIG, else built-in defaults).")
def main(config: Path | None) -> None:
    """A DICOM node that analyses chest X-rays beside a PACS."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from dicom_node.cli.audit import audit
main.add_command(audit)
