"""Consistency-distillation losses on toy denoisers: the spec's oracles (point-mass data, the z/x-space identity,
marginal-preserving η-DDIM, the teacher-trajectory states)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.diffusion import NoiseSchedule, ddim_step, mcm_boundaries
from jaxeff.methods.consistency import (
    consistency_distillation_loss,
    distillation_grid,
    projection_gain,
    segment_timesteps,
    teacher_solve,
    trajectory_states,
)


@pytest.fixture(autouse=True)
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _exact(sched, x0):
    """ε-prediction of point-mass data ``x0``: its x̂ is x0 everywhere."""
    def fn(z, t):
        a, s = sched.alpha_sigma(t)
        return (z - a[:, None] * x0) / s[:, None]
    return fn


def _toy(w):
    return lambda z, t: jnp.tanh(z @ w) * (1 + t[:, None].astype(z.dtype) / 2000)


def test_distillation_grid():
    g = distillation_grid(20)
    assert g[0] == 19 and g[-1] == 999 and len(g) == 50
    with pytest.raises(ValueError, match="skip"):
        distillation_grid(0)


@pytest.mark.parametrize("S", [1, 2, 4])
@pytest.mark.parametrize("space", ["z", "x"])
def test_point_mass_data_gives_zero_loss(S, space):
    sched = NoiseSchedule.create("scaled_linear", set_alpha_to_one=True)
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal(6))
    t = jnp.asarray(distillation_grid(20)[rng.integers(0, 50, 16)], jnp.int32)
    z_t = sched.add_noise(jnp.broadcast_to(x0, (16, 6)), jnp.asarray(rng.standard_normal((16, 6))), t)
    f = _exact(sched, x0)
    loss, aux = consistency_distillation_loss(f, f, f, sched, z_t, t, boundaries=mcm_boundaries(S), skip=20,
                                              prediction="epsilon", space=space)
    assert float(loss) < 1e-20
    assert np.all(np.asarray(aux["s"]) >= np.asarray(aux["tau"]))  # the teacher never crosses a boundary
    # a wrong student is penalised
    loss, _ = consistency_distillation_loss(lambda z, t: 0.9 * f(z, t), f, f, sched, z_t, t,
                                            boundaries=mcm_boundaries(S), skip=20, prediction="epsilon",
                                            space=space)
    assert float(loss) > 1e-6


def test_z_and_x_space_losses_agree():
    sched = NoiseSchedule.create("cosine")
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((6, 6)) * 0.4)
    z_t = jnp.asarray(rng.standard_normal((12, 6)))
    t = jnp.asarray(distillation_grid(20)[rng.integers(0, 50, 12)], jnp.int32)
    kw = dict(boundaries=mcm_boundaries(4), skip=20, prediction="v_prediction")
    student, target, teacher = _toy(w), _toy(w * 1.1), _toy(w * 0.9)
    lz, az = consistency_distillation_loss(student, target, teacher, sched, z_t, t, space="z", **kw)
    lx, ax = consistency_distillation_loss(student, target, teacher, sched, z_t, t, space="x", **kw)
    np.testing.assert_allclose(np.asarray(az["per_sample"]), np.asarray(ax["per_sample"]), rtol=1e-9)
    assert float(lz) > 0
    c = projection_gain(sched, t, az["tau"])
    assert np.all(np.asarray(c) > 0)


def test_lcm_case_is_the_plain_consistency_loss():
    """S = 1 with the clean end at ᾱ = 1: the z-space loss is d(f_θ(z_t, t), f_θ⁻(z_s, s)) with LCM scalings."""
    sched = NoiseSchedule.create("scaled_linear", set_alpha_to_one=True)
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((6, 6)) * 0.4)
    z_t = jnp.asarray(rng.standard_normal((8, 6)))
    t = jnp.asarray([999, 519, 259, 119, 79, 39, 19, 999], jnp.int32)
    student, teacher = _toy(w), _toy(w * 0.8)
    loss, aux = consistency_distillation_loss(student, student, teacher, sched, z_t, t,
                                              boundaries=mcm_boundaries(1), skip=20, prediction="epsilon",
                                              boundary_scalings=True)
    from jaxeff.diffusion.consistency import consistency_output

    s = jnp.maximum(t - 20, -1)
    z_s = ddim_step(sched, teacher(z_t, t), t, s, z_t, prediction="epsilon")
    s_eval = jnp.maximum(s, 0)
    want_target = consistency_output(sched, student(z_s, s_eval), z_s, s_eval, prediction="epsilon")
    want = consistency_output(sched, student(z_t, t), z_t, t, prediction="epsilon")
    per = jnp.mean(jnp.square(want - want_target), axis=1)
    np.testing.assert_allclose(np.asarray(aux["per_sample"]), np.asarray(per), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_eta_ddim_preserves_point_mass_marginals(eta):
    sched = NoiseSchedule.create("scaled_linear")
    n, x0 = 40000, 0.7
    t, s = 600, 380
    a_t, s_t = (float(v) for v in sched.alpha_sigma(t))
    a_s, s_s = (float(v) for v in sched.alpha_sigma(s))
    z = a_t * x0 + s_t * jax.random.normal(jax.random.key(0), (n, 1), jnp.float64)
    f = _exact(sched, jnp.asarray([x0]))
    z_s = teacher_solve(f, sched, z, jnp.full((n,), t), jnp.full((n,), s), prediction="epsilon", eta=eta,
                        sub_steps=3, rng=jax.random.key(1))
    z_s = np.asarray(z_s)[:, 0]
    assert z_s.mean() == pytest.approx(a_s * x0, abs=4 * s_s / np.sqrt(n))
    assert z_s.std() == pytest.approx(s_s, rel=0.02)


def test_teacher_sub_steps_and_errors():
    sched = NoiseSchedule.create("scaled_linear")
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((4, 4)) * 0.5)
    z = jnp.asarray(rng.standard_normal((3, 4)))
    t, s = jnp.full((3,), 700), jnp.full((3,), 640)
    one = teacher_solve(_toy(w), sched, z, t, s, prediction="epsilon")
    np.testing.assert_allclose(np.asarray(one), np.asarray(ddim_step(sched, _toy(w)(z, t), t, s, z)), atol=1e-12)
    three = teacher_solve(_toy(w), sched, z, t, s, prediction="epsilon", sub_steps=3)
    manual = z
    for a, b in ((700, 680), (680, 660), (660, 640)):
        ta, tb = jnp.full((3,), a), jnp.full((3,), b)
        manual = ddim_step(sched, _toy(w)(manual, ta), ta, tb, manual)
    np.testing.assert_allclose(np.asarray(three), np.asarray(manual), atol=1e-12)
    with pytest.raises(ValueError, match="rng"):
        teacher_solve(_toy(w), sched, z, t, s, prediction="epsilon", eta=0.5)
    with pytest.raises(ValueError, match="sub_steps"):
        teacher_solve(_toy(w), sched, z, t, s, prediction="epsilon", sub_steps=0)
    with pytest.raises(ValueError, match="space"):
        consistency_distillation_loss(_toy(w), _toy(w), _toy(w), sched, z, t, boundaries=mcm_boundaries(2), skip=20,
                                      prediction="epsilon", space="w")


def test_trajectory_states():
    sched = NoiseSchedule.create("scaled_linear")
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((4, 4)) * 0.5)
    teacher = _toy(w)
    z_T = jnp.asarray(rng.standard_normal((2, 4)))
    # the last segment's state (s = M - 1) is reached in exactly one teacher step
    t_m = jnp.asarray([870, 880])
    got = trajectory_states(teacher, sched, z_T, t_m, jnp.asarray([1, 1]), 8, prediction="epsilon")
    T = jnp.full((2,), 999)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ddim_step(sched, teacher(z_T, T), T, t_m, z_T)),
                               atol=1e-12)
    # two equal steps for another sample, masked iterations leave the rest alone
    got = trajectory_states(teacher, sched, z_T, jnp.asarray([599, 599]), jnp.asarray([2, 1]), 8,
                            prediction="epsilon")
    mid = jnp.full((2,), 799)
    two = ddim_step(sched, teacher(z_T, T), T, mid, z_T)
    two = ddim_step(sched, teacher(two, mid), mid, jnp.full((2,), 599), two)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(two[0]), atol=1e-12)
    one = ddim_step(sched, teacher(z_T, T), T, jnp.full((2,), 599), z_T)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(one[1]), atol=1e-12)


def test_segment_timesteps_stay_in_their_segment():
    b = mcm_boundaries(4)  # [999, 749, 499, 249, -1]
    g = distillation_grid(20)
    seg = jnp.asarray([0, 1, 2, 3] * 25)
    u = jnp.asarray(np.random.default_rng(5).random(100))
    t = np.asarray(segment_timesteps(b, seg, u, g))
    for sg, tt in zip(np.asarray(seg), t):
        assert b[sg + 1] < tt <= b[sg] and tt in set(g)
