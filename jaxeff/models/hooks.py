"""Hook points of the decoder, and the protocol by which efficiency methods wrap them.

The decoder calls four hooks in every layer. The defaults below *are* the base model: a method replaces a hook
with a function that usually calls the hook it wraps (``Hooks`` is immutable; ``dataclasses.replace`` builds the
wrapped set). Methods compose by wrapping in turn.

=============  =========================================================  ==========================================
hook           signature                                                  default
=============  =========================================================  ==========================================
kv_update      ``(kv: LayerKV, k, v, ctx) -> LayerKV``                    append the new tokens after the kept ones
attention      ``(q, kv: LayerKV, ctx) -> out [B, T, Hq, D]``             dense causal GQA attention (``attention/``)
kv_compress    ``(kv: LayerKV, q, ctx) -> LayerKV``                       keep everything (eviction policies go here)
router         ``(x [N, d], router_kernel [d, E], ctx) -> RouterOutput``  softmax, top-k, renormalise (Mixtral)
=============  =========================================================  ==========================================

``kv_update`` and ``kv_compress`` run only when a cache is passed; without one, ``attention`` sees the current
tokens wrapped as a ``LayerKV`` (``LayerKV.from_sequence``).

A :class:`Method` owns parameters in ``params["methods"][method.name]``; the entries under its ``"layers"`` key
carry a leading layer axis and are handed to the hooks one layer at a time as ``ctx.method_params[name]``
(everything else arrives whole). Base parameters are never renamed, so a Hugging Face checkpoint loads unchanged
and a method's parameters save and load on their own.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from jaxeff.attention.dense import dense_attention
from jaxeff.cache import LayerKV, append_kv


@dataclasses.dataclass
class LayerContext:
    """What a hook may read about the layer it runs in. Created inside the traced layer function.

    Attributes:
      config: the model's ``LMConfig``.
      layer: the layer index (a traced int32 scalar under ``scan_layers``).
      hidden: ``[B, T, d]`` the attention block's normed input (what Attention-Gate reads).
      positions: ``[B, T]`` absolute positions of the current tokens.
      token_valid: ``[B, T]`` bool, False for padding.
      mode: ``"train"`` (no cache), ``"prefill"`` (cache, T > 1) or ``"decode"`` (cache, T == 1).
      method_params: ``{method name: this layer's parameters}``.
      rng: a PRNG key for stochastic methods, or None.
      aux: per-layer outputs collected for the caller (losses, statistics); use :meth:`record`.
      kv_aligned: the ``kv`` that ``attention`` receives holds the current tokens in slot order with increasing
        positions (cache-free forward, or the first prefill of an empty cache): causal attention may skip the
        slots after each query (see ``dense_attention``'s ``causal_aligned``).
      scratch: values one hook leaves for a later hook of the same layer (e.g. a gate computed in ``attention``
        and read again in ``kv_compress``); never returned.
    """

    config: Any
    layer: Any
    hidden: jax.Array
    positions: jax.Array
    token_valid: jax.Array
    mode: str
    method_params: dict
    rng: Any = None
    aux: dict = dataclasses.field(default_factory=dict)
    kv_aligned: bool = False
    scratch: dict = dataclasses.field(default_factory=dict)

    def record(self, name: str, value) -> None:
        """Adds a per-layer auxiliary output; ``LMOutput.aux[name]`` stacks it over layers."""
        self.aux[name] = value


class RouterOutput(NamedTuple):
    """weights ``[N, k]`` (the combination weights), experts ``[N, k]`` int32 (ids ``>= num_experts`` mean "no
    expert": they contribute nothing and cost nothing), probs ``[N, E_total]`` float32 router probabilities."""

    weights: jax.Array
    experts: jax.Array
    probs: jax.Array


def default_kv_update(kv: LayerKV, k: jax.Array, v: jax.Array, ctx: LayerContext) -> LayerKV:
    return append_kv(kv, k, v, ctx.positions, ctx.token_valid)


def default_attention(q: jax.Array, kv: LayerKV, ctx: LayerContext) -> jax.Array:
    """Dense attention; a decode step on TPU/GPU runs the ragged decode kernel instead (see
    :func:`decode_kernel_enabled`), which reads only each row's occupied K/V blocks."""
    if ctx.mode == "decode" and decode_kernel_enabled():
        out = _kernel_decode_attention(q, kv, ctx)
        if out is not None:
            return out
    return dense_attention(q, kv, ctx.positions, sliding_window=ctx.config.sliding_window,
                           causal_aligned=ctx.kv_aligned)


KERNELS_ENV = "JAXEFF_KV_KERNELS"


def decode_kernel_enabled() -> bool:
    """Whether decode steps use the Pallas ragged decode-attention kernel (``pallas_kernels.kv_eviction``): on TPU
    and GPU by default; ``JAXEFF_KV_KERNELS=off`` keeps the XLA path everywhere. Read at trace time."""
    if os.environ.get(KERNELS_ENV, "auto").lower() in ("0", "off", "false", "none"):
        return False
    return jax.default_backend() in ("tpu", "gpu", "cuda", "rocm")


def _kernel_decode_attention(q: jax.Array, kv: LayerKV, ctx: LayerContext):
    """``[B, 1, Hq, D]`` from the kernel, or None when the cache's shapes do not meet the kernel's layout rules
    (e.g. head dims Triton cannot tile), in which case the caller falls back to dense attention."""
    from pallas_kernels.kv_eviction import ragged_decode_attention

    try:
        out = ragged_decode_attention(q[:, 0], kv.k, kv.v, kv.pos, kv.length, ctx.positions[:, 0],
                                      sliding_window=ctx.config.sliding_window)
    except ValueError:
        return None
    return out[:, None]


def default_kv_compress(kv: LayerKV, q: jax.Array, ctx: LayerContext) -> LayerKV:
    return kv


def topk_router(x: jax.Array, router_kernel: jax.Array, ctx: LayerContext) -> RouterOutput:
    """Mixtral routing: softmax over experts in float32, top-k, renormalise the k weights to sum to one."""
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), router_kernel.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, ctx.config.num_experts_per_tok)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return RouterOutput(weights=weights, experts=experts.astype(jnp.int32), probs=probs)


@dataclasses.dataclass(frozen=True)
class Hooks:
    kv_update: Callable = default_kv_update
    attention: Callable = default_attention
    kv_compress: Callable = default_kv_compress
    router: Callable = topk_router

    def replace(self, **changes) -> "Hooks":
        return dataclasses.replace(self, **changes)


class Method(Protocol):
    """An efficiency method applied to a decoder (``DecoderLM.with_methods``).

    ``name`` keys its parameters in ``params["methods"]``; ``init`` creates them (a dict; put per-layer entries,
    with a leading ``num_layers`` axis, under ``"layers"``); ``wrap`` returns the hooks with the method's
    functions in place. Must be hashable (a frozen dataclass): it is part of the model's static identity.
    """

    name: str

    def init(self, rng: jax.Array, config) -> dict: ...

    def wrap(self, hooks: Hooks) -> Hooks: ...
