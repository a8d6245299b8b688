"""Train state, its shardings, and the jitted train/eval steps.

The train state is a plain dict::

    {"params": <model params>, "opt_state": <optax state>, "step": int32 [], "rng": uint32 key data [2]}

``step`` counts optimizer updates done; the per-step model RNG is ``fold_in(rng, step)`` (used only by stochastic
methods), so a resumed run draws the same randomness. Shardings follow the logical-axis rules: parameters by
``model.param_axes()``, optimizer moments like their parameters, scalars replicated.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxeff import sharding as shd
from jaxeff.models.lm import DecoderLM
from jaxeff.training.loss import next_token_loss, nll_sum


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def opt_state_shardings(abstract_opt_state, abstract_params, param_sh, mesh: Mesh):
    """Optimizer-state shardings: every leaf that mirrors a parameter (Adam's ``mu``/``nu``: its key path ends
    with that parameter's path and it has the parameter's shape) gets that parameter's sharding; everything else
    (step counts, masked-out entries) is replicated. Works for any optax state layout (chains, ``multi_transform``
    with frozen parameters)."""
    flat_sh = jax.tree_util.tree_flatten_with_path(param_sh)[0]
    flat_p = jax.tree.leaves(abstract_params)
    by_path = {_path_keys(path): (sh, tuple(p.shape)) for (path, sh), p in zip(flat_sh, flat_p)}
    depth = max((len(k) for k in by_path), default=0)

    def pick(path, leaf):
        keys = _path_keys(path)
        for n in range(min(depth, len(keys)), 0, -1):
            hit = by_path.get(keys[-n:])
            if hit is not None and hit[1] == tuple(getattr(leaf, "shape", ())):
                return hit[0]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def abstract_state(model: DecoderLM, tx: optax.GradientTransformation) -> dict:
    """``jax.ShapeDtypeStruct`` pytree of the train state (no sharding)."""

    def make(rng):
        params = model.init(rng)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(rng)}

    return jax.eval_shape(make, jax.random.key(0))


def state_shardings(model: DecoderLM, tx: optax.GradientTransformation, mesh: Mesh, rules=shd.DEFAULT_RULES):
    """NamedSharding pytree matching :func:`abstract_state`."""
    abstract = abstract_state(model, tx)
    param_sh = shd.tree_shardings(model.param_axes(), abstract["params"], mesh, rules)
    return {
        "params": param_sh,
        "opt_state": opt_state_shardings(abstract["opt_state"], abstract["params"], param_sh, mesh),
        "step": replicated(mesh),
        "rng": replicated(mesh),
    }


def with_shardings(abstract, shardings):
    """Abstract arrays carrying shardings: the restore target Orbax needs (and ``jit`` accepts)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_state(model: DecoderLM, tx: optax.GradientTransformation, rng: jax.Array, shardings,
               params: Optional[dict] = None) -> dict:
    """A sharded train state: random parameters from ``rng``, or the given (pretrained) ``params``. Everything is
    created directly in its sharding (``jit`` with ``out_shardings``): no device ever holds the whole state."""
    if params is None:
        def make(key):
            p = model.init(key)
            return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32),
                    "rng": jax.random.key_data(key)}

        return jax.jit(make, out_shardings=shardings)(rng)

    params = jax.device_put(params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    rest = jax.jit(lambda key: (jnp.zeros((), jnp.int32), jax.random.key_data(key)),
                   out_shardings=(shardings["step"], shardings["rng"]))(rng)
    return {"params": params, "opt_state": opt_state, "step": rest[0], "rng": rest[1]}


# ---- steps ----------------------------------------------------------------------------------------------------------


def trainable_mask(params: dict, trainable: str = "all") -> dict:
    """``True`` for the leaves the optimizer trains: every leaf (``"all"``) or only ``params["methods"]``
    (``"methods"``: the base model frozen)."""
    if trainable == "all":
        return jax.tree.map(lambda _: True, params)
    if trainable == "methods":
        return {k: jax.tree.map(lambda _, k=k: k == "methods", v) for k, v in params.items()}
    raise ValueError(f"trainable: expected 'all' or 'methods', got {trainable!r}")


def _freeze(params: dict, mask: dict) -> dict:
    """Frozen leaves behind ``stop_gradient``: their gradient is a constant zero, so XLA drops the weight-gradient
    computations (activation gradients still flow through them to earlier trainable parameters)."""
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)


