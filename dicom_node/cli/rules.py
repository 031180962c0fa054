"""``rules test``: which routing rule a data set takes, and why."""

from __future__ import annotations

from pathlib import Path

import click
from pydicom import dcmread

from dicom_node.cli.common import settings_from
from dicom_node.routing import NO_ROUTE_REASON, Router


@click.group("rules")
def rules() -> None:
    """Inspect the routing rules."""


@rules.command("test")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--calling-ae", default="", help="The calling AE title the data set would arrive from.")
@click.pass_context
def test(ctx: click.Context, files: tuple[Path, ...], calling_ae: str) -> None:
    """Print, for each DICOM FILE, the rules tried in order with each condition's outcome, and the
    route it takes: its pipelines and destinations, or that it is kept and not analysed.

    Exits 1 when a file is not a readable DICOM file.
    """
    router = Router.from_settings(settings_from(ctx))
    for path in files:
        try:
            dataset = dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise click.ClickException(f"{path} is not a readable DICOM file ({type(exc).__name__})") from exc
        click.echo(f"{path} (SOP Instance {dataset.get('SOPInstanceUID', '?')}, calling AE {calling_ae or '(none)'})")
        for check in router.explain(dataset, calling_ae.strip()):
            click.echo(f"  rule {check.route}: {'taken' if check.taken else 'not taken'}")
            for line in check.lines:
                click.echo(f"    {line}")
        decision = router.route(dataset, calling_ae.strip())
        if decision is None:
            click.echo(f"  => {NO_ROUTE_REASON}: kept, not analysed")
        else:
            pipelines = ", ".join(decision.pipelines) or "none (kept, not analysed)"
            destinations = ", ".join(d.name for d in decision.destinations) or "none"
            shadow = " (shadow: results held until `jobs release`)" if decision.shadow else ""
            click.echo(f"  => route {decision.route}: pipelines {pipelines}; destinations {destinations}{shadow}")
