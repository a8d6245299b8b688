"""KV-cache eviction: Attention-Gate vs the training-free policies vs the dense model, at matched keep ratios.

    python -m benchmarks.kv_eviction [--quick] [--model smollm2|PATH|random-tiny ...] [--gates-smollm2 DIR]
                                     [--gates-tiny DIR] [--out results.jsonl]

Compares ``attention_gate``, ``streaming_llm``, ``h2o`` and ``snapkv`` (``--policies`` also takes the controls
``recent_only`` and ``random``) with the dense model at keep ratios 1.0, 0.75, 0.5 and 0.25 on SmolLM2-135M-Instruct
(real weights, ``--model smollm2``) and on a trained run directory (``--model runs/lm_tiny``; default: both, each
skipped with a ``"skipped"`` line when its asset is missing). ``--model random-tiny`` is a tiny randomly initialised
model with a byte tokenizer (for tests). Prints one JSON object per line with at least ``{"bench", "model",
"policy", "keep_ratio", "metric", "value"}`` plus the unit, the settings, and the machine, date and versions;
``--out`` also appends them to a file; a short table goes to stderr.

Protocol (the same for every policy; a policy acts only through the cache it leaves after the prefill):

* ``ppl``: held-out KJV text (the held-out books, never trained on, tokenized with the model's own tokenizer), N
  windows of ``C + M`` tokens spread evenly over the stream. The first ``C`` tokens are prefilled *with the policy*
  (``jaxeff.generate.prefill``: the policy compacts every (layer, KV head) row to ``ceil(r * C)`` entries and the
  cache is moved into the smaller capacity), then the next ``M`` tokens are scored through that cache: the token
  after the context from the prefill's last logits, the other ``M - 1`` by one forward pass of the base model over
  the continuation with the evicted cache (teacher forcing). This is exactly what ``M`` decode steps would compute:
  the policies evict at prefill only (``decode_every=0``; Attention-Gate's decode appends without evicting), so
  decoding *is* the base model over the evicted cache. ``ppl = exp(mean NLL)`` over the ``N * M`` tokens.
* ``passkey_acc``: a real-text haystack (consecutive held-out KJV verses from a random verse) of exactly ``C`` tokens
  in all, with the sentence ``"The pass key is 48213. Remember it. 48213 is the pass key."`` inserted at a verse
  boundary at each depth (share of the haystack before it), ending with ``"What is the pass key?"`` and the answer
  prefix ``"The pass key is"`` (inside the chat template when the tokenizer has one, as SmolLM2-Instruct's does).
  The prompt is prefilled with the policy, ``G`` tokens are generated greedily (base model over the evicted cache,
  as above), and a trial is correct when the key's digits appear in the decoded text. ``trials`` trials per depth
  (different keys and haystacks, fixed seeds); the row carries the accuracy per depth, and ``key_kept``: the share
  of (layer, KV head) cache rows that still hold each digit-bearing token of the pass-key sentence after the
  prefill, averaged over those tokens and the trials (1.0 for the dense model; a policy blind to the key keeps
  about its keep ratio).
* ``kv_bytes``: ``cache.nbytes()`` (the K/V buffers) per sequence of the cache ``prefill`` returns for the ``C``-token
  prompts with room for one new token: the dense model's cache has exactly ``C + 1`` slots per row
  (``cache_capacity=C + 1``), an evicted one ``evicted_capacity(ceil(r * C)) + 1`` (``prefill``'s resize,
  ``jaxeff.generate.evicted_capacity``: the kept count, rounded up by at most 1/16). The row also
  reports ``kv_meta_bytes`` (positions, lengths, next positions and any per-slot scores or budgets, per sequence),
  ``capacity`` (slots per row), ``kept_entries`` and ``kv_bytes_kept`` (bytes of the entries actually kept).
* ``prefill_ms``: median wall time of that ``prefill`` call (a batch of ``batch`` prompts of ``C`` tokens, compiled
  beforehand; the eviction's host read of the kept lengths and the resize included), the configurations timed in
  turns (one call of each per round) so that load from other processes hits them alike; ``cpu_ms`` is the median
  process CPU time of the same calls (all threads; much less sensitive to that load). Quick mode times the dense
  model and the policies at keep 0.5 only. Without trained gates, Attention-Gate's prefill is still timed, with
  untrained (initialised) gates of the default size (``"gates": "untrained ..."``): its cost does not depend on the
  weights, only the eviction quality does.
* ``decode_attn_ms``: ``pallas_kernels.kv_eviction.ragged_decode_attention`` (``impl="xla"``, the CPU path) for one
  layer's decode (batch 1, the model's head shapes) over a buffer of ``S`` slots (``--attn-context``, 8192) whose rows
  hold ``ceil(r * S)`` entries, with ``kv_bound = bucketed_kv_bound(ceil(r * S), S)``; ``r = 1.0`` is the dense row.
  ``decode_attn_resized_ms``: the same over the buffer ``prefill`` leaves after an eviction (resized to
  ``evicted_capacity(ceil(r * S)) + 1`` slots, no bound). Medians of repeats taken in turns, jit-compiled first; every
  timing row also has ``cpu_ms``, the median process CPU time.
* ``decode_step_ms``: one jitted whole-model decode step (``model.forward`` on one token with a cache, the cache
  donated as ``jaxeff.generate`` does) at a context of ``S`` tokens (``--step-context``) on the cache an eviction at
  ratio ``r`` leaves after ``prefill``'s resize (``evicted_capacity(ceil(r * S))`` entries plus room for the timed
  steps), median over steps taken in turns. The cache's contents are random: the cost of a step depends only on its
  shapes, which are the same for every policy at one ratio (``"policy": "any"``).

Rows for a policy at keep ratio 1.0 are the dense model's figures (``"same_as": "dense"``): every policy keeps every
entry there (exactly the dense computation, Attention-Gate included).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from benchmarks._jsonl import JsonLines

BENCH = "kv_eviction"
POLICIES = ("attention_gate", "streaming_llm", "h2o", "snapkv")
CONTROLS = ("recent_only", "random")
RATIOS = (1.0, 0.75, 0.5, 0.25)
DEFAULT_TINY_RUN = "runs/lm_tiny"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
QUESTION = "\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"
_MARK = "\x00HAYSTACK\x00"


# ---- settings -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """context: ``C`` (prompt tokens; a multiple of 16); continuation: ``M`` scored tokens; ppl_windows: ``N``;
    depths/trials: passkey grid; gen_tokens: ``G`` greedy tokens; batch: prompts per prefill call;
    prefill_repeats: timed prefill calls per configuration."""

    context: int
    continuation: int
    ppl_windows: int
    depths: tuple
    trials: int
    gen_tokens: int
    batch: int
    prefill_repeats: int


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    attn_context: int
    step_context: int
    attn_repeats: int
    step_repeats: int


def default_eval_settings(kind: str, quick: bool, seq_len: int | None = None) -> EvalSettings:
    """Per model kind: ``smollm2`` (contexts where the dense 135M model does solve passkey: measured 100% at 256
    and 512 tokens, worse at 1024), ``run`` (a trained run: ``C + M`` within its training length, so that no
    query-key distance is one it never saw: ``M`` a quarter of it, ``C`` the rest rounded down to 16; too short for
    the passkey frame, which is then skipped) and ``random-tiny`` (tests)."""
    if kind == "smollm2":
        if quick:
            return EvalSettings(256, 64, 6, (0.1, 0.5, 0.9), 2, 8, 3, 3)
        return EvalSettings(512, 64, 16, (0.1, 0.3, 0.5, 0.7, 0.9), 4, 8, 4, 5)
    if kind == "run":
        n = seq_len or 64
        m = max(8, n // 4)
        c = max(32, (n - m) // 16 * 16)
        if quick:
            return EvalSettings(c, m, 64, (0.1, 0.5, 0.9), 2, 8, 16, 3)
        return EvalSettings(c, m, 256, (0.1, 0.3, 0.5, 0.7, 0.9), 4, 8, 16, 7)
    return EvalSettings(256, 8, 2, (0.5,), 1, 8, 2, 1)


def default_timing_settings(quick: bool) -> TimingSettings:
    return TimingSettings(8192, 2048 if quick else 8192, 30 if quick else 200, 4 if quick else 10)


# ---- output -------------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---- models -------------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids (id 0, NUL, is the end of text): the random-tiny model's tokenizer."""

    eos_token_id = 0
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", "replace")


