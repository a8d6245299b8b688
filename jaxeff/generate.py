"""Text generation: batched prefill of prompts of different lengths, then a jitted decode loop.

    tokens = jaxeff.generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=32)          # greedy
    tokens = jaxeff.generate(model, params, prompts, max_new_tokens=64, temperature=0.8, top_p=0.95,
                             rng=jax.random.key(0), stop_tokens=[eos_id])

Prompts are right-padded to a length bucket (a multiple of 16) so that nearby prompt lengths share one compiled
program; the cache capacity is rounded up to a multiple of 64 for the same reason. The whole loop (prefill, then
``lax.while_loop`` over decode steps that stops early once every sequence has emitted a stop token) is one jitted
call. :func:`generate_stream` runs the same steps from Python and yields each new token as it is produced.

A model with a KV-eviction policy (``jaxeff.methods.kv_eviction``) is generated in two calls instead: the
jitted prefill (which compacts each cache row to the policy's budget), a host read of the longest kept row, a move
of the cache into that smaller capacity (``KVCache.resize``), then the jitted decode loop; :func:`prefill` is
that first half, for benchmarks that measure the cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.cache import KVCache
from jaxeff.models.lm import DecoderLM

PROMPT_BUCKET = 16
CAPACITY_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_logits(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token ids ``[B]`` from logits ``[B, V]``: greedy, or temperature + top-k + top-p (nucleus) sampling."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep_sorted = before < cfg.top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def prepare_prompts(
    prompt_tokens, prompt_lengths=None, vocab_size: int | None = None, bucket: int = PROMPT_BUCKET
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads prompts to a bucketed length. Accepts a list of token lists, an int array ``[B, T]`` (with
    optional ``prompt_lengths [B]``), or a tokenizer's output (a mapping with ``input_ids``, e.g. the
    ``BatchEncoding`` of ``apply_chat_template``; a right-padded batch's ``attention_mask`` gives the lengths).
    Returns ``(tokens [B, T'], lengths [B])`` as numpy int32."""
    if hasattr(prompt_tokens, "keys") and "input_ids" in prompt_tokens:
        mask = prompt_tokens.get("attention_mask")
        ids = prompt_tokens["input_ids"]
        if mask is not None and prompt_lengths is None and not isinstance(ids, (list, tuple)):
            mask = np.asarray(mask).reshape(-1, np.shape(mask)[-1]).astype(bool)
            if np.any(mask[:, 1:] & ~mask[:, :-1]):
                raise ValueError("prompt_tokens: expected right-padded prompts (attention_mask 1...1 0...0), got "
                                 "left padding; tokenize with padding_side='right'")
            prompt_lengths = mask.sum(-1)
        prompt_tokens = ids
        if isinstance(ids, (list, tuple)) and ids and np.isscalar(ids[0]):
            prompt_tokens = [ids]  # one prompt as a flat list
    if isinstance(prompt_tokens, (list, tuple)) and (len(prompt_tokens) == 0 or not np.isscalar(prompt_tokens[0])):
        seqs = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompt_tokens]
        if not seqs:
            raise ValueError("prompt_tokens: expected at least one prompt, got an empty list")
        lengths = np.array([len(s) for s in seqs], np.int32)
    else:
        arr = np.asarray(prompt_tokens)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"prompt_tokens: expected [batch, length] or a list of lists, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"prompt_tokens: expected integer token ids, got dtype {arr.dtype}")
        lengths = (np.full(arr.shape[0], arr.shape[1], np.int32) if prompt_lengths is None
                   else np.asarray(prompt_lengths, np.int32).reshape(-1))
        if lengths.shape[0] != arr.shape[0] or lengths.max(initial=0) > arr.shape[1]:
            raise ValueError(f"prompt_lengths {lengths.tolist()} do not fit prompts of shape {arr.shape}")
        seqs = [arr[i, : lengths[i]] for i in range(arr.shape[0])]
    if lengths.min() < 1:
        raise ValueError(f"prompt_tokens: every prompt needs at least one token, got lengths {lengths.tolist()}")
    for i, s in enumerate(seqs):
        if vocab_size is not None and s.size and (s.min() < 0 or s.max() >= vocab_size):
            bad = s[(s < 0) | (s >= vocab_size)][0]
            raise ValueError(f"prompt {i}: token id {int(bad)} is outside the vocabulary [0, {vocab_size})")
    t = _round_up(int(lengths.max()), bucket)
    tokens = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return tokens, lengths


