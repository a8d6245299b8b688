"""Mask families for 3D attention (jaxeff.attention.tile_masks): Attention Tile, STA, arbitrary tile masks.

Oracles from specs/diffusion_methods.md §1.6 and §5.5: the tile-count formula and the paper's sparsities, the
full mask equals the dense table, the diagonal mask is block-diagonal per frame, reference rows are full, each
table's token mask equals a token-level mask built from the definitions (not from the table), every STA query
tile sees exactly kt*kh*kw tiles, tiling is a permutation that untiling inverts, and the visited-block count
equals the analytic count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.attention import (
    VideoTokenLayout,
    attention_tile_count,
    attention_tile_mask,
    attention_tile_sparsity,
    attention_tile_table,
    expected_visited_blocks,
    mask_ladder,
    sliding_tile_mask,
    sta_block_table,
    sta_layout,
    sta_token_mask_reference,
    tile_block_table,
    tile_permutation,
    tile_token_mask_reference,
    tile_tokens,
    untile_tokens,
)
from pallas_kernels.block_sparse_attention.table import BlockTable, dense_table

# Spec §1.2: sparsity in percent, T=8 and T=24.
SPEC_SPARSITY = {(8, 4): 18.75, (8, 3): 31.25, (8, 2): 46.88, (8, 1): 65.63,
                 (24, 12): 22.92, (24, 8): 41.67, (24, 6): 53.13, (24, 4): 65.97, (24, 3): 72.92}
CANVAS, TILE = (6, 8, 8), (2, 2, 2)  # tile grid (3, 4, 4), 48 tiles of 8 tokens


def _unpad2(layout, mask):
    return layout.unpad(layout.unpad(mask, axis=1), axis=2)


# ================================================================================================ Attention Tile
@pytest.mark.parametrize("T,k", sorted(SPEC_SPARSITY))
def test_attention_tile_count_and_sparsity_match_spec(T, k):
    mask = attention_tile_mask(T, k)
    assert attention_tile_count(T, k) == T + k * (2 * T - k - 1) == mask.sum()
    assert 100 * attention_tile_sparsity(T, k) == pytest.approx(SPEC_SPARSITY[T, k], abs=0.0051)
    assert 1 - mask.mean() == pytest.approx(attention_tile_sparsity(T, k))


def test_attention_tile_mask_definition_and_extremes():
    T = 6
    for k in range(T + 1):
        mask = attention_tile_mask(T, k)
        assert mask.shape == (T, T) and mask.dtype == bool
        for i in range(T):
            for j in range(T):
                assert mask[i, j] == (i == j or i < k or j < k)
    assert (attention_tile_mask(T, 0) == np.eye(T, dtype=bool)).all()
    assert attention_tile_mask(T, T - 1).all() and attention_tile_mask(T, T).all()
    custom = attention_tile_mask(T, 2, reference_frames=[4, 1])
    assert custom[[1, 4]].all() and custom[:, [1, 4]].all()
    assert custom.sum() == attention_tile_count(T, 2) and not custom[0, 2]


def test_mask_ladder_names():
    assert mask_ladder(8) == [("4:4", 4), ("3:5", 3), ("2:6", 2), ("1:7", 1)]
    assert mask_ladder(24) == [("12:12", 12), ("8:16", 8), ("6:18", 6), ("4:20", 4), ("3:21", 3)]
    with pytest.raises(ValueError, match="num_frames"):
        mask_ladder(5)


# ========================================================================================== layout and padding
def test_layout_padding_and_kv_valid():
    layout = VideoTokenLayout(num_frames=3, tokens_per_frame=12, block_size=8, text_len=5)
    assert (layout.frame_len, layout.blocks_per_frame, layout.text_padded) == (16, 2, 8)
    assert (layout.seq_len, layout.padded_len, layout.num_blocks) == (41, 56, 7)
    valid = layout.kv_valid
    assert valid.shape == (56,) and valid.sum() == 41
    assert not valid[12:16].any() and not valid[28:32].any() and not valid[44:48].any() and not valid[53:].any()

    x = np.arange(2 * 41 * 3, dtype=np.float32).reshape(2, 41, 3) + 1
    padded = layout.pad(x)
    assert isinstance(padded, np.ndarray) and padded.shape == (2, 56, 3)
    assert (padded[:, ~valid] == 0).all()
    np.testing.assert_array_equal(padded[:, valid], x)  # order preserved: frames, then text
    np.testing.assert_array_equal(padded[:, 16:28], x[:, 12:24])
    np.testing.assert_array_equal(layout.unpad(padded), x)

    # jax arrays, another axis, under jit
    xt = jnp.asarray(np.moveaxis(x, 1, -1))
    pj = jax.jit(lambda a: layout.pad(a, axis=-1))(xt)
    assert isinstance(pj, jax.Array)
    np.testing.assert_array_equal(np.asarray(pj), np.moveaxis(padded, 1, -1))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: layout.unpad(a, axis=2))(pj)), np.asarray(xt))

    # divisible frames and no text: no padding at all
    exact = VideoTokenLayout(4, 16, 8)
    assert exact.padded_len == exact.seq_len == 64 and exact.kv_valid.all()
    y = np.random.default_rng(0).normal(size=(64,))
    np.testing.assert_array_equal(exact.pad(y, axis=0), y)


# ====================================================================================================== tables
@pytest.mark.parametrize("text_len", [0, 5])
def test_attention_tile_full_mask_is_dense_table(text_len):
    layout = VideoTokenLayout(4, 12, 8, text_len)
    dense = dense_table(layout.padded_len, 8, kv_valid=layout.kv_valid)
    assert attention_tile_table(layout, 4) == dense
    assert attention_tile_table(layout, 3) == dense  # k = T-1 is full too
    assert tile_block_table(np.ones((4, 4), bool), layout) == dense


def test_attention_tile_diagonal_is_block_diagonal_per_frame():
    layout = VideoTokenLayout(4, 12, 8)
    table = attention_tile_table(layout, 0)
    expected = BlockTable.from_block_mask(np.kron(np.eye(4, dtype=bool), np.ones((2, 2), bool)), 8, 8,
                                          layout.kv_valid)
    assert table == expected
    token = table.token_mask()[0]
    for q in range(layout.padded_len):
        frame = q // layout.frame_len
        assert (np.flatnonzero(token[q]) // layout.frame_len == frame).all()


def test_reference_frame_rows_are_full():
    layout = VideoTokenLayout(5, 12, 4, text_len=3)
    for refs in (None, [1, 3]):
        table = attention_tile_table(layout, 2, reference_frames=refs)
        bpf = layout.blocks_per_frame
        for frame in (refs or [0, 1]):
            assert table.block_mask[0, frame * bpf:(frame + 1) * bpf].all()
            assert (table.counts[0, frame * bpf:(frame + 1) * bpf] == layout.num_blocks).all()
        other = 4
        assert not table.block_mask[0, other * bpf:(other + 1) * bpf].all()


@pytest.mark.parametrize("text_len", [0, 5])
@pytest.mark.parametrize("block", [8, 5, 16])
def test_random_tile_masks_match_token_reference(text_len, block):
    rng = np.random.default_rng(block + text_len)
    layout = VideoTokenLayout(4, 12, block, text_len)
    for tile_mask in (rng.random((4, 4)) < 0.4, rng.random((3, 4, 4)) < 0.5):
        table = tile_block_table(tile_mask, layout)
        token = table.token_mask()
        assert table.num_masks == (1 if tile_mask.ndim == 2 else 3)
        np.testing.assert_array_equal(token, tile_token_mask_reference(tile_mask, layout))
        # The spec's literal formula mask[q, kv] = M[q // S, kv // S] on the unpadded sequence.
        literal = tile_token_mask_reference(tile_mask, layout, padded=False)
        np.testing.assert_array_equal(_unpad2(layout, token), literal)
        S, n_video = layout.tokens_per_frame, layout.video_len
        q, kv = 13, 40  # frame 1 -> frame 3
        stack = tile_mask if tile_mask.ndim == 3 else tile_mask[None]
        assert literal[0, q, kv] == stack[0, q // S, kv // S]
        if text_len:
            assert literal[:, :, n_video:].all() and literal[:, n_video:, :].all()


def test_text_rows_and_columns_and_padding():
    layout = VideoTokenLayout(3, 12, 8, text_len=5)
    token = attention_tile_table(layout, 0).token_mask()[0]
    text = np.arange(layout.padded_len) >= 3 * layout.frame_len
    valid = layout.kv_valid
    assert (token[:, text & valid]).all()  # every query sees every text key
    assert (token[text][:, valid]).all()  # text queries see every key
    assert not token[:, ~valid].any()  # no query sees a padded key


@pytest.mark.parametrize("S,block", [(12, 8), (12, 4), (12, 5), (16, 8), (12, 32)])
@pytest.mark.parametrize("text_len", [0, 7])
def test_visited_blocks_match_analytic_count(S, block, text_len):
    T = 5
    layout = VideoTokenLayout(T, S, block, text_len)
    for k in range(T + 1):
        table = attention_tile_table(layout, k)
        assert table.visited_blocks == expected_visited_blocks(T, k, layout)
        if not text_len:
            assert table.visited_blocks == attention_tile_count(T, k) * (layout.frame_len // block) ** 2


def test_max_kv_shares_one_width():
    layout = VideoTokenLayout(4, 12, 8)
    tables = [attention_tile_table(layout, k, max_kv=layout.num_blocks) for k in (0, 1, 4)]
    assert {t.max_kv for t in tables} == {layout.num_blocks}
    np.testing.assert_array_equal(tables[1].block_mask, attention_tile_table(layout, 1).block_mask)
    with pytest.raises(ValueError, match="max_kv"):
        attention_tile_table(layout, 4, max_kv=2)


# ======================================================================================== Sliding Tile Attention
def test_tile_permutation_is_the_tile_major_order():
    canvas, tile = (4, 4, 6), (2, 2, 3)
    perm = tile_permutation(canvas, tile)
    np.testing.assert_array_equal(np.sort(perm), np.arange(96))
    expected = [t * 24 + h * 6 + w
                for it in range(2) for ih in range(2) for iw in range(2)
                for t in range(it * 2, it * 2 + 2)
                for h in range(ih * 2, ih * 2 + 2)
                for w in range(iw * 3, iw * 3 + 3)]
    np.testing.assert_array_equal(perm, expected)


@pytest.mark.parametrize("text_len", [0, 3])
def test_tile_untile_identity(text_len):
    n = int(np.prod(CANVAS)) + text_len
    x = np.random.default_rng(1).normal(size=(2, n, 3)).astype(np.float32)
    tiled = tile_tokens(x, CANVAS, TILE, text_len=text_len)
    assert isinstance(tiled, np.ndarray)
    perm = tile_permutation(CANVAS, TILE)
    np.testing.assert_array_equal(tiled[:, :perm.size], x[:, perm])
    np.testing.assert_array_equal(tiled[:, perm.size:], x[:, perm.size:])
    np.testing.assert_array_equal(untile_tokens(tiled, CANVAS, TILE, text_len=text_len), x)
    # jax, token axis last, under jit
    xj = jnp.asarray(np.moveaxis(x, 1, -1))
    tj = jax.jit(lambda a: tile_tokens(a, CANVAS, TILE, axis=-1, text_len=text_len))(xj)
    np.testing.assert_array_equal(np.asarray(tj), np.moveaxis(tiled, 1, -1))
    back = jax.jit(lambda a: untile_tokens(a, CANVAS, TILE, axis=-1, text_len=text_len))(tj)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(xj))


def test_sliding_tile_mask_window_positions():
    grid = (3, 4, 4)
    mask = sliding_tile_mask(grid, (3, 3, 3))
    index = lambda t, h, w: (t * 4 + h) * 4 + w
    seen = lambda q: {np.unravel_index(j, grid) for j in np.flatnonzero(mask[index(*q)])}
    # corner query: centre clamped to (1, 1, 1)
    assert seen((0, 0, 0)) == {(t, h, w) for t in range(3) for h in range(3) for w in range(3)}
    # far corner: centre (1, 2, 2)
    assert seen((2, 3, 3)) == {(t, h, w) for t in range(3) for h in range(1, 4) for w in range(1, 4)}
    # interior query: centred on itself
    assert seen((1, 2, 1)) == {(t, h, w) for t in range(3) for h in range(1, 4) for w in range(3)}
    assert (sliding_tile_mask(grid, (1, 1, 1)) == np.eye(48, dtype=bool)).all()


@pytest.mark.parametrize("window", [(1, 1, 1), (3, 3, 3), (1, 3, 1), (3, 1, 3), (1, 3, 3)])
def test_every_query_tile_sees_exactly_the_window(window):
    table = sta_block_table(CANVAS, TILE, window)
    assert (table.counts == np.prod(window)).all()
    assert table.visited_blocks == 48 * np.prod(window)
    assert table.kv_valid is None  # no mixed blocks: every visited tile is attended in full


def test_sta_window_covering_everything_is_dense():
    canvas = (6, 6, 10)  # tile grid (3, 3, 5): odd sizes
    assert sta_block_table(canvas, TILE, (3, 3, 5)) == dense_table(360, 8)
    # a full axis may be even (STA's calibration candidates use full-axis windows)
    assert sta_block_table(CANVAS, TILE, (3, 4, 4)) == dense_table(384, 8)
    layout = sta_layout(canvas, TILE, text_len=5)
    assert sta_block_table(canvas, TILE, (3, 3, 5), text_len=5) == dense_table(368, 8, kv_valid=layout.kv_valid)


@pytest.mark.parametrize("text_len", [0, 5])
def test_sta_table_matches_mask_mod_reimplementation(text_len):
    windows = [(3, 3, 3), (1, 3, 1), (3, 1, 3), (1, 4, 3)]
    layout = sta_layout(CANVAS, TILE, text_len)
    per_head = sta_block_table(CANVAS, TILE, windows, text_len)
    assert per_head.num_masks == len(windows)
    token = per_head.token_mask()
    np.testing.assert_array_equal(token, sta_token_mask_reference(CANVAS, TILE, windows, text_len))
    for h, window in enumerate(windows):
        single = sta_block_table(CANVAS, TILE, window, text_len).token_mask()
        np.testing.assert_array_equal(single[0], token[h])
    # Back in frame-major order, the same mask computed from each token's (t, h, w) on the canvas.
    n = int(np.prod(CANVAS))
    unpadded = _unpad2(layout, token)
    natural = untile_tokens(untile_tokens(unpadded, CANVAS, TILE, axis=1, text_len=text_len),
                            CANVAS, TILE, axis=2, text_len=text_len)
    reference = sta_token_mask_reference(CANVAS, TILE, windows, text_len, padded=False, tiled=False)
    np.testing.assert_array_equal(natural, reference)
    # token (t=0, h=0, w=0) with window (3,3,3) sees h in [0, 6) and not h = 6
    assert reference[0, 0, 5 * 8 + 5] and not reference[0, 0, 6 * 8]
    if text_len:
        assert reference[:, :, n:].all() and reference[:, n:, :].all()


# ================================================================================================ bad inputs
def test_bad_inputs_raise():
    layout = VideoTokenLayout(4, 12, 8)
    with pytest.raises(ValueError, match="k"):
        attention_tile_mask(4, -1)
    with pytest.raises(ValueError, match="k"):
        attention_tile_mask(4, 5)
    with pytest.raises(ValueError, match="k"):
        attention_tile_count(4, 5)
    with pytest.raises(ValueError, match="reference_frames"):
        attention_tile_mask(4, 2, reference_frames=[0, 4])
    with pytest.raises(ValueError, match="reference_frames"):
        attention_tile_mask(4, 2, reference_frames=[1])
    with pytest.raises(ValueError, match="block_size"):
        VideoTokenLayout(4, 12, 0)
    with pytest.raises(ValueError, match="block_size"):
        VideoTokenLayout(4, 12, -8)
    with pytest.raises(ValueError, match="tokens_per_frame"):
        VideoTokenLayout(4, 0, 8)
    with pytest.raises(ValueError, match=r"tile_mask.*T=4.*\(5, 5\)"):
        tile_block_table(np.ones((5, 5), bool), layout)
    with pytest.raises(ValueError, match="tile_mask"):
        tile_block_table(np.ones((2, 3, 4), bool), layout)
    with pytest.raises(ValueError, match="num_frames"):
        expected_visited_blocks(5, 1, layout)
    with pytest.raises(ValueError, match="x: expected 48"):
        layout.pad(np.zeros((2, 47)))
    with pytest.raises(ValueError, match="x: expected 64"):
        layout.unpad(np.zeros((2, 48)))
    with pytest.raises(ValueError, match="must be odd"):
        sliding_tile_mask((3, 4, 4), (3, 2, 3))
    with pytest.raises(ValueError, match=r"window\[1\].*must be in \[1, 3\]"):
        sliding_tile_mask((3, 4, 4), [(3, 3, 3), (5, 3, 3)])
    with pytest.raises(ValueError, match="window"):
        sliding_tile_mask((3, 4, 4), (3, 3))
    with pytest.raises(ValueError, match="window"):
        sta_block_table(CANVAS, TILE, (0, 1, 1))
    with pytest.raises(ValueError, match="canvas"):
        sta_block_table((6, 8, 9), TILE, (1, 1, 1))
    with pytest.raises(ValueError, match="x: expected 384"):
        tile_tokens(np.zeros((1, 383)), CANVAS, TILE)
