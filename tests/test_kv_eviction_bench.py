"""benchmarks/kv_eviction.py end to end on a tiny random model (byte tokenizer, real KJV text), tiny settings."""

import json
import math

import jax
import pytest

from benchmarks import kv_eviction as bench
from jaxeff.methods.kv_eviction import AttentionGate, save_gates

REQUIRED = ("bench", "model", "policy", "keep_ratio", "metric", "value", "machine", "date", "jax")
RATIOS = (1.0, 0.5)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kv_bench")
    cfg = bench.load_bench_model("random-tiny").model.config
    gate = AttentionGate(heads=1, head_dim=8)
    save_gates(tmp / "gates", gate, gate.init(jax.random.key(1), cfg))  # untrained: exercises the path only
    out = tmp / "rows.jsonl"
    rows = bench.main([
        "--model", "random-tiny", "--gates-tiny", str(tmp / "gates"), "--ratios", ",".join(map(str, RATIOS)),
        "--context", "256", "--continuation", "8", "--ppl-windows", "2", "--depths", "0.5", "--trials", "1",
        "--batch", "2", "--prefill-repeats", "1", "--attn-context", "512", "--attn-repeats", "3",
        "--step-context", "128", "--step-repeats", "2", "--out", str(out),
    ])
    return rows, [json.loads(line) for line in out.read_text().splitlines()]


def _by(rows, metric):
    return {(r["policy"], r["keep_ratio"]): r for r in rows if r["metric"] == metric}


def test_rows_have_the_required_keys_and_are_written_to_out(rows):
    printed, written = rows
    assert printed == written
    for r in printed:
        for key in REQUIRED:
            assert key in r, (key, r)
        assert r["bench"] == "kv_eviction"
    assert not [r for r in printed if r["metric"] == "skipped"]  # gates were given and the context fits


def test_every_policy_and_ratio_has_ppl_passkey_and_kv_bytes(rows):
    printed, _ = rows
    for metric in ("ppl", "passkey_acc", "kv_bytes"):
        got = _by(printed, metric)
        assert ("dense", 1.0) in got
        for policy in bench.POLICIES:
            for ratio in RATIOS:
                assert (policy, ratio) in got, (metric, policy, ratio)


def test_ppl_is_finite_and_ratio_one_is_the_dense_model(rows):
    ppl = _by(rows[0], "ppl")
    for key, r in ppl.items():
        assert math.isfinite(r["value"]) and r["value"] > 1.0, key
        assert r["windows"] == 2 and r["continuation"] == 8
    for policy in bench.POLICIES:
        assert ppl[(policy, 1.0)]["value"] == ppl[("dense", 1.0)]["value"]
    acc = _by(rows[0], "passkey_acc")
    assert all(0.0 <= r["value"] <= 1.0 for r in acc.values())
    assert acc[("dense", 1.0)]["key_kept"] == 1.0
    assert all(0.0 <= r["key_kept"] <= 1.0 for r in acc.values())


def test_passkey_key_positions_hold_the_key():
    s = bench.EvalSettings(context=256, continuation=8, ppl_windows=1, depths=(0.0, 0.5, 1.0), trials=2,
                           gen_tokens=8, batch=2, prefill_repeats=1)
    tok = bench.ByteTokenizer()
    tokens, keys, depths, _, key_positions = bench.passkey_prompts(tok, s)
    assert tokens.shape == (6, 256) and len(key_positions) == 6
    for row, key, where in zip(tokens, keys, key_positions):
        assert tok.decode(row[where]) == str(key) * 2  # the key's digits, both times it is stated


def test_kept_shares_counts_the_rows_holding_each_position():
    import numpy as np

    from jaxeff.cache import KVCache

    cache = KVCache.create(num_layers=2, batch=2, num_kv_heads=2, capacity=4, head_dim=1)
    pos = np.full((2, 2, 2, 4), -1, np.int32)
    pos[0, 0, 0, :3] = [0, 5, 7]  # sequence 0: position 5 held by layer 0 head 0 and layer 1 head 1
    pos[1, 0, 1, :2] = [5, 6]
    pos[1, 0, 0, :4] = [1, 2, 3, 7]  # 7 is held only in the valid slots below
    length = np.array([[[3, 0], [0, 0]], [[3, 2], [0, 0]]], np.int32)  # [L, B, H]: layer 1 head 0 holds 1, 2, 3
    import dataclasses

    cache = dataclasses.replace(cache, pos=pos, length=length)
    got = bench.kept_shares(cache, [[5, 7], [9]])
    assert got == [(2 + 1) / 8, 0.0]  # 5 in two rows, 7 in one (the other 7 is past its row's length)


def test_kv_bytes_follow_the_keep_ratio(rows):
    kv = _by(rows[0], "kv_bytes")
    dense = kv[("dense", 1.0)]
    assert dense["capacity"] == 257 and dense["kept_entries"] == dense["dense_entries"]
    for policy in bench.POLICIES:
        r = kv[(policy, 0.5)]
        assert r["value"] <= 0.5 * dense["value"] + r["kv_meta_bytes"], r
        assert r["value"] < dense["value"]
        assert r["kept_entries"] == math.ceil(0.5 * 256) * dense["dense_entries"] // 256
        assert r["kv_bytes_kept"] == 0.5 * dense["kv_bytes_kept"]


def test_timings_are_reported(rows):
    printed, _ = rows
    for metric in ("decode_attn_ms", "decode_attn_resized_ms", "decode_step_ms"):
        got = _by(printed, metric)
        assert set(got) == {("dense", 1.0), ("any", 0.5)}, metric
        assert all(r["value"] > 0 for r in got.values())
    assert _by(printed, "decode_attn_ms")[("any", 0.5)]["kv_bound"] == 256
    assert _by(printed, "decode_attn_resized_ms")[("any", 0.5)]["capacity"] == 257
    step = _by(printed, "decode_step_ms")
    assert step[("any", 0.5)]["capacity"] < step[("dense", 1.0)]["capacity"]
    prefill = _by(printed, "prefill_ms")
    assert set(prefill) == {("dense", 1.0)} | {(p, 0.5) for p in bench.POLICIES}
    assert all(r["value"] > 0 for r in prefill.values())


def test_unusable_gates_are_reported_not_faked(tmp_path):
    bm = bench.load_bench_model("random-tiny")
    with pytest.raises(FileNotFoundError, match="no saved gates"):
        bench.load_gate_source(str(tmp_path), bm)
    other = AttentionGate(heads=1, head_dim=8)
    big = bench.load_bench_model("random-tiny").model.config
    import dataclasses

    save_gates(tmp_path / "g", other, other.init(jax.random.key(0), dataclasses.replace(big, num_layers=3)))
    with pytest.raises(ValueError, match="do not fit"):
        bench.load_gate_source(str(tmp_path / "g"), bm)


def test_markdown_tables_render_every_policy(rows, tmp_path):
    table = bench.markdown_tables(rows[0])
    assert table.startswith("**random-tiny**")
    for policy in ("dense",) + bench.POLICIES:
        assert f"| {policy} |" in table
    assert "| decode_attn_ms | any | 0.5 |" in table
    out = tmp_path / "rows.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in rows[0]) + "\n")
    assert len(bench.main(["--table", str(out)])) == len(rows[0])