def _capacity(prompt_len: int, max_new_tokens: int, cache_capacity: int | None) -> int:
    need = prompt_len + max_new_tokens
    if cache_capacity is None:
        return _round_up(need, CAPACITY_BUCKET)
    if need > cache_capacity:
        raise ValueError(
            f"cache capacity {cache_capacity} is too small: the longest prompt needs {prompt_len} slots plus "
            f"max_new_tokens={max_new_tokens} ({need} in all); raise cache_capacity or shorten the prompt"
        )
    return cache_capacity


@functools.partial(jax.jit, static_argnames=("model", "capacity"))
def _prefill(model: DecoderLM, params, tokens, lengths, capacity):
    cache = model.init_cache(tokens.shape[0], capacity)
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    out = model.forward(params, tokens, cache=cache, attention_mask=mask, logits_at=lengths - 1, fresh_cache=True)
    return out.logits[:, 0], out.cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def _decode_step(model: DecoderLM, params, token, active, cache: KVCache):
    out = model.forward(params, token[:, None], cache=cache, attention_mask=active[:, None])
    return out.logits[:, 0], out.cache


def _decode_loop(model, params, logits, cache, rng, stop_ids, pad_id, max_new_tokens, sampling):
    """Samples the first token from the prefill ``logits``, then decodes until ``max_new_tokens`` or every
    sequence has stopped (a ``lax.while_loop``)."""
    b = logits.shape[0]
    rng, key = jax.random.split(rng)
    tok = sample_logits(logits, key, sampling)
    done = jnp.isin(tok, stop_ids)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    n_gen = jnp.ones((b,), jnp.int32)

    def cond(state):
        i, _, _, done, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, done, out, n_gen, rng = state
        logits, cache = model.forward(params, tok[:, None], cache=cache, attention_mask=~done[:, None])[:2]
        rng, key = jax.random.split(rng)
        new = sample_logits(logits[:, 0], key, sampling)
        new = jnp.where(done, pad_id, new)
        out = out.at[:, i].set(new)
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | jnp.isin(new, stop_ids)
        return i + 1, new, cache, done, out, n_gen, rng

    state = (jnp.int32(1), tok, cache, done, out, n_gen, rng)
    _, _, _, _, out, n_gen, _ = jax.lax.while_loop(cond, body, state)
    return out, n_gen


@functools.partial(jax.jit, static_argnames=("model", "capacity", "max_new_tokens", "sampling"))
def _generate_jit(model, params, tokens, lengths, rng, stop_ids, pad_id, capacity, max_new_tokens, sampling):
    logits, cache = _prefill(model, params, tokens, lengths, capacity)
    return _decode_loop(model, params, logits, cache, rng, stop_ids, pad_id, max_new_tokens, sampling)


_decode_loop_jit = jax.jit(_decode_loop, static_argnames=("model", "max_new_tokens", "sampling"))


def shrinks_kv_cache(model: DecoderLM) -> bool:
    """True when one of the model's methods evicts KV entries at prefill (``shrinks_kv_cache`` attribute, set by
    the policies of ``jaxeff.methods.kv_eviction``): generation then moves the cache into a smaller one."""
    return any(getattr(m, "shrinks_kv_cache", False) for m in model.methods)


