"""Images the gate must skip, made on the spot: the corpus ``evaluate gate`` scores.

Nothing here is a frontal chest radiograph:

- ``anatomy``: every single-frame image of other anatomy or modality in pydicom-data
  (a hand CR, CT and MR slices, a nuclear-medicine whole body, ultrasound, ...), and
  each of them turned 90°, 180°, 270° and inverted;
- ``synthetic``: blank, constant, noise, smooth blobs, gradients, a checkerboard;
- ``chest-transformed``: the frontal chest images given to :func:`transformed`
  inverted, turned 90° either way, upside down, and cut to their top, bottom or
  left part (one lung, the neck and shoulders, the abdomen).

Every image is the ``display`` uint8 array the content check sees after decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipelines.chest_xray.preprocess import PERCENTILES, window, load_dataset
from pipelines.errors import InputError

#: pydicom-data files of other anatomy or modalities (single frame, at least 64 px).
ANATOMY_FILES = (
    "RG3_UNCR.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm", "CT_small.dcm", "MR_small.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm", "JPEG2000_UNC.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm", "mlut_18.dcm", "vlut_04.dcm", "US1_UNCR.dcm", "SC_rgb.dcm",
)
#: Seeds of the corpus's synthetic images; training draws its own from TRAINING_SEEDS.
SYNTHETIC_SEEDS = range(4)
TRAINING_SEEDS = range(100, 400)
SYNTHETIC_SIZE = 512


@dataclass(frozen=True)
class CorpusImage:
    """One image the gate must skip: its group, a name that says what it is, and the display image."""

    group: str
    name: str
    display: np.ndarray


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "inverted": lambda d: 255 - d,
    "rotated 90": lambda d: np.rot90(d, 1),
    "rotated 270": lambda d: np.rot90(d, -1),
    "upside down": lambda d: d[::-1],
    "top third": lambda d: d[: d.shape[0] // 3],
    "bottom third": lambda d: d[-(d.shape[0] // 3) :],
    "left half": lambda d: d[:, : d.shape[1] // 2],
}


def transformed(group: str, images: Iterable[tuple[str, np.ndarray]], names: Iterable[str]) -> Iterator[CorpusImage]:
    """Yield each of ``images`` under each transform in ``names`` (keys of :data:`TRANSFORMS`)."""
    chosen = list(names)
    for name, display in images:
        for transform in chosen:
            yield CorpusImage(group, f"{name} {transform}", np.ascontiguousarray(TRANSFORMS[transform](display)))


def anatomy_images() -> list[tuple[str, np.ndarray]]:
    """Return (file name, display) of :data:`ANATOMY_FILES`, colour ones as luminance.

    Raises :class:`InputError` when pydicom-data (the ``train`` extra) is not installed.
    """
    try:
        from pydicom import dcmread
        from pydicom.data import get_testdata_file
    except ImportError as exc:  # pragma: no cover - pydicom ships pydicom.data
        raise InputError("pydicom's test data is needed for the gate corpus") from exc
    images = []
    for name in ANATOMY_FILES:
        path = get_testdata_file(name)
        if path is None:
            raise InputError(f"{name} not found: install pydicom-data (pip install -e '.[train]')")
        dataset = dcmread(path)
        try:
            images.append((name, load_dataset(dataset).display))
        except InputError:  # colour: the luminance a relabelling sender would send
            rgb = np.asarray(dataset.pixel_array, dtype=np.float32)
            gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            images.append((name, window(gray, *np.percentile(gray, PERCENTILES))))
    return images


def synthetic_images(seeds: Iterable[int] = SYNTHETIC_SEEDS, size: int = SYNTHETIC_SIZE) -> list[CorpusImage]:
    """Return blank and constant images, and noise, blob, gradient and checkerboard images for each seed."""
    rows, cols = np.mgrid[:size, :size] / size
    made = [CorpusImage("synthetic", "all zero", np.zeros((size, size), np.uint8)),
            CorpusImage("synthetic", "constant 128", np.full((size, size), 128, np.uint8)),
            CorpusImage("synthetic", "constant 255", np.full((size, size), 255, np.uint8))]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        uniform = rng.integers(0, 256, (size, size)).astype(np.uint8)
        gaussian = np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8)
        blobs = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=4 + 8 * (seed % 5))
        angle = rng.uniform(0, np.pi)
        gradient = np.cos(angle) * rows + np.sin(angle) * cols
        radial = np.hypot(rows - rng.uniform(0.3, 0.7), cols - rng.uniform(0.3, 0.7))
        check = ((rows * (4 + 4 * (seed % 6))).astype(int) + (cols * (4 + 4 * (seed % 6))).astype(int)) % 2
        made += [
            CorpusImage("synthetic", f"uniform noise {seed}", uniform),
            CorpusImage("synthetic", f"gaussian noise {seed}", gaussian),
            CorpusImage("synthetic", f"smooth blobs {seed}", window(blobs, blobs.min(), blobs.max())),
            CorpusImage("synthetic", f"gradient {seed}", window(gradient, gradient.min(), gradient.max())),
            CorpusImage("synthetic", f"radial gradient {seed}", window(radial, radial.min(), radial.max())),
            CorpusImage("synthetic", f"checkerboard {seed}", (check * 255).astype(np.uint8)),
        ]
    return made


def corpus(chest_images: Iterable[tuple[str, np.ndarray]]) -> list[CorpusImage]:
    """Return the whole corpus: other anatomy (as sent and transformed), synthetic images, and
    ``chest_images`` (name, display) under every transform of :data:`TRANSFORMS`."""
    anatomy = anatomy_images()
    return [
        *(CorpusImage("anatomy", name, display) for name, display in anatomy),
        *transformed("anatomy", anatomy, ("rotated 90", "upside down", "rotated 270", "inverted")),
        *synthetic_images(),
        *transformed("chest-transformed", chest_images, TRANSFORMS),
    ]
