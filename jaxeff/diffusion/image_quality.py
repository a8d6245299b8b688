"""Sample quality of generated Fashion-MNIST images: an FID-style Fréchet distance in the features of a classifier
trained in the repo on the real training images, and class accuracy (does the image show the class it was asked
for).

No pretrained Inception network works offline here, so the feature extractor is a small convolutional classifier
(three 3x3 convolutions, the last two strided, 2x2 average pooling to a 4x4 map, a 64-d feature layer, a 10-way
head) trained on
the 60k training images; its 64-d features are what the distance compares, against the features of real *test*
images. It trains in about a minute on 2 CPU cores and is cached under ``~/.cache/jaxeff/image_features``
(``$JAXEFF_CACHE``), keyed by the recipe, so every measurement uses the same network.

* ``fid``: Fréchet distance between Gaussian fits of generated and real features (the FID formula, other
  features: the numbers are comparable with each other, not with published FIDs). Lower is better.
* ``class_acc``: the fraction of generated images the classifier assigns to their conditioning class.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxeff.data import fashion_mnist as fm
from jaxeff.diffusion.video_quality import _cache_dir, batched, frechet_distance, load_params_npz, save_params_npz

FEATURE_DIM = 64
_RECIPE = {"version": 3, "steps": 1200, "batch": 64, "lr": 2e-3, "width": 24, "size": 32, "seed": 4321}


def _conv(x, w, b, stride):
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.gelu(y + b)


def init_classifier(rng, width: int = _RECIPE["width"]) -> dict:
    k = jax.random.split(rng, 5)
    he = lambda key, shape, fan: jax.random.normal(key, shape) * (2.0 / fan) ** 0.5
    return {
        "conv0": {"w": he(k[0], (3, 3, 1, width), 9), "b": jnp.zeros((width,))},
        "conv1": {"w": he(k[1], (3, 3, width, 2 * width), 9 * width), "b": jnp.zeros((2 * width,))},
        "conv2": {"w": he(k[2], (3, 3, 2 * width, 2 * width), 18 * width), "b": jnp.zeros((2 * width,))},
        "feat": {"w": he(k[3], (32 * width, FEATURE_DIM), 32 * width), "b": jnp.zeros((FEATURE_DIM,))},
        "head": {"w": jax.random.normal(k[4], (FEATURE_DIM, 10)) * FEATURE_DIM ** -0.5, "b": jnp.zeros((10,))},
    }


def _images(x: jax.Array) -> jax.Array:
    """``[n, 1, 1, H, W]`` one-frame clips (or ``[n, H, W]``) -> NHWC ``[n, H, W, 1]``."""
    if x.ndim == 5:
        x = x[:, 0, 0]
    return x[..., None]


def classifier_features(params: dict, images: jax.Array) -> jax.Array:
    x = _images(images.astype(jnp.float32))
    x = _conv(x, params["conv0"]["w"], params["conv0"]["b"], 1)
    x = _conv(x, params["conv1"]["w"], params["conv1"]["b"], 2)
    x = _conv(x, params["conv2"]["w"], params["conv2"]["b"], 2)
    n, h, w, c = x.shape  # [n, 8, 8, 2 width] -> 2x2 average pooling -> [n, 4 * 4 * 2 width]
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).reshape(n, -1)
    return jax.nn.gelu(x @ params["feat"]["w"] + params["feat"]["b"])


def classifier_logits(params: dict, images: jax.Array) -> jax.Array:
    return classifier_features(params, images) @ params["head"]["w"] + params["head"]["b"]


def _key() -> str:
    return hashlib.sha1(json.dumps(_RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def train_classifier(*, progress: bool = True) -> tuple[dict, dict]:
    """Trains the classifier on the Fashion-MNIST training split; ``(params, report)`` with test accuracy."""
    r = _RECIPE
    images, labels = fm.load("train")
    params = init_classifier(jax.random.key(r["seed"]))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, r["lr"], 100, r["steps"], r["lr"] * 0.05),
                     weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(classifier_logits(p, x), y).mean()

        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    rng = np.random.default_rng(r["seed"])
    bar = tqdm(range(r["steps"]), desc="image feature extractor", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)
    for s in bar:
        idx = rng.integers(0, len(images), r["batch"])
        x = fm.to_clips(images[idx], r["size"])
        x = np.where(rng.random((len(idx), 1, 1, 1, 1)) < 0.5, x, x[..., ::-1])  # horizontal flips
        params, opt, loss = step(params, opt, jnp.asarray(x), jnp.asarray(labels[idx]))
        if s % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
    test_x, test_y = fm.load("test")
    acc = class_accuracy(params, fm.to_clips(test_x, r["size"]), test_y)
    return params, {"test_accuracy": acc, "steps": r["steps"]}


def load_classifier(*, progress: bool = True) -> tuple[dict, dict]:
    """The cached classifier (trained and cached on first use)."""
    path = _cache_dir().parent / "image_features" / f"fmnist-{_key()}.npz"
    if path.exists():
        return load_params_npz(path)
    params, report = train_classifier(progress=progress)
    save_params_npz(path, params, report)
    return params, report


def class_accuracy(params: dict, images: np.ndarray, labels: np.ndarray) -> float:
    logits = batched(classifier_logits, params, np.asarray(images, np.float32), batch=256)
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


class ImageQuality:
    """Scores generated Fashion-MNIST images (one-frame clips ``[n, 1, 1, S, S]`` in ``[-1, 1]``, ``S`` = the
    padded size, 32) against ``num_real`` real test images.

        q = ImageQuality(num_real=2000)
        q.score(samples, labels)   # {"fid": ..., "class_acc": ...}
    """

    def __init__(self, num_real: int = 2000, *, progress: bool = True, params: Optional[dict] = None):
        if params is None:
            params, self.report = load_classifier(progress=progress)
        else:
            self.report = {}
        self.params = params
        test_x, _ = fm.load("test")
        if not 2 <= num_real <= len(test_x):
            raise ValueError(f"num_real: expected 2..{len(test_x)}, got {num_real}")
        self.real_features = self.features(fm.to_clips(test_x[:num_real], _RECIPE["size"]))

    def features(self, images: np.ndarray) -> np.ndarray:
        return batched(classifier_features, self.params, np.asarray(images, np.float32), batch=256)

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict:
        images = np.asarray(images, np.float32)
        size = _RECIPE["size"]
        if images.shape[1:] != (1, 1, size, size):
            raise ValueError(f"images: expected [n, 1, 1, {size}, {size}] one-frame clips, got {images.shape}")
        return {"fid": frechet_distance(self.features(images), self.real_features),
                "class_acc": class_accuracy(self.params, images, labels)}
