"""Finding classifiers: one manifest entry each, scoring lung regions and localizing with Grad-CAM."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.chest_xray.gradcam import GRADCAM_LAYER, LungGradCAM
from pipelines.chest_xray.models import load_network
from pipelines.chest_xray.preprocess import InputSpec, classifier_input
from pipelines.errors import WeightsError


@dataclass
class FindingClassifier:
    """A loaded classifier for one finding, with its threshold and flagging policy.

    ``flaggable`` is True only when the manifest's validation-AUROC gate is met and
    the finding is enabled for flagging (by the manifest or by the site).
    """

    name: str
    display_name: str
    network: nn.Module
    spec: InputSpec
    output_index: int
    threshold: float
    flaggable: bool
    gradcam: LungGradCAM
    device: torch.device

    @classmethod
    def from_manifest(
        cls, entry: Mapping[str, Any], root: Path, device: torch.device, site_enabled: Collection[str] = ()
    ) -> FindingClassifier:
        """Return the classifier of a manifest finding entry, its weights checked and loaded.

        Raises :class:`WeightsError` for a missing/altered file or an incomplete entry.
        """
        missing = [key for key in ("name", "input", "threshold", "gate", "validation") if key not in entry]
        if missing:
            raise WeightsError(f"manifest finding {entry.get('name', '?')!r} lacks {', '.join(missing)}")
        network = load_network(entry, root, device)
        index = int(entry.get("output", {}).get("index", 0))
        gate = entry["gate"]
        gate_met = float(entry["validation"].get("auroc") or 0.0) >= float(gate.get("minimum", 1.0))
        enabled = bool(entry.get("flag_enabled", False)) or entry["name"] in site_enabled
        return cls(
            name=str(entry["name"]),
            display_name=str(entry.get("display_name", entry["name"])),
            network=network,
            spec=InputSpec.from_manifest(entry["input"]),
            output_index=index,
            threshold=float(entry["threshold"]),
            flaggable=gate_met and enabled,
            gradcam=LungGradCAM(network, str(entry.get("gradcam_layer", GRADCAM_LAYER)), index),
            device=device,
        )

    def inputs(
        self, displays: Sequence[np.ndarray], lung_masks: Sequence[np.ndarray]
    ) -> tuple[torch.Tensor, list[tuple[slice, slice]]]:
        """Return the input batch of ``displays`` and the source box of each input."""
        pairs = [classifier_input(d, m, self.spec) for d, m in zip(displays, lung_masks, strict=True)]
        return torch.from_numpy(np.stack([p[0] for p in pairs])).to(self.device), [p[1] for p in pairs]

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Return the sigmoid probability of this finding for each input of ``batch``."""
        return torch.sigmoid(self.network(batch)[:, self.output_index]).float().cpu().numpy()
