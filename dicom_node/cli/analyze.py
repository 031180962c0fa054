"""``dicom-node analyze``: run the configured pipeline on local files, without the network."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image

from dicom_node.cli.common import expand_paths, settings_from
from dicom_node.errors import ConfigError
from dicom_node.plugins import build_pipeline
from dicom_node.writers.common import AlgorithmIdentity
from dicom_node.writers.sc import overlay_pixels
from pipelines.base import ImageInput, ImageResult
from pipelines.errors import PipelineError, SkippedByGate, WeightsError

logger = logging.getLogger(__name__)

NOTICE = "AI result, not for diagnosis; research model, not for clinical use"


def _write(image: ImageInput, result: ImageResult, algorithm: AlgorithmIdentity, caveats: Sequence[str],
           out: Path, stem: str) -> dict[str, Any]:
    """Write the overlay (as the SC shows it: banner and notices included, heat of flagged findings
    only), the pipeline's masks, every finding's raw heat-map (grey, scaled to its own peak) and
    the flagged regions of one image; return its JSON record."""
    flagged = result.flagged
    Image.fromarray(overlay_pixels(result, image.display, algorithm, caveats)).save(out / f"{stem}.overlay.png")
    for name, mask in result.masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{stem}.mask-{name}.png")
    findings = []
    for finding in result.findings:
        if finding.heatmap is not None:
            Image.fromarray(np.round(finding.heatmap * 255).astype(np.uint8)).save(
                out / f"{stem}.heatmap-{finding.name}.png")
        if finding.region is not None:
            Image.fromarray(finding.region.astype(np.uint8) * 255).save(out / f"{stem}.region-{finding.name}.png")
        findings.append(
            {
                "name": finding.name,
                "display_name": finding.display_name,
                "probability": round(finding.probability, 4),
                "threshold": finding.threshold,
                "flagged": finding.flagged,
                "experimental": finding.experimental,
                "region_pixels": int(finding.region.sum()) if finding.region is not None else 0,
            }
        )
    return {
        "mask_fractions": {name: round(float(mask.mean()), 4) for name, mask in result.masks.items()},
        "flagged": [f.name for f in flagged],
        "findings": findings,
    }


def _summary(record: dict[str, Any]) -> str:
    """Return the one-line text of an image's record: its error, skip reason or scores."""
    if "error" in record:
        return str(record["error"])
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    return ", ".join(f"{f['name']} {f['probability']:.3f}{' FLAGGED' if f['flagged'] else ''}" for f in record["findings"])


@click.command("analyze")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for overlay PNGs, masks and JSON findings.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="What to print on stdout.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="Weights manifest (default: the configured pipeline.manifest).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--pipeline", "pipeline_name", help="The configured pipeline to run (default: pipeline.name).")
@click.pass_context
def analyze(ctx: click.Context, paths: tuple[Path, ...], out: Path, fmt: str, weights: Path | None,
            device: str, pipeline_name: str | None) -> None:
    """Analyse DICOM (or, where the pipeline reads them, PNG/JPEG) FILES and folders locally with the
    configured pipeline: overlay PNG (as the SC shows it), masks, raw heat-maps and JSON findings per image."""
    settings = settings_from(ctx)
    try:
        plugin, pipeline = build_pipeline(settings, pipeline_name, device=device, manifest=weights)
    except (ConfigError, WeightsError) as exc:
        raise click.ClickException(str(exc)) from exc
    algorithm = AlgorithmIdentity.of(pipeline, plugin)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index, path in enumerate(expand_paths(paths), start=1):
        stem = f"{index:04d}-{path.stem}"
        record: dict[str, Any] = {"file": str(path), "output": stem, "pipeline": pipeline.name,
                                  "version": pipeline.version, "notice": NOTICE}
        try:
            image, verdict = plugin.load_path(pipeline, path)
            result = pipeline.run([image])[0]
            if result.verdict.accepted:
                record.update(_write(image, result, algorithm, verdict.caveats, out, stem),
                              caveats=list(verdict.caveats))
            else:
                record["skipped"] = result.verdict.reason
        except SkippedByGate as exc:
            record["skipped"] = exc.reason
        except PipelineError as exc:
            record["error"] = str(exc)
        (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
        records.append(record)
        if fmt == "text":
            click.echo(f"{path}: {_summary(record)}")
    if fmt == "json":
        click.echo(json.dumps(records, indent=2))
