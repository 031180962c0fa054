"""MONAI networks, the weights manifest, and loading weights with a sha256 check.

A manifest entry names its weights ``file`` (relative to the manifest), its
``sha256``, its ``architecture`` (a MONAI network name and its keyword arguments)
and its ``format``: ``monai`` (a state_dict of that network, as ``train`` writes) or
``torchvision-densenet121`` (a CheXNet-style torchvision DenseNet-121 state_dict,
mapped onto MONAI's ``DenseNet121``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.networks.nets import DenseNet, DenseNet121, UNet
from torch import nn

from pipelines.base import sha256_file
from pipelines.errors import WeightsError

logger = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[nn.Module]] = {"UNet": UNet, "DenseNet": DenseNet, "DenseNet121": DenseNet121}
FORMATS = {"monai", "torchvision-densenet121"}


def build_network(architecture: Mapping[str, Any]) -> nn.Module:
    """Return an untrained MONAI network from ``{"name": ..., "args": {...}}``.

    Raises :class:`WeightsError` for an unknown name or arguments it rejects.
    """
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise WeightsError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    args = dict(architecture.get("args", {}))
    for key, value in args.items():
        if isinstance(value, list):
            args[key] = tuple(value)
    try:
        return ARCHITECTURES[name](**args)
    except TypeError as exc:
        raise WeightsError(f"bad arguments for {name}: {exc}") from exc


def read_manifest(path: Path) -> dict[str, Any]:
    """Return the parsed manifest at ``path``; raises :class:`WeightsError` if missing or malformed."""
    if not path.is_file():
        raise WeightsError(f"weights manifest not found: {path}")
    try:
        manifest = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise WeightsError(f"weights manifest {path} is not valid YAML: {exc}") from exc
    if not isinstance(manifest, dict) or "lung" not in manifest or not isinstance(manifest.get("findings"), list):
        raise WeightsError(f"weights manifest {path} needs a 'lung' entry and a 'findings' list")
    return manifest


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest`` to ``path`` as YAML (keys in insertion order)."""
    path.write_text(yaml.safe_dump(dict(manifest), sort_keys=False, width=100))


def verified_path(entry: Mapping[str, Any], root: Path) -> Path:
    """Return the weights file of ``entry`` after checking that it exists and matches its sha256.

    Raises :class:`WeightsError` naming the file when it is missing, has no recorded
    sha256, or its content differs from the recorded sha256.
    """
    if "file" not in entry or "sha256" not in entry:
        raise WeightsError(f"manifest entry {entry.get('name', '?')!r} needs 'file' and 'sha256'")
    path = root / str(entry["file"])
    if not path.is_file():
        raise WeightsError(f"weights file missing: {path}")
    actual = sha256_file(path)
    if actual != str(entry["sha256"]).lower():
        raise WeightsError(
            f"weights file altered: {path} has sha256 {actual}, the manifest records {entry['sha256']}; "
            "refusing to start"
        )
    return path


def load_network(entry: Mapping[str, Any], root: Path, device: torch.device) -> nn.Module:
    """Return the network of a manifest ``entry``, weights loaded and checked, in eval mode on ``device``.

    Raises :class:`WeightsError` when the file is missing or altered, the format is
    unknown, or the state_dict does not fit the architecture.
    """
    path = verified_path(entry, root)
    fmt = entry.get("format", "monai")
    if fmt not in FORMATS:
        raise WeightsError(f"unknown weights format {fmt!r} for {path.name}; expected one of {sorted(FORMATS)}")
    network = build_network(entry.get("architecture", {}))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights {path}: {exc}") from exc
    if fmt == "torchvision-densenet121":
        state = torchvision_densenet_to_monai(state)
    try:
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise WeightsError(f"weights {path.name} do not fit {entry['architecture'].get('name')}: {exc}") from exc
    logger.info("loaded %s (%s)", path.name, entry["sha256"][:12])
    return network.to(device).eval()


def save_weights(network: nn.Module, path: Path) -> str:
    """Save ``network``'s state_dict with float tensors stored as float16; return the file's sha256."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()}
    torch.save(state, path)
    return sha256_file(path)


_TV_LAYER = re.compile(r"^(features\.denseblock\d+\.denselayer\d+)\.(norm|relu|conv)\.?(\d)\.(.+)$")


def torchvision_densenet_to_monai(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a torchvision DenseNet-121 state_dict renamed for MONAI's ``DenseNet121``.

    Accepts the ``module.`` prefix of DataParallel checkpoints, the old
    ``norm.1``-style layer names of early torchvision/CheXNet checkpoints, and a
    classifier stored as ``classifier`` or ``classifier.0`` (CheXNet's Linear+Sigmoid).
    Raises :class:`WeightsError` when keys look like neither naming.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("module.").removeprefix("densenet121.")
        layer = _TV_LAYER.match(name)
        if layer:
            name = f"{layer[1]}.layers.{layer[2]}{layer[3]}.{layer[4]}"
        elif name.startswith("classifier."):
            name = "class_layers.out." + name.removeprefix("classifier.").removeprefix("0.")
        elif not name.startswith("features."):
            raise WeightsError(f"unexpected key {key!r} in a torchvision DenseNet-121 state_dict")
        mapped[name] = value
    return mapped
