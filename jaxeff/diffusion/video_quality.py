"""Sample quality of generated moving-shapes clips: a Fréchet distance in the features of a classifier trained in
the repo, and caption accuracy (does the clip show what its caption asks for).

No pretrained video network (I3D for FVD) works offline here, so the feature extractor is trained on the real
procedural clips: a small convolutional network over frames predicting which (shape, colour) pairs a clip contains (a
multi-label target, order-free). Its penultimate activations (``FEATURE_DIM``) are the features:

* ``fd``: the Fréchet distance between Gaussian fits of the features of generated and of real held-out clips (the
  FID/FVD formula). Lower is better; two sets of real clips score near 0, plain noise scores far away.
* ``caption_acc``: the fraction of generated clips whose two most likely (shape, colour) pairs are exactly the
  caption's pairs.

The extractor trains in about a minute on 2 CPU cores and is cached under ``~/.cache/jaxeff/video_features``
(keyed by the clip geometry and the training recipe), so every measurement of one geometry uses the same network.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxeff.data.video import COLOUR_NAMES, SHAPES, MovingShapesConfig, moving_shapes

FEATURE_DIM = 64
NUM_PAIRS = len(SHAPES) * len(COLOUR_NAMES)
_RECIPE = {"version": 3, "steps": 800, "batch": 32, "lr": 2e-3, "width": 64, "patch": 4, "seed": 1234}
# Index seeds of the extractor's data, disjoint from the trainer's (seed, seed + 1) ranges for small seeds.
_TRAIN_SEED, _REAL_SEED = 9001, 9002


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("JAXEFF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxeff"))
    return pathlib.Path(base) / "video_features"


def pair_targets(captions: np.ndarray) -> np.ndarray:
    """Multi-hot ``[n, NUM_PAIRS]`` of the (shape, colour) pairs named by caption rows ``[n, 2*objects]``."""
    captions = np.asarray(captions)
    out = np.zeros((captions.shape[0], NUM_PAIRS), np.float32)
    for o in range(captions.shape[1] // 2):
        shape = captions[:, 2 * o] - 1
        colour = captions[:, 2 * o + 1] - 1 - len(SHAPES)
        ok = (shape >= 0) & (colour >= 0)
        out[np.nonzero(ok)[0], (shape * len(COLOUR_NAMES) + colour)[ok]] = 1.0
    return out


def _conv2d(x, w, stride):
    # x [N, H, W, C], w [kh, kw, Cin, Cout]
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def init_extractor(rng, width: int = _RECIPE["width"], patch: int = _RECIPE["patch"]) -> dict:
    k = jax.random.split(rng, 5)
    pin = patch * patch * 3
    return {
        "patch": {"w": jax.random.normal(k[0], (pin, width)) * pin ** -0.5, "b": jnp.zeros((width,))},
        "conv0": {"w": jax.random.normal(k[1], (3, 3, width, width)) * (9 * width) ** -0.5, "b": jnp.zeros((width,))},
        "conv1": {"w": jax.random.normal(k[2], (3, 3, width, width)) * (9 * width) ** -0.5, "b": jnp.zeros((width,))},
        "feat": {"w": jax.random.normal(k[3], (3 * width, FEATURE_DIM)) * (3 * width) ** -0.5,
                 "b": jnp.zeros((FEATURE_DIM,))},
        "head": {"w": jax.random.normal(k[4], (FEATURE_DIM, NUM_PAIRS)) * FEATURE_DIM ** -0.5,
                 "b": jnp.zeros((NUM_PAIRS,))},
    }


def extractor_features(params: dict, clips: jax.Array) -> jax.Array:
    """``[B, 3, T, H, W]`` clips in ``[-1, 1]`` -> features ``[B, FEATURE_DIM]``: per-frame patch embedding and two
    3x3 convolutions (the second strided), then the space-time mean, the mean absolute change between frames and the
    mean absolute second difference (content, motion, and jerkiness of the motion)."""
    B, C, T, H, W = clips.shape
    p = int(round((params["patch"]["w"].shape[0] // 3) ** 0.5))
    if H % p or W % p:
        raise ValueError(f"clips: height and width must be multiples of the extractor patch {p}, got {H}x{W}")
    x = clips.astype(jnp.float32).transpose(0, 2, 3, 4, 1).reshape(B * T, H // p, p, W // p, p, C)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(B * T, H // p, W // p, p * p * C)
    x = jax.nn.gelu(x @ params["patch"]["w"] + params["patch"]["b"])
    x = jax.nn.gelu(_conv2d(x, params["conv0"]["w"], 1) + params["conv0"]["b"])
    x = jax.nn.gelu(_conv2d(x, params["conv1"]["w"], 2) + params["conv1"]["b"])
    x = x.reshape((B, T) + x.shape[1:])  # [B, T, h, w, width]
    zeros = jnp.zeros((B, x.shape[-1]), x.dtype)
    vel = jnp.abs(jnp.diff(x, axis=1)).mean(axis=(1, 2, 3)) if T > 1 else zeros
    acc = jnp.abs(jnp.diff(x, 2, axis=1)).mean(axis=(1, 2, 3)) if T > 2 else zeros
    pooled = jnp.concatenate([x.mean(axis=(1, 2, 3)), vel, acc], -1)
    return jax.nn.gelu(pooled @ params["feat"]["w"] + params["feat"]["b"])


def extractor_logits(params: dict, clips: jax.Array) -> jax.Array:
    return extractor_features(params, clips) @ params["head"]["w"] + params["head"]["b"]


def _key(shapes: MovingShapesConfig) -> str:
    blob = json.dumps({"shapes": shapes.__dict__, "recipe": _RECIPE}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def train_extractor(shapes: MovingShapesConfig, *, progress: bool = True) -> tuple[dict, dict]:
    """Trains the feature extractor on fresh clips of ``shapes``; ``(params, report)`` where report has the
    held-out pair accuracy."""
    r = _RECIPE
    params = init_extractor(jax.random.key(r["seed"]))
    tx = optax.adam(optax.cosine_decay_schedule(r["lr"], r["steps"], 0.05))
    opt = tx.init(params)

    def loss_fn(p, clips, target):
        return optax.sigmoid_binary_cross_entropy(extractor_logits(p, clips), target).mean()

    @jax.jit
    def step(p, o, clips, target):
        loss, g = jax.value_and_grad(loss_fn)(p, clips, target)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    bar = tqdm(range(r["steps"]), desc="video feature extractor", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)
    for s in bar:
        clips, captions, _ = moving_shapes(shapes, np.arange(s * r["batch"], (s + 1) * r["batch"]), _TRAIN_SEED)
        params, opt, loss = step(params, opt, jnp.asarray(clips), jnp.asarray(pair_targets(captions)))
        if s % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
    clips, captions, _ = moving_shapes(shapes, np.arange(256), _TRAIN_SEED + 100)
    acc = caption_accuracy(params, clips, captions)
    return params, {"heldout_pair_accuracy": acc, "steps": r["steps"]}


def load_params_npz(path) -> tuple[dict, dict]:
    """``(params, report)`` of a two-level params dict saved by ``save_params_npz``."""
    data = np.load(path, allow_pickle=False)
    params: dict = {}
    for k in data.files:
        if k != "__report__":
            a, b = k.split("/")
            params.setdefault(a, {})[b] = jnp.asarray(data[k])
    return params, json.loads(str(data["__report__"]))


def save_params_npz(path, params: dict, report: dict) -> None:
    """Saves a two-level params dict and a JSON report atomically (concurrent first uses never see half a file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    flat = {f"{a}/{b}": np.asarray(v) for a, d in params.items() for b, v in d.items()}
    np.savez(tmp, __report__=np.asarray(json.dumps(report)), **flat)
    os.replace(tmp, path)


def load_extractor(shapes: MovingShapesConfig, *, progress: bool = True) -> tuple[dict, dict]:
    """The cached extractor for this clip geometry (trained and cached on first use)."""
    path = _cache_dir() / f"{_key(shapes)}.npz"
    if path.exists():
        return load_params_npz(path)
    params, report = train_extractor(shapes, progress=progress)
    save_params_npz(path, params, report)
    return params, report


def batched(fn, params, clips: np.ndarray, batch: int = 64) -> np.ndarray:
    jfn = jax.jit(fn)
    return np.concatenate([np.asarray(jfn(params, jnp.asarray(clips[i:i + batch])))
                           for i in range(0, len(clips), batch)]) if len(clips) else np.zeros((0,))


def caption_accuracy(params: dict, clips: np.ndarray, captions: np.ndarray) -> float:
    """Fraction of clips whose top-k pairs (k = objects in the caption) equal the caption's pair set."""
    logits = batched(extractor_logits, params, np.asarray(clips))
    target = pair_targets(captions)
    k = int(target.sum(-1).max())
    top = np.argsort(-logits, axis=-1)[:, :k]
    pred = np.zeros_like(target)
    np.put_along_axis(pred, top, 1.0, axis=-1)
    return float(np.mean(np.all(pred == target, axis=-1)))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|μa - μb|² + tr(Σa + Σb - 2 (Σa Σb)^½)`` of the Gaussian fits of feature sets ``[n, d]`` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: expected two [n >= 2, d] feature sets, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((Ca Cb)^½) from the eigenvalues of Ca^½ Cb Ca^½ (symmetric PSD, so no complex square roots).
    w, v = np.linalg.eigh(ca)
    sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(sa @ cb @ sa)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.sum(np.sqrt(np.clip(ev, 0, None))))


