"""Assemble an ``evaluate lung`` folder from a set's images and another team's lung masks of them.

    python -m training.chest_xray.mask_folder --set DIR --masks DIR --out DIR

``DIR/images.csv`` maps each image's stem (column ``image``) to the file name it had at its source
(``original_filename``). A mask in ``--masks`` whose stem is that source name becomes
``OUT/masks-lung/<image stem>.png`` (binary, 0/255) beside a link ``OUT/images/<image file>``, so the
set's hash split (and so what the lung UNet trained on) still applies to it. A mask whose aspect ratio
differs from its image's by more than :data:`ASPECT_TOLERANCE` was drawn on another crop of the picture:
it is left out and listed, never stretched onto the image.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from pipelines.errors import InputError
from training.chest_xray.datasets import image_files

ASPECT_TOLERANCE = 0.01


@dataclass
class Assembled:
    """What :func:`assemble` wrote and what it left out (image stems)."""

    kept: list[str] = field(default_factory=list)
    no_mask: list[str] = field(default_factory=list)
    other_crop: list[str] = field(default_factory=list)


def _source_names(table: Path) -> dict[str, str]:
    """Return image stem → source file stem from ``table`` (``image``, ``original_filename``)."""
    if not table.is_file():
        raise InputError(f"names file not found: {table}")
    with table.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    if rows and not {"image", "original_filename"} <= set(rows[0]):
        raise InputError(f"{table} needs the columns 'image' and 'original_filename'")
    return {row["image"]: Path(row["original_filename"]).stem for row in rows}


def assemble(set_dir: Path, masks_dir: Path, out: Path) -> Assembled:
    """Write ``out/images`` (links) and ``out/masks-lung`` for every image of ``set_dir/images`` that
    ``masks_dir`` holds a mask of, matched through ``set_dir/images.csv``; return what was kept and left out.

    Raises :class:`InputError` when a folder or the names file is missing, when no mask matches (before
    anything is written), or when a matched image or mask cannot be read (naming the file)."""
    names = _source_names(set_dir / "images.csv")
    masks = {path.stem: path for path in image_files(masks_dir)}
    result = Assembled()
    matched = []
    for image in image_files(set_dir / "images"):
        mask_path = masks.get(names.get(image.stem, ""))
        if mask_path is None:
            result.no_mask.append(image.stem)
        else:
            matched.append((image, mask_path))
    if not matched:
        raise InputError(f"no mask in {masks_dir} matches an image of {set_dir} by its source file name")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks-lung").mkdir(exist_ok=True)
    for image, mask_path in matched:
        try:
            with Image.open(image) as picture, Image.open(mask_path) as drawn:
                (width, height), (mask_width, mask_height) = picture.size, drawn.size
                if abs((width / height) / (mask_width / mask_height) - 1) > ASPECT_TOLERANCE:
                    result.other_crop.append(image.stem)
                    continue
                binary = drawn.convert("L").point(lambda value: 255 if value > 127 else 0)
        except OSError as exc:
            raise InputError(f"cannot read {image.name} or its mask {mask_path}: {exc}") from exc
        binary.save(out / "masks-lung" / f"{image.stem}.png")
        link = out / "images" / image.name
        link.unlink(missing_ok=True)
        link.symlink_to(image.resolve())
        result.kept.append(image.stem)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, assemble the folder and print what was kept and left out as JSON."""
    parser = argparse.ArgumentParser(prog="python -m training.chest_xray.mask_folder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="set_dir", type=Path, required=True,
                        help="a set with images/ and images.csv (image, original_filename)")
    parser.add_argument("--masks", type=Path, required=True, help="lung masks named by the images' source file names")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (images/ links, masks-lung/)")
    args = parser.parse_args(argv)
    try:
        result = assemble(args.set_dir, args.masks, args.out)
    except InputError as exc:
        parser.error(str(exc))
    counts = {key: len(value) for key, value in asdict(result).items()}
    print(json.dumps(counts | {"other_crop_stems": result.other_crop}, indent=2))


if __name__ == "__main__":
    main()
