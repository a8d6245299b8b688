"""Block-sparse attention (pallas_kernels/block_sparse_attention): every implementation against the dense reference.

The XLA path, the Mosaic TPU kernels and the Triton kernels (both in interpret mode) are held to
``block_sparse_attention_reference`` on three tables (shared with key padding, an empty row and a row whose keys
are all padding; per-head with rectangular blocks; dense), forward and gradients; the reference itself is held to a
numpy loop and, on a dense table, to plain softmax attention. One input shape is shared (B=2, H=2, N=64, D=16) so
each implementation compiles few programs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxeff.attention.tile_masks import VideoTokenLayout, expected_visited_blocks, tile_block_table
from jaxeff.sharding import MeshConfig, activate, make_mesh
from pallas_kernels._dispatch import resolve_impl
from pallas_kernels.block_sparse_attention import (
    BlockTable,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_attention_with_visits,
    dense_table,
)
from pallas_kernels.block_sparse_attention import xla as xla_path

B, H, N, D = 2, 2, 64, 16
IMPLS = ("xla", "pallas_tpu", "pallas_gpu")
TOL = dict(atol=1e-5, rtol=1e-5)


def _shared_table() -> BlockTable:
    """bq = bk = 16. Row 1 visits nothing; row 2 visits only block 3, whose keys are all padding; two more padded
    keys inside block 0."""
    mask = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 1, 1]], bool)
    kv_valid = np.ones(N, bool)
    kv_valid[48:] = False
    kv_valid[5:7] = False
    return BlockTable.from_block_mask(mask, 16, 16, kv_valid)


def _per_head_table() -> BlockTable:
    """One mask per head, bq = 16, bk = 8 (rectangular blocks), lists of different lengths."""
    rng = np.random.default_rng(1)
    mask = rng.random((H, N // 16, N // 8)) < 0.45
    mask[:, :, 0] |= ~mask.any(-1)  # every row visits something: the empty row is the shared table's case
    return BlockTable.from_block_mask(mask, 16, 8)


TABLES = {"shared": _shared_table(), "per_head": _per_head_table(), "dense": dense_table(N, 16, 32)}

_attention = jax.jit(block_sparse_attention, static_argnames=("table", "sm_scale", "impl", "interpret", "mesh"))


@functools.partial(jax.jit, static_argnames=("table", "impl", "mesh"))
def _grads(q, k, v, cotangent, table, impl, mesh=None):
    def loss(q, k, v):
        out = block_sparse_attention(q, k, v, table, impl=impl, mesh=mesh)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _inputs(seed: int, shape=(B, H, N, D), dtype=jnp.float32) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    q, k, v, cot = (rng.normal(size=shape).astype(np.float32) for _ in range(4))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (jnp.asarray(cot),)


@pytest.fixture(scope="module")
def qkv():
    return _inputs(0)


@pytest.fixture(scope="module")
def expected(qkv):
    """Reference outputs and gradients per table, computed once."""
    q, k, v, cot = qkv
    return {name: (_attention(q, k, v, table, impl="reference"), _grads(q, k, v, cot, table, "reference"))
            for name, table in TABLES.items()}


def _numpy_attention(q, k, v, token_mask, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for b, h, i in np.ndindex(*q.shape[:3]):
        allowed = token_mask[h if token_mask.shape[0] > 1 else 0, i]
        if allowed.any():
            s = k[b, h, allowed] @ q[b, h, i] * scale
            w = np.exp(s - s.max())
            out[b, h, i] = w @ v[b, h, allowed] / w.sum()
    return out


def _plain_attention(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


# ================================================================================================== reference
@pytest.mark.parametrize("name", ("shared", "per_head"))
def test_reference_matches_numpy_loop(qkv, name):
    q, k, v, _ = qkv
    table = TABLES[name]
    got = block_sparse_attention_reference(q, k, v, table, sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, table.token_mask(), 0.3), **TOL)


def test_reference_on_a_dense_table_is_dense_attention(qkv):
    q, k, v, _ = qkv
    got = block_sparse_attention_reference(q, k, v, TABLES["dense"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(_plain_attention(q, k, v)), **TOL)


# ============================================================================================ implementations
@pytest.mark.parametrize("name", tuple(TABLES))
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_matches_reference(qkv, expected, impl, name):
    q, k, v, _ = qkv
    got = np.asarray(_attention(q, k, v, TABLES[name], impl=impl))
    assert got.shape == (B, H, N, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(expected[name][0]), **TOL)
    if name == "shared":  # the empty row and the row whose keys are all padding give exactly 0
        assert np.all(got[:, :, 16:48] == 0)
    if name == "dense":
        np.testing.assert_allclose(got, np.asarray(_plain_attention(q, k, v)), **TOL)


@pytest.mark.parametrize("name", tuple(TABLES))
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_reference(qkv, expected, impl, name):
    q, k, v, cot = qkv
    got = _grads(q, k, v, cot, TABLES[name], impl)
    for label, g, e in zip(("dq", "dk", "dv"), got, expected[name][1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), err_msg=f"{impl}/{name}: {label}", **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_unvisited_blocks_are_never_read(impl):
    """K/V blocks 1 and 3 are in no list: filled with NaN they must not reach the output or the gradients."""
    mask = np.array([[1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
    table = BlockTable.from_block_mask(mask, 16, 16)
    q, k, v, cot = _inputs(3)
    expected_out = block_sparse_attention_reference(q, k, v, table)
    expected_grads = _grads(q, k, v, cot, table, "reference")
    poison = np.zeros(N, bool)
    poison[16:32] = poison[48:] = True
    k_bad, v_bad = (jnp.where(jnp.asarray(poison)[:, None], jnp.nan, x) for x in (k, v))
    got = np.asarray(_attention(q, k_bad, v_bad, table, impl=impl))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np.asarray(expected_out), **TOL)
    for label, g, e in zip(("dq", "dk", "dv"), _grads(q, k_bad, v_bad, cot, table, impl), expected_grads):
        assert np.all(np.isfinite(np.asarray(g))), label
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), err_msg=label, **TOL)


@pytest.mark.parametrize("impl", ("pallas_tpu", "pallas_gpu"))
def test_visited_block_counter_equals_the_analytic_count(impl):
    """Attention Tile masks (4 frames of 12 tokens, 2 blocks of 8 per frame, padded keys), k=1 on head 0 and k=2
    on head 1: each program processes exactly its list, and a head's total is the analytic tile count."""
    layout = VideoTokenLayout(num_frames=4, tokens_per_frame=12, block_size=8)
    frames = np.arange(4)
    tile = np.stack([(frames[:, None] == frames) | (frames[:, None] < r) | (frames[None] < r) for r in (1, 2)])
    table = tile_block_table(tile, layout)
    assert table.seq_len == N and table.num_masks == H
    q, k, v, _ = _inputs(4)
    out, visits = jax.jit(block_sparse_attention_with_visits, static_argnames=("table", "impl"))(
        q, k, v, table, impl=impl)
    visits = np.asarray(visits)
    assert visits.shape == (B, H, table.num_q_blocks) and visits.dtype == np.int32
    np.testing.assert_array_equal(visits, np.broadcast_to(table.counts, visits.shape))
    for h, r in enumerate((1, 2)):
        assert visits[:, h].sum(axis=-1).tolist() == [expected_visited_blocks(4, r, layout)] * B
    assert visits.sum() == B * table.visited_blocks
    np.testing.assert_allclose(np.asarray(out), np.asarray(block_sparse_attention_reference(q, k, v, table)), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
    q, k, v, cot = _inputs(5, dtype=jnp.bfloat16)
    table = TABLES["shared"]
    got = _attention(q, k, v, table, impl=impl)
    assert got.dtype == jnp.bfloat16
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected_out = block_sparse_attention_reference(*as_f32, table)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected_out), atol=3e-2, rtol=3e-2)
    grads = _grads(q, k, v, cot, table, impl)
    for label, g, e in zip(("dq", "dk", "dv"), grads, _grads(*as_f32, cot, table, "reference")):
        assert g.dtype == jnp.bfloat16, label
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e), atol=6e-2, rtol=6e-2, err_msg=label)


