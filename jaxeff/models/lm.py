"""The decoder LM (Llama 2/3, Mistral, Qwen2, SmolLM2, Mixtral), pure-functional.

``DecoderLM`` is a frozen, hashable description (config + methods); parameters and caches are plain pytrees::

    model = DecoderLM(LMConfig(...))
    params = model.init(jax.random.key(0))                 # nested dict, layer weights stacked [L, ...]
    logits = model.apply(params, tokens)                   # tokens int32 [B, T] -> logits [B, T, V] float32
    cache = model.init_cache(batch=B, capacity=S)
    logits, cache = model.apply(params, prompt, cache=cache, attention_mask=mask)   # prefill / decode

Parameter layout (``L`` layers, ``d`` hidden, ``H``/``K`` query/KV heads of size ``D``, ``I`` FFN width, ``E``
experts)::

    embed/embedding [V, d]            layers/attn_norm/scale [L, d]       layers/mlp_norm/scale [L, d]
    layers/attn/{q,k,v}/kernel [L, d, H|K, D]  (+ bias [L, H|K, D] when qkv_bias)
    layers/attn/o/kernel [L, H, D, d]
    layers/mlp/{gate,up}/kernel [L, d, I]      layers/mlp/down/kernel [L, I, d]          (dense)
    layers/moe/router/kernel [L, d, E]         layers/moe/{gate,up}/kernel [L, E, d, I]
    layers/moe/down/kernel [L, E, I, d]
    final_norm/scale [d]              lm_head/kernel [d, V]  (absent when tie_embeddings)
    methods/<name>/...                (parameters of applied methods; see ``jaxeff.models.hooks``)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import sharding as shd
from jaxeff.cache import KVCache, LayerKV
from jaxeff.models.config import LMConfig
from jaxeff.models.hooks import Hooks, LayerContext
from jaxeff.models.layers import apply_rope, dense, rms_norm, rope_cos_sin, swiglu
from jaxeff.models.moe import moe_ffn

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class LMOutput(NamedTuple):
    """logits ``[B, T, V]`` float32 (``[B, 1, V]`` with ``logits_at``); cache (None without one); aux: per-layer
    outputs recorded by hooks, stacked ``[L, ...]``; hidden: final normed hidden states when requested."""

    logits: jax.Array
    cache: Optional[KVCache]
    aux: dict
    hidden: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple
    axes: tuple
    init: str  # "normal" | "ones" | "zeros"


def param_specs(cfg: LMConfig) -> dict:
    """Shapes, logical axes and initialisers of every base parameter."""
    L, d, V, D = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.head_size
    H, K, I, E = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.num_experts

    def proj(heads, head_axis):
        out = {"kernel": ParamSpec((L, d, heads, D), ("layers", "embed", head_axis, "head_dim"), "normal")}
        if cfg.qkv_bias:
            out["bias"] = ParamSpec((L, heads, D), ("layers", head_axis, "head_dim"), "zeros")
        return out

    attn = {"q": proj(H, "q_heads"), "k": proj(K, "kv_heads"), "v": proj(K, "kv_heads"),
            "o": {"kernel": ParamSpec((L, H, D, d), ("layers", "q_heads", "head_dim", "embed"), "normal")}}
    if cfg.o_bias:
        attn["o"]["bias"] = ParamSpec((L, d), ("layers", "embed"), "zeros")
    layers: dict[str, Any] = {
        "attn_norm": {"scale": ParamSpec((L, d), ("layers", "norm"), "ones")},
        "attn": attn,
        "mlp_norm": {"scale": ParamSpec((L, d), ("layers", "norm"), "ones")},
    }
    if cfg.is_moe:
        layers["moe"] = {
            "router": {"kernel": ParamSpec((L, d, E), ("layers", "embed", "router"), "normal")},
            "gate": {"kernel": ParamSpec((L, E, d, I), ("layers", "experts", "embed", "mlp"), "normal")},
            "up": {"kernel": ParamSpec((L, E, d, I), ("layers", "experts", "embed", "mlp"), "normal")},
            "down": {"kernel": ParamSpec((L, E, I, d), ("layers", "experts", "mlp", "embed"), "normal")},
        }
    else:
        mlp = {
            "gate": {"kernel": ParamSpec((L, d, I), ("layers", "embed", "mlp"), "normal")},
            "up": {"kernel": ParamSpec((L, d, I), ("layers", "embed", "mlp"), "normal")},
            "down": {"kernel": ParamSpec((L, I, d), ("layers", "mlp", "embed"), "normal")},
        }
        if cfg.mlp_bias:
            mlp["gate"]["bias"] = ParamSpec((L, I), ("layers", "mlp"), "zeros")
            mlp["up"]["bias"] = ParamSpec((L, I), ("layers", "mlp"), "zeros")
            mlp["down"]["bias"] = ParamSpec((L, d), ("layers", "embed"), "zeros")
        layers["mlp"] = mlp
    specs = {
        "embed": {"embedding": ParamSpec((V, d), ("vocab", "embed"), "normal")},
        "layers": layers,
        "final_norm": {"scale": ParamSpec((d,), ("norm",), "ones")},
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = {"kernel": ParamSpec((d, V), ("embed", "vocab"), "normal")}
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


@dataclasses.dataclass(frozen=True)
class DecoderLM:
    """A decoder-only transformer. Hashable: pass it as a static argument to ``jax.jit``.

    Attributes:
      config: the static architecture (``LMConfig``).
      methods: efficiency methods applied in order (each wraps the hooks; see ``jaxeff.models.hooks``).
      base_hooks: the hooks before any method wraps them (swap the attention implementation here).
    """

    config: LMConfig
    methods: tuple = ()
    base_hooks: Hooks = Hooks()

    # ---- construction --------------------------------------------------------------------------------------

    @property
    def hooks(self) -> Hooks:
        hooks = self.base_hooks
        for m in self.methods:
            hooks = m.wrap(hooks)
        return hooks

    def with_methods(self, *methods) -> "DecoderLM":
        names = [m.name for m in self.methods + tuple(methods)]
        if len(set(names)) != len(names):
            raise ValueError(f"methods must have distinct names, got {names}")
        return dataclasses.replace(self, methods=self.methods + tuple(methods))

    @property
    def dtype(self):
        return _DTYPES[self.config.dtype]

    @property
    def param_dtype(self):
        return _DTYPES[self.config.param_dtype]

    def init(self, rng: jax.Array) -> dict:
        """Random parameters (normal(0, initializer_range) kernels, unit norms, zero biases)."""
        specs = param_specs(self.config)
        leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
        keys = jax.random.split(rng, len(leaves) + 1)
        std = self.config.initializer_range
        pdt = self.param_dtype

        def make(spec: ParamSpec, key):
            if spec.init == "ones":
                return jnp.ones(spec.shape, pdt)
            if spec.init == "zeros":
                return jnp.zeros(spec.shape, pdt)
            return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(pdt)

        params = jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys[:-1])])
        if self.methods:
            mkeys = jax.random.split(keys[-1], len(self.methods))
            params["methods"] = {m.name: m.init(k, self.config) for m, k in zip(self.methods, mkeys)}
        return params

    def param_axes(self) -> dict:
        """Logical axis names, a pytree like ``init``'s output with a tuple of names per leaf."""
        axes = jax.tree.map(lambda s: s.axes, param_specs(self.config), is_leaf=_is_spec)
        if self.methods:
            axes["methods"] = {}
            for m in self.methods:
                if hasattr(m, "param_axes"):
                    axes["methods"][m.name] = m.param_axes(self.config)
                else:  # replicate whatever the method creates
                    shapes = jax.eval_shape(lambda k: m.init(k, self.config), jax.random.key(0))
                    axes["methods"][m.name] = jax.tree.map(lambda s: (None,) * len(s.shape), shapes)
        return axes

    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        cfg = self.config
        return KVCache.create(
            cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_size, dtype or self.dtype
        )

    # ---- forward -------------------------------------------------------------------------------------------

    def apply(self, params: dict, tokens: jax.Array, *, cache: Optional[KVCache] = None, **kwargs):
        """``logits [B, T, V]`` without a cache; ``(logits, cache)`` with one. See :meth:`forward`."""
        out = self.forward(params, tokens, cache=cache, **kwargs)
        return out.logits if cache is None else (out.logits, out.cache)

    __call__ = apply

    def forward(
        self,
        params: dict,
        tokens: jax.Array,
        *,
        cache: Optional[KVCache] = None,
        attention_mask: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
        logits_at: Optional[jax.Array] = None,
        rng: Optional[jax.Array] = None,
        return_hidden: bool = False,
        compute_logits: bool = True,
        fresh_cache: bool = False,
    ) -> LMOutput:
        """The full forward pass.

        Args:
          params: from ``init`` or ``load_pretrained``.
          tokens: int32 ``[B, T]``. Ids outside ``[0, vocab_size)`` raise when concrete and give NaN logits
            under ``jit`` (never a silent wrong embedding).
          cache: a ``KVCache``; the tokens are appended to it (prefill when ``T > 1``, a decode step when 1).
          attention_mask: ``[B, T]`` 1 for real tokens, 0 for right padding.
          positions: ``[B, T]`` absolute positions (default: ``arange(T)``, after ``cache.next_pos`` with a cache).
          logits_at: ``[B]`` int index into ``T``: compute logits only there (``[B, 1, V]``); saves the
            ``T x V`` head matmul in prefill.
          rng: PRNG key for stochastic methods.
          return_hidden: also return the final normed hidden states (``[B, T, d]``).
          compute_logits: False skips the LM head (``logits`` is then None).
          fresh_cache: the caller guarantees ``cache`` is empty (a first prefill, as in ``jaxeff.generate``):
            attention then reads the prompt's own keys/values instead of the whole buffer and, with default
            positions, skips the slots after each query (same result, about half the attention work).
        """
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected int [batch, length], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens: expected an integer dtype, got {tokens.dtype}")
        _check_token_range(tokens, cfg.vocab_size)
        b, t = tokens.shape
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"cache: batch size {cache.batch_size} does not match tokens batch size {b}")
        valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        default_positions = positions is None
        if positions is None:
            start = cache.next_pos[:, None] if cache is not None else 0
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
        mode = "train" if cache is None else ("decode" if t == 1 else "prefill")
        own_kv = cache is None or (fresh_cache and mode == "prefill")  # attention over the current tokens only
        aligned = own_kv and default_positions

        x = _embed(params["embed"]["embedding"], tokens).astype(self.dtype)
        x = shd.constrain(x, ("batch", "length", "embed"))
        cos, sin = rope_cos_sin(positions, cfg)
        method_params = params.get("methods", {})
        layer_mp = {k: v.get("layers", {}) for k, v in method_params.items()}
        global_mp = {k: {kk: vv for kk, vv in v.items() if kk != "layers"} for k, v in method_params.items()}
        hooks = self.hooks
        rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)

        def layer_fn(x, xs):
            lp, mp, lkv, li, lrng = xs
            mparams = {name: {**global_mp[name], **mp.get(name, {})} for name in global_mp}
            return _decoder_layer(cfg, hooks, x, lp, mparams, lkv, li, lrng, positions, valid, cos, sin, mode,
                                  own_kv, aligned)

        if cfg.remat != "none":
            policy = (jax.checkpoint_policies.nothing_saveable if cfg.remat == "full"
                      else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
            layer_fn = jax.checkpoint(layer_fn, policy=policy, prevent_cse=not cfg.scan_layers)

        layer_kvs = cache.layers() if cache is not None else None
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        xs = (params["layers"], layer_mp, layer_kvs, layer_ids, rngs)
        if cfg.scan_layers:
            x, (new_kvs, aux) = jax.lax.scan(layer_fn, x, xs)
        else:
            outs = []
            for i in range(cfg.num_layers):
                x, out = layer_fn(x, jax.tree.map(lambda a: a[i], xs))
                outs.append(out)
            new_kvs, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else (None, {})

        x = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
        hidden = x if return_hidden else None
        if logits_at is not None:
            idx = jnp.asarray(logits_at, jnp.int32).reshape(b, 1, 1)
            x = jnp.take_along_axis(x, jnp.broadcast_to(idx, (b, 1, x.shape[-1])), axis=1)
        logits = self.logits(params, x) if compute_logits else None

        new_cache = None
        if cache is not None:
            next_pos = jnp.maximum(cache.next_pos, jnp.max(jnp.where(valid, positions + 1, 0), axis=-1))
            new_cache = cache.with_layers(new_kvs, next_pos.astype(jnp.int32))
        return LMOutput(logits=logits, cache=new_cache, aux=aux, hidden=hidden)

    def logits(self, params: dict, hidden: jax.Array) -> jax.Array:
        """LM head: ``[..., d] -> [..., V]`` float32."""
        if self.config.tie_embeddings:
            w = params["embed"]["embedding"].astype(hidden.dtype)
            out = jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
        else:
            w = params["lm_head"]["kernel"].astype(hidden.dtype)
            out = jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)
        return shd.constrain(out, ("batch", "length", "vocab"))


