"""Shared helpers for tests on tiny decoder LMs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import DecoderLM, LMConfig

FAST = {"xla_backend_optimization_level": 0}  # tiny programs: LLVM optimisation only costs compile time
TINY = LMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def random_params(model: DecoderLM, std: float = 0.2, seed: int = 0) -> dict:
    """Parameters with ``normal(0, std)`` weights and ``1 + normal(0, std)`` norm scales. A std of 0.2-0.3 gives O(1)
    logits, so a wrong mask or a dropped token changes them visibly (the default init's 0.02 would make every
    comparison trivially tight)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + std * rng.standard_normal(s.shape),
                                    s.dtype),
        shapes,
    )


def tiny_model(cfg: LMConfig = TINY, std: float = 0.2) -> tuple[DecoderLM, dict]:
    model = DecoderLM(cfg)
    return model, random_params(model, std)


@jax.jit(static_argnums=0, compiler_options=FAST)
def forward_cache(model, params, tokens, cache, mask):
    """``(logits, cache)`` of a cached forward pass (prefill or decode step), compiled for tiny programs."""
    out = model.forward(params, tokens, cache=cache, attention_mask=mask)
    return out.logits, out.cache


@jax.jit(static_argnums=0, compiler_options=FAST)
def forward(model, params, tokens):
    """Cache-free logits, compiled for tiny programs."""
    return model.apply(params, tokens)
