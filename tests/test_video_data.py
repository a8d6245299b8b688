"""Moving-shapes clips, captions and the sample-quality measures built on them."""

import numpy as np
import pytest

from jaxeff.data.video import (
    COLOUR_NAMES,
    MovingShapesConfig,
    caption_embedding_table,
    caption_text,
    embed_captions,
    moving_shapes,
)
from jaxeff.diffusion import video_quality as vq


def test_clips_are_a_pure_function_of_seed_and_index():
    cfg = MovingShapesConfig(frames=4, size=16, num_objects=2, min_half=2, max_half=3)
    a, cap_a, mot_a = moving_shapes(cfg, [3, 7], seed=5)
    b, cap_b, _ = moving_shapes(cfg, [7], seed=5)
    c, _, _ = moving_shapes(cfg, [7], seed=6)
    assert a.shape == (2, 3, 4, 16, 16) and a.dtype == np.float32
    assert a.min() >= -1 and a.max() <= 1
    np.testing.assert_array_equal(a[1], b[0])
    np.testing.assert_array_equal(cap_a[1], cap_b[0])
    assert not np.array_equal(a[1], c[0])
    assert mot_a.shape == (2, 2, 2)
    # The objects move: consecutive frames differ.
    assert np.abs(np.diff(a, axis=2)).sum() > 0
    # Caption colours are distinct and appear in the clip.
    for clip, cap in zip(a, cap_a):
        names = caption_text(cap).split(", ")
        assert len(names) == 2 and names[0].split()[0] != names[1].split()[0]
        assert all(n.split()[0] in COLOUR_NAMES for n in names)


def test_caption_embeddings_and_errors():
    table = caption_embedding_table(8)
    caps = np.array([[1, 3, 2, 4], [0, 0, 0, 0]])
    emb = embed_captions(caps, table)
    assert emb.shape == (2, 4, 8)
    assert np.all(emb[1] == 0)  # the null caption is the unconditional input
    swapped = embed_captions(np.array([[2, 4, 1, 3]]), table)
    assert not np.allclose(swapped[0], emb[0])  # positions matter
    with pytest.raises(ValueError, match="num_objects"):
        MovingShapesConfig(num_objects=0)
    with pytest.raises(ValueError, match="size"):
        MovingShapesConfig(size=8, max_half=6)
    with pytest.raises(ValueError, match="indices"):
        moving_shapes(MovingShapesConfig(), [-1])


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    a -= a.mean(0)
    assert vq.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, 2.0, 0.0])
    assert vq.frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-6)
    # Scaling one Gaussian by s: trace term (1 - s)^2 per dimension.
    assert vq.frechet_distance(a, 3 * a) == pytest.approx(4.0 * np.trace(np.cov(a, rowvar=False)), rel=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        vq.frechet_distance(a, a[:, :2])


def test_pair_targets():
    t = vq.pair_targets(np.array([[1, 3, 2, 4]]))  # square red, disc green
    assert t.sum() == 2
    assert t[0, 0 * len(COLOUR_NAMES) + 0] == 1 and t[0, 1 * len(COLOUR_NAMES) + 1] == 1
