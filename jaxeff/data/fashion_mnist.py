"""Fashion-MNIST (Xiao et al. 2017: 70k 28x28 grey images of 10 clothing classes) from local files, as one-frame
"clips" for the DiT and class labels as one-token captions.

No download happens: the files are the Debian package ``dataset-fashion-mnist`` (``apt-get install
dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``), or any directory holding the four
standard ``*-ubyte.gz`` files named by ``$JAXEFF_FASHION_MNIST``.
"""

from __future__ import annotations

import functools
import gzip
import os
import pathlib

import numpy as np

CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV = "JAXEFF_FASHION_MNIST"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IMAGE_SIZE = 28


class DatasetMissing(FileNotFoundError):
    pass


def data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(ENV, DEFAULT_DIR))


def available() -> bool:
    d = data_dir()
    return all((d / f).exists() for pair in _FILES.values() for f in pair)


@functools.lru_cache(maxsize=2)
def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, 28, 28], labels int32 [n])`` of ``"train"`` (60k) or ``"test"`` (10k)."""
    if split not in _FILES:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    d = data_dir()
    img_f, lab_f = (d / f for f in _FILES[split])
    if not (img_f.exists() and lab_f.exists()):
        raise DatasetMissing(
            f"Fashion-MNIST not found in {d} (looked for {img_f.name}, {lab_f.name}): install the Debian package "
            f"with 'apt-get install dataset-fashion-mnist', or point ${ENV} at a directory with the standard files")
    with gzip.open(img_f) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    with gzip.open(lab_f) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int32)
    if len(images) != len(labels):
        raise ValueError(f"{img_f} holds {len(images)} images but {lab_f} {len(labels)} labels")
    return images, labels


def to_clips(images: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 ``[n, 28, 28]`` -> float32 one-frame clips ``[n, 1, 1, size, size]`` in ``[-1, 1]``, zero-padded
    (background value -1) to ``size`` pixels, centred."""
    if size < IMAGE_SIZE:
        raise ValueError(f"size: expected at least {IMAGE_SIZE} pixels, got {size}")
    x = images.astype(np.float32) / 127.5 - 1.0
    lo = (size - IMAGE_SIZE) // 2
    out = np.full((len(images), 1, 1, size, size), -1.0, np.float32)
    out[:, 0, 0, lo:lo + IMAGE_SIZE, lo:lo + IMAGE_SIZE] = x
    return out


def class_embedding_table(text_dim: int, seed: int = 0) -> np.ndarray:
    """The fixed class "text encoder": one unit-variance random vector per class (float32 ``[10, text_dim]``); the
    unconditional input is a zero vector. Frozen on purpose, like the video captions' table: the DiT's
    cross-attention projections learn what to make of it."""
    return np.random.default_rng([seed, text_dim, 13]).standard_normal((len(CLASSES), text_dim)).astype(np.float32)


def embed_labels(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Class ids ``[n]`` (``-1``: unconditional) -> one-token caption embeddings ``[n, 1, text_dim]``."""
    labels = np.asarray(labels)
    emb = np.asarray(table)[np.clip(labels, 0, len(CLASSES) - 1)]
    return np.where((labels < 0)[:, None], 0.0, emb)[:, None, :].astype(np.float32)
