"""Score the chest X-ray models on a folder laid out like the sets in ``../shared/data``.

    python -m training.chest_xray.evaluate lung --data-dir DIR [--data-dir DIR ...] [--split test] [--json]
    python -m training.chest_xray.evaluate covid19 --data-dir DIR [--split test] [--negatives DIR] [--json]
    python -m training.chest_xray.evaluate pneumothorax --data-dir DIR [--split test] [--json]
    python -m training.chest_xray.evaluate localization --data-dir DIR [--split train] [--json]
    python -m training.chest_xray.evaluate gate --data-dir DATA [--split test] [--json]
    python -m training.chest_xray.evaluate sources --data-dir DATA [--json]

Layouts: lung ``images/`` (PNG, JPEG or DICOM ``.dcm``) + ``masks-lung/``; covid19 ``COVID/`` + ``Normal/``;
pneumothorax ``images/`` + ``labels.csv``; localization ``images/`` + ``masks-opacity/``;
gate and sources: the data folder holding every set (``../shared/data``); sources puts each head's
figures on the sources it trained on beside those on sources it never saw.
``--split`` picks a part of the sets the models were trained on (the hash split, or
``official_split`` of labels.csv; ``held-out`` is val and test together); ``all``
scores an outside set.
Everything goes through the inference path of the node (decode → display → lungs
→ classifier input). 95 % CIs are percentile bootstraps (1,000 rounds, stratified
by label); the gate's rates have exact binomial (Clopper-Pearson) intervals. ROC
curves and example overlays are written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from sklearn.metrics import roc_curve
from tqdm import tqdm

from pipelines.chest_xray.classification import FindingClassifier
from pipelines.chest_xray.gradcam import peak
from pipelines.chest_xray.models import read_manifest
from pipelines.chest_xray.overlay import render_overlay
from pipelines.chest_xray.pipeline import ChestXrayPipeline
from pipelines.chest_xray.preprocess import IMAGE_SUFFIXES, load_dataset, load_path
from pipelines.errors import InputError, WeightsError
from training.chest_xray import datasets, gate_corpus
from training.chest_xray.datasets import Sample
from training.chest_xray.metrics import dice, mean_with_ci, proportion_with_ci, with_ci

logger = logging.getLogger(__name__)

BATCH = 32
EXAMPLES = 8
TOLERANCE_PX = 15
#: What ``evaluate lung`` reads from ``images/``.
LUNG_IMAGE_SUFFIXES = IMAGE_SUFFIXES | {".dcm"}


def _batches(samples: Sequence[Sample], desc: str) -> Iterator[tuple[list[Sample], list[np.ndarray]]]:
    for start in tqdm(range(0, len(samples), BATCH), desc=desc):
        chunk = list(samples[start : start + BATCH])
        yield chunk, [load_path(s.image)[0].display for s in chunk]


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mask_scores(mask: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Return Dice, spill (share of the predicted lung outside the reference) and coverage (share of the
    reference inside the prediction). Spill is an error under either lung convention; coverage is not
    when the reference takes in the retrocardiac lung."""
    overlap = int((mask & truth).sum())
    return {"dice": dice(mask, truth), "spill": 1 - overlap / max(int(mask.sum()), 1),
            "coverage": overlap / max(int(truth.sum()), 1)}


LUNG_SCORES = ("dice", "spill", "coverage")


def evaluate_lung(pipeline: ChestXrayPipeline, roots: Sequence[Path], split: str, out: Path) -> dict[str, Any]:
    """Return the Dice, spill and coverage (:func:`_mask_scores`) of the lung masks at source
    resolution, per folder and pooled, with 95 % CIs, and the worst Dice.

    Images may be DICOM (``.dcm``, read as the node reads what it receives: modality LUT, VOI
    window, MONOCHROME1), so a site can score its own annotated studies."""
    report: dict[str, Any] = {"task": "lung", "split": split, "sets": {}}
    pooled: list[dict[str, float]] = []
    for root in roots:
        scores = []
        samples = datasets.masked_samples(root, "masks-lung", split, LUNG_IMAGE_SUFFIXES)
        for chunk, displays in _batches(samples, f"lung {root.name}"):
            for sample, display, mask in zip(chunk, displays, pipeline.segmenter.masks(displays), strict=True):
                truth = datasets.read_mask(sample.mask, display.shape)
                scores.append(_mask_scores(mask, truth))
                if len(scores) <= EXAMPLES:
                    _save_png(render_overlay(display, mask, outlines=[truth]), out / f"lung-{root.name}-{len(scores)}.png")
        pooled += scores
        report["sets"][root.name] = _lung_summary(scores)
    report["pooled"] = _lung_summary(pooled)
    return report


