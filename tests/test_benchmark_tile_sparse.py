"""benchmarks/tile_sparse_attention.py end to end at tiny shapes (16 tokens per frame, 2 heads, 2 repeats)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import tile_sparse_attention as bench

REQUIRED = ("bench", "impl", "mask", "frames", "tokens_per_frame", "block_size", "sparsity", "dense_ms", "sparse_ms",
            "speedup", "ideal_speedup", "speedup_vs_ideal", "dense_kernel_ms", "kernel_speedup",
            "kernel_speedup_vs_ideal", "backend", "device", "date", "jax", "batch", "heads", "head_dim", "pass")
TINY = ["--quick", "--tokens-per-frame-8", "16", "--tokens-per-frame-24", "16", "--heads", "2", "--head-dim", "16",
        "--repeats", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tile_bench") / "rows.jsonl"
    rows = bench.main(TINY + ["--backward", "--out", str(out)])
    return rows, [json.loads(line) for line in out.read_text().splitlines()]


def _analytic_sparsity(row: dict) -> float:
    """Attention Tile: 1 - (T + k (2T - k - 1)) / T^2; STA: 1 - window volume / tile count."""
    T = row["frames"]
    if row["family"] == "attention_tile":
        k = row["k"]
        return 1.0 - (T + k * (2 * T - k - 1)) / T ** 2
    grid = [c // t for c, t in zip(row["sta_canvas"], row["sta_tile"])]
    return 1.0 - math.prod(row["sta_window"]) / math.prod(grid)


def test_printed_lines_equal_returned_rows_and_file(capsys, tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = bench.main(TINY + ["--ladders", "8", "--ks-8", "2,1", "--no-sta", "--out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows == [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mask"] for r in rows] == ["2:6", "1:7"]


def test_every_ladder_mask_and_pass_has_a_row(run):
    rows, written = run
    assert rows == written
    got = {(r["frames"], r["pass"], r["mask"]) for r in rows}
    expected = set()
    for p in ("fwd", "fwd+bwd"):
        expected |= {(8, p, m) for m in ("4:4", "3:5", "2:6", "1:7", "sta(3,1,1)")}
        expected |= {(24, p, m) for m in ("12:12", "8:16", "6:18", "4:20", "3:21", "2:22", "1:23", "sta(3,1,1)")}
    assert got == expected and len(rows) == len(expected)


def test_rows_have_the_required_keys_and_consistent_figures(run):
    rows, _ = run
    for r in rows:
        for key in REQUIRED:
            assert key in r, (key, r)
        assert r["bench"] == "tile_sparse_attention" and r["impl"] == "xla" and r["backend"] == "cpu"
        assert (r["tokens_per_frame"], r["block_size"], r["heads"], r["head_dim"], r["batch"]) == (16, 16, 2, 16, 1)
        assert r["sparsity"] == pytest.approx(_analytic_sparsity(r), abs=1e-12)
        assert r["table_sparsity"] == pytest.approx(r["sparsity"], abs=1e-12)  # no text, no padding
        assert r["visited_blocks"] == round((1 - r["sparsity"]) * r["total_blocks"])
        for key in ("dense_ms", "dense_kernel_ms", "sparse_ms", "dense_ms_min", "dense_kernel_ms_min",
                    "sparse_ms_min"):
            assert r[key] > 0, (key, r)
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
        assert r["kernel_speedup"] == pytest.approx(r["dense_kernel_ms"] / r["sparse_ms"])
        assert r["ideal_speedup"] == pytest.approx(1 / (1 - r["sparsity"]))
        assert r["speedup_vs_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
        assert r["kernel_speedup_vs_ideal"] == pytest.approx(r["kernel_speedup"] / r["ideal_speedup"])
        if r["sparsity"] < bench.TARGET_SPARSITY:
            assert r["target_met"] is None and r["kernel_target_met"] is None
        else:
            assert r["target_met"] == (r["speedup_vs_ideal"] >= bench.TARGET_FRACTION)
            assert r["kernel_target_met"] == (r["kernel_speedup_vs_ideal"] >= bench.TARGET_FRACTION)
        # the all-blocks table through the block-sparse path is the dense attention
        assert r["check_max_abs_err"] < 1e-4


def test_baselines_are_shared_within_a_ladder_pass(run):
    rows, _ = run
    for frames in (8, 24):
        for p in ("fwd", "fwd+bwd"):
            group = [r for r in rows if r["frames"] == frames and r["pass"] == p]
            assert len({r["dense_ms"] for r in group}) == 1 and len({r["dense_kernel_ms"] for r in group}) == 1


def test_padded_frames_match_the_dense_baseline(tmp_path):
    """24 tokens per frame in blocks of 16: frames padded to 32, padded keys masked."""
    rows = bench.main(["--ladders", "8", "--ks-8", "1", "--tokens-per-frame-8", "24", "--block-size", "16",
                       "--heads", "1", "--head-dim", "8", "--repeats", "1"])
    (r,) = rows
    assert (r["seq_len"], r["padded_len"], r["block_size"]) == (8 * 24, 8 * 32, 16)
    assert r["sparsity"] == pytest.approx(1 - 22 / 64) and r["table_sparsity"] == pytest.approx(r["sparsity"])
    assert r["check_max_abs_err"] < 1e-4


@pytest.mark.parametrize("argv, message", [
    (["--tokens-per-frame-8", "0"], "positive integer"),
    (["--tokens-per-frame-24", "-4"], "positive integer"),
    (["--repeats", "-1"], "positive integer"),
    (["--heads", "two"], "positive integer"),
    (["--ks-8", "9"], "--ks-8"),
    (["--ladders", "16"], "frame counts"),
    (["--impl", "cuda"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
