"""The optimizer: global-norm clipping, then AdamW on a linear-warmup + cosine-decay schedule."""

from __future__ import annotations

import jax
import optax

from jaxeff.training.config import OptimConfig

# Parameters that are not decayed: norm scales and biases (decaying them toward 0 only hurts; the usual choice).
_NO_DECAY_LEAVES = ("scale", "bias")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate at optimizer step ``s`` (0-based): linear from 0 to ``lr`` over ``warmup_steps``, then cosine
    decay to ``lr * min_lr_ratio`` at ``total_steps``. A run no longer than its warmup (a smoke test) warms up over
    ``total_steps - 1`` steps instead."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params) -> dict:
    """``True`` for the leaves weight decay applies to (everything but norm scales and biases)."""

    def keep(path, _):
        last = path[-1]
        return getattr(last, "key", None) not in _NO_DECAY_LEAVES

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, trainable: str = "all",
                   params=None) -> optax.GradientTransformation:
    """Clipping + AdamW over the trainable parameters. ``trainable="methods"``: only ``params["methods"]`` is
    trained; the base model's leaves get zero updates and no optimizer state (``optax.set_to_zero``); ``params``
    (arrays or ``jax.ShapeDtypeStruct``s) then gives the tree structure."""
    inner = _adamw(cfg, total_steps)
    if trainable == "all":
        return inner
    if params is None:
        raise ValueError(f"make_optimizer: params: expected the parameter tree (or its shapes) with "
                         f"trainable={trainable!r}, got None")
    from jaxeff.training.steps import trainable_mask

    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, trainable))
    return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)


def _adamw(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=decay_mask,
        )
    )
    return optax.chain(*parts)
