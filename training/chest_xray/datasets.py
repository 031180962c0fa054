"""The folder layouts that training and evaluation read, and their deterministic splits.

- lung: ``images/`` + ``masks-lung/`` (binary PNG, same stem);
- covid19: ``COVID/`` + ``Normal/``;
- NIH: ``images/`` + ``labels.csv`` (``image``, ``official_split``, one column per label);
- localization: ``images/`` + ``masks-opacity/``.

Sets without an official split are split by a hash of the file stem: 70 % train,
15 % val, 15 % test, stable across machines and runs.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from collections.abc import Collection
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.chest_xray.preprocess import IMAGE_SUFFIXES
from pipelines.errors import InputError

SPLIT_RULE = "sha256(file stem) mod 100: < 70 train, < 85 val, else test"
SPLITS = ("train", "val", "test")
HELD_OUT = "held-out"  # val and test together: everything training did not see


@dataclass(frozen=True)
class Sample:
    """One image file with its mask file (or None) and binary label (or None)."""

    image: Path
    mask: Path | None = None
    label: int | None = None


def hash_split(stem: str) -> str:
    """Return "train", "val" or "test" for a file stem, by :data:`SPLIT_RULE`."""
    bucket = int(hashlib.sha256(stem.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


def image_files(folder: Path, suffixes: Collection[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Return the files in ``folder`` with one of ``suffixes`` (PNG/JPEG by default), sorted; raises
    :class:`InputError` when it is missing."""
    if not folder.is_dir():
        raise InputError(f"folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)


def read_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Return the binary mask PNG at ``path`` (> 127) as a boolean array of ``shape``, nearest-resized if needed."""
    with Image.open(path) as image:
        mask = image.convert("L")
        if mask.size != (shape[1], shape[0]):
            mask = mask.resize((shape[1], shape[0]), Image.NEAREST)
        return np.asarray(mask) > 127


def _in_split(chosen: str, split: str) -> bool:
    return split in ("all", chosen) or (split == HELD_OUT and chosen != "train")


def _keep(stem: str, split: str) -> bool:
    return _in_split(hash_split(stem), split)


def masked_samples(root: Path, mask_folder: str, split: str = "all",
                   suffixes: Collection[str] = IMAGE_SUFFIXES) -> list[Sample]:
    """Return the images (files with one of ``suffixes``) under ``root/images`` that have a mask
    PNG in ``root/mask_folder``.

    Raises :class:`InputError` when a folder is missing or no image has a mask.
    """
    masks = {p.stem: p for p in image_files(root / mask_folder)}
    samples = [
        Sample(image, masks[image.stem])
        for image in image_files(root / "images", suffixes)
        if image.stem in masks and _keep(image.stem, split)
    ]
    if not samples:
        raise InputError(f"no images with masks in {root / mask_folder} (split {split})")
    return samples


def covid_samples(root: Path, split: str = "all") -> list[Sample]:
    """Return ``root/COVID`` (label 1) and ``root/Normal`` (label 0) images in ``split``.

    Raises :class:`InputError` when a folder is missing or empty.
    """
    samples = [
        Sample(image, label=label)
        for folder, label in (("COVID", 1), ("Normal", 0))
        for image in image_files(root / folder)
        if _keep(image.stem, split)
    ]
    if not samples:
        raise InputError(f"no COVID/Normal images in {root} (split {split})")
    return samples


def labelled_samples(root: Path, label: str, split: str = "all") -> list[Sample]:
    """Return ``root/images`` with their ``label`` column from ``root/labels.csv``.

    ``split`` filters on the ``official_split`` column when the CSV has one, else on
    the hash split. Raises :class:`InputError` for a missing file, column or image.
    """
    table = root / "labels.csv"
    if not table.is_file():
        raise InputError(f"labels file not found: {table}")
    files = {p.stem: p for p in image_files(root / "images")}
    samples = []
    with table.open(newline="") as stream:
        for row in csv.DictReader(stream):
            if label not in row:
                raise InputError(f"{table} has no column {label!r}")
            stem = Path(row["image"]).stem
            if stem not in files:
                raise InputError(f"{table} names {stem}, which is not in {root / 'images'}")
            chosen = row.get("official_split") or hash_split(stem)
            if _in_split(chosen, split):
                samples.append(Sample(files[stem], label=int(row[label])))
    if not samples:
        raise InputError(f"no labelled images in {root} (split {split})")
    return samples


#: The frontal chest sets under a data folder like ``../shared/data``: name → (folder, kind).
FRONTAL_CHEST_SETS = {
    "openist": ("lung-seg/openist", "masked"),
    "covid-seg": ("lung-seg/covid-seg", "masked"),
    "covid-radiography": ("covid-radiography", "covid"),
    "nih-cxr14": ("nih-cxr14", "labelled"),
}


def frontal_chest_samples(data_dir: Path, split: str = "all") -> dict[str, list[Sample]]:
    """Return the images of every set of :data:`FRONTAL_CHEST_SETS` in ``split``, by set name.

    Raises :class:`InputError` when a set's folder is missing.
    """
    found = {}
    for name, (folder, kind) in FRONTAL_CHEST_SETS.items():
        root = data_dir / folder
        if kind == "masked":
            found[name] = masked_samples(root, "masks-lung", split)
        elif kind == "covid":
            found[name] = covid_samples(root, split)
        else:
            found[name] = labelled_samples(root, "Pneumothorax", split)
    return found


OUTSIDE_NORMALS = "lung-seg/openist"
THRESHOLD_SPLIT = "val"  # of OUTSIDE_NORMALS: covid19's threshold is chosen on it, so it is not scored


def threshold_normals(data_dir: Path) -> list[Sample]:
    """Return the outside-source normals covid19's threshold is chosen on (never trained on)."""
    return masked_samples(data_dir / OUTSIDE_NORMALS, "masks-lung", THRESHOLD_SPLIT)


def outside_normals(data_dir: Path) -> list[Sample]:
    """Return the outside-source normals covid19 is scored on: all of :data:`OUTSIDE_NORMALS` but the
    split its threshold is chosen on."""
    every = masked_samples(data_dir / OUTSIDE_NORMALS, "masks-lung")
    return [s for s in every if hash_split(s.image.stem) != THRESHOLD_SPLIT]


#: What each head never trained on, scored by ``evaluate sources`` as its outside sources.
OUTSIDE_SOURCES = {
    "lung": "no lung source is held out entirely: lung-seg/covid-seg val + test (29 images never trained on; "
    "its train split trains with partial labels; its masks take in the retrocardiac lung: Dice and coverage "
    "count the convention against the model, spill does not)",
    "covid19": "COVID-19: lung-seg/covid-seg val + test (27, ieee8023 collection, never trained on; the "
    "COVID-19 Radiography Database also draws on that collection, so some may be near-duplicates of "
    "training images); normal: lung-seg/openist train + test hash splits (232; its val split, 43, chooses the "
    "threshold and is not scored)",
    "pneumothorax": "normal: lung-seg/openist, all 275 (no outside source has pneumothorax labels)",
    "localization": "none (opacity masks exist for covid-seg only)",
}