def test_tpu_kernels_in_the_tpu_simulator():
    """The TPU simulator models the DMAs of the scalar-prefetch pipeline and raises on out-of-bounds block reads;
    blocks of 128 as on a real TPU."""
    mask = np.array([[1, 1], [0, 0]], bool)  # query block 1 visits nothing; KV block 1 is partly padding
    table = BlockTable.from_block_mask(mask, 128, 128, np.arange(256) < 200)
    q, k, v, cot = _inputs(6, shape=(1, 1, 256, 16))
    simulator = pltpu.InterpretParams(out_of_bounds_reads="raise")

    def loss(q, k, v, impl, interpret):
        return jnp.sum(block_sparse_attention(q, k, v, table, impl=impl, interpret=interpret) * cot)

    got = block_sparse_attention(q, k, v, table, impl="pallas_tpu", interpret=simulator)
    np.testing.assert_allclose(np.asarray(got), np.asarray(block_sparse_attention_reference(q, k, v, table)), **TOL)
    got_grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "pallas_tpu", simulator)
    for g, e in zip(got_grads, jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "reference", None)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), **TOL)


# ================================================================================================= XLA path
def test_xla_plan_is_gather_free_for_attention_tile():
    """Two blocks per frame are merged into one block per frame; the reference-frame keys are shared by the
    group's rows and each frame's own keys are one static slice: no gather, no reordering."""
    layout = VideoTokenLayout(num_frames=4, tokens_per_frame=16, block_size=8)
    frames = np.arange(4)
    table = tile_block_table((frames[:, None] == frames) | (frames[:, None] < 1) | (frames[None] < 1), layout)
    plan = xla_path._plan(table, H)
    assert (plan.block_q, plan.block_kv) == (16, 16) and len(plan.head_groups) == 1
    groups = plan.head_groups[0].groups
    assert [g.count for g in groups] == [4, 2] and plan.head_groups[0].row_order is None
    assert groups[1].shared.runs == ((0, 1),) and groups[1].per_row.rows_slice == (1, 3, 1)
    assert all(g.per_row is None or g.per_row.gather is None for g in groups)


