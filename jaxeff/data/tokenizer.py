"""Offline tokenizers: a byte-level BPE trained on the training split with Hugging Face ``tokenizers``, cached.

Byte-level BPE never needs an unknown token (every byte is in the base alphabet), so any text the model is later
prompted with encodes. Training is deterministic for a given corpus, vocabulary size and library version; the
result is cached under ``$JAXEFF_CACHE/tokenizers/`` (default ``~/.cache/jaxeff``) keyed by a hash of everything
that determines it, so a second run, or another test, reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np

EOS_TOKEN = "<|endoftext|>"
BYTE_ALPHABET_SIZE = 256
# Bumped whenever the training recipe below changes, so stale cache entries are not reused.
_RECIPE_VERSION = 1


def cache_root() -> pathlib.Path:
    """``$JAXEFF_CACHE`` or ``~/.cache/jaxeff`` (the same folder as the converted model assets)."""
    from jaxeff.assets import cache_dir

    return cache_dir()


def stable_hash(obj) -> str:
    """A short hex digest of a JSON-serialisable object (sorted keys: independent of dict order)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Writes via a temporary file and ``os.replace``: concurrent writers (pytest workers, several processes)
    never leave a half-written file for a reader."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def train_byte_level_bpe(documents: Iterable[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (``<|endoftext|>`` is id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTE_ALPHABET_SIZE + 1:
        raise ValueError(
            f"vocab_size: expected >= {BYTE_ALPHABET_SIZE + 1} for a byte-level BPE (256 bytes + {EOS_TOKEN}), "
            f"got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    return tok


def cached_bpe(key: dict, documents_fn: Callable[[], Sequence[str]], vocab_size: int):
    """The BPE for ``key`` from the cache, training (and caching) it on ``documents_fn()`` on a miss."""
    from tokenizers import Tokenizer

    path = cache_root() / "tokenizers" / f"bpe-{vocab_size}-{stable_hash({**key, 'v': _RECIPE_VERSION})}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = train_byte_level_bpe(documents_fn(), vocab_size)
    atomic_write_bytes(path, tok.to_str().encode())
    return tok


def to_hf_tokenizer(tok):
    """Wraps a ``tokenizers.Tokenizer`` as a ``transformers`` fast tokenizer (so ``save_pretrained`` writes files
    that ``AutoTokenizer.from_pretrained`` loads)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN)


def backend_of(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or ``tokenizer`` itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the full tokenizer definition (vocabulary, merges, normalisation), for cache keys."""
    return hashlib.sha256(backend_of(tokenizer).to_str().encode()).hexdigest()[:16]


def encode_documents(tokenizer, documents: Sequence[Sequence[str]], eos_id: int) -> np.ndarray:
    """One token stream ``[N]`` int32: each document's lines encoded (in parallel, line by line: byte-level
    pre-tokenisation never merges across a newline, so this equals encoding the joined text) and followed by
    ``eos_id``, so the model learns where documents end."""
    backend = backend_of(tokenizer)
    pieces: list[np.ndarray] = []
    eos = np.asarray([eos_id], np.int32)
    for lines in documents:
        texts = [ln + "\n" for ln in lines[:-1]] + list(lines[-1:])
        encs = backend.encode_batch(texts, add_special_tokens=False)
        pieces.extend(np.asarray(e.ids, np.int32) for e in encs)
        pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