def make_train_step(model: DecoderLM, tx: optax.GradientTransformation, grad_accum: int = 1,
                    trainable: str = "all") -> Callable:
    """The pure train step ``(state, windows [B, T + 1]) -> (state, metrics)``.

    With ``grad_accum = A > 1`` the batch is split into ``A`` micro-batches of ``B / A`` sequences and their
    gradients are summed in a ``lax.scan`` (one compiled micro-step, activations of one micro-batch alive at a
    time). Micro-batch ``a`` takes rows ``a, a + A, a + 2A, ...``: a strided split keeps each device's rows on that
    device under a data-parallel sharding of the batch axis, where a contiguous split would move rows between devices.
    Every micro-batch has the same token count, so the mean of the micro-batch means is the batch mean.

    ``trainable="methods"`` freezes the base model (see :func:`trainable_mask`; pair it with an optimizer from
    ``make_optimizer(..., trainable="methods")``).

    ``metrics``: ``loss`` (the mean next-token NLL plus any aux loss), ``nll``, ``grad_norm`` (before clipping),
    and the applied methods' metrics (``jaxeff.training.loss.method_losses``).
    """

    def loss_and_grad(params, windows, rng):
        mask = trainable_mask(params, trainable)
        (loss, m), grads = jax.value_and_grad(
            lambda p: next_token_loss(model, _freeze(p, mask), windows, rng), has_aux=True
        )(params)
        return loss, m, grads

    def step(state, windows):
        params = state["params"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        windows = shd.constrain(windows, ("batch", "length"))
        if grad_accum == 1:
            loss, metrics, grads = loss_and_grad(params, windows, rng)
        else:
            b, t1 = windows.shape
            micro = windows.reshape(b // grad_accum, grad_accum, t1).transpose(1, 0, 2)
            micro = shd.constrain(micro, (None, "batch", "length"))
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            abstract_metrics = jax.eval_shape(lambda: loss_and_grad(params, micro[0], rng)[1])
            zero_metrics = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), abstract_metrics)

            def body(carry, xs):
                g_acc, l_acc, m_acc = carry
                mb, a = xs
                loss, m, g = loss_and_grad(params, mb, jax.random.fold_in(rng, a))
                g_acc = jax.tree.map(lambda acc, gi: acc + gi.astype(jnp.float32), g_acc, g)
                m_acc = jax.tree.map(lambda acc, mi: acc + mi.astype(jnp.float32), m_acc, m)
                return (g_acc, l_acc + loss, m_acc), None

            init = (zeros, jnp.zeros((), jnp.float32), zero_metrics)
            (gsum, lsum, msum), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
            grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), gsum, params)
            loss = lsum / grad_accum
            metrics = jax.tree.map(lambda x: x / grad_accum, msum)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, {"loss": loss, **metrics, "grad_norm": grad_norm}

    return step


def jit_train_step(model: DecoderLM, tx: optax.GradientTransformation, mesh: Mesh, state_sh, batch_sh,
                   grad_accum: int = 1, rules=shd.DEFAULT_RULES, trainable: str = "all"):
    """``jax.jit`` of :func:`make_train_step` with in/out shardings; the input state is donated (updated in
    place). The model is traced with ``mesh`` active, so its activation constraints shard over it."""
    step = make_train_step(model, tx, grad_accum, trainable)

    def traced(state, windows):
        with shd.activate(mesh, rules):
            return step(state, windows)

    rep = replicated(mesh)
    return jax.jit(
        traced, in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, rep), donate_argnums=(0,),
    )


def jit_eval_step(model: DecoderLM, mesh: Mesh, param_sh, batch_sh, rules=shd.DEFAULT_RULES):
    """``(params, windows [B, T + 1]) -> (nll_sum, token_count, method metrics)``, jitted with shardings (nothing
    donated)."""

    def traced(params, windows):
        with shd.activate(mesh, rules):
            windows = shd.constrain(windows, ("batch", "length"))
            return nll_sum(model, params, windows)

    rep = replicated(mesh)
    return jax.jit(traced, in_shardings=(param_sh, batch_sh), out_shardings=rep)


def batch_sharding(mesh: Mesh, batch_size: int, seq_len: int, rules=shd.DEFAULT_RULES) -> NamedSharding:
    """The sharding ``shard_host_batch`` gives a ``[batch_size, seq_len + 1]`` window batch."""
    return shd.data_sharding(mesh, 2, rules, (batch_size, seq_len + 1))
