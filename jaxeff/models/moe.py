"""Mixtral sparse mixture-of-experts feed-forward, routed through the ``router`` hook.

Two implementations of the same function:
  * ``ragged`` (default): sort the (token, slot) assignments by expert and run three grouped matmuls
    (``jax.lax.ragged_dot``); cost grows with the number of routed assignments, not with the number of experts.
    Assignments to ids ``>= num_experts`` (null experts, dropped tokens) sort last, fall outside every group and
    cost nothing.
  * ``dense``: every expert on every token, combined with a ``[N, E]`` weight matrix. Exact and simple; for
    small expert counts and for checking the ragged path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.models.hooks import LayerContext, RouterOutput


def load_balancing_loss(route: RouterOutput, valid: jax.Array, num_experts: int) -> jax.Array:
    """Switch/Mixtral auxiliary loss ``E * sum_e f_e * P_e`` over the valid tokens.

    f_e: fraction of (token, slot) assignments that go to expert e (summed over the k slots, as transformers
    does); P_e: mean router probability of e. ``valid``: ``[N]`` bool.
    """
    w = valid.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    counts = jax.nn.one_hot(route.experts, route.probs.shape[-1], dtype=jnp.float32)  # [N, k, E]
    f = jnp.sum(counts * w[:, None, None], axis=(0, 1)) / denom
    p = jnp.sum(route.probs * w[:, None], axis=0) / denom
    return num_experts * jnp.sum(f * p)


def _experts_dense(x, route: RouterOutput, gate, up, down):
    e = gate.shape[0]
    dt = x.dtype
    combine = jnp.sum(jax.nn.one_hot(route.experts, e, dtype=jnp.float32) * route.weights[..., None], axis=1)
    h = jax.nn.silu(jnp.einsum("nd,edi->nei", x, gate.astype(dt))) * jnp.einsum("nd,edi->nei", x, up.astype(dt))
    y = jnp.einsum("nei,eid->ned", h, down.astype(dt))
    return jnp.einsum("ne,ned->nd", combine.astype(dt), y)


def _experts_ragged(x, route: RouterOutput, gate, up, down):
    n, k = route.experts.shape
    e = gate.shape[0]
    dt = x.dtype
    flat_e = route.experts.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    token_of = (jnp.arange(n * k, dtype=jnp.int32) // k)[order]
    xs = x[token_of]
    group_sizes = jnp.sum(jax.nn.one_hot(flat_e, e, dtype=jnp.int32), axis=0)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate.astype(dt), group_sizes)) * jax.lax.ragged_dot(
        xs, up.astype(dt), group_sizes
    )
    ys = jax.lax.ragged_dot(h, down.astype(dt), group_sizes)
    # Rows past sum(group_sizes) (ids >= E) belong to no group; zero them explicitly.
    in_group = jnp.arange(n * k) < jnp.sum(group_sizes)
    ys = jnp.where(in_group[:, None], ys, 0)
    y = jnp.zeros_like(ys).at[order].set(ys)
    return jnp.sum(y.reshape(n, k, -1) * route.weights[..., None].astype(dt), axis=1)


def moe_ffn(x: jax.Array, p: dict, ctx: LayerContext, router) -> jax.Array:
    """x: ``[B, T, d]``; p: ``{"router": {"kernel": [d, E]}, "gate"|"up": {"kernel": [E, d, I]},
    "down": {"kernel": [E, I, d]}}``. Records ``moe_aux_loss`` and ``moe_expert_load`` ``[E]`` in ``ctx``."""
    b, t, d = x.shape
    cfg = ctx.config
    flat = x.reshape(b * t, d)
    route = router(flat, p["router"]["kernel"], ctx)
    valid = ctx.token_valid.reshape(-1)
    ctx.record("moe_aux_loss", load_balancing_loss(route, valid, cfg.num_experts))
    load = jnp.sum(jax.nn.one_hot(route.experts, cfg.num_experts, dtype=jnp.float32) * valid[:, None, None], (0, 1))
    ctx.record("moe_expert_load", load)
    impl = _experts_ragged if cfg.moe_impl == "ragged" else _experts_dense
    y = impl(flat, route, p["gate"]["kernel"], p["up"]["kernel"], p["down"]["kernel"])
    return y.reshape(b, t, d)
