"""Assembling an ``evaluate lung`` folder from another team's masks, named by the images' source file names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import InputError
from training.chest_xray.datasets import masked_samples
from training.chest_xray.mask_folder import assemble, main


def _grey(path: Path, size: tuple[int, int], value: int = 128) -> None:
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8)).save(path)


@pytest.fixture()
def lung_set(tmp_path: Path) -> tuple[Path, Path]:
    """A set of three images (one without a mask, one whose mask is of another crop) and a masks folder."""
    root, masks = tmp_path / "set", tmp_path / "team-masks"
    (root / "images").mkdir(parents=True)
    masks.mkdir()
    for stem, size in (("a", (200, 100)), ("b", (200, 100)), ("c", (200, 100))):
        _grey(root / "images" / f"{stem}.jpg", size)
    (root / "images.csv").write_text("image,original_filename\na,first.jpeg\nb,second.png\nc,third.jpg\n")
    drawn = np.zeros((50, 100), dtype=np.uint8)
    drawn[10:40, 10:45] = 250  # a JPEG-like grey that is lung
    drawn[10:40, 55:90] = 90  # a grey below half that is not
    Image.fromarray(drawn).save(masks / "first.jpg")
    _grey(masks / "second.png", (100, 100), 255)  # square: drawn on another crop of a 2:1 image
    return root, masks


def test_masks_are_matched_by_source_name_and_binarised(lung_set: tuple[Path, Path], tmp_path: Path) -> None:
    root, masks = lung_set
    out = tmp_path / "out"
    result = assemble(root, masks, out)
    assert result.kept == ["a"] and result.other_crop == ["b"] and result.no_mask == ["c"]
    assert (out / "images" / "a.jpg").resolve() == (root / "images" / "a.jpg").resolve()
    mask = np.asarray(Image.open(out / "masks-lung" / "a.png"))
    assert set(np.unique(mask)) == {0, 255}
    assert mask[25, 20] == 255 and mask[25, 70] == 0
    assert [s.image.stem for s in masked_samples(out, "masks-lung")] == ["a"]


def test_cli_reports_what_it_left_out(lung_set: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    root, masks = lung_set
    main(["--set", str(root), "--masks", str(masks), "--out", str(tmp_path / "out")])
    report = json.loads(capsys.readouterr().out)
    assert report == {"kept": 1, "no_mask": 1, "other_crop": 1, "other_crop_stems": ["b"]}


def test_no_matching_mask_or_no_names_file_is_a_clear_error(lung_set: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = lung_set
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no mask in .* matches an image"):
        assemble(root, empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    (root / "images.csv").unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["--set", str(root), "--masks", str(empty), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "names file not found" in capsys.readouterr().err


def test_an_unreadable_mask_is_named(lung_set: tuple[Path, Path], tmp_path: Path) -> None:
    root, masks = lung_set
    (masks / "first.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read a.jpg or its mask .*first.jpg"):
        assemble(root, masks, tmp_path / "out")