@dataclasses.dataclass
class BenchModel:
    """A base model (no methods) with its parameters, tokenizer and settings kind."""

    name: str
    kind: str  # smollm2 | run | random-tiny
    model: object
    params: dict
    tokenizer: object
    source: str
    seq_len: int | None = None


def load_bench_model(spec: str) -> BenchModel:
    """``smollm2`` (the shipped SmolLM2-135M-Instruct), ``random-tiny`` or a training run directory.
    Raises FileNotFoundError when the asset is missing."""

    from jaxeff.models.config import LMConfig
    from jaxeff.models.lm import DecoderLM

    if spec == "smollm2":
        from transformers import AutoTokenizer

        import jaxeff
        from jaxeff import assets

        try:
            path = assets.smollm2_path()
        except Exception as e:  # AssetError (package not installed) or a failed conversion
            raise FileNotFoundError(f"SmolLM2-135M asset unavailable: {e}") from e
        model, params = jaxeff.load_pretrained(str(path))
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return BenchModel("SmolLM2-135M-Instruct", "smollm2", model, params, tok, str(path))
    if spec == "random-tiny":
        cfg = LMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=4096, tie_embeddings=True, eos_token_id=0)
        return BenchModel("random-tiny", "random-tiny", DecoderLM(cfg), _numpy_init(cfg), ByteTokenizer(),
                          "random init (numpy seed 0)")
    run_dir = pathlib.Path(spec)
    if not (run_dir / "model.yaml").is_file():
        raise FileNotFoundError(f"{spec!r} is not a training run directory (no model.yaml); train one with "
                                f"python -m train.lm --config configs/lm_tiny.yaml output_dir={spec}")
    import yaml

    from jaxeff.training.run import load_run

    model, params, tok = load_run(run_dir)
    model = dataclasses.replace(model, methods=())
    params = {k: v for k, v in params.items() if k != "methods"}
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    seq_len = ((cfg or {}).get("data") or {}).get("seq_len")
    return BenchModel(run_dir.name, "run", model, params, tok, str(run_dir), seq_len)


