"""Mask families for 3D (video) attention, and their block tables.

Video tokens are frame-major: ``T`` latent frames of ``S = Hp * Wp`` tokens each (raster order inside a frame),
optionally followed by ``text_len`` text tokens (MM-DiT). Three families describe which frames (or 3D tiles) a
query may attend to; every family is expanded to a ``BlockTable`` that the block-sparse kernels consume:

- **Attention Tile** (Efficient-vDiT, arXiv 2502.06155): ``M[i, j] = (i == j) or i in R or j in R`` over the
  ``T x T`` frame tiles, with ``R`` the ``k`` global reference frames. The paper does not say which frames form
  ``R``; the first ``k`` is our default (any explicit set is accepted, and the FLOPs do not depend on the choice).
- **Sliding Tile Attention** (STA, arXiv 2502.04507): tokens reordered tile-major, each query tile attends to a
  ``kt x kh x kw`` window of tiles whose centre is clamped inward at the borders, so every query tile sees the
  same number of tiles. Per-head windows are allowed.
- **Arbitrary** frame-level masks, ``[T, T]`` or per-head ``[H, T, T]``.

Padding and text (documented choices; the Efficient-vDiT text handling is not recovered, the spec recommends
STA's rule): each frame is padded from ``S`` to ``S_pad = ceil(S / block) * block`` tokens so no block straddles
two frames; text tokens follow the video tokens, padded to a block multiple. Every query attends to every text
key, and text queries attend to every key. Padded keys are masked through ``kv_valid``; padded query rows are
computed like the other rows of their frame (or like text rows) and dropped by ``unpad``.

Everything here runs on the host (numpy): masks and tables are static per layer. ``pad``/``unpad`` and
``tile_tokens``/``untile_tokens`` also accept jax arrays (static shapes, usable under ``jit``).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention.table import BlockTable

Triple = tuple[int, int, int]
Windows = Union[Sequence[int], Sequence[Sequence[int]], np.ndarray]

# The paper's named masks k:(T-k), densest first [Efficient-vDiT Table 1].
_PAPER_LADDERS = {8: (4, 3, 2, 1), 24: (12, 8, 6, 4, 3)}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _check_triple(name: str, value, minimum: int = 1) -> Triple:
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != 3:
        raise ValueError(f"{name}: expected 3 ints (t, h, w), got {value!r}")
    return tuple(_check_int(f"{name}[{axis}]", v, minimum) for axis, v in enumerate(items))


def _as_array(x):
    """``x`` and the array module to operate on it with (numpy in -> numpy out, jax in -> jax out)."""
    if isinstance(x, jax.Array):
        return x, jnp
    return np.asarray(x), np


def _slice(x, start: int, stop: int, axis: int):
    return x[(slice(None),) * axis + (slice(start, stop),)]


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected an axis of an array with {ndim} dims, got {axis}")
    return axis % ndim


# ================================================================================================ Attention Tile
def attention_tile_count(num_frames: int, k: int) -> int:
    """Tiles computed by the Attention Tile mask with ``k`` reference frames: ``T + k (2T - k - 1)``."""
    T = _check_int("num_frames", num_frames, 1)
    k = _check_int("k", k, 0)
    if k > T:
        raise ValueError(f"k: expected at most num_frames={T} reference frames, got {k}")
    return T + k * (2 * T - k - 1)


def attention_tile_sparsity(num_frames: int, k: int) -> float:
    """Fraction of the ``T x T`` tiles skipped: ``1 - count / T^2``."""
    return 1.0 - attention_tile_count(num_frames, k) / num_frames ** 2


def mask_name(num_frames: int, k: int) -> str:
    """The paper's notation ``"k:(T-k)"``, e.g. ``"2:6"`` for T=8, k=2."""
    attention_tile_count(num_frames, k)
    return f"{k}:{num_frames - k}"


def mask_ladder(num_frames: int) -> list[tuple[str, int]]:
    """The paper's named masks ``[(name, k), ...]``, densest first: 4:4 ... 1:7 for T=8 and 12:12 ... 3:21 for
    T=24 (the only frame counts the paper names)."""
    if num_frames not in _PAPER_LADDERS:
        raise ValueError(f"num_frames: the paper names masks for T in {sorted(_PAPER_LADDERS)}, got {num_frames!r}")
    return [(mask_name(num_frames, k), k) for k in _PAPER_LADDERS[num_frames]]


