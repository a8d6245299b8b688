"""Moving shapes: the embedded procedural video dataset (no download), with captions for text conditioning.

Each clip shows ``num_objects`` bouncing squares or discs of distinct colours on a black canvas. The caption names
each object's shape and colour (``"red disc, blue square"``) as token ids of a tiny fixed vocabulary, so a video
model can be trained text-conditioned and guided, and a sample's content can be checked against its caption.

Clips are a pure function of ``(seed, index)``: any batch of any run can be regenerated exactly (what the trainer's
resume relies on), and train/eval splits are disjoint index ranges.

Layout: ``clips`` float32 ``[n, C=3, T, H, W]`` in ``[-1, 1]`` (the diffusers video layout), ``captions`` int32
``[n, 2 * num_objects]`` (``shape, colour`` per object), ``motion`` float32 ``[n, num_objects, 2]`` (velocity).
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("square", "disc")
COLOURS = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 0.9, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "magenta": (0.95, 0.2, 0.9),
    "cyan": (0.1, 0.9, 0.95),
}
COLOUR_NAMES = tuple(COLOURS)
# Caption vocabulary: 0 is the null token (unconditional / classifier-free guidance), then shapes, then colours.
VOCAB = ("<null>",) + SHAPES + COLOUR_NAMES
NULL_TOKEN = 0


def shape_token(i: int) -> int:
    return 1 + i


def colour_token(i: int) -> int:
    return 1 + len(SHAPES) + i


@dataclasses.dataclass(frozen=True)
class MovingShapesConfig:
    """Clip geometry. ``frames`` x ``size`` x ``size`` RGB; objects have half-size in ``[min_half, max_half]``
    pixels and speed up to ``max_speed`` pixels per frame."""

    frames: int = 8
    size: int = 32
    num_objects: int = 2
    min_half: int = 3
    max_half: int = 6
    max_speed: float = 2.0

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"frames: expected an int >= 1, got {self.frames!r}")
        if self.num_objects < 1 or self.num_objects > len(COLOURS):
            raise ValueError(f"num_objects: expected 1..{len(COLOURS)}, got {self.num_objects!r}")
        if not 1 <= self.min_half <= self.max_half:
            raise ValueError(f"min_half/max_half: expected 1 <= min_half <= max_half, got "
                             f"{self.min_half}, {self.max_half}")
        if self.size < 2 * self.max_half + 2:
            raise ValueError(f"size: expected at least 2 * max_half + 2 = {2 * self.max_half + 2} pixels, "
                             f"got {self.size}")

    @property
    def caption_len(self) -> int:
        return 2 * self.num_objects


def _clip(cfg: MovingShapesConfig, rng: np.random.Generator, yy, xx):
    T, H = cfg.frames, cfg.size
    out = np.zeros((T, H, H, 3), np.float32)
    colours = rng.choice(len(COLOURS), cfg.num_objects, replace=False)
    caption = np.zeros(cfg.caption_len, np.int32)
    motion = np.zeros((cfg.num_objects, 2), np.float32)
    for o in range(cfg.num_objects):
        half = int(rng.integers(cfg.min_half, cfg.max_half + 1))
        pos = rng.uniform(half, H - 1 - half, 2)
        vel = rng.uniform(-cfg.max_speed, cfg.max_speed, 2)
        shape = int(rng.integers(len(SHAPES)))
        colour = np.asarray(COLOURS[COLOUR_NAMES[colours[o]]], np.float32)
        caption[2 * o], caption[2 * o + 1] = shape_token(shape), colour_token(int(colours[o]))
        motion[o] = vel
        for t in range(T):
            if SHAPES[shape] == "disc":
                inside = (yy - pos[0]) ** 2 + (xx - pos[1]) ** 2 <= half * half
            else:
                inside = (np.abs(yy - pos[0]) <= half) & (np.abs(xx - pos[1]) <= half)
            out[t][inside] = colour  # later objects occlude earlier ones
            pos = pos + vel
            bounce = (pos < half) | (pos > H - 1 - half)
            vel = np.where(bounce, -vel, vel)
            pos = np.clip(pos, half, H - 1 - half)
    return out, caption, motion


def moving_shapes(cfg: MovingShapesConfig, indices, seed: int = 0):
    """``(clips [n, 3, T, H, W] in [-1, 1], captions [n, 2*num_objects] int32, motion [n, num_objects, 2])`` for
    the clip ``indices`` (ints >= 0): clip ``i`` depends only on ``(seed, i)``."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and indices.min() < 0:
        raise ValueError(f"indices: expected ints >= 0, got min {indices.min()}")
    yy, xx = np.mgrid[: cfg.size, : cfg.size].astype(np.float32)
    clips, captions, motions = [], [], []
    for i in indices:
        rng = np.random.default_rng([seed, int(i)])
        clip, caption, motion = _clip(cfg, rng, yy, xx)
        clips.append(clip)
        captions.append(caption)
        motions.append(motion)
    n = len(indices)
    clips = np.stack(clips) if n else np.zeros((0, cfg.frames, cfg.size, cfg.size, 3), np.float32)
    clips = clips.transpose(0, 4, 1, 2, 3) * 2.0 - 1.0
    captions = np.stack(captions) if n else np.zeros((0, cfg.caption_len), np.int32)
    motions = np.stack(motions) if n else np.zeros((0, cfg.num_objects, 2), np.float32)
    return np.ascontiguousarray(clips, np.float32), captions, motions


def caption_text(caption) -> str:
    """``"red disc, blue square"`` for a caption token row (null tokens are skipped)."""
    words = [VOCAB[int(t)] for t in np.asarray(caption).reshape(-1)]
    parts = [f"{words[i + 1]} {words[i]}" for i in range(0, len(words), 2)
             if words[i] != "<null>" and words[i + 1] != "<null>"]
    return ", ".join(parts) if parts else "<unconditional>"


def caption_embedding_table(text_dim: int, seed: int = 0) -> np.ndarray:
    """The fixed "text encoder" of the dataset: one unit-variance random vector per vocabulary entry (float32
    ``[len(VOCAB), text_dim]``), with the null token mapped to zeros. It is frozen on purpose: the video model's
    own text projection learns what to make of it, as it would of a frozen T5 encoder's output."""
    rng = np.random.default_rng([seed, text_dim, 7])
    table = rng.standard_normal((len(VOCAB), text_dim)).astype(np.float32)
    table[NULL_TOKEN] = 0.0
    return table


def embed_captions(captions, table) -> np.ndarray:
    """``[n, L] -> [n, L, text_dim]`` caption embeddings (positions are distinguished by adding a fixed
    per-position offset so "red disc, blue square" differs from "blue disc, red square")."""
    captions = np.asarray(captions)
    table = np.asarray(table)
    L, dim = captions.shape[-1], table.shape[-1]
    pos = np.random.default_rng([L, dim, 11]).standard_normal((L, dim)).astype(np.float32) * 0.5
    emb = table[captions] + pos
    return np.where((captions == NULL_TOKEN)[..., None], 0.0, emb).astype(np.float32)
