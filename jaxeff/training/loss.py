"""Next-token cross-entropy of the decoder LM on windows of ``T + 1`` tokens."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from jaxeff.models.lm import DecoderLM


def token_nll(model: DecoderLM, params: dict, windows: jax.Array, rng: Optional[jax.Array] = None):
    """Per-token negative log-likelihood ``[B, T]`` float32 of ``windows[:, 1:]`` given ``windows[:, :-1]``
    (``windows``: int ``[B, T + 1]``), and the model's per-layer aux outputs."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    out = model.forward(params, inputs, rng=rng)
    nll = optax.softmax_cross_entropy_with_integer_labels(out.logits.astype(jnp.float32), targets)
    return nll, out.aux


def next_token_loss(model: DecoderLM, params: dict, windows: jax.Array, rng: Optional[jax.Array] = None):
    """``(loss, metrics)``: the mean token NLL, plus the router load-balancing loss (scaled by
    ``router_aux_loss_coef``, averaged over layers) for MoE models. ``windows``: int ``[B, T + 1]``."""
    nll, aux = token_nll(model, params, windows, rng)
    nll_mean = jnp.mean(nll)
    loss = nll_mean
    cfg = model.config
    if cfg.is_moe and cfg.router_aux_loss_coef and "moe_aux_loss" in aux:
        loss = loss + cfg.router_aux_loss_coef * jnp.mean(aux["moe_aux_loss"])
    return loss, {"nll": nll_mean}


def nll_sum(model: DecoderLM, params: dict, windows: jax.Array):
    """``(sum of token NLLs, token count)`` float32 scalars, for exact perplexity over many batches."""
    nll, _ = token_nll(model, params, windows)
    return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)