class VideoQuality:
    """Scores generated clips against real ones of the same geometry.

        q = VideoQuality(shapes, num_real=512)
        q.score(generated_clips, captions)   # {"fd": ..., "caption_acc": ...}
    """

    def __init__(self, shapes: MovingShapesConfig, num_real: int = 512, *, progress: bool = True,
                 params: Optional[dict] = None):
        self.shapes = shapes
        if params is None:
            params, self.report = load_extractor(shapes, progress=progress)
        else:
            self.report = {}
        self.params = params
        real, _, _ = moving_shapes(shapes, np.arange(num_real), _REAL_SEED)
        self.real_features = batched(extractor_features, params, real)

    def features(self, clips: np.ndarray) -> np.ndarray:
        return batched(extractor_features, self.params, np.asarray(clips, np.float32))

    def score(self, clips: np.ndarray, captions: np.ndarray) -> dict:
        clips = np.asarray(clips, np.float32)
        if clips.shape[1:] != (3, self.shapes.frames, self.shapes.size, self.shapes.size):
            raise ValueError(f"clips: expected [n, 3, {self.shapes.frames}, {self.shapes.size}, {self.shapes.size}],"
                             f" got {clips.shape}")
        return {"fd": frechet_distance(self.features(clips), self.real_features),
                "caption_acc": caption_accuracy(self.params, clips, captions)}