def _numpy_init(cfg) -> dict:
    """Random parameters like ``DecoderLM.init`` (normal(0, initializer_range), unit norms, zero biases), drawn
    with numpy: no XLA programs to compile for a throw-away model."""
    import jax
    import jax.numpy as jnp

    from jaxeff.models.lm import ParamSpec, param_specs

    rng = np.random.default_rng(0)

    def make(spec):
        if spec.init in ("ones", "zeros"):
            return jnp.full(spec.shape, 1.0 if spec.init == "ones" else 0.0, jnp.float32)
        return jnp.asarray(rng.normal(0.0, cfg.initializer_range, spec.shape).astype(np.float32))

    return jax.tree.map(make, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def _trees_equal(a, b) -> bool:
    import jax

    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def load_gate_source(path: str, bm: BenchModel):
    """``(AttentionGate, gate params)`` from a ``save_gates`` directory, a run directory holding ``gates/``, or a
    run directory trained with an ``attention_gate`` section (read with ``load_run``; its base weights must be
    this model's, i.e. trained with ``train.trainable: methods``). Raises with the reason otherwise."""
    from jaxeff.methods.kv_eviction.attention_gate import GATES_FILE, gate_params, load_gates

    p = pathlib.Path(path)
    if (p / GATES_FILE).is_file():
        return load_gates(p, bm.model.config)
    if (p / "gates" / GATES_FILE).is_file():
        return load_gates(p / "gates", bm.model.config)
    if (p / "model.yaml").is_file():
        from jaxeff.training.run import load_run

        model, params, _ = load_run(p)
        gate = next((m for m in model.methods if m.name == "attention_gate"), None)
        if gate is None:
            raise ValueError(f"{path!r}: the run has no attention_gate section")
        if not _trees_equal({k: v for k, v in params.items() if k != "methods"}, bm.params):
            raise ValueError(f"{path!r}: the run's base weights differ from {bm.name}'s (trained with "
                             f"train.trainable=all?), so its gates belong to another model")
        return gate, gate_params(params)
    raise FileNotFoundError(f"{path!r}: no saved gates ({GATES_FILE}, gates/{GATES_FILE}) and not a run directory")


def make_policy(name: str, ratio: float, context: int, gate=None):
    from jaxeff.methods.kv_eviction import H2O, RandomKeep, RecentOnly, SnapKV, StreamingLLM

    if name == "streaming_llm":
        return StreamingLLM(keep_ratio=ratio, sink_tokens=4)
    if name == "h2o":
        return H2O(keep_ratio=ratio, recent_ratio=0.5)
    if name == "snapkv":  # the paper's 32-query window, shorter for short contexts
        return SnapKV(keep_ratio=ratio, window=max(4, min(32, context // 8)), kernel_size=7, pooling="max")
    if name == "recent_only":
        return RecentOnly(keep_ratio=ratio)
    if name == "random":
        return RandomKeep(keep_ratio=ratio, seed=0)
    if name == "attention_gate":
        return dataclasses.replace(gate, keep_ratio=ratio, budget=None)
    raise ValueError(f"policy: expected one of {POLICIES + CONTROLS}, got {name!r}")


# ---- data ---------------------------------------------------------------------------------------------------------


def heldout_verses() -> list:
    from jaxeff.data import kjv

    return [v for b in kjv.DEFAULT_HELDOUT_BOOKS for v in kjv.book_verses(b)]


def heldout_stream(tok) -> np.ndarray:
    """The held-out books as one token stream (each book followed by the end-of-text id)."""
    from jaxeff.data import kjv

    docs = [kjv.book_verses(b) for b in kjv.DEFAULT_HELDOUT_BOOKS]
    if isinstance(tok, ByteTokenizer):
        return np.concatenate([np.asarray(tok.encode("\n".join(d)) + [tok.eos_token_id], np.int32) for d in docs])
    from jaxeff.data.tokenizer import encode_documents

    return encode_documents(tok, docs, int(tok.eos_token_id))


def ppl_windows(tok, s: EvalSettings) -> np.ndarray:
    """``[N, C + M]`` held-out windows spread evenly over the stream."""
    from jaxeff.data.text import eval_windows

    return eval_windows(heldout_stream(tok), s.context + s.continuation - 1, s.ppl_windows)


def _encode(tok, text: str) -> list:
    return list(tok.encode(text, add_special_tokens=False))


def passkey_frame(tok) -> tuple[list, list, bool]:
    """``(tokens before the haystack, tokens after it, chat)``: the chat template when the tokenizer has one."""
    if getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template([{"role": "user", "content": INTRO + _MARK + QUESTION}],
                                           add_generation_prompt=True, tokenize=False)
        pre, post = rendered.split(_MARK)
        return _encode(tok, pre), _encode(tok, post + ANSWER_PREFIX), True
    return _encode(tok, INTRO), _encode(tok, QUESTION + " " + ANSWER_PREFIX), False


def passkey_prompts(tok, s: EvalSettings, seed: int = 0):
    """``(tokens [P, C] int32, keys [P], depths [P], chat, key_positions [P])`` or raises ValueError when ``C`` is
    too short. ``key_positions[i]``: the positions in prompt ``i`` of the pass-key sentence's tokens that hold
    digits."""
    pre, post, chat = passkey_frame(tok)
    verses = heldout_verses()
    prompts, keys, depths, key_positions = [], [], [], []
    verse_cache: dict = {}

    def verse_tokens(i):
        if i not in verse_cache:
            verse_cache[i] = _encode(tok, verses[i % len(verses)] + "\n")
        return verse_cache[i]

    for di, depth in enumerate(s.depths):
        for trial in range(s.trials):
            rng = np.random.default_rng([seed, di, trial])
            key = int(rng.integers(10000, 100000))
            needle = _encode(tok, NEEDLE.format(key=key))
            budget = s.context - len(pre) - len(post) - len(needle)
            if budget < 16:
                raise ValueError(f"context {s.context} leaves {budget} haystack tokens (the frame and the pass-key "
                                 f"sentence take {s.context - budget}); raise --context")
            hay, i = [], int(rng.integers(0, len(verses)))
            while sum(len(v) for v in hay) < budget:
                hay.append(verse_tokens(i))
                i += 1
            bounds = np.cumsum([0] + [len(v) for v in hay])
            cut = int(np.argmin(np.abs(bounds - depth * budget)))  # the verse boundary nearest the depth
            flat = [t for v in hay for t in v][:budget]
            at = min(int(bounds[cut]), budget)
            prompts.append(pre + flat[:at] + needle + flat[at:] + post)
            keys.append(key)
            depths.append(depth)
            start = len(pre) + at
            key_positions.append([start + j for j, t in enumerate(needle)
                                  if any(ch.isdigit() for ch in tok.decode([t]))])
    return np.asarray(prompts, np.int32), keys, depths, chat, key_positions


# ---- jitted pieces ------------------------------------------------------------------------------------------------


def _jits():
    import jax
    import jax.numpy as jnp

    from jaxeff.cache import KVCache

    @functools.partial(jax.jit, static_argnames=("model",))
    def score_continuation(model, params, first_logits, cont, cache):
        """NLL ``[B, M]`` of ``cont`` after the prompt: ``cont[0]`` from the prefill's last logits, the rest by one
        forward pass over ``cont[:, :-1]`` through the (evicted) cache."""
        logits = first_logits[:, None].astype(jnp.float32)
        if cont.shape[1] > 1:
            out = model.forward(params, cont[:, :-1], cache=cache)
            logits = jnp.concatenate([logits, out.logits.astype(jnp.float32)], axis=1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, cont[..., None], axis=-1)[..., 0]

    @functools.partial(jax.jit, static_argnames=("model", "steps"))
    def greedy(model, params, first_logits, cache, steps):
        tok = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)

        def body(carry, _):
            tok, cache = carry
            out = model.forward(params, tok[:, None], cache=cache)
            nxt = jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32)
            return (nxt, out.cache), nxt

        if steps == 1:
            return tok[:, None]
        _, rest = jax.lax.scan(body, (tok, cache), None, length=steps - 1)
        return jnp.concatenate([tok[:, None], rest.T], axis=1)

    @functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
    def decode_step(model, params, token, cache):
        out = model.forward(params, token, cache=cache)
        return out.logits, out.cache

    grow = jax.jit(KVCache.resize, static_argnums=1)
    return score_continuation, greedy, decode_step, grow


_JITS = None


def jits():
    global _JITS
    if _JITS is None:
        _JITS = _jits()
    return _JITS


# ---- measurements -------------------------------------------------------------------------------------------------


def meta_bytes(cache) -> int:
    """Bytes of everything in the cache but the K/V buffers."""
    total = cache.pos.nbytes + cache.length.nbytes + cache.next_pos.nbytes
    for extra in (cache.score, cache.budget):
        if extra is not None:
            total += extra.nbytes
    return int(total)


def _batches(arr: np.ndarray, size: int):
    """Micro-batches of ``size`` rows (the last one padded by repeating its first row) and their real counts."""
    for i in range(0, len(arr), size):
        part = arr[i:i + size]
        n = len(part)
        if n < size:
            part = np.concatenate([part, np.repeat(part[:1], size - n, axis=0)])
        yield part, n


def _prefill(pmodel, pparams, toks, context: int):
    """``jaxeff.generate.prefill`` of ``C``-token prompts with room for one new token (dense: exactly ``C + 1``
    slots per row; a policy's cache is then moved into ``evicted_capacity(kept) + 1`` slots)."""
    import jax

    from jaxeff.generate import prefill

    out = prefill(pmodel, pparams, toks, max_new_tokens=1, cache_capacity=context + 1)
    return jax.block_until_ready(out)


def evaluate(bm: BenchModel, pmodel, pparams, windows, pk, s: EvalSettings) -> dict:
    """ppl, passkey accuracy and cache bytes of one (policy, ratio) on ``bm`` (see the module docstring)."""
    import jax.numpy as jnp

    score_continuation, greedy, _, grow = jits()
    c, m = s.context, s.continuation
    extra = max(m, s.gen_tokens)
    res: dict = {}

    def run_prefill(toks):
        logits, cache = _prefill(pmodel, pparams, toks, c)
        if "kv_bytes" not in res:
            b, cfg = toks.shape[0], pmodel.config
            kept = float(np.sum(np.asarray(cache.length))) / b
            res.update(
                kv_bytes=cache.nbytes() / b, kv_meta_bytes=meta_bytes(cache) / b, capacity=cache.capacity,
                kept_entries=kept, dense_entries=cfg.num_layers * cfg.num_kv_heads * c,
                kv_bytes_kept=kept * (cache.k.shape[-1] + cache.v.shape[-1]) * cache.k.dtype.itemsize,
            )
        # one capacity for every policy and ratio (the empty slots are masked), so the scoring and generation
        # programs compile once per model
        return logits, grow(cache, c + 1 + extra)

    nll = []
    for part, n in _batches(windows, s.batch):
        logits, cache = run_prefill(part[:, :c])
        cont = jnp.asarray(part[:, c:c + m])
        nll.append(np.asarray(score_continuation(bm.model, bm.params, logits, cont, cache))[:n])
    res["nll"] = float(np.concatenate(nll).mean())
    res["ppl"] = float(math.exp(res["nll"]))

    if pk is not None:
        tokens, keys, depths, key_positions = pk
        gen, key_kept = [], []
        for i, (part, n) in enumerate(_batches(tokens, s.batch)):
            logits, cache = run_prefill(part)
            key_kept.extend(kept_shares(cache, key_positions[i * s.batch:i * s.batch + n]))
            gen.extend(np.asarray(greedy(bm.model, bm.params, logits, cache, s.gen_tokens))[:n])
        texts = [bm.tokenizer.decode([int(t) for t in g]) for g in gen]
        correct = [str(k) in t for t, k in zip(texts, keys)]
        res["passkey_acc"] = float(np.mean(correct))
        res["passkey_by_depth"] = {str(d): float(np.mean([ok for ok, dd in zip(correct, depths) if dd == d]))
                                   for d in s.depths}
        res["passkey_sample"] = texts[0]
        res["key_kept"] = float(np.mean(key_kept))
    return res


def kept_shares(cache, positions) -> list:
    """For each of the first ``len(positions)`` sequences of ``cache``: the share of (layer, KV head, position)
    triples, over its ``positions``, whose entry the cache still holds."""
    pos, length = np.asarray(cache.pos), np.asarray(cache.length)
    valid = np.arange(pos.shape[-1]) < length[..., None]  # [L, B, H, S]
    out = []
    for b, want in enumerate(positions):
        held = np.where(valid[:, b], pos[:, b], -1)  # [L, H, S]
        out.append(float(np.isin(held, want).sum()) / (held.shape[0] * held.shape[1] * len(want)))
    return out


def _round_robin(fns: dict, repeats: int, cpu: bool = False) -> dict:
    """Median seconds of each (already compiled) thunk, timed in turns (one call of each per round) so that a
    burst of load from other processes hits every configuration alike. ``cpu``: ``(wall, process CPU)`` medians
    (CPU seconds of all the process's threads: nearly independent of the machine's load)."""
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[k].append((time.perf_counter() - t, time.process_time() - c))
    if cpu:
        return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    return {k: statistics.median(w for w, _ in v) for k, v in times.items()}


def time_prefills(configs: dict, toks: np.ndarray, context: int, repeats: int) -> dict:
    """``{key: (median wall ms, median process-CPU ms)}`` of ``_prefill`` for ``{key: (model, params)}`` on the
    same prompts."""
    fns = {k: functools.partial(_prefill, m, p, toks, context) for k, (m, p) in configs.items()}
    for fn in fns.values():  # compile (a no-op for the configurations evaluated before)
        fn()
    return {k: (w * 1e3, c * 1e3) for k, (w, c) in _round_robin(fns, repeats, cpu=True).items()}


def _kept(ratio: float, n: int) -> int:
    from jaxeff.methods.kv_eviction import ceil_ratio

    return int(ceil_ratio(np.int32(n), ratio))


def time_decode_attention(config, ratios, context: int, repeats: int, resized: bool, seed: int = 0) -> dict:
    """``{ratio: (median ms, median CPU ms, kv_bound or capacity)}`` of one layer's ragged decode attention (XLA path),
    batch 1,
    over rows holding ``ceil(r * S)`` entries: in a buffer of ``S`` slots with ``kv_bound =
    bucketed_kv_bound(kept, S)`` (``resized=False``), or in a buffer resized to ``evicted_capacity(kept) + 1`` slots as
    ``prefill`` leaves it (``resized=True``, no bound)."""
    import jax
    import jax.numpy as jnp

    from jaxeff.generate import evicted_capacity
    from pallas_kernels.kv_eviction import bucketed_kv_bound, ragged_decode_attention

    hq, hkv, d = config.num_heads, config.num_kv_heads, config.head_size
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((1, hq, d), np.float32))
    q_pos = jnp.asarray([context], jnp.int32)
    fns, sizes = {}, {}
    for ratio in ratios:
        kept = _kept(ratio, context)
        slots = evicted_capacity(kept) + 1 if resized else context
        k = jnp.asarray(rng.standard_normal((1, hkv, slots, d), np.float32))
        v = jnp.asarray(rng.standard_normal((1, hkv, slots, d), np.float32))
        pos = np.full((1, hkv, slots), -1, np.int32)
        pos[..., :kept] = np.sort(rng.choice(context, kept, replace=False))
        args = (q, k, v, jnp.asarray(pos), jnp.full((1, hkv), kept, jnp.int32), q_pos)
        bound = None if resized else bucketed_kv_bound(kept, context)
        fn = jax.jit(functools.partial(ragged_decode_attention, kv_bound=bound, impl="xla"))
        jax.block_until_ready(fn(*args))
        fns[ratio] = functools.partial(lambda f, a: jax.block_until_ready(f(*a)), fn, args)
        sizes[ratio] = slots if resized else bound
    return {r: (w * 1e3, c * 1e3, sizes[r]) for r, (w, c) in _round_robin(fns, repeats, cpu=True).items()}


def time_decode_steps(bm: BenchModel, ratios, context: int, repeats: int, seed: int = 0) -> dict:
    """``{ratio: (median ms, median CPU ms, capacity)}`` of one jitted whole-model decode step (batch 1) on the cache an
    eviction
    at ``ratio`` of a ``context``-token prompt leaves: ``evicted_capacity(ceil(r * S))`` entries (``S`` for the dense
    model) plus room for the timed steps; random contents."""
    import jax
    import jax.numpy as jnp

    from jaxeff.cache import KVCache
    from jaxeff.generate import evicted_capacity

    _, _, decode_step, _ = jits()
    cfg = bm.model.config
    rng = np.random.default_rng(seed)
    token = jnp.zeros((1, 1), jnp.int32)
    state, caps = {}, {}
    for i, ratio in enumerate(ratios):
        kept = context if ratio >= 1.0 else _kept(ratio, context)
        slots = context if ratio >= 1.0 else evicted_capacity(kept)
        capacity = slots + repeats + 2
        shape = (cfg.num_layers, 1, cfg.num_kv_heads, capacity, cfg.head_size)
        key = jax.random.fold_in(jax.random.key(seed), i)
        pos = np.full(capacity, -1, np.int32)
        pos[:kept] = np.sort(rng.choice(context, kept, replace=False))
        cache = KVCache(
            k=jax.random.normal(key, shape, jnp.float32).astype(bm.model.dtype),
            v=jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32).astype(bm.model.dtype),
            pos=jnp.broadcast_to(jnp.asarray(pos), shape[:-1]), length=jnp.full(shape[:3], kept, jnp.int32),
            next_pos=jnp.asarray([context], jnp.int32),
        )
        logits, state[ratio] = decode_step(bm.model, bm.params, token, cache)  # compile
        jax.block_until_ready(logits)
        caps[ratio] = capacity

    def step(ratio):
        logits, state[ratio] = decode_step(bm.model, bm.params, token, state[ratio])
        jax.block_until_ready(logits)

    times = _round_robin({r: functools.partial(step, r) for r in ratios}, repeats, cpu=True)
    return {r: (w * 1e3, c * 1e3, caps[r]) for r, (w, c) in times.items()}


