"""``status``: what the node holds and whether its parts are reachable."""

from __future__ import annotations

import json
import shutil

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from dicom_node.cli.common import node_errors_as_click, settings_from
from dicom_node.config import Settings
from dicom_node.db import Delivery, Instance, Job, NodeDatabase


def collect_status(settings: Settings) -> dict[str, object]:
    """Return counts of instances and jobs by state, spool size, free disk, broker reachability."""
    from dicom_node import tasks

    db = NodeDatabase(settings.node_database_url)
    try:
        with db.session() as session:
            jobs = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            verdicts = dict(session.execute(
                select(Instance.verdict, func.count()).group_by(Instance.verdict)).all())
            deliveries = dict(session.execute(
                select(Delivery.status, func.count()).group_by(Delivery.status)).all())
            spool_bytes = session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)))
    finally:
        db.dispose()
    tasks.configure(settings)
    disk_root = settings.state_dir if settings.state_dir.exists() else settings.state_dir.parent
    return {
        "instances": {(str(k) if k else "pending"): v for k, v in verdicts.items()},
        "jobs": {str(k): v for k, v in jobs.items()},
        "deliveries": {str(k): v for k, v in deliveries.items()},
        "spool_bytes": int(spool_bytes or 0),
        "free_disk_bytes": shutil.disk_usage(disk_root.resolve()).free,
        "broker_reachable": tasks.broker_reachable(),
    }


@click.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
@node_errors_as_click
def status(ctx: click.Context, fmt: str) -> None:
    """Show instances and jobs by state, spool size, free disk and whether the broker answers."""
    report = collect_status(settings_from(ctx))
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
        return
    table = Table("what", "state", "count", title="dicom-node status")
    for what in ("instances", "jobs", "deliveries"):
        for state, count in sorted(report[what].items()):  # type: ignore[union-attr]
            table.add_row(what, state, str(count))
    table.add_row("spool", "bytes", f"{report['spool_bytes']:,}")
    table.add_row("disk", "free bytes", f"{report['free_disk_bytes']:,}")
    table.add_row("broker", "reachable", "yes" if report["broker_reachable"] else "NO")
    Console().print(table)
