"""Fashion-MNIST (real 28x28 greyscale photos of clothing, 10 classes, MIT licence) as demo-world images.

The data installs offline through Debian's package `dataset-fashion-mnist` (IDX files, gzip, under
/usr/share/datasets/fashion-mnist). It is needed only to retrain the fashion demo model and its classifier and to
measure them against real images; the shipped weights and the suite's quality test do not read it.

Images enter the demo models exactly like shapes-world scenes: float32 in [0, 1], channels first, 32x32 RGB
(the 28x28 photo padded with its black background by 2 pixels per side, grey replicated to the three channels).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .text_encoder import FASHION_CLASSES

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
CLASS_NAMES = FASHION_CLASSES  # label i is CLASS_NAMES[i], in the dataset's own order
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}  # fmt: skip
IMAGE_SIZE = 32
_PAD = (IMAGE_SIZE - 28) // 2
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # IDX: unsigned bytes, 3 dimensions / 1 dimension


def available(directory: Path = DATASET_DIR) -> bool:
    return all((directory / name).is_file() for files in SPLITS.values() for name in files)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX array of unsigned bytes: big-endian int32 magic, one int32 per dimension, then the data."""
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file {path} is missing; {INSTALL_HINT}")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = magic & 0xFF  # the magic's low byte counts the dimensions
    found = int(np.frombuffer(raw, dtype=">i4", count=1)[0]) if len(raw) >= 4 else None
    if found != magic or len(raw) < 4 * (1 + ndim):
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {found}, expected {magic})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes of data")
    return data.reshape(shape)


def load(split: str, directory: Path = DATASET_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the "train" (60k) or "test" (10k) split."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not a Fashion-MNIST split; expected one of {list(SPLITS)}")
    images_name, labels_name = SPLITS[split]
    images = _read_idx(directory / images_name, _IMAGES_MAGIC)
    labels = _read_idx(directory / labels_name, _LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 3, 32, 32] in [0, 1]: black border, grey in all three channels."""
    grey = np.pad(images.astype(np.float32) / 255.0, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)))
    return np.repeat(grey[:, None], 3, axis=1)


def caption(label: int) -> str:
    """The demo-text prompt for a class label (the class name is a single vocabulary word)."""
    return CLASS_NAMES[label]
