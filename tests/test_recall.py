"""Key-value recall sequences (``jaxeff.data.recall``): the layout (fact after a line break, at least ``min_gap``
before the question, the question ending the prompt, the answer right after it), determinism by position, the
share rewritten, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from jaxeff.data.recall import ANSWER, FACT, QUESTION, RecallMixer
from jaxeff.data.text import WindowSampler, kjv_bpe_tokenizer, kjv_token_splits

SEQ, SPLIT = 160, 120

@pytest.fixture(scope="module")
def corpus():
    tok = kjv_bpe_tokenizer(320, ("Ruth", "Esther"))  # the small BPE of the training tests (cached)
    train, _ = kjv_token_splits(tok, ("Ruth", "Esther"), ("Jonah",))
    return tok, WindowSampler(train, SEQ, seed=0)

def _enc(tok, text):
    return list(tok.encode(text, add_special_tokens=False))

def test_sequence_layout(corpus):
    tok, sampler = corpus
    mixer = RecallMixer(tok, SEQ, SPLIT, rate=1.0, seed=0, min_gap=20)
    newline = _enc(tok, "\n")
    at_breaks = 0
    for pos in range(12):
        window = sampler.batch(pos, 1)[0]
        seq, info = mixer.sequence(window, np.random.default_rng(pos))
        assert seq.shape == window.shape and seq.dtype == window.dtype
        noun, key = info["noun"], info["key"]
        fact, question = _enc(tok, FACT.format(noun=noun, key=key)), _enc(tok, QUESTION.format(noun=noun))
        answer = _enc(tok, ANSWER.format(noun=noun, key=key))
        s, e = info["fact_start"], info["fact_end"]
        assert list(seq[s:e]) == fact and 1 <= s
        body = SPLIT - len(fact) - len(question)
        if np.isin(window[:body - 20], newline).any():  # inserted after a line break of the text, when it has one
            assert tok.decode(seq[s - 1:s]).endswith("\n")
            at_breaks += 1
        assert list(seq[SPLIT - len(question):SPLIT]) == question  # the prompt ends with the question
        assert list(seq[SPLIT:SPLIT + len(answer)]) == answer  # the continuation starts with the answer
        assert SPLIT - len(question) - e >= 20  # min_gap
        assert str(key) in tok.decode(seq[SPLIT:SPLIT + len(answer)])
        # the text around the inserts is the window's text, in order
        np.testing.assert_array_equal(np.concatenate([seq[:s], seq[e:SPLIT - len(question)]]), window[:body])
        np.testing.assert_array_equal(seq[SPLIT + len(answer):], window[body:body + SEQ + 1 - SPLIT - len(answer)])
    assert at_breaks >= 3

def test_apply_is_deterministic_and_rewrites_its_share(corpus):
    tok, sampler = corpus
    batch = sampler.batch(0, 64)
    assert RecallMixer(tok, SEQ, SPLIT, rate=0.0).apply(batch, 0) is batch
    half = RecallMixer(tok, SEQ, SPLIT, rate=0.5, seed=3)
    a, b = half.apply(batch, 0), half.apply(batch, 0)
    np.testing.assert_array_equal(a, b)  # the same position gives the same batch (resume)
    changed = (a != batch).any(axis=1)
    assert 16 <= changed.sum() <= 48
    # row i at position p is the same sequence as row 0 at position p + i
    np.testing.assert_array_equal(half.apply(batch[5:6], 5)[0], a[5])
    assert not np.array_equal(half.apply(batch, 64), a)
    full = RecallMixer(tok, SEQ, SPLIT, rate=1.0, seed=3).apply(batch, 0)
    assert (full != batch).any(axis=1).all()

@pytest.mark.parametrize("kwargs, match", [
    ({"rate": 1.5}, r"recall rate: expected a share in \[0, 1\]"),
    ({"rate": 0.5, "split": 20}, r"recall split: expected room for the fact, the gap and the question"),
    ({"rate": 0.5, "split": SEQ}, r"recall split: expected room .* for the answer"),
    ({"rate": 0.5, "min_gap": -1}, r"recall min_gap: expected an int >= 0"),
])
def test_bad_settings_are_named(corpus, kwargs, match):
    tok, _ = corpus
    args = {"seq_len": SEQ, "split": SPLIT, **kwargs}
    with pytest.raises(ValueError, match=match):
        RecallMixer(tok, **args)
    with pytest.raises(ValueError, match="expected windows of 161 tokens"):
        RecallMixer(tok, SEQ, SPLIT, rate=0.5).apply(np.zeros((2, 100), np.int32), 0)

