"""SmolLM2-135M prefill latency and greedy decode speed: jaxeff (jit) vs transformers (PyTorch), side by side.

    python -m benchmarks.lm_vs_transformers [--quick] [--model PATH] [--out results.jsonl]

Both run in this process on the same machine, the same number of threads and float32 weights, and their timed
calls alternate within every repeat (so a change in the machine's load affects both alike). Prints one JSON
object per line: ``{"bench", "impl", "metric", "value", "unit", ...}``. Metrics:

* ``prefill_ms``: one forward pass over a ``--prefill-len``-token prompt (batch 1) that fills the KV cache and
  returns the last position's logits (transformers: ``use_cache=True, logits_to_keep=1``), median of repeats.
* ``decode_tok_s``: greedy decoding speed after a short prompt, ``(N - 1) / (t(N tokens) - t(1 token))`` with
  both timed end to end through each library's ``generate``, so prefill and per-call overhead cancel (fastest
  of the repeats for each length).
* ``compile_s`` (jaxeff only): time of the first prefill and generate calls minus their steady-state times (jit
  tracing and XLA compilation).
* ``greedy_match``: whether the two libraries produced the same greedy tokens (1.0 = identical).

``--model random`` uses randomly initialised weights of SmolLM2-135M's shape (no asset needed); ``--model
random-tiny`` a 2-layer random Llama (a smoke test of the benchmark itself).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from benchmarks._jsonl import JsonLines

BENCH = "lm_vs_transformers"


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _smollm2_config_dict() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


def _tiny_config_dict() -> dict:
    return {**_smollm2_config_dict(), "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _prepare_model_dir(model_arg: str, tmp: str) -> str:
    if model_arg == "smollm2":
        from jaxeff import assets

        return str(assets.smollm2_path())
    if model_arg in ("random", "random-tiny"):
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**(_smollm2_config_dict() if model_arg == "random" else _tiny_config_dict()))
        model = transformers.LlamaForCausalLM(cfg).eval()
        model.save_pretrained(tmp)
        return tmp
    return model_arg


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens (a few minutes)")
    ap.add_argument("--model", default="smollm2",
                    help="'smollm2' (default), 'random', 'random-tiny' or an HF directory")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)

    import tempfile

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    import jaxeff
    from jaxeff.generate import _prefill, prepare_prompts

    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    n_new = args.decode_tokens or (32 if args.quick else 128)
    common = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "threads": args.threads,
        "date": datetime.date.today().isoformat(), "jax": jax.__version__, "torch": torch.__version__,
        "backend": jax.default_backend(),
    }

    with JsonLines(BENCH, args.out) as emit, tempfile.TemporaryDirectory() as tmp:
        path = _prepare_model_dir(args.model, tmp)
        model_name = {"random": "SmolLM2-135M (random weights)", "random-tiny": "tiny Llama (random weights)"}.get(
            args.model, "SmolLM2-135M" if args.model == "smollm2" else args.model)
        common["model"] = model_name
        rng = np.random.default_rng(0)
        vocab = json.loads(open(os.path.join(path, "config.json")).read())["vocab_size"]
        prompt = rng.integers(0, vocab, size=(1, args.prefill_len)).astype(np.int64)
        short = prompt[:, :16]

        # ---- jaxeff: load, compile (timed separately)
        model, params = jaxeff.load_pretrained(path)
        toks, lens = prepare_prompts(prompt, vocab_size=model.config.vocab_size)
        capacity = toks.shape[1] + 64
        jt, jl = jnp.asarray(toks), jnp.asarray(lens)

        def jax_prefill():
            logits, _ = _prefill(model, params, jt, jl, capacity)
            jax.block_until_ready(logits)

        def jax_gen(n):
            return jaxeff.generate(model, params, short, max_new_tokens=n, stop_tokens=[])

        t0 = time.perf_counter()
        jax_prefill()
        jax_gen(1)
        jax_gen(n_new)
        first_calls = time.perf_counter() - t0

        # ---- transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tp, ts = torch.from_numpy(prompt), torch.from_numpy(short)

        @torch.inference_mode()
        def hf_prefill():
            hf(tp, use_cache=True, logits_to_keep=1)

        @torch.inference_mode()
        def hf_gen(n):
            return hf.generate(ts, attention_mask=torch.ones_like(ts), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)

        hf_prefill()
        hf_gen(2)

        # ---- timed side by side: the two libraries alternate within every repeat, so a change in the machine's
        # load during the run affects both alike
        t = {k: [] for k in ("jp", "hp", "j1", "jn", "h1", "hn")}
        for _ in range(repeats):
            t["jp"].append(_time(jax_prefill))
            t["hp"].append(_time(hf_prefill))
        for _ in range(max(2, repeats // 2)):
            t["j1"].append(_time(lambda: jax_gen(1)))
            t["jn"].append(_time(lambda: jax_gen(n_new)))
            t["h1"].append(_time(lambda: hf_gen(1)))
            t["hn"].append(_time(lambda: hf_gen(n_new)))
        med = {k: statistics.median(v) for k, v in t.items()}
        # decode speed from the fastest run of each length: load from other processes only ever adds time, and a
        # difference of two medians of short runs can come out negative on a busy machine
        best = {k: min(v) for k, v in t.items()}

        def decode_rate(k1: str, kn: str):
            # None when n tokens were not measurably slower than 1 (a tiny model on a busy machine)
            return (n_new - 1) / (best[kn] - best[k1]) if best[kn] > best[k1] else None

        rates = {"jaxeff": decode_rate("j1", "jn"), "transformers": decode_rate("h1", "hn")}
        for impl, r in rates.items():
            if r is None:
                print(f"warning: {impl}: {n_new} tokens were not measurably slower than 1 token on this machine; "
                      f"decode_tok_s is null (raise --decode-tokens)", file=sys.stderr)
        jax_tokens = np.asarray(jax_gen(n_new)[0])
        hf_tokens = hf_gen(n_new)[0, short.shape[1]:].numpy()

        emit(impl="jaxeff", metric="prefill_ms", value=med["jp"] * 1e3, unit="ms",
             prompt_len=args.prefill_len, **common)
        emit(impl="transformers", metric="prefill_ms", value=med["hp"] * 1e3, unit="ms",
             prompt_len=args.prefill_len, **common)
        emit(impl="jaxeff", metric="decode_tok_s", value=rates["jaxeff"],
             unit="tok/s", new_tokens=n_new, **common)
        emit(impl="transformers", metric="decode_tok_s", value=rates["transformers"],
             unit="tok/s", new_tokens=n_new, **common)
        emit(impl="jaxeff", metric="compile_s",
             value=first_calls - med["jp"] - med["j1"] - med["jn"], unit="s", **common)
        emit(impl="both", metric="greedy_match", value=float(np.array_equal(jax_tokens, hf_tokens)),
             unit="bool", new_tokens=n_new, **common)

    by = {(r["impl"], r["metric"]): r["value"] for r in emit.rows}
    summary = (f"prefill {args.prefill_len} tok: jaxeff {by['jaxeff', 'prefill_ms']:.1f} ms vs transformers "
               f"{by['transformers', 'prefill_ms']:.1f} ms; decode: jaxeff {by['jaxeff', 'decode_tok_s']} tok/s "
               f"vs transformers {by['transformers', 'decode_tok_s']} tok/s")
    print(summary, file=sys.stderr)
    return emit.rows


if __name__ == "__main__":
    main()
