"""``report``: the quality report of a window as one static HTML page."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from dicom_node.cli.audit import Moment
from dicom_node.cli.common import node_errors_as_click, settings_from
from dicom_node.db import NodeDatabase
from dicom_node.quality import collect, pipeline_references, reader_agreements
from dicom_node.report import render


@click.command()
@click.option("--since", type=Moment(), default="7d", show_default=True,
              help="From this time (ISO 8601, or an age: 24h, 7d).")
@click.option("--until", type=Moment(), help="Up to this time (default: now).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The HTML file to write.")
@click.pass_context
@node_errors_as_click
def report(ctx: click.Context, since: datetime, until: datetime | None, out: Path) -> None:
    """Write the quality report of the instances received in the window: scores and drift per finding,
    flag rate, gate skip reasons, latency, volume per sending AE, feedback agreement."""
    settings = settings_from(ctx)
    now = datetime.now(UTC)
    until = until or now
    if since >= until:
        raise click.BadParameter("must be before --until (or now)", param_hint="--since")
    references = pipeline_references(settings)
    db = NodeDatabase(settings.node_database_url)
    try:
        window = collect(db, settings.results_dir, references, since=since, until=until)
        previous = collect(db, settings.results_dir, references, since=since - (until - since), until=since)
        feedback = reader_agreements(db, settings.results_dir, since=since, until=until)
    finally:
        db.dispose()
    try:
        out.write_text(render(window, feedback, previous=previous, generated_at=now))
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror}") from exc
    click.echo(f"Wrote {out}: {sum(window.verdicts.values())} instance(s), {len(window.findings)} finding(s)")