def _check_token_range(tokens: jax.Array, vocab: int) -> None:
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        bad = arr[(arr < 0) | (arr >= vocab)]
        raise ValueError(
            f"tokens: ids must be in [0, vocab_size={vocab}), got {bad.size} out-of-range id(s), e.g. {int(bad[0])}"
        )


def _embed(embedding: jax.Array, tokens: jax.Array) -> jax.Array:
    v = embedding.shape[0]
    ids = jnp.where(tokens < 0, v, tokens)  # negative ids must not wrap around
    return jnp.take(embedding, ids, axis=0, mode="fill", fill_value=jnp.nan)


def _decoder_layer(cfg, hooks, x, lp, mparams, lkv, layer_id, rng, positions, valid, cos, sin, mode, own_kv,
                   aligned):
    ctx = LayerContext(
        config=cfg, layer=layer_id, hidden=None, positions=positions, token_valid=valid, mode=mode,
        method_params=mparams, rng=rng, kv_aligned=aligned,
    )
    a = lp["attn"]
    h = rms_norm(x, lp["attn_norm"]["scale"], cfg.rms_norm_eps)
    ctx.hidden = h
    q = dense(h, a["q"]["kernel"], a["q"].get("bias"), spec="btd,dhk->bthk")
    k = dense(h, a["k"]["kernel"], a["k"].get("bias"), spec="btd,dhk->bthk")
    v = dense(h, a["v"]["kernel"], a["v"].get("bias"), spec="btd,dhk->bthk")
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    q = shd.constrain(q, ("batch", "length", "q_heads", "head_dim"))
    own = LayerKV.from_sequence(k, v, positions, valid) if own_kv else None  # the current tokens' keys/values
    kv = own if lkv is None else hooks.kv_update(lkv, k, v, ctx)
    attn = hooks.attention(q, own if own_kv else kv, ctx)
    if lkv is not None:
        kv = hooks.kv_compress(kv, q, ctx)
    x = x + dense(attn.astype(x.dtype), a["o"]["kernel"], a["o"].get("bias"), spec="bthk,hkd->btd")
    x = shd.constrain(x, ("batch", "length", "embed"))
    h = rms_norm(x, lp["mlp_norm"]["scale"], cfg.rms_norm_eps)
    if cfg.is_moe:
        y = moe_ffn(h, lp["moe"], ctx, hooks.router)
    else:
        m = lp["mlp"]
        if cfg.mlp_bias:
            g = jax.nn.silu(dense(h, m["gate"]["kernel"], m["gate"]["bias"], spec="btd,di->bti"))
            u = dense(h, m["up"]["kernel"], m["up"]["bias"], spec="btd,di->bti")
            y = dense(g * u, m["down"]["kernel"], m["down"]["bias"], spec="bti,id->btd")
        else:
            y = swiglu(h, m["gate"]["kernel"], m["up"]["kernel"], m["down"]["kernel"])
    x = x + y
    x = shd.constrain(x, ("batch", "length", "embed"))
    return x, (kv if lkv is not None else None, ctx.aux)
