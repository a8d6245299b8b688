"""LCM scheduler, multistep consistency sampling and TLCM milestones: the spec's golden values, diffusers'
LCMScheduler (float64, fixed noise) and the MCM oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.diffusion import NoiseSchedule, ddim_sample
from jaxeff.diffusion.consistency import (
    TLCM_MILESTONES,
    lcm_boundary_scalings,
    lcm_sample,
    lcm_step,
    lcm_timesteps,
    mcm_boundaries,
    mcm_sample,
    segment_start,
    tlcm_sample,
    tlcm_subset,
    tlcm_timesteps,
)


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def test_lcm_golden_values_and_errors():
    np.testing.assert_array_equal(lcm_timesteps(1), [999])
    np.testing.assert_array_equal(lcm_timesteps(2), [999, 499])
    np.testing.assert_array_equal(lcm_timesteps(4), [999, 759, 499, 259])
    np.testing.assert_array_equal(lcm_timesteps(8), [999, 879, 759, 639, 499, 379, 259, 139])
    for t, (cs, co) in [(0, (1.0, 0.0)), (1, (0.0024938, 0.99875)), (999, (2.505e-9, 1 - 1.25e-9))]:
        c_skip, c_out = lcm_boundary_scalings(t)
        assert float(c_skip) == pytest.approx(cs, rel=1e-4, abs=1e-12)
        assert float(c_out) == pytest.approx(co, abs=5e-6)  # the golden values are rounded
    with pytest.raises(ValueError, match="num_steps"):
        lcm_timesteps(51)
    with pytest.raises(ValueError, match="original_steps"):
        lcm_timesteps(4, original_steps=0)
    with pytest.raises(ValueError, match="strength"):
        lcm_timesteps(4, strength=1.5)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("num_steps, original", [(4, 50), (3, 25)])
def test_lcm_step_matches_diffusers(prediction, num_steps, original):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", original_inference_steps=original,
                                 prediction_type=prediction, set_alpha_to_one=True)
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    sched = NoiseSchedule(ref.alphas_cumprod.numpy(), float(ref.final_alpha_cumprod), "scaled_linear")
    ref.set_timesteps(num_steps)
    ts = ref.timesteps.numpy()
    np.testing.assert_array_equal(ts, lcm_timesteps(num_steps, original))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 3, 4, 4))
    gen_ref, gen_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for i, t in enumerate(ts):
        out = rng.standard_normal(z.shape)
        r = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(z), generator=gen_ref)
        last = i == len(ts) - 1
        noise = None if last else torch.randn(z.shape, generator=gen_ours, dtype=torch.float64).numpy()
        t_prev = ts[i + 1] if not last else t
        prev, denoised = lcm_step(sched, jnp.asarray(out), jnp.full((2,), t), t_prev, jnp.asarray(z),
                                  prediction=prediction, noise=None if noise is None else jnp.asarray(noise),
                                  last=last)
        np.testing.assert_allclose(np.asarray(denoised), r.denoised.numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.asarray(prev), r.prev_sample.numpy(), rtol=1e-6, atol=1e-9)
        z = r.prev_sample.numpy()
    with pytest.raises(ValueError, match="fresh noise"):
        lcm_step(sched, jnp.asarray(z), jnp.full((2,), 999), 499, jnp.asarray(z))


def test_mcm_boundaries_and_segments():
    np.testing.assert_array_equal(mcm_boundaries(4), [999, 749, 499, 249, -1])
    np.testing.assert_array_equal(mcm_boundaries(1), [999, -1])
    np.testing.assert_array_equal(mcm_boundaries(4, spacing="leading"), [751, 501, 251, 1, -1])
    b = mcm_boundaries(4)
    got = segment_start(b, jnp.array([999, 750, 749, 250, 249, 0]))
    np.testing.assert_array_equal(np.asarray(got), [749, 749, 499, 249, -1, -1])


def _teacher(sched, x0):
    """An exact denoiser of point-mass data ``x0``: its ε̂ makes x̂ == x0 at every timestep."""
    def denoise(z, t):
        a, s = sched.alpha_sigma(t)
        a, s = a[:, None, None], s[:, None, None]
        return (z - a * x0) / s
    return denoise


@pytest.mark.parametrize("S", [1, 2, 4])
def test_mcm_with_the_teacher_is_ddim(S):
    sched = NoiseSchedule.create("cosine")
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal((3, 5, 2)))
    w = jnp.asarray(rng.standard_normal((2, 2)) * 0.3)

    def denoise(z, t):  # any smooth eps-predictor: a teacher with a nontrivial x̂
        return jnp.tanh(z @ w) * (1 + t[:, None, None] / 1000)

    mcm = mcm_sample(denoise, z, sched, mcm_boundaries(S))
    ddim = ddim_sample(denoise, z, sched, S, spacing="trailing")
    np.testing.assert_allclose(np.asarray(mcm), np.asarray(ddim), atol=1e-10)
    if S == 1:  # one segment: one-step consistency sampling, f(z_T, T)
        t = jnp.full((3,), 999, jnp.int32)  # the samplers' timestep dtype
        a, s = sched.alpha_sigma(t)
        x_hat = (z - s[:, None, None] * denoise(z, t)) / a[:, None, None]
        np.testing.assert_allclose(np.asarray(mcm), np.asarray(x_hat), atol=1e-12)


def test_samplers_on_point_mass_data_return_it():
    sched = NoiseSchedule.create("scaled_linear", set_alpha_to_one=True)
    x0 = jnp.asarray(np.random.default_rng(2).standard_normal((5, 2)))
    z = jnp.asarray(np.random.default_rng(3).standard_normal((4, 5, 2)))
    f = _teacher(sched, x0)
    np.testing.assert_allclose(np.asarray(mcm_sample(f, z, sched, mcm_boundaries(4))), np.broadcast_to(x0, z.shape),
                               atol=1e-9)
    np.testing.assert_allclose(np.asarray(tlcm_sample(f, z, sched, 3, rng=jax.random.key(0))),
                               np.broadcast_to(x0, z.shape), atol=1e-9)
    # LCM's boundary scalings mix in z at the last timestep: c_skip(259) z + c_out(259) x0
    out = lcm_sample(f, z, sched, 4, rng=jax.random.key(0))
    assert np.isfinite(np.asarray(out)).all()
    c_skip, c_out = lcm_boundary_scalings(259)
    assert float(c_skip) < 1e-5 and np.abs(np.asarray(out) - np.asarray(x0)).max() < 1e-3
    with pytest.raises(ValueError, match="rng"):
        lcm_sample(f, z, sched, 2)
    lcm_sample(f, z, sched, 1)  # one step needs no rng


def test_tlcm_milestones():
    np.testing.assert_array_equal(TLCM_MILESTONES, [999, 874, 749, 624, 499, 374, 249, 124, 0])
    assert tlcm_subset(1) == (0, 8) and tlcm_subset(2) == (0, 4, 8) and tlcm_subset(3) == (0, 4, 7, 8)
    assert tlcm_subset(4) == (0, 2, 4, 7, 8) and tlcm_subset(5) == (0, 2, 4, 6, 7, 8)
    assert tlcm_subset(6) == (0, 2, 4, 5, 6, 7, 8) and tlcm_subset(7) == (0, 2, 3, 4, 5, 6, 7, 8)
    assert tlcm_subset(8) == tuple(range(9))
    # 8 steps visit every milestone once; the last evaluation is at t = 124
    np.testing.assert_array_equal(tlcm_timesteps(8), TLCM_MILESTONES[:-1])
    np.testing.assert_array_equal(tlcm_timesteps(1), [999])
    with pytest.raises(ValueError, match="1..8"):
        tlcm_subset(9)


def test_bad_timesteps():
    sched = NoiseSchedule.create("scaled_linear")
    z = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="descending"):
        mcm_sample(lambda z, t: z, z, sched, [249, 499, -1])
    with pytest.raises(ValueError, match="descending"):
        lcm_sample(lambda z, t: z, z, sched, 1, timesteps=[1000])