def test_xla_cache_blocking_splits_heads_and_rows(qkv, expected, monkeypatch):
    """A tiny score budget forces the per-(batch, head) loop and the split of count groups into row ranges."""
    monkeypatch.setattr(xla_path, "_SCORE_BUDGET", 16 * 16)
    q, k, v, cot = qkv
    for name in ("shared", "per_head"):
        table = TABLES[name]
        got = jax.jit(lambda q, k, v, t=table: xla_path.block_sparse_attention_xla(q, k, v, t, sm_scale=D ** -0.5))
        np.testing.assert_allclose(np.asarray(got(q, k, v)), np.asarray(expected[name][0]), **TOL)
        grads = jax.grad(lambda q, k, v: jnp.sum(got(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)
        for g, e in zip(grads, expected[name][1]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), err_msg=name, **TOL)


# ================================================================================================== sharding
@pytest.mark.parametrize("impl", ("xla", "pallas_tpu"))
def test_sharded_over_batch_and_heads_equals_single_device(devices8, impl):
    """Batch over data=2 and 4 heads over tensor=4; the per-head table is sliced to each shard's head."""
    mesh = make_mesh(MeshConfig(data=2, tensor=4), devices8)
    rng = np.random.default_rng(7)
    per_head = BlockTable.from_block_mask(rng.random((4, 4, 4)) < 0.5, 16, 16, np.arange(N) < 60)
    q, k, v, cot = _inputs(8, shape=(B, 4, N, D))
    for table in (TABLES["shared"], per_head):
        single = (_attention(q, k, v, table, impl=impl), _grads(q, k, v, cot, table, impl))
        with activate(mesh):  # the mesh active in jaxeff.sharding
            sharded_out = _attention(q, k, v, table, impl=impl)
        sharded_grads = _grads(q, k, v, cot, table, impl, mesh=mesh)  # the mesh passed explicitly
        np.testing.assert_allclose(np.asarray(sharded_out), np.asarray(single[0]), **TOL)
        for g, e in zip(sharded_grads, single[1]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), **TOL)


# ==================================================================================================== errors
def test_auto_picks_the_xla_path_on_the_cpu(qkv):
    assert jax.default_backend() == "cpu" and resolve_impl("auto") == "xla"
    q, k, v, _ = qkv
    table = TABLES["per_head"]
    np.testing.assert_array_equal(np.asarray(_attention(q, k, v, table, impl="auto")),
                                  np.asarray(_attention(q, k, v, table, impl="xla")))


def test_clear_errors(qkv):
    q, k, v, _ = qkv
    table = TABLES["shared"]
    with pytest.raises(ValueError, match="seq_len=64"):
        block_sparse_attention(q[:, :, :32], k[:, :, :32], v[:, :, :32], table)
    three = BlockTable.from_block_mask(np.ones((3, 4, 4), bool), 16, 16)
    with pytest.raises(ValueError, match="num_masks=3"):
        block_sparse_attention(q, k, v, three)
    with pytest.raises(ValueError, match="impl"):
        block_sparse_attention(q, k, v, table, impl="cuda")
    with pytest.raises(ValueError, match="k: expected"):
        block_sparse_attention(q, k[:, :1], v, table)
    with pytest.raises(ValueError, match="interpret"):
        block_sparse_attention(q, k, v, table, impl="pallas_gpu", interpret="yes")
    with pytest.raises(ValueError, match="Pallas kernels only"):
        block_sparse_attention_with_visits(q, k, v, table, impl="xla")
    # hardware rules, checked when a kernel would be compiled
    with pytest.raises(ValueError, match="block_q: the compiled TPU kernel needs a multiple of 128"):
        block_sparse_attention(q, k, v, table, impl="pallas_tpu", interpret=False)
    odd = dense_table(48, 24)
    q48 = q[:, :, :48]
    with pytest.raises(ValueError, match="table.block_q: the Triton kernel needs a power of two"):
        block_sparse_attention(q48, q48, q48, odd, impl="pallas_gpu", interpret=False)
    q24 = jnp.zeros((1, 1, N, 24))
    with pytest.raises(ValueError, match="q head dim: the Triton kernel needs a power of two"):
        block_sparse_attention(q24, q24, q24, table, impl="pallas_gpu", interpret=False)
