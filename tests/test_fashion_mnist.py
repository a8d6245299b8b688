"""Fashion-MNIST from the Debian package, one-frame clips, class captions and the FID-style image score."""

import numpy as np
import pytest

from jaxeff.data import fashion_mnist as fm

needs_data = pytest.mark.skipif(not fm.available(), reason="Fashion-MNIST not installed (apt-get install "
                                "dataset-fashion-mnist, or set $JAXEFF_FASHION_MNIST)")


@needs_data
def test_load_and_clips():
    x, y = fm.load("train")
    xt, yt = fm.load("test")
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [6000] * 10 and set(yt.tolist()) == set(range(10))
    c = fm.to_clips(x[:4])
    assert c.shape == (4, 1, 1, 32, 32) and c.min() >= -1 and c.max() <= 1
    assert np.all(c[:, :, :, :2] == -1) and np.all(c[:, :, :, :, -2:] == -1)  # padding is background
    np.testing.assert_allclose(c[:, 0, 0, 2:30, 2:30], x[:4] / 127.5 - 1, atol=1e-6)


def test_captions_and_errors(tmp_path, monkeypatch):
    table = fm.class_embedding_table(8)
    e = fm.embed_labels(np.array([3, -1]), table)
    assert e.shape == (2, 1, 8) and np.all(e[1] == 0) and np.allclose(e[0, 0], table[3])
    with pytest.raises(ValueError, match="size"):
        fm.to_clips(np.zeros((1, 28, 28), np.uint8), size=20)
    with pytest.raises(ValueError, match="split"):
        fm.load("val")
    monkeypatch.setenv(fm.ENV, str(tmp_path))
    fm.load.cache_clear()
    try:
        with pytest.raises(fm.DatasetMissing, match="apt-get install dataset-fashion-mnist"):
            fm.load("train")
    finally:
        fm.load.cache_clear()


@needs_data
def test_image_quality_separates_real_from_corrupted():
    from jaxeff.diffusion.image_quality import ImageQuality

    q = ImageQuality(num_real=1000, progress=False)  # trains the classifier once per cache ($JAXEFF_CACHE)
    assert q.report["test_accuracy"] > 0.8
    xt, yt = fm.load("test")
    real = fm.to_clips(xt[5000:6000])
    s_real = q.score(real, yt[5000:6000])
    noisy = np.clip(real + np.random.default_rng(0).normal(0, 0.5, real.shape), -1, 1).astype(np.float32)
    s_noisy = q.score(noisy, yt[5000:6000])
    assert s_real["class_acc"] > 0.8 and s_real["fid"] < s_noisy["fid"] / 5
    with pytest.raises(ValueError, match="one-frame clips"):
        q.score(real[:, 0], yt[5000:6000])