# ---- the benchmark ------------------------------------------------------------------------------------------------


def run_model(bm: BenchModel, emit, args, s: EvalSettings, ts: TimingSettings, gates, gate_reason, policies,
              ratios) -> dict:
    """All measurements of one model; returns ``{(policy or measurement, ratio): result}`` for the summary."""
    import jax

    from jaxeff.methods.kv_eviction import AttentionGate, with_gate_params

    base = {"model": bm.name, "context": s.context}
    windows = ppl_windows(bm.tokenizer, s)
    try:
        tokens, keys, depths, chat, key_positions = passkey_prompts(bm.tokenizer, s, args.seed)
        pk = (tokens, keys, depths, key_positions)
    except ValueError as e:
        pk, chat = None, False
        emit(**base, policy=None, keep_ratio=None, metric="skipped", value=None, reason=f"passkey: {e}")
    ppl_fields = {"windows": len(windows), "continuation": s.continuation, "text": "KJV held-out books"}
    pk_fields = {"depths": list(s.depths), "trials": s.trials, "gen_tokens": s.gen_tokens, "chat_template": chat}
    results: dict = {}
    evaluated: dict = {("dense", 1.0): (bm.model, bm.params)}

    def report(policy, ratio, r, extra=None):
        extra = dict(extra or {})
        emit(**base, policy=policy, keep_ratio=ratio, metric="ppl", value=r["ppl"], unit="ppl", nll=r["nll"],
             **ppl_fields, **extra)
        if "passkey_acc" in r:
            emit(**base, policy=policy, keep_ratio=ratio, metric="passkey_acc", value=r["passkey_acc"], unit="frac",
                 by_depth=r["passkey_by_depth"], key_kept=r["key_kept"], sample=r["passkey_sample"], **pk_fields,
                 **extra)
        emit(**base, policy=policy, keep_ratio=ratio, metric="kv_bytes", value=r["kv_bytes"], unit="bytes/seq",
             kv_meta_bytes=r["kv_meta_bytes"], capacity=r["capacity"], kept_entries=r["kept_entries"],
             dense_entries=r["dense_entries"], kv_bytes_kept=r["kv_bytes_kept"], **extra)

    t0 = time.perf_counter()
    dense = evaluate(bm, bm.model, bm.params, windows, pk, s)
    results[("dense", 1.0)] = dense
    report("dense", 1.0, dense)
    print(f"[{BENCH}] {bm.name} dense: ppl {dense['ppl']:.3f}, passkey {dense.get('passkey_acc')} "
          f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    for policy in policies:
        if policy == "attention_gate" and gates is None:
            emit(**base, policy=policy, keep_ratio=None, metric="skipped", value=None, reason=gate_reason)
            continue
        gate_fields = {"gates": gates[2]} if policy == "attention_gate" else {}
        for ratio in ratios:
            if ratio >= 1.0:  # every policy keeps every entry: the dense computation itself
                results[(policy, ratio)] = dense
                report(policy, ratio, dense, {"same_as": "dense", **gate_fields})
                continue
            t0 = time.perf_counter()
            if policy == "attention_gate":
                pmodel = bm.model.with_methods(make_policy(policy, ratio, s.context, gates[0]))
                pparams = with_gate_params(bm.params, gates[1])
            else:
                pmodel, pparams = bm.model.with_methods(make_policy(policy, ratio, s.context)), bm.params
            r = evaluate(bm, pmodel, pparams, windows, pk, s)
            results[(policy, ratio)] = r
            evaluated[(policy, ratio)] = (pmodel, pparams)
            report(policy, ratio, r, gate_fields)
            print(f"[{BENCH}] {bm.name} {policy} r={ratio}: ppl {r['ppl']:.3f}, passkey {r.get('passkey_acc')} "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    if args.no_timing:
        return results

    # prefill time: the dense model and the policies (quick: at keep 0.5 only), in turns on the same prompts
    timed = {k: v for k, v in evaluated.items() if not args.quick or k[1] in (1.0, 0.5)}
    untrained = "attention_gate" in policies and gates is None
    if untrained:  # the gate's prefill cost does not depend on its weights: time it with initialised gates
        gate = AttentionGate(keep_ratio=0.5)
        timed[("attention_gate", 0.5)] = (bm.model.with_methods(gate), with_gate_params(
            bm.params, gate.init(jax.random.key(0), bm.model.config)))
    first = next(_batches(windows, s.batch))[0][:, :s.context]
    for (policy, ratio), (ms, cpu_ms) in time_prefills(timed, first, s.context, s.prefill_repeats).items():
        results[("prefill", policy, ratio)] = ms
        results[("prefill_cpu", policy, ratio)] = cpu_ms
        fields = {"gates": "untrained (initialised, default size: timing only)" if untrained else gates[2]} \
            if policy == "attention_gate" else {}
        emit(**base, policy=policy, keep_ratio=ratio, metric="prefill_ms", value=ms, unit="ms", cpu_ms=cpu_ms,
             batch=s.batch, repeats=s.prefill_repeats, **fields)

    all_ratios = sorted(set(ratios) | {1.0}, reverse=True)
    cfg = bm.model.config
    heads = [cfg.num_heads, cfg.num_kv_heads, cfg.head_size]
    for resized, metric in ((False, "decode_attn_ms"), (True, "decode_attn_resized_ms")):
        got = time_decode_attention(cfg, all_ratios, ts.attn_context, ts.attn_repeats, resized, args.seed)
        for ratio, (ms, cpu_ms, size) in got.items():
            results[(metric, ratio)] = ms
            where = {"capacity": size} if resized else {"kv_bound": size, "capacity": ts.attn_context}
            emit(model=bm.name, policy="dense" if ratio >= 1.0 else "any", keep_ratio=ratio, metric=metric,
                 value=ms, unit="ms", cpu_ms=cpu_ms, context=ts.attn_context, **where, impl="xla", batch=1,
                 heads=heads, repeats=ts.attn_repeats)
    steps = time_decode_steps(bm, all_ratios, ts.step_context, ts.step_repeats, args.seed)
    for ratio, (ms, cpu_ms, cap) in steps.items():
        results[("decode_step_ms", ratio)] = ms
        emit(model=bm.name, policy="dense" if ratio >= 1.0 else "any", keep_ratio=ratio, metric="decode_step_ms",
             value=ms, unit="ms", cpu_ms=cpu_ms, context=ts.step_context, capacity=cap, batch=1,
             repeats=ts.step_repeats)
    return results


def summarize(name: str, results: dict, policies, ratios) -> str:
    lines = [f"{name}: ppl / passkey_acc / kv_bytes vs dense"]
    dense = results.get(("dense", 1.0))
    for policy in ("dense",) + tuple(policies):
        cells = []
        for ratio in ratios:
            r = results.get((policy, ratio))
            if r is None or (policy == "dense" and ratio < 1.0):
                continue
            pk = f"{r['passkey_acc']:.2f}" if "passkey_acc" in r else "-"
            cells.append(f"r={ratio}: {r['ppl']:.2f} / {pk} / {r['kv_bytes'] / dense['kv_bytes']:.2f}x")
        if cells:
            lines.append(f"  {policy:<15} " + "  ".join(cells))
    for metric in ("decode_attn_ms", "decode_attn_resized_ms", "decode_step_ms"):
        base = results.get((metric, 1.0))
        if base:
            parts = [f"r={r}: {results[(metric, r)]:.3f} ({results[(metric, r)] / base:.2f}x)"
                     for r in sorted({k[1] for k in results if k[0] == metric}, reverse=True)]
            lines.append(f"  {metric}: " + "  ".join(parts))
    for what in ("prefill", "prefill_cpu"):
        d, g = results.get((what, "dense", 1.0)), results.get((what, "attention_gate", 0.5))
        if d and g:
            lines.append(f"  {what}_ms: dense {d:.1f}, attention_gate r=0.5 {g:.1f} ({g / d - 1:+.1%})")
    return "\n".join(lines)


def markdown_tables(rows: list) -> str:
    """Markdown tables (one per model) of the rows of one run: ppl / passkey_acc / KV bytes (vs dense) per policy
    and keep ratio, then the timings."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if r.get("metric") == "ppl"):
        mine = [r for r in rows if r["model"] == model]
        get = {(r["policy"], r["keep_ratio"], r["metric"]): r for r in mine}
        ratios = sorted({r["keep_ratio"] for r in mine if r["metric"] == "ppl"}, reverse=True)
        policies = list(dict.fromkeys(r["policy"] for r in mine if r["metric"] == "ppl"))
        dense_kv = get[("dense", 1.0, "kv_bytes")]["value"]
        ppl = get[("dense", 1.0, "ppl")]
        out.append(f"**{model}**: C = {ppl['context']} context tokens, ppl over {ppl['windows']} windows x "
                   f"{ppl['continuation']} tokens; cells are ppl / passkey accuracy / KV bytes vs dense\n")
        out.append("| policy | " + " | ".join(f"keep {r}" for r in ratios) + " |")
        out.append("|---" * (len(ratios) + 1) + "|")
        for policy in policies:
            cells = []
            for ratio in ratios:
                p = get.get((policy, ratio, "ppl"))
                if p is None:
                    cells.append("")
                    continue
                pk = get.get((policy, ratio, "passkey_acc"))
                kv = get[(policy, ratio, "kv_bytes")]["value"] / dense_kv
                cells.append(f"{p['value']:.2f} / {pk['value']:.2f} / {kv:.3f}" if pk else f"{p['value']:.2f} / - / "
                             f"{kv:.3f}")
            out.append(f"| {policy} | " + " | ".join(cells) + " |")
        skipped = [r for r in mine if r["metric"] == "skipped"]
        for r in skipped:
            out.append(f"\nskipped{' ' + r['policy'] if r['policy'] else ''}: {r['reason']}")
        timing = [r for r in mine if r["metric"] in ("prefill_ms", "decode_attn_ms", "decode_attn_resized_ms",
                                                        "decode_step_ms")]
        if timing:
            out.append("\n| metric | policy | keep | wall ms | CPU ms | vs dense (wall) | vs dense (CPU) |")
            out.append("|---|---|---|---|---|---|---|")
            for r in timing:
                d = get[("dense", 1.0, r["metric"])]
                cpu, dcpu = r.get("cpu_ms"), d.get("cpu_ms")
                cpu_cells = f"{cpu:.3f} | " if cpu else "- | "
                out.append(f"| {r['metric']} | {r['policy']} | {r['keep_ratio']} | {r['value']:.3f} | {cpu_cells}"
                           f"{r['value'] / d['value']:.2f}x | " + (f"{cpu / dcpu:.2f}x |" if cpu and dcpu else "- |"))
        out.append("")
    return "\n".join(out)


def _floats(text: str) -> tuple:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer windows/trials/repeats, shorter contexts (<10 min)")
    ap.add_argument("--model", action="append", default=None,
                    help=f"'smollm2', 'random-tiny' or a training run directory; repeatable (default: smollm2 and "
                         f"{DEFAULT_TINY_RUN}, each skipped when missing)")
    ap.add_argument("--gates-smollm2", default=None,
                    help="Attention-Gate gates for SmolLM2 (save_gates dir or run dir)")
    ap.add_argument("--gates-tiny", default=None, help="gates for the other models (save_gates dir or run dir)")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma list from {POLICIES + CONTROLS}")
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    ap.add_argument("--context", type=int, default=None, help="prompt tokens C (a multiple of 16)")
    ap.add_argument("--continuation", type=int, default=None, help="scored tokens M after the context")
    ap.add_argument("--ppl-windows", type=int, default=None)
    ap.add_argument("--depths", default=None, help="passkey depths, comma list")
    ap.add_argument("--trials", type=int, default=None, help="passkey trials per depth")
    ap.add_argument("--batch", type=int, default=None, help="prompts per prefill call")
    ap.add_argument("--prefill-repeats", type=int, default=None)
    ap.add_argument("--attn-context", type=int, default=None, help="slots for decode_attn_ms (default 8192)")
    ap.add_argument("--step-context", type=int, default=None, help="context for decode_step_ms")
    ap.add_argument("--attn-repeats", type=int, default=None)
    ap.add_argument("--step-repeats", type=int, default=None)
    ap.add_argument("--no-timing", action="store_true", help="skip prefill/decode timings")
    ap.add_argument("--clear-caches", action="store_true", help="drop compiled programs after each configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--table", default=None, metavar="JSONL", help="print Markdown tables of a results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in pathlib.Path(args.table).read_text().splitlines() if line.strip()]
        print(markdown_tables([r for r in rows if r.get("bench") == BENCH]))
        return rows

    import jax

    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    bad = [p for p in policies if p not in POLICIES + CONTROLS]
    if bad:
        ap.error(f"--policies: unknown {bad}; expected names from {POLICIES + CONTROLS}")
    ratios = tuple(sorted(set(_floats(args.ratios)) | {1.0}, reverse=True))
    if any(not 0.0 < r <= 1.0 for r in ratios):
        ap.error(f"--ratios: expected values in (0, 1], got {args.ratios}")
    specs = args.model or ["smollm2", DEFAULT_TINY_RUN]

    common = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": _cpu_name(),
        "date": datetime.date.today().isoformat(), "jax": jax.__version__, "backend": jax.default_backend(),
        "quick": bool(args.quick),
    }
    emit = JsonLines(BENCH, args.out, common)
    t_start = time.perf_counter()
    summaries = []
    try:
        for spec in specs:
            t_model = time.perf_counter()
            try:
                bm = load_bench_model(spec)
            except FileNotFoundError as e:
                emit(model=spec, policy=None, keep_ratio=None, metric="skipped", value=None, reason=str(e))
                print(f"[{BENCH}] skipping {spec}: {e}", file=sys.stderr)
                continue
            s = default_eval_settings(bm.kind, args.quick, bm.seq_len)
            s = dataclasses.replace(s, **{k: v for k, v in {
                "context": args.context, "continuation": args.continuation, "ppl_windows": args.ppl_windows,
                "depths": _floats(args.depths) if args.depths else None, "trials": args.trials,
                "batch": args.batch, "prefill_repeats": args.prefill_repeats}.items() if v is not None})
            if s.context % 16:
                ap.error(f"--context: expected a multiple of 16 (the prompt bucket), got {s.context}")
            ts = default_timing_settings(args.quick)
            ts = dataclasses.replace(ts, **{k: v for k, v in {
                "attn_context": args.attn_context, "step_context": args.step_context,
                "attn_repeats": args.attn_repeats, "step_repeats": args.step_repeats}.items() if v is not None})
            gate_path = args.gates_smollm2 if bm.kind == "smollm2" else args.gates_tiny
            gates, gate_reason = None, None
            if "attention_gate" in policies:
                if gate_path is None:
                    flag = "--gates-smollm2" if bm.kind == "smollm2" else "--gates-tiny"
                    gate_reason = (f"no trained Attention-Gate gates given ({flag} DIR: a save_gates directory, e.g. "
                                   f"<run>/gates of python -m train.attention_gate)")
                else:
                    try:
                        gate, gp = load_gate_source(gate_path, bm)
                        gates = (gate, gp, gate_path)
                    except (FileNotFoundError, ValueError) as e:
                        gate_reason = f"gates unusable: {e}"
            results = run_model(bm, emit, args, s, ts, gates, gate_reason, policies, ratios)
            wall = time.perf_counter() - t_model
            emit(model=bm.name, policy=None, keep_ratio=None, metric="wall_s", value=wall, unit="s")
            summaries.append(summarize(bm.name, results, policies, ratios))
            del bm
    finally:
        emit.close()
    total = time.perf_counter() - t_start
    print("\n".join(summaries + [f"[{BENCH}] total {total:.0f} s"]), file=sys.stderr)
    return emit.rows


if __name__ == "__main__":
    main()
