"""Dense vs block-sparse attention over the Efficient-vDiT "Attention Tile" mask ladders, side by side.

    python -m benchmarks.tile_sparse_attention [--quick] [--impl auto|xla|reference|pallas_tpu|pallas_gpu]
                                               [--backward] [--out results.jsonl] ...

For each ladder (``T = 8`` and ``T = 24`` latent frames, no text tokens) and each mask ``k:(T-k)`` of it
(``jaxeff.attention.attention_tile_mask``: ``k`` global reference frames), one row compares three timings of the
same self-attention on random ``q, k, v [B, H, N, D]``:

* ``dense_ms``: plain jnp softmax attention (``QK^T``, float32 softmax, ``PV``), jitted; the ``N x N`` scores are
  materialised. This is what a model without a kernel runs, but on a CPU it is slowed by moving that large score
  matrix through DRAM, so ratios against it flatter the sparse path.
* ``dense_kernel_ms``: ``block_sparse_attention`` on the table that visits every block (``dense_table``), same
  implementation, block size and padding as the sparse run ("same-kernel dense"). Ratios against it isolate what
  skipping blocks buys.
* ``sparse_ms``: ``block_sparse_attention`` on the mask's table (``tile_block_table``).

``impl="auto"`` is the XLA path on the CPU, the Triton kernel on GPU and the Mosaic kernel on TPU. Inputs are
made once per ladder; the block-sparse runs see the block-aligned sequence (``VideoTokenLayout.pad``: frames padded
to a block multiple, padded keys masked) and the dense baseline the unpadded one; padding happens outside the
timed calls. Every function is compiled and run once before timing; then each repeat calls the dense baseline,
the same-kernel dense and every mask's sparse run once each, in an order rotated from repeat to repeat, so that
load from other processes hits them alike. Times are medians over the repeats (``*_ms_min``: the fastest repeat,
less sensitive to that load). ``--backward`` adds rows for the forward plus backward (``jax.grad`` of
``sum(out * cotangent)`` in q, k and v), ``"pass": "fwd+bwd"``.

Each row: ``sparsity`` is the analytic fraction of skipped tiles (``attention_tile_sparsity``; it equals the
table's block sparsity, ``table_sparsity``, when there is no text), ``ideal_speedup = 1 / (1 - sparsity)`` is the
work-proportional speedup, ``speedup = dense_ms / sparse_ms`` and ``kernel_speedup = dense_kernel_ms /
sparse_ms``, each also divided by the ideal (``*_vs_ideal``). The target "speedup >= 0.7 x ideal
for every mask with sparsity >= 45%" is reported against both baselines (``target_met`` / ``kernel_target_met``;
null for masks below 45%). ``check_max_abs_err`` is the largest difference between the dense baseline and the
same-kernel dense output (a check that the two compute the same attention).

Ladders (documented choices): ``T = 8`` uses the paper's four masks 4:4, 3:5, 2:6 and 1:7 (``mask_ladder(8)``).
``T = 24``: the paper's named masks 12:12, 8:16, 6:18, 4:20 and 3:21 (``mask_ladder(24)``) plus 2:22 and 1:23,
sparsity 0.23 to 0.88 (sparse runs are the cheap part of a repeat, so the whole ladder is kept). Each ladder also
gets one Sliding Tile Attention row (``"family": "sta"``) when the block is a whole frame: the ``T x h x w`` latent
(``h * w`` = tokens per frame, ``h`` the largest divisor not above its square root) cut into ``2 x h/2 x w`` tiles
of one block each (``T`` tiles), window ``(3, 1, 1)`` tiles, so every query tile sees 3 of them (sparsity
``1 - 3 / T``).

Shapes: ``--quick`` is ``T = 8`` at 256 tokens per frame (16x16 latent frames, N = 2048) and ``T = 24`` at 64
(8x8, N = 1536), 15 repeats; the full run uses 1024 and 256 tokens per frame (N = 8192 and 6144; no STA row at
T = 8, whose block is then a quarter frame), 21 repeats. On a 2-core CPU shared with another job, ``--quick`` took
36 s (2.5 min with ``--backward``) and the full run 9 min. Blocks are ``min(tokens per frame, --block-size)``,
default cap 256 (128 on GPU, where Triton keeps a block pair in registers; a compiled TPU kernel needs multiples of
128). float32 on the CPU, bfloat16 elsewhere (``--dtype``). On a GPU or TPU the rows also carry achieved TFLOP/s
(``sparse_tflops``, ``dense_kernel_tflops``, ``dense_tflops``), counting
``4 * B * H * visited_blocks * block_q * block_kv * D`` flops for the forward (every visited block product, padding
included) and 3.5 times that for forward plus backward (the flash-attention convention: backward = 2.5 x forward).

Output: one JSON object per line on stdout (``--out`` also appends them to a file), then a summary table on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from benchmarks._jsonl import JsonLines
from jaxeff.attention.tile_masks import (
    VideoTokenLayout,
    attention_tile_mask,
    attention_tile_sparsity,
    mask_ladder,
    mask_name,
    sliding_tile_mask,
    sta_layout,
    tile_block_table,
)
from pallas_kernels._dispatch import IMPLS, resolve_impl
from pallas_kernels.block_sparse_attention import BlockTable, block_sparse_attention, dense_table

BENCH = "tile_sparse_attention"
LADDER_FRAMES = (8, 24)
DEFAULT_KS = {8: tuple(k for _, k in mask_ladder(8)), 24: tuple(k for _, k in mask_ladder(24)) + (2, 1)}
TOKENS_PER_FRAME = {"quick": {8: 256, 24: 64}, "full": {8: 1024, 24: 256}}
REPEATS = {"quick": 15, "full": 21}
STA_WINDOW = (3, 1, 1)
TARGET_SPARSITY = 0.45  # the target applies to masks at least this sparse
TARGET_FRACTION = 0.7  # ... which must reach this fraction of the ideal speedup
BWD_FLOP_FACTOR = 3.5  # forward + backward flops over forward flops (flash-attention convention)


# ---- attention under test -----------------------------------------------------------------------------------------


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain softmax attention ``[B, H, N, D]`` with the ``N x N`` scores materialised (float32 softmax)."""
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)


