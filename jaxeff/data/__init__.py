"""Embedded datasets and offline tokenizers (no downloads at run time)."""

from jaxeff.data.kjv import BOOKS as KJV_BOOKS, DEFAULT_HELDOUT_BOOKS, book_text, split_books
from jaxeff.data.text import (
    WindowSampler,
    eval_windows,
    kjv_bpe_tokenizer,
    kjv_token_splits,
    unigram_log_probs,
    unigram_perplexity,
)
from jaxeff.data.tokenizer import cache_root, encode_documents, train_byte_level_bpe

__all__ = [
    "KJV_BOOKS", "DEFAULT_HELDOUT_BOOKS", "book_text", "split_books", "WindowSampler", "eval_windows",
    "kjv_bpe_tokenizer", "kjv_token_splits", "unigram_log_probs", "unigram_perplexity", "cache_root",
    "encode_documents", "train_byte_level_bpe",
]
