"""Schedules and the DDIM step against the spec's golden values and diffusers' DDIMScheduler (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.diffusion import (
    NoiseSchedule,
    ddim_prev_timesteps,
    ddim_project,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddim_trajectory,
)


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def test_sd_schedule_golden_values():
    ac = NoiseSchedule.create("scaled_linear").alphas_cumprod
    for t, want in [(0, 0.99915), (259, 0.658976), (499, 0.277670), (759, 0.0522129), (999, 0.00466010)]:
        assert ac[t] == pytest.approx(want, rel=2e-5), t


def test_ddim_timesteps_golden_and_errors():
    np.testing.assert_array_equal(ddim_timesteps(4), [751, 501, 251, 1])
    np.testing.assert_array_equal(ddim_timesteps(4, spacing="trailing"), [999, 749, 499, 249])
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(4, spacing="middle")
    with pytest.raises(ValueError, match="schedule"):
        NoiseSchedule.create("sigmoid")


def test_ddim_projection_identity():
    sched = NoiseSchedule.create("scaled_linear")
    rng = np.random.default_rng(0)
    z, x = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    t = jnp.array([500, 20])
    np.testing.assert_allclose(ddim_project(sched, z, x, t, t), z, atol=1e-12)


@pytest.mark.parametrize("schedule", ["scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("spacing,eta", [("leading", 0.0), ("trailing", 0.7)])
def test_ddim_matches_diffusers(schedule, prediction, spacing, eta):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    beta = {"scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}[schedule]
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type=prediction, timestep_spacing=spacing)
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    sched = NoiseSchedule.create(schedule)
    np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-9)
    # Use diffusers' own float32-derived table so the step itself is compared to 1e-6 in float64.
    sched = NoiseSchedule(ref.alphas_cumprod.numpy(), float(ref.final_alpha_cumprod), schedule)
    ref.set_timesteps(4)
    np.testing.assert_array_equal(ref.timesteps.numpy(), ddim_timesteps(4, spacing=spacing))
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 3, 5))
    for t in ref.timesteps.numpy():
        out, noise = rng.standard_normal(z.shape), rng.standard_normal(z.shape)
        want = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(z), eta=eta,
                        variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
        s = t - 1000 // 4
        got = ddim_step(sched, jnp.asarray(out), jnp.full((2,), t), jnp.full((2,), s), jnp.asarray(z),
                        prediction=prediction, eta=eta, noise=jnp.asarray(noise))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
        z = want


def test_ddim_trajectory_lists_the_states_ddim_sample_visits():
    sched = NoiseSchedule.create("cosine")
    denoise = lambda z, t: jnp.sin(z) + 1e-3 * t[:, None, None]  # any denoiser that depends on z and t
    z_T = jax.random.normal(jax.random.key(0), (2, 3, 4))
    zs, ts = ddim_trajectory(denoise, z_T, sched, 4, prediction="epsilon")
    assert zs.shape == (4, 2, 3, 4)
    np.testing.assert_array_equal(ts, ddim_timesteps(4, spacing="trailing"))
    np.testing.assert_array_equal(np.asarray(zs[0]), np.asarray(z_T))
    prev = ddim_prev_timesteps(ts)
    z = z_T
    for i, (t, s) in enumerate(zip(ts, prev)):
        np.testing.assert_allclose(np.asarray(zs[i]), np.asarray(z), rtol=1e-5, atol=1e-6)
        tb = jnp.full((2,), t)
        z = ddim_step(sched, denoise(z, tb), tb, jnp.full((2,), s), z, prediction="epsilon")
    final = ddim_sample(denoise, z_T, sched, 4, prediction="epsilon", return_x0=False)
    np.testing.assert_allclose(np.asarray(final), np.asarray(z), rtol=1e-5, atol=1e-6)


def test_ddim_sample_of_exact_denoiser_returns_the_data_point():
    # A point mass: the ideal x-predictor returns x0 everywhere, so every DDIM trajectory ends at x0.
    sched = NoiseSchedule.create("cosine")
    x0 = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 4)))
    z_T = jax.random.normal(jax.random.key(0), x0.shape, x0.dtype)
    out = ddim_sample(lambda z, t: x0, z_T, sched, 3, prediction="sample")
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-12)
    out = ddim_sample(lambda z, t: x0, z_T, sched, 3, prediction="sample", eta=1.0, rng=jax.random.key(1),
                      return_x0=False)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=2e-2)
    with pytest.raises(ValueError, match="rng"):
        ddim_sample(lambda z, t: x0, z_T, sched, 3, prediction="sample", eta=1.0)
