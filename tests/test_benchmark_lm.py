"""The speed benchmark against transformers prints its JSON lines (a smoke run on a tiny random Llama)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_lm_vs_transformers_prints_json_lines(capsys, tmp_path):
    from benchmarks import lm_vs_transformers

    out = tmp_path / "rows.jsonl"
    rows = lm_vs_transformers.main(["--quick", "--model", "random-tiny", "--prefill-len", "32",
                                    "--decode-tokens", "32", "--out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows == [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        assert {"bench", "impl", "metric", "value", "unit"} <= set(row) and row["bench"] == "lm_vs_transformers"
    got = {(r["impl"], r["metric"]) for r in rows}
    for impl in ("jaxeff", "transformers"):
        assert {(impl, "prefill_ms"), (impl, "decode_tok_s")} <= got
    by = {(r["impl"], r["metric"]): r["value"] for r in rows}
    assert by["jaxeff", "prefill_ms"] > 0 and by["transformers", "prefill_ms"] > 0
    # decode speed is null only when a tiny model's decoding drowns in the machine's load; otherwise positive
    for impl in ("jaxeff", "transformers"):
        assert by[impl, "decode_tok_s"] is None or by[impl, "decode_tok_s"] > 0
    assert by["both", "greedy_match"] == 1.0  # the same weights give the same greedy tokens