def with_backward(attend: Callable) -> Callable:
    """``(q, k, v, cotangent) -> (dq, dk, dv)`` of ``sum(attend(q, k, v) * cotangent)``: a forward plus a
    backward."""

    def loss(q, k, v, cotangent):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


# ---- the ladders --------------------------------------------------------------------------------------------------


def _sta_canvas(num_frames: int, tokens_per_frame: int) -> Optional[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """``(canvas, tile)`` of the STA row, or None when the frame has no even height to halve or T is odd."""
    h = max(d for d in range(1, math.isqrt(tokens_per_frame) + 1) if tokens_per_frame % d == 0)
    w = tokens_per_frame // h
    if h % 2 or num_frames % 2:
        return None
    return (num_frames, h, w), (2, h // 2, w)


@functools.lru_cache(maxsize=None)
def _sta_table(canvas: tuple, tile: tuple, window: tuple) -> BlockTable:
    grid = tuple(c // t for c, t in zip(canvas, tile))
    return tile_block_table(sliding_tile_mask(grid, window), sta_layout(canvas, tile))


def ladder_masks(num_frames: int, ks: tuple[int, ...], layout: VideoTokenLayout, with_sta: bool) -> list[dict]:
    """``[{"family", "mask", "k", "sparsity", "table", ...}, ...]`` for one ladder, densest Attention Tile mask
    first, then the STA row (when the block is a whole frame and ``with_sta``)."""
    masks = []
    for k in ks:
        masks.append({"family": "attention_tile", "mask": mask_name(num_frames, k), "k": k,
                      "sparsity": attention_tile_sparsity(num_frames, k),
                      "table": tile_block_table(attention_tile_mask(num_frames, k), layout)})
    if with_sta and layout.block_size != layout.tokens_per_frame:
        print(f"[{BENCH}] T={num_frames}: no STA row (its tiles are one block; the block {layout.block_size} is not "
              f"the frame's {layout.tokens_per_frame} tokens)", file=sys.stderr)
    elif with_sta:
        shape = _sta_canvas(num_frames, layout.tokens_per_frame)
        if shape is None:
            print(f"[{BENCH}] T={num_frames}: no STA row (needs an even T and an even frame height)", file=sys.stderr)
        else:
            canvas, tile = shape
            grid = tuple(c // t for c, t in zip(canvas, tile))
            table = _sta_table(canvas, tile, STA_WINDOW)
            masks.append({"family": "sta", "mask": "sta" + str(STA_WINDOW).replace(" ", ""), "k": None,
                          "sparsity": 1.0 - math.prod(STA_WINDOW) / math.prod(grid), "table": table,
                          "sta_canvas": list(canvas), "sta_tile": list(tile), "sta_window": list(STA_WINDOW)})
    return masks


# ---- timing -------------------------------------------------------------------------------------------------------


def _call_ms(fn: Callable, args: tuple) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) * 1e3


def time_interleaved(calls: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds of ``repeats`` calls of each ``fn(*args)``, one call of each per repeat, in an order rotated by
    one position every repeat. Calls each function once beforehand (compilation, first-touch allocations)."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn, args = calls[name]
            times[name].append(_call_ms(fn, args))
    return times


def _fwd_flops(batch: int, heads: int, head_dim: int, table: BlockTable) -> float:
    per_mask_heads = heads // table.num_masks
    return 4.0 * batch * per_mask_heads * table.visited_blocks * table.block_q * table.block_kv * head_dim


def _target(sparsity: float, ratio_vs_ideal: float) -> Optional[bool]:
    return None if sparsity < TARGET_SPARSITY else bool(ratio_vs_ideal >= TARGET_FRACTION)


def run_ladder(num_frames: int, tokens_per_frame: int, block_size: int, ks: tuple[int, ...], *, batch: int,
               heads: int, head_dim: int, dtype, impl: str, repeats: int, backward: bool, with_sta: bool,
               seed: int) -> list[dict]:
    """The rows of one ladder (without the common fields): forward, and forward plus backward with ``backward``."""
    layout = VideoTokenLayout(num_frames, tokens_per_frame, block_size)
    masks = ladder_masks(num_frames, ks, layout, with_sta)
    full = dense_table(layout.padded_len, block_size, kv_valid=layout.kv_valid)

    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, heads, layout.seq_len, head_dim)
    q, k, v, ct = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    qp, kp, vp, ctp = (jax.block_until_ready(layout.pad(x, axis=2)) for x in (q, k, v, ct))

    def sparse(table: BlockTable) -> Callable:
        return functools.partial(block_sparse_attention, table=table, impl=impl)

    dense_fwd = jax.jit(dense_attention)
    kernel_fwd = jax.jit(sparse(full))
    err = jnp.max(jnp.abs(layout.unpad(kernel_fwd(qp, kp, vp), axis=2).astype(jnp.float32)
                          - dense_fwd(q, k, v).astype(jnp.float32)))
    check_max_abs_err = float(err)

    passes = [("fwd", lambda f: f, (), ())] + ([("fwd+bwd", with_backward, (ct,), (ctp,))] if backward else [])
    rows = []
    for pass_name, wrap, extra, extra_padded in passes:
        calls = {"dense": (jax.jit(wrap(dense_attention)), (q, k, v) + extra),
                 "dense_kernel": (jax.jit(wrap(sparse(full))), (qp, kp, vp) + extra_padded)}
        for m in masks:
            calls[m["mask"]] = (jax.jit(wrap(sparse(m["table"]))), (qp, kp, vp) + extra_padded)
        t0 = time.perf_counter()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        times = time_interleaved(calls, repeats)
        print(f"[{BENCH}] T={num_frames} {pass_name}: {len(calls)} functions x {repeats} repeats in "
              f"{time.perf_counter() - t0:.1f} s (load average {load})", file=sys.stderr)
        dense_ms = statistics.median(times["dense"])
        kernel_ms = statistics.median(times["dense_kernel"])
        flop_factor = 1.0 if pass_name == "fwd" else BWD_FLOP_FACTOR
        for m in masks:
            table: BlockTable = m["table"]
            sparse_ms = statistics.median(times[m["mask"]])
            ideal = 1.0 / (1.0 - m["sparsity"])
            speedup, kernel_speedup = dense_ms / sparse_ms, kernel_ms / sparse_ms
            row = {
                "impl": resolve_impl(impl), "impl_requested": impl, "pass": pass_name, "family": m["family"],
                "mask": m["mask"], "k": m["k"], "frames": num_frames, "tokens_per_frame": tokens_per_frame,
                "block_size": block_size, "seq_len": layout.seq_len, "padded_len": layout.padded_len,
                "batch": batch, "heads": heads, "head_dim": head_dim, "dtype": jnp.dtype(dtype).name,
                "sparsity": m["sparsity"], "table_sparsity": table.sparsity,
                "visited_blocks": table.visited_blocks, "total_blocks": table.num_q_blocks * table.num_kv_blocks,
                "dense_ms": dense_ms, "dense_kernel_ms": kernel_ms, "sparse_ms": sparse_ms,
                "speedup": speedup, "ideal_speedup": ideal, "speedup_vs_ideal": speedup / ideal,
                "kernel_speedup": kernel_speedup, "kernel_speedup_vs_ideal": kernel_speedup / ideal,
                "target_met": _target(m["sparsity"], speedup / ideal),
                "kernel_target_met": _target(m["sparsity"], kernel_speedup / ideal),
                "dense_ms_min": min(times["dense"]), "dense_kernel_ms_min": min(times["dense_kernel"]),
                "sparse_ms_min": min(times[m["mask"]]), "repeats": repeats,
                "check_max_abs_err": check_max_abs_err, "loadavg_1m": load,
            }
            row.update({key: m[key] for key in ("sta_canvas", "sta_tile", "sta_window") if key in m})
            if jax.default_backend() != "cpu":
                kernel_flops = flop_factor * _fwd_flops(batch, heads, head_dim, full)
                row["sparse_tflops"] = flop_factor * _fwd_flops(batch, heads, head_dim, table) / sparse_ms / 1e9
                row["dense_kernel_tflops"] = kernel_flops / kernel_ms / 1e9
                dense_flops = flop_factor * 4.0 * batch * heads * layout.seq_len ** 2 * head_dim
                row["dense_tflops"] = dense_flops / dense_ms / 1e9
            rows.append(row)
    return rows


# ---- output -------------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summary_table(rows: list[dict]) -> str:
    """A fixed-width table of the rows, plus the target verdicts (masks with sparsity >= 45%)."""
    head = (f"{'T':>3} {'pass':<7} {'mask':<12} {'sparsity':>8} {'ideal':>6} {'dense ms':>9} {'kern ms':>9} "
            f"{'sparse ms':>9} {'speedup':>8} {'/ideal':>6} {'kern sp':>8} {'/ideal':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['frames']:>3} {r['pass']:<7} {r['mask']:<12} {r['sparsity']:>8.3f} "
                     f"{r['ideal_speedup']:>6.2f} "
                     f"{r['dense_ms']:>9.2f} {r['dense_kernel_ms']:>9.2f} {r['sparse_ms']:>9.2f} "
                     f"{r['speedup']:>7.2f}x {r['speedup_vs_ideal']:>6.2f} {r['kernel_speedup']:>7.2f}x "
                     f"{r['kernel_speedup_vs_ideal']:>6.2f}")
    judged = [r for r in rows if r["target_met"] is not None]
    for key, label in (("target_met", "vs dense jnp"), ("kernel_target_met", "vs same-kernel dense")):
        missed = [f"T={r['frames']} {r['mask']} ({r['pass']})" for r in judged if not r[key]]
        verdict = "met by all" if not missed else "missed by " + ", ".join(missed)
        lines.append(f"target speedup >= {TARGET_FRACTION} x ideal at sparsity >= {TARGET_SPARSITY} ({label}, "
                     f"{len(judged)} rows): {verdict}")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _k_list(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))  # unique, in order
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of reference-frame counts, got {text!r}") from None
    if not ks or min(ks) < 0:
        raise argparse.ArgumentTypeError(f"expected a non-empty comma list of counts >= 0, got {text!r}")
    return ks


def _ladder_list(text: str) -> tuple[int, ...]:
    try:
        frames = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        frames = ()
    if not frames or any(t not in LADDER_FRAMES for t in frames):
        raise argparse.ArgumentTypeError(f"expected a comma list of frame counts from {LADDER_FRAMES}, got {text!r}")
    return frames


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tile_sparse_attention",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="15 repeats at 256 / 64 tokens per frame (about a minute on a 2-core CPU)")
    ap.add_argument("--impl", default="auto", choices=IMPLS, help="block_sparse_attention implementation")
    ap.add_argument("--ladders", type=_ladder_list, default=LADDER_FRAMES, help="comma list of frame counts (8,24)")
    ap.add_argument("--ks-8", type=_k_list, default=None, help="reference-frame counts k of the T=8 ladder")
    ap.add_argument("--ks-24", type=_k_list, default=None, help="reference-frame counts k of the T=24 ladder")
    ap.add_argument("--tokens-per-frame-8", type=_positive_int, default=None,
                    help="tokens per latent frame for T=8 (default 256 quick, 1024 full)")
    ap.add_argument("--tokens-per-frame-24", type=_positive_int, default=None,
                    help="tokens per latent frame for T=24 (default 64 quick, 256 full)")
    ap.add_argument("--block-size", type=_positive_int, default=None,
                    help="largest block; each ladder uses min(this, tokens per frame) (default 256; 128 on GPU)")
    ap.add_argument("--batch", type=_positive_int, default=1)
    ap.add_argument("--heads", type=_positive_int, default=8)
    ap.add_argument("--head-dim", type=_positive_int, default=64)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="input dtype (default float32 on the CPU, bfloat16 elsewhere)")
    ap.add_argument("--repeats", type=_positive_int, default=None,
                    help="timed calls of each function (default 15 quick, 21 full)")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward (jax.grad)")
    ap.add_argument("--no-sta", action="store_true", help="skip the Sliding Tile Attention row of each ladder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return ap


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = build_parser()
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    ks_by_frames = {8: args.ks_8, 24: args.ks_24}
    for frames, ks in ks_by_frames.items():
        if ks is not None and max(ks) > frames:
            ap.error(f"--ks-{frames}: expected counts in [0, {frames}], got {list(ks)}")
    tokens = {8: args.tokens_per_frame_8 or TOKENS_PER_FRAME[mode][8],
              24: args.tokens_per_frame_24 or TOKENS_PER_FRAME[mode][24]}
    backend = jax.default_backend()
    block_cap = args.block_size or (128 if backend in ("gpu", "cuda", "rocm") else 256)
    dtype = jnp.dtype(args.dtype or ("float32" if backend == "cpu" else "bfloat16"))
    repeats = args.repeats or REPEATS[mode]

    device = jax.devices()[0]
    common = {
        "backend": backend, "device": device.device_kind, "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "cpu": _cpu_name(), "date": datetime.date.today().isoformat(), "jax": jax.__version__,
        "quick": bool(args.quick),
    }
    t_start = time.perf_counter()
    with JsonLines(BENCH, args.out, common) as emit:
        for frames in args.ladders:
            ks = ks_by_frames[frames] or DEFAULT_KS[frames]
            ladder = run_ladder(frames, tokens[frames], min(tokens[frames], block_cap), ks, batch=args.batch,
                                heads=args.heads, head_dim=args.head_dim, dtype=dtype, impl=args.impl,
                                repeats=repeats, backward=args.backward, with_sta=not args.no_sta, seed=args.seed)
            for row in ladder:
                emit(**row)
    rows = emit.rows
    print(summary_table(rows), file=sys.stderr)
    print(f"[{BENCH}] {len(rows)} rows in {time.perf_counter() - t_start:.1f} s on {backend} ({device.device_kind})",
          file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
