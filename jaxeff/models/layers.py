"""Building blocks of the decoder: RMSNorm, rotary position embeddings, dense projections."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.models.config import LMConfig, RopeScaling


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in ``x.dtype`` (the Llama convention: the scale multiplies after
    the cast back). ``x``: ``[..., d]``, ``scale``: ``[d]``."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * x32.astype(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with Llama 3.1 / linear scaling applied."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions: jax.Array, cfg: LMConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[B, T, head_dim]`` (float32) for integer ``positions`` ``[B, T]``."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout). ``x``: ``[B, T, H, D]``; ``cos``/``sin``: ``[B, T, D]``."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(dtype)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, spec: str) -> jax.Array:
    """``einsum(spec, x, kernel) + bias`` in ``x.dtype``."""
    y = jnp.einsum(spec, x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """``down(silu(x @ gate) * (x @ up))`` for ``x`` ``[..., d]``, kernels ``[d, I]``, ``[d, I]``, ``[I, d]``."""
    dt = x.dtype
    return (jax.nn.silu(x @ gate.astype(dt)) * (x @ up.astype(dt))) @ down.astype(dt)
