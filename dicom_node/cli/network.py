"""``echo`` and ``send``: talk to a DICOM peer from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from dicom_node.cli.common import expand_paths, node_errors_as_click, settings_from
from dicom_node.scu import Disposition, Peer, store_files


def _peer(_ctx: click.Context, _param: click.Parameter, value: str) -> Peer:
    try:
        return Peer.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command()
@click.argument("peer", callback=_peer, metavar="AE@HOST:PORT")
@click.option("--calling-ae", help="Calling AE title (default: this node's).")
@click.pass_context
@node_errors_as_click
def echo(ctx: click.Context, peer: Peer, calling_ae: str | None) -> None:
    """Send a C-ECHO to PEER; exit 0 when it answers success."""
    from dicom_node.scu import echo as send_echo

    settings = settings_from(ctx)
    status = send_echo(peer, calling_ae=calling_ae or settings.scp.ae_title)
    click.echo(f"{peer}: C-ECHO status 0x{status:04X}")
    if status != 0:
        raise click.exceptions.Exit(1)


@click.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path), metavar="FILE|DIR...")
@click.option("--to", "peer", required=True, callback=_peer, metavar="AE@HOST:PORT",
              help="Destination AE.")
@click.option("--calling-ae", help="Calling AE title (default: this node's).")
@click.pass_context
@node_errors_as_click
def send(ctx: click.Context, paths: tuple[Path, ...], peer: Peer, calling_ae: str | None) -> None:
    """C-STORE files (folders are searched) to a peer; exit 1 unless every one is stored."""
    settings = settings_from(ctx)
    outcomes = store_files(expand_paths(paths), peer, calling_ae=calling_ae or settings.scp.ae_title)
    for outcome in outcomes:
        status = "-" if outcome.status is None else f"0x{outcome.status:04X}"
        click.echo(f"{outcome.path}: {status} {outcome.disposition}"
                   + (f" ({outcome.detail})" if outcome.detail else ""))
    delivered = sum(o.disposition is Disposition.DELIVERED for o in outcomes)
    click.echo(f"{delivered} of {len(outcomes)} stored at {peer}", err=True)
    if delivered != len(outcomes):
        raise click.exceptions.Exit(1)
