"""Sharding on 8 simulated CPU devices: mesh shapes, logical-axis rules, parameters that really carry the specs the
rules give, and sharded forward / prefill / decode equal to the single-device computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxeff import DecoderLM, KVCache, LMConfig
from jaxeff.config import ConfigError
from jaxeff.sharding import (
    MeshConfig, activate, data_sharding, logical_to_spec, make_mesh, param_shardings, tree_shardings,
)

FAST = {"xla_backend_optimization_level": 0}  # tiny programs: LLVM optimisation only costs compile time
VOCAB, B, T = 64, 8, 8

CONFIGS = {
    "dense": LMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, initializer_range=0.2),
    "moe": LMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, num_experts=4, num_experts_per_tok=2, initializer_range=0.2),
}
# Logical axes of the cache buffers (they follow the parameters' kv_heads sharding).
CACHE_AXES = KVCache(
    k=("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    v=("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    pos=("layers", "batch", "kv_heads", "cache_length"),
    length=("layers", "batch", "kv_heads"),
    next_pos=("batch",),
)


# ---- mesh shapes and rules ----------------------------------------------------------------------------------


def test_mesh_shape_resolves_fill_axis():
    assert MeshConfig(data=-1, tensor=2).shape(8) == (4, 1, 1, 2)  # axes: data, fsdp, expert, tensor
    assert MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 1, 2)
    assert MeshConfig(data=1, fsdp=-1).shape(8) == (1, 8, 1, 1)
    assert MeshConfig().shape(1) == (1, 1, 1, 1)


@pytest.mark.parametrize(
    "cfg, fragments",
    [
        (MeshConfig(data=3), ["'mesh'", "device count 8", "product is 3"]),
        (MeshConfig(data=2, fsdp=2, tensor=4), ["'mesh'", "device count 8", "product is 16"]),
        (MeshConfig(data=-1, fsdp=3), ["'mesh'", "(3)", "device count 8"]),
        (MeshConfig(data=0), ["'mesh.data'", "positive size or -1", "got 0"]),
        (MeshConfig(tensor=-2), ["'mesh.tensor'", "got -2"]),
        (MeshConfig(data=-1, fsdp=-1), ["'mesh'", "at most one axis may be -1"]),
    ],
)
def test_mesh_shape_rejects_bad_sizes(cfg, fragments):
    with pytest.raises(ConfigError) as info:
        cfg.shape(8)
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))


@pytest.fixture(scope="module")
def meshes(devices8):
    return {
        "dp2_fsdp2_tp2": make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices8),
        "dp8": make_mesh(MeshConfig(data=8), devices8),
        "dp2_ep2_tp2": make_mesh(MeshConfig(data=2, expert=2, tensor=2), devices8),
    }


def test_make_mesh_axes(meshes):
    mesh = meshes["dp2_fsdp2_tp2"]
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert mesh.devices.size == 8 and len(set(mesh.devices.flat)) == 8


def test_logical_to_spec_follows_rules(meshes):
    # without a mesh: the rules table alone (trailing replicated dims dropped)
    assert logical_to_spec(("layers", "embed", "q_heads", "head_dim")) == P(None, "fsdp", "tensor")
    # batch takes fsdp first, so an activation's embed dimension is replicated
    assert logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp", "expert"))
    assert logical_to_spec(("norm",)) == P()
    assert logical_to_spec(("batch", "unknown_axis", None)) == P(("data", "fsdp", "expert"))
    # a mesh axis is used by one dimension only: the first one that asks for it
    assert logical_to_spec(("a", "b"), rules=(("a", "tensor"), ("b", "tensor"))) == P("tensor")

    mesh = meshes["dp2_fsdp2_tp2"]
    spec = lambda axes, shape: logical_to_spec(axes, mesh=mesh, shape=shape)  # noqa: E731
    assert spec(("batch", "length"), (8, 5)) == P(("data", "fsdp"))  # expert has size 1: dropped
    assert spec(("batch", "length"), (2, 5)) == P("data")  # fsdp would not divide 2 any more
    assert spec(("batch",), (3,)) == P()  # nothing divides 3
    assert spec(("vocab", "embed"), (63, 32)) == P(None, "fsdp")  # tensor=2 does not divide 63
    assert spec(("vocab", "embed"), (64, 32)) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), mesh=meshes["dp8"], shape=(64, 32)) == P()  # size-1 axes
    assert logical_to_spec(("batch",), mesh=meshes["dp8"], shape=(8,)) == P("data")


# ---- parameters carry the rules' specs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """{name: (model, unsharded params)} with the same key the sharded init uses."""
    out = {}
    for name, cfg in CONFIGS.items():
        model = DecoderLM(cfg)
        out[name] = (model, jax.jit(model.init, compiler_options=FAST)(jax.random.key(0)))
    return out


EXPECTED_SPECS = {
    ("dense", "dp2_fsdp2_tp2"): {
        ("layers", "attn", "q", "kernel"): P(None, "fsdp", "tensor"),  # [L, d, H, D]
        ("layers", "attn", "k", "kernel"): P(None, "fsdp", "tensor"),  # [L, d, K=2, D]
        ("layers", "attn", "o", "kernel"): P(None, "tensor", None, "fsdp"),  # [L, H, D, d]
        ("layers", "mlp", "down", "kernel"): P(None, "tensor", "fsdp"),  # [L, I, d]
        ("embed", "embedding"): P("tensor", "fsdp"),  # [V, d]
        ("lm_head", "kernel"): P("fsdp", "tensor"),  # [d, V]
        ("final_norm", "scale"): P(),
        ("layers", "attn_norm", "scale"): P(),
    },
    ("moe", "dp2_ep2_tp2"): {
        ("layers", "moe", "gate", "kernel"): P(None, "expert", None, "tensor"),  # [L, E, d, I]; fsdp has size 1
        ("layers", "moe", "down", "kernel"): P(None, "expert", "tensor"),  # [L, E, I, d]
        ("layers", "moe", "router", "kernel"): P(),  # [L, d, E]: replicated by rule
        ("layers", "attn", "q", "kernel"): P(None, None, "tensor"),
    },
}


@pytest.mark.parametrize("model_name, mesh_name", list(EXPECTED_SPECS))
def test_sharded_init_places_params_by_the_rules(models, meshes, model_name, mesh_name):
    model, reference = models[model_name]
    mesh = meshes[mesh_name]
    shardings = param_shardings(model, mesh)
    params = jax.jit(model.init, out_shardings=shardings, compiler_options=FAST)(jax.random.key(0))
    for path, spec in EXPECTED_SPECS[model_name, mesh_name].items():
        leaf = params
        for k in path:
            leaf = leaf[k]
        assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
        # the data really is split that way: every shard has the global shape divided by the named axes
        shard_shape = list(leaf.shape)
        for dim, axes in enumerate(spec):
            for ax in (axes,) if isinstance(axes, str) else axes or ():
                shard_shape[dim] //= mesh.shape[ax]
        assert all(s.data.shape == tuple(shard_shape) for s in leaf.addressable_shards), path
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):  # same values as the unsharded init
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- sharded computation equals the single-device one -------------------------------------------------------


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB, dtype=jnp.int32)


@pytest.fixture(scope="module")
def single_device_logits(models, tokens):
    fwd = jax.jit(lambda model, p, t: model.apply(p, t), static_argnums=0, compiler_options=FAST)
    return {name: np.asarray(fwd(model, params, tokens)) for name, (model, params) in models.items()}


def _logits_sharding(mesh, shape):
    return NamedSharding(mesh, logical_to_spec(("batch", "length", "vocab"), mesh=mesh, shape=shape))


@pytest.mark.parametrize(
    "model_name, mesh_name", [("dense", "dp2_fsdp2_tp2"), ("dense", "dp8"), ("moe", "dp2_ep2_tp2")]
)
def test_sharded_forward_equals_single_device(models, meshes, tokens, single_device_logits, model_name, mesh_name):
    model, params = models[model_name]
    mesh = meshes[mesh_name]
    p_shard = param_shardings(model, mesh)
    t_shard = data_sharding(mesh, 2, shape=tokens.shape)
    out_shard = _logits_sharding(mesh, (B, T, VOCAB))
    # a fresh function per mesh: `activate` takes effect while tracing, and jit's cache does not key on it
    fwd = jax.jit(lambda p, t: model.apply(p, t), in_shardings=(p_shard, t_shard), out_shardings=out_shard,
                  compiler_options=FAST)
    with activate(mesh):
        logits = fwd(jax.device_put(params, p_shard), jax.device_put(tokens, t_shard))
    assert logits.sharding.spec == out_shard.spec
    assert len({s.device for s in logits.addressable_shards}) == 8
    np.testing.assert_allclose(np.asarray(logits), single_device_logits[model_name], atol=1e-5, rtol=1e-5)


def test_sharded_prefill_and_decode_with_cache(models, meshes, tokens, single_device_logits):
    """Prefill 6 tokens, decode 2, on the data=2/fsdp=2/tensor=2 mesh with a sharded cache: the logits equal the
    single-device full forward pass."""
    model, params = models["dense"]
    mesh = meshes["dp2_fsdp2_tp2"]
    capacity = 16
    p_shard = param_shardings(model, mesh)
    cache = model.init_cache(B, capacity)
    c_shard = tree_shardings(CACHE_AXES, cache, mesh)
    t_shard = data_sharding(mesh, 2, shape=(B, T))

    def step(p, t, c):
        out = model.forward(p, t, cache=c)
        return out.logits, out.cache

    step = jax.jit(step, in_shardings=(p_shard, t_shard, c_shard), out_shardings=(None, c_shard),
                   compiler_options=FAST)
    with activate(mesh):
        params_s = jax.device_put(params, p_shard)
        cache = jax.device_put(cache, c_shard)
        prefill_logits, cache = step(params_s, jax.device_put(tokens[:, :6], t_shard), cache)
        outs = [prefill_logits]
        for i in (6, 7):
            logits, cache = step(params_s, jax.device_put(tokens[:, i:i + 1], t_shard), cache)
            outs.append(logits)
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), "tensor")  # [L, B, Hkv, S, D]
    assert cache.next_pos.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(cache.length), T)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), single_device_logits["dense"],
                               atol=1e-5, rtol=1e-5)
