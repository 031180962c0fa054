"""``calibrate``: a finding's AUROC, sensitivity and specificity on the site's own labelled cases,
and the threshold that meets a target sensitivity; ``--write`` makes it the site's (see
:mod:`dicom_node.calibration`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dicom_node.calibration import (
    RULE,
    Assessment,
    OperatingPoint,
    assess,
    feedback_digest,
    feedback_labels,
    labels_digest,
    read_labels,
    site_cases,
    write_override,
)
from dicom_node.cli.common import node_errors_as_click, os_user, settings_from
from pipelines.errors import WeightsError


def _point_lines(name: str, point: OperatingPoint) -> list[str]:
    return [f"{name} threshold {point.threshold:g}:",
            f"  sensitivity {point.sensitivity}", f"  specificity {point.specificity}"]


def _report(assessment: Assessment) -> str:
    lines = [f"cases: {assessment.positives} positive, {assessment.negatives} negative",
             f"AUROC {assessment.auroc}"]
    if assessment.current is not None:
        lines += _point_lines("current", assessment.current)
    lines += _point_lines("proposed", assessment.proposed)
    lines.append(f"proposed: the {RULE} ({assessment.target_sensitivity:g})")
    return "\n".join(lines)


@click.command("calibrate")
@click.option("--pipeline", help="The pipeline whose results are calibrated (default: pipeline.name).")
@click.option("--finding", required=True, help="The finding's name, as in its results (e.g. covid19).")
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with a 'label' column (1 positive, 0 negative) and a 'sop_instance_uid' or "
                   "'accession_number' column.")
@click.option("--from-feedback", is_flag=True,
              help="Label each image by the readers' newest verdict on the finding instead: an agreement "
                   "keeps its flag, a disagreement reverses it.")
@click.option("--target-sensitivity", required=True, type=float, help="The sensitivity the threshold must meet.")
@click.option("--write", is_flag=True, help="Write the proposed threshold as the next site override version.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
@node_errors_as_click
def calibrate(ctx: click.Context, pipeline: str | None, finding: str, labels_file: Path | None,
              from_feedback: bool, target_sensitivity: float, write: bool, fmt: str) -> None:
    """Assess a finding on the site's labelled cases (a labels file, or the readers' feedback) and
    propose its threshold."""
    if (labels_file is not None) == from_feedback:
        raise click.UsageError("give either --labels FILE or --from-feedback")
    settings = settings_from(ctx)
    pipeline = pipeline or settings.pipeline.name
    if labels_file is not None:
        key_column, labels = read_labels(labels_file)
        digest = labels_digest(labels_file)
    else:
        key_column, labels = "sop_instance_uid", feedback_labels(settings, pipeline, finding)
        digest = feedback_digest(labels)
    cases = site_cases(settings, pipeline, finding, key_column, labels)
    assessment = assess(cases.pairs, target_sensitivity=target_sensitivity,
                        current_threshold=cases.current_threshold, min_positives=settings.calibration.min_positives,
                        min_negatives=settings.calibration.min_negatives, resamples=settings.calibration.resamples)
    written = None
    if write:
        try:
            written = write_override(settings, pipeline, finding, assessment, cases,
                                     labels_sha256=digest, actor=os_user())
        except WeightsError as exc:
            raise click.ClickException(str(exc)) from exc
    counts = {"labelled": cases.labelled, "unmatched": cases.unmatched,
              "other_model_versions": cases.other_models}
    if fmt == "json":
        click.echo(json.dumps({**assessment.as_dict(), "model_version": cases.model_version, **counts,
                               "override": str(written) if written else None}, indent=2))
        return
    click.echo(f"{pipeline} {finding}, model {cases.model_version}")
    click.echo(f"labels: {cases.labelled}, without a result: {cases.unmatched}, "
               f"scored by another model version only: {cases.other_models}")
    click.echo(_report(assessment))
    if written:
        click.echo(f"written: {written}; workers use it from their next start")