def _reference_set(num_frames: int, k: int, reference_frames) -> np.ndarray:
    """bool ``[T]``: which frames are global reference frames."""
    T = _check_int("num_frames", num_frames, 1)
    k = _check_int("k", k, 0)
    if k > T:
        raise ValueError(f"k: expected 0 <= k <= num_frames={T}, got {k}")
    is_ref = np.zeros(T, bool)
    if reference_frames is None:
        is_ref[:k] = True
        return is_ref
    frames = sorted({_check_int("reference_frames (each frame id)", f, 0) for f in reference_frames})
    if frames and frames[-1] >= T:
        raise ValueError(f"reference_frames: expected frame ids in [0, {T}), got {frames}")
    if len(frames) != k:
        raise ValueError(f"reference_frames: expected k={k} distinct frames, got {len(frames)} ({frames})")
    is_ref[frames] = True
    return is_ref


def attention_tile_mask(num_frames: int, k: int, reference_frames: Optional[Sequence[int]] = None) -> np.ndarray:
    """bool ``[T, T]`` frame-level mask: ``M[i, j] = (i == j) or i in R or j in R``.

    ``R`` is the first ``k`` frames unless ``reference_frames`` (``k`` distinct frame ids) is given. ``k = 0`` is
    the diagonal; ``k >= T - 1`` turns every tile on.
    """
    is_ref = _reference_set(num_frames, k, reference_frames)
    return np.eye(num_frames, dtype=bool) | is_ref[:, None] | is_ref[None, :]


