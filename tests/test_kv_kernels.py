"""KV-eviction kernels (pallas_kernels/kv_eviction): compaction and ragged decode attention.

Every implementation (the XLA path, the Mosaic TPU kernel and the Triton kernel, both in interpret mode) is held
to the jnp references, and the references to a plain numpy loop and to ``jaxeff.attention.dense``. One cache shape
is shared by all tests (B=2, Hkv=2, G=3, S=32, block 8), so each implementation compiles only a few programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxeff.attention.dense import dense_attention
from jaxeff.cache import LayerKV
from pallas_kernels.kv_eviction import (
    bucketed_kv_bound,
    compact,
    compact_reference,
    compaction_plan,
    kv_index_map,
    ragged_decode_attention,
    ragged_decode_attention_reference,
)
from pallas_kernels.kv_eviction.dispatch import resolve_impl

B, HKV, G, S, D, DV, BLOCK = 2, 2, 3, 32, 16, 8, 8
LENGTHS = np.array([[0, S], [13, 5]], np.int32)  # an empty row, a full row, lengths off the block grid
Q_POS = np.array([40, 37], np.int32)
WINDOW = 6
KERNEL_IMPLS = ("xla", "pallas_tpu", "pallas_gpu")

_compact = jax.jit(compact, static_argnames=("impl", "interpret", "block_size"))
_decode = jax.jit(
    ragged_decode_attention,
    static_argnames=("sliding_window", "scale", "block_size", "kv_bound", "impl", "interpret"),
)


def _cache(seed: int) -> dict[str, np.ndarray]:
    """A well-formed ragged cache: rows of LENGTHS, increasing positions (some past the query: causal masking), a
    padding hole (pos -1) inside one row, pos -1 and stale finite K/V past each row's length."""
    rng = np.random.default_rng(seed)
    pos = np.full((B, HKV, S), -1, np.int32)
    for b in range(B):
        for h in range(HKV):
            n = LENGTHS[b, h]
            pos[b, h, :n] = np.sort(rng.choice(Q_POS[b] + 3, size=n, replace=False))
    pos[1, 0, 4] = -1
    return {
        "q": rng.normal(size=(B, HKV * G, D)).astype(np.float32),
        "k": rng.normal(size=(B, HKV, S, D)).astype(np.float32),
        "v": rng.normal(size=(B, HKV, S, DV)).astype(np.float32),
        "pos": pos,
        "length": LENGTHS.copy(),
        "q_pos": Q_POS.copy(),
    }


def _decode_args(c: dict[str, np.ndarray]) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(c[name]) for name in ("q", "k", "v", "pos", "length", "q_pos"))


def _dense(c: dict[str, np.ndarray], sliding_window: int | None) -> np.ndarray:
    kv = LayerKV(k=jnp.asarray(c["k"]), v=jnp.asarray(c["v"]), pos=jnp.asarray(c["pos"]),
                 length=jnp.asarray(c["length"]))
    out = dense_attention(jnp.asarray(c["q"])[:, None], kv, jnp.asarray(c["q_pos"])[:, None],
                          sliding_window=sliding_window)
    return np.asarray(out[:, 0])


def _compaction_inputs(seed: int) -> tuple[jax.Array, ...]:
    """Rows with holes (pos -1) among the filled slots; the full row (0, 1) keeps everything, row (1, 1) nothing."""
    rng = np.random.default_rng(seed)
    c = _cache(seed)
    pos = c["pos"].copy()
    pos[0, 1, rng.choice(S, size=5, replace=False)] = -1
    keep = rng.random((B, HKV, S)) < 0.5
    keep[0, 1] = True
    keep[1, 1] = False
    return jnp.asarray(c["k"]), jnp.asarray(c["v"]), jnp.asarray(pos), jnp.asarray(keep)


def _numpy_compact(k, v, pos, keep):
    k, v, pos, keep = map(np.asarray, (k, v, pos, keep))
    k_out, v_out = np.zeros_like(k), np.zeros_like(v)
    pos_out = np.full_like(pos, -1)
    length = np.zeros(pos.shape[:2], np.int32)
    for b in range(pos.shape[0]):
        for h in range(pos.shape[1]):
            n = 0
            for s in range(pos.shape[2]):
                if keep[b, h, s] and pos[b, h, s] >= 0:
                    k_out[b, h, n], v_out[b, h, n], pos_out[b, h, n] = k[b, h, s], v[b, h, s], pos[b, h, s]
                    n += 1
            length[b, h] = n
    return k_out, v_out, pos_out, length


