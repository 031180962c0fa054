"""The chest X-ray pipeline: quality gate → lung segmentation → classification → Grad-CAM."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from pydicom import Dataset

from pipelines.base import Finding, ImageInput, ImageResult, Verdict
from pipelines.chest_xray.classification import FindingClassifier
from pipelines.chest_xray.gate import check_chest_radiograph
from pipelines.chest_xray.gradcam import region
from pipelines.chest_xray.models import load_network, read_manifest
from pipelines.chest_xray.preprocess import load_dataset
from pipelines.chest_xray.segmentation import LungSegmenter
from pipelines.errors import InputError

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    """Return the torch device for ``"auto"`` (CUDA when present, else CPU) or a named device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ChestXrayPipeline:
    """Lung segmentation, per-finding probability/threshold/flag, and lung-restricted Grad-CAM.

    Implements :class:`pipelines.base.Pipeline`. Build it with :meth:`from_manifest`,
    which checks every weights file's sha256 before anything is loaded.
    """

    name = "chest_xray"

    def __init__(
        self,
        segmenter: LungSegmenter,
        classifiers: Sequence[FindingClassifier],
        *,
        version: str,
        model_versions: str = "",
        min_age_years: float = 18.0,
    ) -> None:
        self.segmenter = segmenter
        self.classifiers = list(classifiers)
        self.version = version
        self.model_versions = model_versions
        self.min_age_years = min_age_years

    @classmethod
    def from_manifest(
        cls,
        path: str | Path = "weights/manifest.yaml",
        *,
        device: str | torch.device = "auto",
        min_age_years: float = 18.0,
        enable_flags: Collection[str] = (),
    ) -> ChestXrayPipeline:
        """Return the pipeline described by the manifest at ``path``.

        ``enable_flags`` names findings a site has validated and allows to be flagged
        although the manifest marks them experimental (the validation-AUROC gate still
        applies). Raises :class:`pipelines.errors.WeightsError` when the manifest is
        missing or malformed, or any weights file is missing or altered.
        """
        path = Path(path)
        manifest = read_manifest(path)
        root = path.parent
        torch_device = resolve_device(device)
        lung = manifest["lung"]
        segmenter = LungSegmenter(load_network(lung, root, torch_device), int(lung["input"]["size"][0]), torch_device)
        classifiers = [
            FindingClassifier.from_manifest(entry, root, torch_device, enable_flags) for entry in manifest["findings"]
        ]
        logger.info("chest_xray %s on %s: findings %s", manifest.get("version"), torch_device, [c.name for c in classifiers])
        models = "; ".join(
            f"{entry.get('name', 'lung')} {entry['architecture']['name']} {str(entry['sha256'])[:8]}"
            for entry in [lung, *manifest["findings"]]
        )
        return cls(segmenter, classifiers, version=str(manifest.get("version", "0")), model_versions=models,
                   min_age_years=min_age_years)

    def accepts(self, dataset: Dataset) -> Verdict:
        """Return the quality gate's verdict for ``dataset`` (frontal adult chest CR/DX)."""
        return check_chest_radiograph(dataset, min_age_years=self.min_age_years)

    def load(self, dataset: Dataset) -> ImageInput:
        """Return the :class:`ImageInput` of ``dataset``; raises :class:`InputError` when undecodable."""
        return load_dataset(dataset)

    def run(self, inputs: Sequence[ImageInput]) -> list[ImageResult]:
        """Return one :class:`ImageResult` per input, in order.

        Raises :class:`InputError` when no lungs are found in an image.
        """
        if not inputs:
            return []
        displays = [image.display for image in inputs]
        masks = self.segmenter.masks(displays)
        for image, mask in zip(inputs, masks, strict=True):
            if not mask.any():
                raise InputError(f"no lungs found in image {image.sop_instance_uid}")
        results = [ImageResult(image.sop_instance_uid, mask) for image, mask in zip(inputs, masks, strict=True)]
        for classifier in self.classifiers:
            batch, boxes = classifier.inputs(displays, masks)
            probabilities = classifier.probabilities(batch)
            heatmaps = classifier.gradcam.heatmaps(batch, boxes, masks)
            for result, probability, heatmap in zip(results, probabilities, heatmaps, strict=True):
                flagged = classifier.flaggable and float(probability) >= classifier.threshold
                result.findings.append(
                    Finding(
                        name=classifier.name,
                        display_name=classifier.display_name,
                        probability=float(probability),
                        threshold=classifier.threshold,
                        flagged=flagged,
                        experimental=not classifier.flaggable,
                        heatmap=heatmap,
                        region=region(heatmap) if flagged else None,
                    )
                )
        return results
