"""``config check``: print the effective settings, secrets redacted."""

from __future__ import annotations

import click
import yaml

from dicom_node.cli.common import settings_from


@click.group("config")
def config() -> None:
    """Inspect the configuration."""


@config.command("check")
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate the settings (file → environment) and print them, secrets redacted.

    Exits 1 with a message naming the bad key or value when they are invalid.
    """
    settings = settings_from(ctx)
    click.echo(yaml.safe_dump(settings.redacted(), sort_keys=False), nl=False)
