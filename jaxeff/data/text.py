"""Token streams for language-model training: the tokenized KJV splits, shuffled training windows addressed by a
single integer position (what a checkpoint saves), fixed held-out evaluation windows, and the unigram baseline.

Every process of a multi-host run builds the same global batch from the same position with no communication:
the window order depends only on ``(seed, epoch)``; ``jaxeff.sharding.shard_host_batch`` then transfers only the
process's own shards.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np

from jaxeff.data import kjv
from jaxeff.data.tokenizer import (
    atomic_write_bytes,
    cache_root,
    cached_bpe,
    encode_documents,
    stable_hash,
    to_hf_tokenizer,
    tokenizer_fingerprint,
)


# ---- corpus -> tokens ---------------------------------------------------------------------------------------------


def kjv_bpe_tokenizer(vocab_size: int, train_books: Sequence[str]):
    """A byte-level BPE (transformers fast tokenizer) trained on ``train_books`` only, cached."""
    books = tuple(train_books)
    tok = cached_bpe(
        {"corpus": "kjv", "books": books}, lambda: [kjv.book_text(b) for b in books], vocab_size
    )
    return to_hf_tokenizer(tok)


def _cached_tokens(key: dict, books: Sequence[str], tokenizer, eos_id: int) -> np.ndarray:
    path = cache_root() / "tokens" / f"kjv-{stable_hash(key)}.npy"
    if path.exists():
        return np.load(path)
    tokens = encode_documents(tokenizer, [kjv.book_verses(b) for b in books], eos_id)
    buf = io.BytesIO()
    np.save(buf, tokens)
    atomic_write_bytes(path, buf.getvalue())
    return tokens


def kjv_token_splits(
    tokenizer, train_books: Sequence[str], heldout_books: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_tokens [N_train], heldout_tokens [N_heldout])`` int32: the books in canonical order, each followed by
    the tokenizer's end-of-text id. Cached by the tokenizer's fingerprint and the book lists."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer: needs an eos_token to separate documents, it has none")
    fp = tokenizer_fingerprint(tokenizer)
    out = []
    for books in (tuple(train_books), tuple(heldout_books)):
        out.append(_cached_tokens({"tok": fp, "books": books, "eos": int(eos_id)}, books, tokenizer, int(eos_id)))
    return out[0], out[1]


# ---- training windows ---------------------------------------------------------------------------------------------


class WindowSampler:
    """Shuffled, non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets) over a stream.

    Window ``w`` is ``tokens[w * seq_len : w * seq_len + seq_len + 1]``. Epoch ``e`` visits all windows in the order
    of a permutation seeded by ``(seed, e)``; the sequence of windows is addressed by ``position`` (windows consumed
    so far, across epochs), which is the whole data state a checkpoint needs.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens = np.asarray(tokens, np.int32)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.num_windows = (len(self.tokens) - 1) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(f"token stream of {len(self.tokens)} tokens is shorter than one window of {seq_len + 1}")
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perms[epoch]

    def window_ids(self, position: int, count: int) -> np.ndarray:
        """The window ids at positions ``[position, position + count)``, ``[count]``."""
        pos = np.arange(position, position + count, dtype=np.int64)
        out = np.empty(count, np.int64)
        for epoch in np.unique(pos // self.num_windows):
            sel = pos // self.num_windows == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % self.num_windows]
        return out

    def batch(self, position: int, batch_size: int) -> np.ndarray:
        """The global batch ``[batch_size, seq_len + 1]`` int32 starting at ``position``."""
        starts = self.window_ids(position, batch_size) * self.seq_len
        return self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]

    def state(self, position: int) -> dict:
        """The JSON data state saved with a checkpoint (the extra fields detect a changed corpus on resume)."""
        return {"position": int(position), "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows, "num_tokens": int(len(self.tokens))}

    def check_state(self, state: dict) -> int:
        """Returns the saved position after checking the saved stream matches this one."""
        mine = self.state(0)
        for k in ("seed", "seq_len", "num_windows", "num_tokens"):
            if state.get(k) != mine[k]:
                raise ValueError(
                    f"checkpoint data state: '{k}' was {state.get(k)!r} when saved, the current data gives "
                    f"{mine[k]!r}; the corpus, tokenizer or data config changed since the checkpoint"
                )
        return int(state["position"])


# ---- evaluation -----------------------------------------------------------------------------------------------------


def eval_windows(tokens: np.ndarray, seq_len: int, count: Optional[int] = None) -> np.ndarray:
    """``[count, seq_len + 1]`` int32 non-overlapping windows spread evenly over the whole stream (every held-out
    book is represented, not only the first ones); ``count=None`` takes them all."""
    tokens = np.asarray(tokens, np.int32)
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"held-out stream of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
    if count is None:
        count = n
    if count > n:
        raise ValueError(f"asked for {count} held-out windows of {seq_len + 1} tokens, the split has only {n}")
    ids = np.linspace(0, n - 1, count).round().astype(np.int64)
    return tokens[ids[:, None] * seq_len + np.arange(seq_len + 1)]


def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int, alpha: float = 1.0) -> np.ndarray:
    """``[vocab_size]`` float64 log-probabilities of token frequencies in ``train_tokens`` with add-``alpha``
    (Laplace) smoothing, so tokens never seen in training still get a finite probability."""
    counts = np.bincount(np.asarray(train_tokens, np.int64), minlength=vocab_size)[:vocab_size].astype(np.float64)
    return np.log(counts + alpha) - math.log(counts.sum() + alpha * vocab_size)


def unigram_perplexity(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int, alpha: float = 1.0) -> float:
    """Perplexity of ``targets`` (any shape) under the smoothed unigram model of ``train_tokens``: the baseline a
    language model must beat using context."""
    logp = unigram_log_probs(train_tokens, vocab_size, alpha)
    return float(math.exp(-logp[np.asarray(targets, np.int64)].mean()))
