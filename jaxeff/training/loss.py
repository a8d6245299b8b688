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


def method_losses(model: DecoderLM, aux: dict) -> tuple[jax.Array, dict]:
    """``(sum of the applied methods' auxiliary losses, their metrics)`` from a forward pass's ``aux``: every
    method with an ``aux_loss(aux) -> (loss, metrics)`` contributes (Attention-Gate's eviction loss)."""
    total = jnp.zeros((), jnp.float32)
    metrics: dict = {}
    for m in model.methods:
        if hasattr(m, "aux_loss"):
            loss, mm = m.aux_loss(aux)
            total = total + loss
            metrics.update(mm)
    return total, metrics


def next_token_loss(model: DecoderLM, params: dict, windows: jax.Array, rng: Optional[jax.Array] = None):
    """``(loss, metrics)``: the mean token NLL, plus the router load-balancing loss (scaled by
    ``router_aux_loss_coef``, averaged over layers) for MoE models, plus the methods' auxiliary losses
    (:func:`method_losses`). ``windows``: int ``[B, T + 1]``. ``metrics`` holds ``nll`` and the methods' metrics."""
    nll, aux = token_nll(model, params, windows, rng)
    nll_mean = jnp.mean(nll)
    loss = nll_mean
    cfg = model.config
    if cfg.is_moe and cfg.router_aux_loss_coef and "moe_aux_loss" in aux:
        loss = loss + cfg.router_aux_loss_coef * jnp.mean(aux["moe_aux_loss"])
    extra, metrics = method_losses(model, aux)
    return loss + extra, {"nll": nll_mean, **metrics}


def nll_sum(model: DecoderLM, params: dict, windows: jax.Array):
    """``(sum of token NLLs, token count, method metrics)``: float32 scalars for exact perplexity over many
    batches, and the methods' per-batch metrics (e.g. Attention-Gate's keep rate; empty without methods)."""
    nll, aux = token_nll(model, params, windows)
    _, metrics = method_losses(model, aux)
    return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32), metrics