def _lung_summary(scores: Sequence[dict[str, float]]) -> dict[str, Any]:
    return {
        "images": len(scores),
        **{key: mean_with_ci(np.array([s[key] for s in scores])) for key in LUNG_SCORES},
        "min": min(s["dice"] for s in scores),
    }


def _scores(
    pipeline: ChestXrayPipeline, classifiers: Sequence[FindingClassifier], samples: Sequence[Sample]
) -> np.ndarray:
    """Return (len(classifiers), len(samples)) probabilities through the node's inference path."""
    scores: list[list[float]] = [[] for _ in classifiers]
    for _, displays in _batches(samples, "score"):
        masks = pipeline.segmenter.masks(displays)
        for row, classifier in zip(scores, classifiers, strict=True):
            row.extend(classifier.probabilities(classifier.inputs(displays, masks)[0]).tolist())
    return np.array(scores)


def _classifier(pipeline: ChestXrayPipeline, name: str) -> FindingClassifier:
    for classifier in pipeline.classifiers:
        if classifier.name == name:
            return classifier
    raise InputError(f"the manifest has no finding {name!r}")


ROC_SIZE, ROC_MARGIN = 400, 40
ROC_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]


def _roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str) -> None:
    """Draw ROC curves (1 - specificity on x, sensitivity on y) into a PNG."""
    side = ROC_SIZE + 2 * ROC_MARGIN
    canvas = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(canvas)

    def point(x: float, y: float) -> tuple[float, float]:
        return ROC_MARGIN + x * ROC_SIZE, ROC_MARGIN + (1 - y) * ROC_SIZE

    draw.rectangle([point(0, 1), point(1, 0)], outline="black")
    draw.line([point(0, 0), point(1, 1)], fill="gray")
    draw.text((ROC_MARGIN, 10), f"ROC {title}", fill="black")
    draw.text((ROC_MARGIN + ROC_SIZE // 3, side - 25), "1 - specificity", fill="black")
    draw.text((5, ROC_MARGIN - 15), "sensitivity", fill="black")
    for row, (label, (labels, scores, auroc)) in enumerate(curves.items()):
        fpr, tpr, _ = roc_curve(labels, scores)
        colour = ROC_COLOURS[row % len(ROC_COLOURS)]
        draw.line([point(x, y) for x, y in zip(fpr, tpr, strict=True)], fill=colour, width=2)
        draw.text((ROC_MARGIN + ROC_SIZE // 3, ROC_MARGIN + ROC_SIZE - 20 * (row + 2)), f"{label}: AUROC {auroc:.3f}", fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def evaluate_binary(
    pipeline: ChestXrayPipeline,
    classifiers: Sequence[FindingClassifier],
    samples: Sequence[Sample],
    out: Path,
    task: str,
    negatives: Sequence[Sample] = (),
) -> dict[str, Any]:
    """Return AUROC/accuracy/sensitivity/specificity with 95 % CIs of each classifier at its threshold.

    ``negatives`` (images known not to have the finding, such as another source's) adds
    each classifier's specificity on them, under ``negatives``.
    """
    labels = np.array([s.label for s in samples])
    scores = _scores(pipeline, classifiers, samples)
    outside = _scores(pipeline, classifiers, negatives) if negatives else None
    report: dict[str, Any] = {"task": task, "images": len(samples), "positives": int(labels.sum()), "models": {}}
    curves = {}
    for index, classifier in enumerate(classifiers):
        metrics = with_ci(labels, scores[index], classifier.threshold)
        entry: dict[str, Any] = {"input": classifier.spec.as_manifest(), "threshold": classifier.threshold, **metrics}
        if outside is not None:
            spec = with_ci(np.zeros(len(negatives), dtype=int), outside[index], classifier.threshold)["specificity"]
            entry["negatives"] = {"images": len(negatives), "specificity": spec}
        report["models"][classifier.name] = entry
        curves[classifier.name] = (labels, scores[index], metrics["auroc"]["value"])
    _roc_png(curves, out / f"roc-{task}.png", task)
    return report


def evaluate_localization(
    pipeline: ChestXrayPipeline, root: Path, finding: str, out: Path, split: str = "all"
) -> dict[str, Any]:
    """Return the pointing-game hit rate of ``finding``'s lung-restricted Grad-CAM against ``masks-opacity``.

    A hit is a heat-map peak (:func:`~pipelines.chest_xray.gradcam.peak`) inside the opacity
    mask (also reported within :data:`TOLERANCE_PX` pixels of it, the tolerance of Zhang et
    al.'s pointing game). Also reported: the share of the top 10 % of heat inside the opacity,
    the chance hit rate of a uniformly random lung pixel (opacity area inside the lungs / lung
    area), the hit rate of a pointer that ignores the image content (:func:`_anatomical_prior`),
    and how often the peak sits on the lung border (within 1 % of the image size).
    """
    classifier = _classifier(pipeline, finding)
    hits, near, top_share, chance, prior, border = [], [], [], [], [], []
    for chunk, displays in _batches(datasets.masked_samples(root, "masks-opacity", split), "localization"):
        masks = pipeline.segmenter.masks(displays)
        batch, boxes = classifier.inputs(displays, masks)
        for sample, display, mask, heat in zip(chunk, displays, masks, classifier.gradcam.heatmaps(batch, boxes, masks), strict=True):
            opacity = datasets.read_mask(sample.mask, display.shape)
            point = peak(heat)
            hits.append(float(opacity[point]))
            near.append(float(ndimage.distance_transform_edt(~opacity)[point] <= TOLERANCE_PX))
            border.append(float(ndimage.distance_transform_edt(mask)[point] <= 0.01 * max(mask.shape)))
            top = heat >= np.quantile(heat[mask], 0.9) if mask.any() else heat > 0
            top_share.append(float((opacity & top & mask).sum() / max(int((top & mask).sum()), 1)))
            chance.append(float((opacity & mask).sum() / max(int(mask.sum()), 1)))
            prior.append(float(opacity[_anatomical_prior(mask)]))
            if len(hits) <= EXAMPLES:
                _save_png(render_overlay(display, mask, heat, outlines=[opacity]), out / f"localization-{len(hits)}.png")
    return {
        "task": "localization",
        "finding": finding,
        "split": split,
        "images": len(hits),
        "pointing_game": mean_with_ci(np.array(hits)),
        f"pointing_game_within_{TOLERANCE_PX}px": mean_with_ci(np.array(near)),
        "peak_on_lung_border": float(np.mean(border)),
        "top10_heat_in_opacity": mean_with_ci(np.array(top_share)),
        "chance_pointing_game": float(np.mean(chance)),
        "anatomical_prior_pointing_game": mean_with_ci(np.array(prior)),
    }


CORPUS_CHESTS_PER_SET = 25


def _skip_kind(reason: str) -> str:
    """Return which content check skipped: blank, no lungs or the view / body-part network."""
    return "blank" if "blank" in reason else "no lungs" if "no lungs" in reason else "view check"


def _content_verdicts(pipeline: ChestXrayPipeline, displays: Sequence[np.ndarray]) -> list[Any]:
    verdicts = []
    for start in range(0, len(displays), BATCH):
        chunk = list(displays[start : start + BATCH])
        verdicts += pipeline.content_check.verdicts(chunk, pipeline.segmenter.masks(chunk))
    return verdicts


def evaluate_gate(pipeline: ChestXrayPipeline, data_dir: Path, split: str, out: Path) -> dict[str, Any]:
    """Return the image content check's false skips on every frontal chest set in ``split`` (with 95 %
    CIs) and its skips of :func:`gate_corpus.corpus` (made of pydicom-data's other anatomy, synthetic
    images, and RG1 and the first images of each chest set turned, inverted and cropped)."""
    report: dict[str, Any] = {"task": "gate", "split": split, "threshold": pipeline.content_check.threshold,
                              "chest": {}, "corpus": {}}
    pooled: list[float] = []
    chest_examples: list[tuple[str, np.ndarray]] = []
    for name, samples in datasets.frontal_chest_samples(data_dir, split).items():
        skipped, kinds = [], Counter()
        for batch, (chunk, displays) in enumerate(_batches(samples, f"gate {name}")):
            if batch == 0:  # the corpus turns, inverts and crops the first images of each set
                chest_examples += [(f"{name} {s.image.stem}", d) for s, d in zip(chunk, displays, strict=True)
                                   ][:CORPUS_CHESTS_PER_SET]
            for sample, display, verdict in zip(chunk, displays, _content_verdicts(pipeline, displays), strict=True):
                skipped.append(float(not verdict.accepted))
                if not verdict.accepted:
                    kinds[_skip_kind(verdict.reason)] += 1
                    _save_png(display, out / "gate-false-skips" / f"{name}-{sample.image.stem}.png")
        pooled += skipped
        report["chest"][name] = {"images": len(skipped), "false_skips": int(sum(skipped)),
                                 "false_skip_rate": proportion_with_ci(int(sum(skipped)), len(skipped)),
                                 "by_check": dict(kinds)}
    report["chest_pooled"] = {"images": len(pooled), "false_skips": int(sum(pooled)),
                              "false_skip_rate": proportion_with_ci(int(sum(pooled)), len(pooled))}
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    rg1 = load_dataset(dcmread(get_testdata_file("RG1_UNCR.dcm"))).display
    items = gate_corpus.corpus([("RG1_UNCR", rg1), *chest_examples])
    verdicts = _content_verdicts(pipeline, [item.display for item in items])
    for group in dict.fromkeys(item.group for item in items):
        members = [(item, v) for item, v in zip(items, verdicts, strict=True) if item.group == group]
        passed = [item.name for item, v in members if v.accepted]
        for item, v in members:
            if v.accepted:
                _save_png(item.display, out / "gate-corpus-passed" / f"{item.name.replace(' ', '_')}.png")
        report["corpus"][group] = {
            "images": len(members), "skipped": len(members) - len(passed),
            "skip_rate": proportion_with_ci(len(members) - len(passed), len(members)),
            "by_check": dict(Counter(_skip_kind(v.reason) for _, v in members if not v.accepted)),
            "passed": passed,
        }
    skipped = sum(entry["skipped"] for entry in report["corpus"].values())
    report["corpus_pooled"] = {"images": len(items), "skipped": skipped,
                               "skip_rate": proportion_with_ci(skipped, len(items))}
    return report


def _as_label(samples: Sequence[Sample], label: int) -> list[Sample]:
    return [Sample(s.image, s.mask, label) for s in samples]


def evaluate_sources(pipeline: ChestXrayPipeline, data_dir: Path, out: Path) -> dict[str, Any]:
    """Return every head's figures on the sources it was trained on (their test split) beside its figures
    on sources it never trained on (:data:`datasets.OUTSIDE_SOURCES`; for the lung, which trained on both of
    its sources, the unseen images of the other convention's), with 95 % CIs."""
    lung = data_dir / "lung-seg"
    openist = datasets.masked_samples(lung / "openist", "masks-lung")
    covid_seg = datasets.masked_samples(lung / "covid-seg", "masks-opacity", datasets.HELD_OUT)
    nih_test = datasets.labelled_samples(data_dir / "nih-cxr14", "Pneumothorax", "test")
    covid19, pneumothorax = _classifier(pipeline, "covid19"), _classifier(pipeline, "pneumothorax")
    return {
        "task": "sources",
        "outside_sources": datasets.OUTSIDE_SOURCES,
        "lung": {
            "in_source": evaluate_lung(pipeline, [lung / "openist"], "test", out / "lung-in"),
            "outside_source": evaluate_lung(pipeline, [lung / "covid-seg"], datasets.HELD_OUT, out / "lung-outside"),
        },
        "covid19": {
            # NIH's official train and val splits are negatives of its training: its test split is in-source
            "in_source": evaluate_binary(pipeline, [covid19], datasets.covid_samples(data_dir / "covid-radiography", "test"),
                                         out, "covid19-in", _as_label(nih_test, 0)),
            "outside_source": evaluate_binary(pipeline, [covid19],
                                              _as_label(covid_seg, 1) + _as_label(datasets.outside_normals(data_dir), 0),
                                              out, "covid19-outside"),
        },
        "pneumothorax": {
            "in_source": evaluate_binary(pipeline, [pneumothorax], nih_test, out, "pneumothorax-in",
                                         _as_label(openist, 0)),
            "outside_source": "no outside source has pneumothorax labels: only its specificity on OpenIST's "
            "normals (in_source.models.pneumothorax.negatives)",
        },
        "localization": {
            "in_source": evaluate_localization(pipeline, lung / "covid-seg", "covid19", out / "localization",
                                               datasets.HELD_OUT),
            "outside_source": "no outside source has opacity masks",
        },
    }


def _anatomical_prior(lung_mask: np.ndarray) -> tuple[int, int]:
    """Return the centre of the lower half of the image-left lung (the right lung of a PA view), a point
    chosen without looking at the image, where COVID-19 opacities are most common in ``covid-seg``.
    """
    labels, count = ndimage.label(lung_mask)
    columns = ndimage.center_of_mass(lung_mask, labels, range(1, count + 1))
    lung = labels == 1 + int(np.argmin([column for _, column in columns]))
    rows = np.nonzero(lung)[0]
    lower = lung & (np.arange(lung.shape[0])[:, None] > np.median(rows))
    return peak(lower.astype(np.float32), 1.0)


def _print(report: dict[str, Any], indent: str = "") -> None:
    for key, value in report.items():
        if isinstance(value, dict) and set(value) == {"value", "ci_low", "ci_high"}:
            print(f"{indent}{key}: {value['value']:.4f} (95% CI {value['ci_low']:.4f}-{value['ci_high']:.4f})")
        elif isinstance(value, dict):
            print(f"{indent}{key}:")
            _print(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")


def _report(args: argparse.Namespace, pipeline: ChestXrayPipeline) -> dict[str, Any]:
    """Run the evaluation ``args.task`` names and return its report."""
    root = args.data_dir[0]
    if args.task == "lung":
        return evaluate_lung(pipeline, args.data_dir, args.split, args.out)
    if args.task == "covid19":
        manifest = read_manifest(args.weights)
        references = [
            FindingClassifier.from_manifest(entry, args.weights.parent, pipeline.segmenter.device)
            for entry in manifest.get("references", [])
            if entry["name"].startswith("covid19")
        ]
        negatives = [Sample(p, label=0) for p in datasets.image_files(args.negatives)] if args.negatives else []
        samples = datasets.covid_samples(root, args.split)
        return evaluate_binary(pipeline, [_classifier(pipeline, "covid19"), *references], samples, args.out, "covid19", negatives)
    if args.task == "pneumothorax":
        samples = datasets.labelled_samples(root, "Pneumothorax", args.split)
        return evaluate_binary(pipeline, [_classifier(pipeline, "pneumothorax")], samples, args.out, "pneumothorax")
    if args.task == "gate":
        return evaluate_gate(pipeline, root, args.split, args.out)
    if args.task == "sources":
        return evaluate_sources(pipeline, root, args.out)
    return evaluate_localization(pipeline, root, "covid19", args.out, args.split)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run one evaluation, print (or dump as JSON) its report."""
    parser = argparse.ArgumentParser(prog="python -m training.chest_xray.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["lung", "covid19", "pneumothorax", "localization", "gate", "sources"])
    parser.add_argument("--data-dir", type=Path, action="append", required=True)
    parser.add_argument("--split", choices=["all", *datasets.SPLITS, datasets.HELD_OUT], default="all",
                        help=f"{datasets.HELD_OUT}: val and test together")
    parser.add_argument("--negatives", type=Path, help="covid19: a folder of outside images without COVID-19")
    parser.add_argument("--weights", type=Path, default=Path("weights/manifest.yaml"))
    parser.add_argument("--out", type=Path, default=Path(".train/evaluate"), help="folder for ROC and overlay PNGs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        pipeline = ChestXrayPipeline.from_manifest(args.weights, device=args.device)
        report = _report(args, pipeline)
    except (InputError, WeightsError) as exc:
        parser.error(str(exc))
    report["weights"] = {"manifest": str(args.weights), "version": pipeline.version}
    report["outputs"] = str(args.out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)


if __name__ == "__main__":
    main()