def prefill(
    model: DecoderLM,
    params: dict,
    prompt_tokens,
    *,
    max_new_tokens: int,
    prompt_lengths=None,
    cache_capacity: int | None = None,
):
    """Runs the prefill of :func:`generate` and returns ``(logits [B, V] at each prompt's last token, cache)``,
    the cache having room for ``max_new_tokens`` more tokens per sequence.

    When the model evicts KV entries at prefill (:func:`shrinks_kv_cache`), the cache is then moved into one of
    ``evicted_capacity(longest kept row) + max_new_tokens`` slots (never more than it had), so its memory
    (``cache.nbytes()``) follows the policy's keep ratio; this reads the kept lengths on the host.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    tokens, lengths = prepare_prompts(prompt_tokens, prompt_lengths, model.config.vocab_size)
    capacity = _capacity(int(lengths.max()), max_new_tokens, cache_capacity)  # pads take no slots
    logits, cache = _prefill(model, params, jnp.asarray(tokens), jnp.asarray(lengths), capacity)
    if shrinks_kv_cache(model):
        kept = int(jax.device_get(jnp.max(cache.length)))
        smaller = evicted_capacity(kept) + max_new_tokens
        if smaller < cache.capacity:
            cache = _resize(cache, smaller)
    return logits, cache


_resize = jax.jit(KVCache.resize, static_argnums=1)


def evicted_capacity(kept: int) -> int:
    """Slots for the ``kept`` entries of the longest row after an eviction: ``kept`` rounded up to a multiple of
    ``min(16, kept // 16)`` (at least 1), so that nearby kept lengths share a compiled decode loop while the
    rounding wastes at most 1/16 of the kept entries (and nothing for a kept length that is a multiple of 16, or
    under 32)."""
    kept = max(int(kept), 1)
    return _round_up(kept, max(1, min(PROMPT_BUCKET, kept // 16)))


def _stop_ids(model: DecoderLM, stop_tokens) -> np.ndarray:
    if stop_tokens is None:
        eos = model.config.eos_token_id
        stop_tokens = [] if eos is None else [eos]
    ids = np.asarray(list(stop_tokens), np.int32).reshape(-1)
    return ids if ids.size else np.array([-1], np.int32)  # -1 never matches a sampled id


def generate(
    model: DecoderLM,
    params: dict,
    prompt_tokens,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] | None = None,
    rng: jax.Array | None = None,
    prompt_lengths=None,
    cache_capacity: int | None = None,
    pad_id: int = 0,
    return_lengths: bool = False,
):
    """Generates continuations of a batch of prompts.

    Args:
      prompt_tokens: a list of token-id lists (any lengths), or an int array ``[B, T]`` (all of length ``T``
        unless ``prompt_lengths`` says otherwise).
      max_new_tokens: tokens to generate per prompt (the stop token, when hit, is included and counted).
      temperature / top_k / top_p: sampling; ``temperature=0`` is greedy decoding.
      stop_tokens: ids that end a sequence (default: the model's ``eos_token_id`` if known; ``[]`` for none).
      rng: PRNG key (needed only when sampling; default ``jax.random.key(0)``).
      cache_capacity: KV-cache slots per sequence (default: longest prompt + max_new_tokens, rounded up).
      pad_id: fills positions after a sequence stopped.
      return_lengths: also return the number of generated tokens per sequence.

    Returns:
      ``tokens`` int32 ``[B, max_new_tokens]`` (numpy), and ``lengths [B]`` when ``return_lengths``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    rng = jax.random.key(0) if rng is None else rng
    stop_ids = jnp.asarray(_stop_ids(model, stop_tokens))
    if shrinks_kv_cache(model):  # prefill, shrink the cache on the host, then the jitted decode loop
        logits, cache = prefill(model, params, prompt_tokens, max_new_tokens=max_new_tokens,
                                prompt_lengths=prompt_lengths, cache_capacity=cache_capacity)
        out, n_gen = _decode_loop_jit(
            model, params, logits, cache, rng, stop_ids, jnp.int32(pad_id), int(max_new_tokens), sampling
        )
    else:  # one jitted call
        tokens, lengths = prepare_prompts(prompt_tokens, prompt_lengths, model.config.vocab_size)
        capacity = _capacity(int(lengths.max()), max_new_tokens, cache_capacity)  # pads take no slots
        out, n_gen = _generate_jit(
            model, params, jnp.asarray(tokens), jnp.asarray(lengths), rng, stop_ids, jnp.int32(pad_id), capacity,
            int(max_new_tokens), sampling,
        )
    out, n_gen = np.asarray(out), np.asarray(n_gen)
    return (out, n_gen) if return_lengths else out


def generate_stream(
    model: DecoderLM,
    params: dict,
    prompt_tokens,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] | None = None,
    rng: jax.Array | None = None,
    cache_capacity: int | None = None,
) -> Iterator[np.ndarray]:
    """Like :func:`generate`, but yields the next token of every sequence (``[B]`` numpy) after each step.
    A sequence that has stopped yields ``-1``. Stops once every sequence has stopped."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    rng = jax.random.key(0) if rng is None else rng
    stop = _stop_ids(model, stop_tokens)
    sample = jax.jit(sample_logits, static_argnames=("cfg",))
    logits, cache = prefill(model, params, prompt_tokens, max_new_tokens=max_new_tokens, cache_capacity=cache_capacity)
    done = np.zeros(logits.shape[0], bool)
    for step in range(max_new_tokens):
        rng, key = jax.random.split(rng)
        tok = np.asarray(sample(logits, key, cfg=sampling))
        tok = np.where(done, -1, tok)
        yield tok
        done |= np.isin(tok, stop)
        if done.all() or step == max_new_tokens - 1:
            return
        active = jnp.asarray(~done)
        logits, cache = _decode_step(model, params, jnp.asarray(np.maximum(tok, 0)), active, cache)