# ========================================================================================== layout and padding
@dataclasses.dataclass(frozen=True)
class VideoTokenLayout:
    """Where each token sits in the block-aligned sequence the kernels see.

    ``num_frames`` segments of ``tokens_per_frame`` tokens, each padded to ``frame_len = ceil(S / block) * block``,
    then ``text_len`` text tokens padded to a block multiple. For Attention Tile a segment is a latent frame; for
    STA (``sta_layout``) it is one 3D tile of the tile-major order, and the block is the tile.

    Unpadded length ``seq_len = T * S + text_len``; padded length ``padded_len = T * frame_len + text_padded``.
    """

    num_frames: int
    tokens_per_frame: int
    block_size: int
    text_len: int = 0

    def __post_init__(self):
        _check_int("num_frames", self.num_frames, 1)
        _check_int("tokens_per_frame", self.tokens_per_frame, 1)
        _check_int("block_size", self.block_size, 1)
        _check_int("text_len", self.text_len, 0)
        for name in ("num_frames", "tokens_per_frame", "block_size", "text_len"):
            object.__setattr__(self, name, int(getattr(self, name)))

    # ------------------------------------------------------------------------------------------------ lengths
    @property
    def blocks_per_frame(self) -> int:
        return -(-self.tokens_per_frame // self.block_size)

    @property
    def frame_len(self) -> int:
        """``S_pad``: tokens per frame after padding."""
        return self.blocks_per_frame * self.block_size

    @property
    def text_blocks(self) -> int:
        return -(-self.text_len // self.block_size)

    @property
    def text_padded(self) -> int:
        return self.text_blocks * self.block_size

    @property
    def video_len(self) -> int:
        """Unpadded video tokens ``T * S``."""
        return self.num_frames * self.tokens_per_frame

    @property
    def seq_len(self) -> int:
        """Unpadded sequence length ``T * S + text_len``."""
        return self.video_len + self.text_len

    @property
    def num_blocks(self) -> int:
        return self.num_frames * self.blocks_per_frame + self.text_blocks

    @property
    def padded_len(self) -> int:
        """``N_pad``: the sequence length the kernels see."""
        return self.num_blocks * self.block_size

    @property
    def kv_valid(self) -> np.ndarray:
        """bool ``[N_pad]``: False on padding (frame tails and text tail)."""
        frame = np.arange(self.frame_len) < self.tokens_per_frame
        text = np.arange(self.text_padded) < self.text_len
        return np.concatenate([np.tile(frame, self.num_frames), text])

    # --------------------------------------------------------------------------------------------- pad / unpad
    def pad(self, x, axis: int = 1):
        """Zero-pad the token axis ``axis`` from ``seq_len`` to ``padded_len`` (numpy or jax, static shapes)."""
        x, xp = _as_array(x)
        axis = _normalize_axis(axis, x.ndim)
        if x.shape[axis] != self.seq_len:
            raise ValueError(f"x: expected {self.seq_len} tokens (T*S + text_len) on axis {axis}, "
                             f"got shape {tuple(x.shape)}")
        lead, tail = x.shape[:axis], x.shape[axis + 1:]
        video = _slice(x, 0, self.video_len, axis).reshape(lead + (self.num_frames, self.tokens_per_frame) + tail)
        widths = [(0, 0)] * video.ndim
        widths[axis + 1] = (0, self.frame_len - self.tokens_per_frame)
        video = xp.pad(video, widths).reshape(lead + (self.num_frames * self.frame_len,) + tail)
        if not self.text_len:
            return video
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, self.text_padded - self.text_len)
        return xp.concatenate([video, xp.pad(_slice(x, self.video_len, self.seq_len, axis), widths)], axis=axis)

    def unpad(self, x, axis: int = 1):
        """Drop the padding of the token axis ``axis``: ``padded_len`` -> ``seq_len``; ``unpad(pad(x)) == x``."""
        x, xp = _as_array(x)
        axis = _normalize_axis(axis, x.ndim)
        if x.shape[axis] != self.padded_len:
            raise ValueError(f"x: expected {self.padded_len} padded tokens on axis {axis}, got shape {tuple(x.shape)}")
        lead, tail = x.shape[:axis], x.shape[axis + 1:]
        padded_video = self.num_frames * self.frame_len
        video = _slice(x, 0, padded_video, axis).reshape(lead + (self.num_frames, self.frame_len) + tail)
        video = _slice(video, 0, self.tokens_per_frame, axis + 1).reshape(lead + (self.video_len,) + tail)
        if not self.text_len:
            return video
        text = _slice(x, padded_video, padded_video + self.text_len, axis)
        return xp.concatenate([video, text], axis=axis)


def _mask_stack(tile_mask, num_frames: int, name: str = "tile_mask") -> np.ndarray:
    """bool ``[M, T, T]`` from ``[T, T]`` or ``[H, T, T]``."""
    mask = np.asarray(tile_mask)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[1:] != (num_frames, num_frames) or mask.shape[0] == 0:
        raise ValueError(f"{name}: expected bool [T, T] or [H, T, T] with T={num_frames} (the layout's frames), "
                         f"got shape {np.shape(tile_mask)}")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{name}: expected a boolean (or 0/1) mask, got values outside {{0, 1}}")
    return mask.astype(bool)


# ====================================================================================================== tables
def tile_block_table(tile_mask, layout: VideoTokenLayout, max_kv: Optional[int] = None) -> BlockTable:
    """The block table (``block_q = block_kv = layout.block_size``) of a frame-level mask.

    tile_mask: bool ``[T, T]`` (all heads) or ``[H, T, T]`` (per head), ``T = layout.num_frames``. Video blocks
    follow the mask of their frames; every query block visits the text blocks and text query blocks visit every
    block. ``kv_valid`` masks the padding. ``max_kv`` pads the lists to a width shared by several layers.
    """
    mask = _mask_stack(tile_mask, layout.num_frames)
    T = layout.num_frames
    with_text = np.ones((mask.shape[0], T + 1, T + 1), bool)  # segment T = text: on in its row and column
    with_text[:, :T, :T] = mask
    segment = np.concatenate([np.repeat(np.arange(T), layout.blocks_per_frame), np.full(layout.text_blocks, T)])
    block_mask = with_text[:, segment[:, None], segment[None, :]]
    return BlockTable.from_block_mask(block_mask, layout.block_size, layout.block_size, layout.kv_valid, max_kv)


def attention_tile_table(layout: VideoTokenLayout, k: int, reference_frames: Optional[Sequence[int]] = None,
                         max_kv: Optional[int] = None) -> BlockTable:
    """``tile_block_table(attention_tile_mask(layout.num_frames, k, reference_frames), layout, max_kv)``."""
    return tile_block_table(attention_tile_mask(layout.num_frames, k, reference_frames), layout, max_kv)


def expected_visited_blocks(num_frames: int, k: int, layout: VideoTokenLayout) -> int:
    """Analytic block products an Attention Tile table visits: ``count(T, k) * (S_pad / block)^2`` for the video,
    plus every video query block's text blocks and every text query block's full row."""
    if num_frames != layout.num_frames:
        raise ValueError(f"num_frames: expected the layout's {layout.num_frames} frames, got {num_frames}")
    bpf, nt = layout.blocks_per_frame, layout.text_blocks
    return attention_tile_count(num_frames, k) * bpf ** 2 + num_frames * bpf * nt + nt * layout.num_blocks


def tile_token_mask_reference(tile_mask, layout: VideoTokenLayout, padded: bool = True) -> np.ndarray:
    """bool ``[M, N, N]`` token-level mask straight from the definition, the oracle for ``tile_block_table``.

    ``mask[q, kv] = M[frame(q), frame(kv)]`` between video tokens, or True when either token is text. With
    ``padded`` the positions are the padded sequence (``N = N_pad``; padded keys False, padded queries follow
    their frame or the text); without, the unpadded one (``N = T*S + text_len``, ``frame(p) = p // S``).
    """
    mask = _mask_stack(tile_mask, layout.num_frames)
    T = layout.num_frames
    if padded:
        pos = np.arange(layout.padded_len)
        frame_len, valid = layout.frame_len, layout.kv_valid
    else:
        pos = np.arange(layout.seq_len)
        frame_len, valid = layout.tokens_per_frame, np.ones(layout.seq_len, bool)
    is_text = pos >= T * frame_len
    frame = np.where(is_text, 0, pos // frame_len)
    video = mask[:, frame[:, None], frame[None, :]] & ~is_text[:, None] & ~is_text[None, :]
    return (video | is_text[:, None] | is_text[None, :]) & valid[None, :]


# ======================================================================================== Sliding Tile Attention
def _tile_grid(canvas, tile) -> tuple[Triple, Triple, Triple]:
    canvas = _check_triple("canvas", canvas)
    tile = _check_triple("tile", tile)
    for axis, (c, t) in enumerate(zip(canvas, tile)):
        if c % t:
            raise ValueError(f"canvas: axis {axis} has {c} tokens, not a multiple of tile[{axis}]={t} "
                             f"(canvas={canvas}, tile={tile}); pad the latent or pick a tile that divides it")
    return canvas, tile, tuple(c // t for c, t in zip(canvas, tile))


@lru_cache(maxsize=64)
def _permutation(canvas: Triple, tile: Triple) -> np.ndarray:
    (T, H, W), (tt, th, tw) = canvas, tile
    order = np.arange(T * H * W).reshape(T // tt, tt, H // th, th, W // tw, tw).transpose(0, 2, 4, 1, 3, 5)
    perm = order.reshape(-1)
    perm.setflags(write=False)
    return perm


def tile_permutation(canvas: Sequence[int], tile: Sequence[int]) -> np.ndarray:
    """int ``[T*H*W]``: ``tiled[p] = x[perm[p]]``. Tile-major order: reshape the frame-major tokens to
    ``(T/tt, tt, H/th, th, W/tw, tw)``, permute to ``(T/tt, H/th, W/tw, tt, th, tw)``, flatten."""
    canvas, tile, _ = _tile_grid(canvas, tile)
    return _permutation(canvas, tile).copy()


def _token_order(canvas, tile, text_len: int, inverse: bool) -> np.ndarray:
    canvas, tile, _ = _tile_grid(canvas, tile)
    text_len = _check_int("text_len", text_len, 0)
    perm = _permutation(canvas, tile)
    if inverse:
        perm = np.argsort(perm)
    return np.concatenate([perm, np.arange(perm.size, perm.size + text_len)])


def _take_tokens(x, order: np.ndarray, axis: int, name: str):
    x, xp = _as_array(x)
    axis = _normalize_axis(axis, x.ndim)
    if x.shape[axis] != order.size:
        raise ValueError(f"x: expected {order.size} tokens ({name}) on axis {axis}, got shape {tuple(x.shape)}")
    return xp.take(x, order, axis=axis)


def tile_tokens(x, canvas: Sequence[int], tile: Sequence[int], axis: int = 1, text_len: int = 0):
    """Frame-major -> tile-major along ``axis`` (numpy or jax). ``x.shape[axis] = T*H*W + text_len``; the text
    tokens after the video stay where they are."""
    return _take_tokens(x, _token_order(canvas, tile, text_len, inverse=False), axis, "T*H*W + text_len")


def untile_tokens(x, canvas: Sequence[int], tile: Sequence[int], axis: int = 1, text_len: int = 0):
    """Tile-major -> frame-major along ``axis``; the inverse of ``tile_tokens``."""
    return _take_tokens(x, _token_order(canvas, tile, text_len, inverse=True), axis, "T*H*W + text_len")


def _window_stack(window: Windows, grid: Triple) -> tuple[np.ndarray, bool]:
    """int ``[M, 3]`` windows (in tiles) and whether ``window`` was a per-head list."""
    try:
        arr = np.asarray(window)
    except ValueError:
        arr = np.empty(0)
    per_head = arr.ndim == 2
    if arr.ndim not in (1, 2) or arr.shape[-1] != 3 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"window: expected (kt, kh, kw) in tiles or a per-head list of them, got {window!r}")
    arr = arr.reshape(-1, 3)
    for head, w in enumerate(arr):
        where = f"window[{head}]" if per_head else "window"
        for axis, (k, n) in enumerate(zip(w.tolist(), grid)):
            if k < 1 or k > n:
                raise ValueError(f"{where}: axis {axis} size {k} must be in [1, {n}] (the tile grid is {grid})")
            if k % 2 == 0 and k != n:
                raise ValueError(f"{where}: axis {axis} size {k} must be odd (or equal to the grid size {n}, "
                                 f"the whole axis); tile grid {grid}")
    return arr.astype(np.int64), per_head


def sliding_tile_mask(tile_grid: Sequence[int], window: Windows) -> np.ndarray:
    """bool ``[n, n]`` (one window) or ``[H, n, n]`` (a list of per-head windows) over the ``n = nt*nh*nw`` tiles
    in raster order of ``tile_grid = (nt, nh, nw)``.

    A query tile ``q`` attends to the tiles ``kv`` with ``|c - kv| <= k // 2`` on every axis, where the centre
    ``c = clamp(q, k // 2, n_axis - 1 - k // 2)`` is shifted inward at the borders, so each query tile sees
    exactly ``kt * kh * kw`` tiles. Window sizes are odd; a size equal to the grid size covers the whole axis
    whatever its parity (STA's calibration candidates include such full-axis windows).
    """
    grid = _check_triple("tile_grid", tile_grid)
    windows, per_head = _window_stack(window, grid)
    coords = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=-1)  # [n, 3]
    masks = []
    for w in windows:
        ok = np.ones((coords.shape[0],) * 2, bool)
        for axis, (k, n) in enumerate(zip(w.tolist(), grid)):
            if k == n:
                continue
            centre = np.clip(coords[:, axis], k // 2, n - 1 - k // 2)
            ok &= np.abs(centre[:, None] - coords[None, :, axis]) <= k // 2
        masks.append(ok)
    return np.stack(masks) if per_head else masks[0]


def sta_layout(canvas: Sequence[int], tile: Sequence[int], text_len: int = 0) -> VideoTokenLayout:
    """The layout of STA's tile-major sequence: one segment and one block per tile (no video padding), then the
    text padded to a tile multiple."""
    _, tile, grid = _tile_grid(canvas, tile)
    volume = int(np.prod(tile))
    return VideoTokenLayout(int(np.prod(grid)), volume, volume, text_len)


def sta_block_table(canvas: Sequence[int], tile: Sequence[int], window: Windows, text_len: int = 0,
                    max_kv: Optional[int] = None) -> BlockTable:
    """The STA table over the tile-major sequence (``tile_tokens`` order, then text): blocks of one tile,
    ``window`` in tiles (one ``(kt, kh, kw)`` or a per-head list). Pad the text with ``sta_layout(...).pad``."""
    _, _, grid = _tile_grid(canvas, tile)
    return tile_block_table(sliding_tile_mask(grid, window), sta_layout(canvas, tile, text_len), max_kv)


def sta_token_mask_reference(canvas: Sequence[int], tile: Sequence[int], window: Windows, text_len: int = 0,
                             padded: bool = True, tiled: bool = True) -> np.ndarray:
    """bool ``[M, N, N]`` token-level STA mask computed per token, the oracle for ``sta_block_table``.

    Each token's ``(t, h, w)`` comes from its position (tile-major when ``tiled``, frame-major otherwise), its
    tile is ``(t // tt, h // th, w // tw)``, and video-video pairs follow the clamp-centred window
    (``c = min(max(q, k // 2), n - 1 - k // 2)``); image queries see every text key, text queries see every key.
    With ``padded`` the text is padded to a tile multiple and padded keys are False.
    """
    canvas, tile, grid = _tile_grid(canvas, tile)
    windows, _ = _window_stack(window, grid)
    text_len = _check_int("text_len", text_len, 0)
    n_video = int(np.prod(canvas))
    volume = int(np.prod(tile))
    text_total = -(-text_len // volume) * volume if padded else text_len
    pos = np.arange(n_video + text_total)
    is_text = pos >= n_video
    video_pos = np.where(is_text, 0, pos)
    if tiled:
        it, ih, iw, a, b, c = np.unravel_index(video_pos, grid + tile)
        thw = (it * tile[0] + a, ih * tile[1] + b, iw * tile[2] + c)
    else:
        thw = np.unravel_index(video_pos, canvas)
    tile_xyz = [coord // size for coord, size in zip(thw, tile)]
    valid = pos < n_video + text_len
    masks = []
    for w in windows:
        ok = ~is_text[:, None] & ~is_text[None, :]
        for axis, k in enumerate(w.tolist()):
            n, half, coord = grid[axis], k // 2, tile_xyz[axis]
            centre = np.minimum(np.maximum(coord, half), n - 1 - half)
            ok &= np.abs(centre[:, None] - coord[None, :]) <= half
        masks.append((ok | is_text[:, None] | is_text[None, :]) & valid[None, :])
    return np.stack(masks)