def test_compact_reference_matches_numpy_loop():
    args = _compaction_inputs(0)
    expected = _numpy_compact(*args)
    got = compact_reference(*args)
    for name, g, e in zip(("k", "v", "pos", "length"), got, expected):
        np.testing.assert_array_equal(np.asarray(g), e, err_msg=name)
    assert got[3][0, 1] == S - 5 and got[3][1, 1] == 0  # keep-all on a full row with 5 holes; keep-nothing


def test_compaction_plan_points_at_the_kept_slots_in_order():
    _, _, pos, keep = _compaction_inputs(1)
    src, length = map(np.asarray, compaction_plan(pos, keep))
    kept = np.asarray(keep) & (np.asarray(pos) >= 0)
    for b in range(B):
        for h in range(HKV):
            n = length[b, h]
            np.testing.assert_array_equal(src[b, h, :n], np.flatnonzero(kept[b, h]))
            assert np.all(src[b, h, n:] == 0)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_compact_matches_reference(impl):
    args = _compaction_inputs(2)
    expected = compact_reference(*args)
    got = _compact(*args, impl=impl, block_size=BLOCK)
    for name, g, e in zip(("k", "v", "pos", "length"), got, expected):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e), err_msg=f"{impl}: {name}")


@pytest.mark.parametrize("impl", ("reference", "pallas_tpu"))
def test_compact_is_idempotent_with_keep_all(impl):
    k, v, pos, keep = _compaction_inputs(3)
    once = _compact(k, v, pos, keep, impl=impl, block_size=BLOCK)
    twice = _compact(*once[:3], jnp.ones_like(keep), impl=impl, block_size=BLOCK)
    for name, a, b in zip(("k", "v", "pos", "length"), once, twice):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_compacted_cache_attends_like_the_kept_subset():
    """Compaction is exact for attention: the compacted rows give what the original rows give with the evicted
    slots masked out (their pos set to -1)."""
    k, v, pos, keep = _compaction_inputs(4)
    q = jnp.asarray(_cache(4)["q"])
    q_pos = jnp.asarray(Q_POS)
    k_c, v_c, pos_c, length_c = _compact(k, v, pos, keep, impl="xla")
    masked = jnp.where(keep, pos, -1)
    full = jnp.full((B, HKV), S, jnp.int32)
    expected = ragged_decode_attention_reference(q, k, v, masked, full, q_pos)
    got = _decode(q, k_c, v_c, pos_c, length_c, q_pos, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", (None, WINDOW))
def test_reference_equals_dense_attention(sliding_window):
    c = _cache(5)
    got = ragged_decode_attention_reference(*_decode_args(c), sliding_window=sliding_window)
    np.testing.assert_allclose(np.asarray(got), _dense(c, sliding_window), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(got)[0, :G] == 0)  # the empty row (b=0, kv head 0) gives zeros


@pytest.mark.parametrize("sliding_window", (None, WINDOW))
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_ragged_decode_equals_reference_and_dense_attention(impl, sliding_window):
    c = _cache(6)
    args = _decode_args(c)
    got = np.asarray(_decode(*args, sliding_window=sliding_window, block_size=BLOCK, impl=impl))
    assert got.shape == (B, HKV * G, DV)
    expected = ragged_decode_attention_reference(*args, sliding_window=sliding_window)
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, _dense(c, sliding_window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_unoccupied_blocks_are_never_read(impl):
    """K/V past each row's occupied blocks are NaN, and the unoccupied tail of the last occupied block holds stale
    finite K/V with valid-looking positions: the kernels must skip the first (a NaN read would poison the softmax)
    and mask the second. The XLA path gets kv_bound = the longest row rounded up to a block, and NaNs past it."""
    c = _cache(7)
    kv_bound = None
    if impl == "xla":  # it reads [:kv_bound]: sequence 1 only (rows of 13 and 5), with kv_bound = 16
        c = {name: a[1:] for name, a in c.items()}
        kv_bound = 2 * BLOCK
    expected = np.asarray(ragged_decode_attention_reference(*_decode_args(c)))
    for b, h in np.ndindex(*c["length"].shape):
        n = c["length"][b, h]
        end = kv_bound if impl == "xla" else -(-n // BLOCK) * BLOCK
        c["pos"][b, h, n:] = np.arange(n, S)  # stale but causal positions
        c["k"][b, h, end:] = np.nan
        c["v"][b, h, end:] = np.nan
    got = np.asarray(_decode(*_decode_args(c), block_size=BLOCK, kv_bound=kv_bound, impl=impl))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_tpu_index_map_repeats_the_last_occupied_block():
    """Steps past a row's occupied blocks fetch the same block again (no new DMA on a TPU)."""
    lengths = np.array([0, 1, 8, 13, 32], np.int32)
    got = [[kv_index_map(0, h, j, lengths, None, num_kv_heads=len(lengths), block_size=BLOCK)
            for j in range(S // BLOCK)] for h in range(len(lengths))]
    blocks = np.array([[int(index[2]) for index in row] for row in got])
    np.testing.assert_array_equal(blocks, [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 3]])
    assert all(index[:2] == (0, h) and index[3] == 0 for h, row in enumerate(got) for index in row)


def test_tpu_kernels_in_the_tpu_simulator():
    """The TPU simulator models DMAs and semaphores and raises on out-of-bounds block reads."""
    simulator = pltpu.InterpretParams(out_of_bounds_reads="raise")
    c = _cache(8)
    args = _decode_args(c)
    got = _decode(*args, sliding_window=WINDOW, block_size=BLOCK, impl="pallas_tpu", interpret=simulator)
    expected = ragged_decode_attention_reference(*args, sliding_window=WINDOW)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
    compact_args = _compaction_inputs(8)
    got = _compact(*compact_args, impl="pallas_tpu", block_size=BLOCK, interpret=simulator)
    for g, e in zip(got, compact_reference(*compact_args)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_kv_bound_buckets_and_auto_dispatch():
    assert bucketed_kv_bound(0, 256) == 64
    assert bucketed_kv_bound(65, 256) == 128
    assert bucketed_kv_bound(250, 200) == 200
    assert resolve_impl("auto") == {"cpu": "xla", "tpu": "pallas_tpu"}.get(jax.default_backend(), "pallas_gpu")


def _bad_decode_calls():
    c = _decode_args(_cache(9))
    q, k, v, pos, length, q_pos = c
    return [
        ("q: expected shape", lambda: ragged_decode_attention(q[:, :, :8], k, v, pos, length, q_pos)),
        ("Hq=5", lambda: ragged_decode_attention(q[:, :5], k, v, pos, length, q_pos)),
        ("v:", lambda: ragged_decode_attention(q, k, v[:, :, :16], pos, length, q_pos)),
        ("pos:", lambda: ragged_decode_attention(q, k, v, pos[:, :, :16], length, q_pos)),
        ("length:", lambda: ragged_decode_attention(q, k, v, pos, length[:1], q_pos)),
        ("q_pos:", lambda: ragged_decode_attention(q, k, v, pos, length, q_pos.astype(jnp.float32))),
        ("block_size", lambda: ragged_decode_attention(q, k, v, pos, length, q_pos, block_size=12, impl="pallas_tpu")),
        ("kv_bound", lambda: ragged_decode_attention(q, k, v, pos, length, q_pos, kv_bound=S + 1)),
        ("sliding_window", lambda: ragged_decode_attention(q, k, v, pos, length, q_pos, sliding_window=0)),
        ("impl", lambda: ragged_decode_attention(q, k, v, pos, length, q_pos, impl="cuda")),
        ("interpret", lambda: ragged_decode_attention(
            q, k, v, pos, length, q_pos, impl="pallas_gpu", interpret=pltpu.InterpretParams())),
        # hardware layout rules, checked before any kernel is built when not interpreting
        ("multiple of 128", lambda: ragged_decode_attention(
            q, k, v, pos, length, q_pos, block_size=BLOCK, impl="pallas_tpu", interpret=False)),
        ("block_size: the Triton kernel", lambda: ragged_decode_attention(
            q, k, v, pos, length, q_pos, block_size=BLOCK, impl="pallas_gpu", interpret=False)),
        ("v head dim", lambda: ragged_decode_attention(
            q, k, v, pos, length, q_pos, block_size=16, impl="pallas_gpu", interpret=False)),
    ]


def _bad_compact_calls():
    k, v, pos, keep = _compaction_inputs(9)
    return [
        ("k:", lambda: compact(k[0], v, pos, keep)),
        ("v:", lambda: compact(k, v[:, :1], pos, keep)),
        ("pos:", lambda: compact(k, v, pos[..., :8], keep)),
        ("keep: expected dtype bool", lambda: compact(k, v, pos, keep.astype(jnp.int32))),
        ("block_size", lambda: compact(k, v, pos, keep, impl="pallas_gpu", block_size=5)),
        ("impl", lambda: compact(k, v, pos, keep, impl="mosaic")),
        ("multiple of 8", lambda: compact(k, v, pos, keep, impl="pallas_tpu", block_size=4, interpret=False)),
    ]


@pytest.mark.parametrize("kind", ("decode", "compact"))
def test_bad_arguments_name_the_argument(kind):
    calls = _bad_decode_calls() if kind == "decode" else _bad_compact_calls()
    for expected, call in calls:
        with pytest.raises(ValueError, match=expected):
            call()
