"""Key-value recall sequences in real text, mixed into language-model training windows.

Continual pre-training on running text alone never rewards remembering one distant fact: almost every token is
predictable from its neighbourhood. A learned KV-eviction policy (Attention-Gate) trained that way keeps a number
stated 300 tokens ago no more often than any other token, and fails pass-key retrieval. :class:`RecallMixer`
rewrites a share of the training windows into recall sequences of the same length::

    [text ... FACT ... text ... QUESTION] [ANSWER text ...]
    \\___________ prompt: split tokens __________/ \\__ the rest __/

* ``FACT``: ``"The {noun} number is {key}.\\n"`` (``noun`` from :data:`NOUNS`, ``key`` five random digits), inserted
  after a line break of the text (a verse boundary in the KJV) at a uniformly random place of the prompt that ends at
  least ``min_gap`` tokens before the question;
* ``QUESTION``: ``"\\nWhich number was given for the {noun}?\\n"``, the prompt's last tokens;
* ``ANSWER``: ``"The {noun} number is {key}.\\n"``: the first tokens after the prompt, followed by the text.

The key's digits in the answer are predictable only from the fact, so a model whose cache lost the fact pays about
``log 10`` nats per digit. The template shares no words with the pass-key prompt of ``benchmarks.kv_eviction`` ("The
pass key is ...", asked as "What is the pass key?"), so that benchmark measures transfer to a new wording, not a
memorised one.

A window's rewrite depends only on ``(seed, position of the window in the training order)``, so a resumed run sees
the same sequences; every process of a multi-host run builds the same global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

NOUNS = ("lamp", "harbour", "garden", "tower", "bridge", "locker", "orchard", "wagon", "lantern", "cellar", "mill",
         "granary", "ferry", "chapel", "forge", "beacon")
FACT = "The {noun} number is {key}.\n"
QUESTION = "\nWhich number was given for the {noun}?\n"
ANSWER = "The {noun} number is {key}.\n"


@dataclasses.dataclass
class RecallMixer:
    """Rewrites a share ``rate`` of the windows ``[B, T + 1]`` into key-value recall sequences (module docstring).

    Args:
      tokenizer: the model's tokenizer (anything with ``encode(text, add_special_tokens=False)`` and ``decode``).
      seq_len: ``T`` (windows hold ``T + 1`` tokens).
      split: the prompt length: the question ends at token ``split`` and the answer starts there (for
        Attention-Gate with ``prefill="dense"``: its ``prompt_len``).
      rate: the share of windows rewritten, in [0, 1].
      seed: with the window's position, fixes everything random.
      min_gap: at least this many tokens between the fact's end and the question's start (keep it at or above any
        always-kept local window, or the fact is kept for free).
    """

    tokenizer: Any
    seq_len: int
    split: int
    rate: float
    seed: int = 0
    min_gap: int = 32

    def __post_init__(self):
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"recall rate: expected a share in [0, 1], got {self.rate!r}")
        if self.min_gap < 0:
            raise ValueError(f"recall min_gap: expected an int >= 0, got {self.min_gap!r}")
        longest = max(NOUNS, key=len)
        fact = len(self._encode(FACT.format(noun=longest, key=99999)))
        question = len(self._encode(QUESTION.format(noun=longest)))
        answer = len(self._encode(ANSWER.format(noun=longest, key=99999)))
        need = fact + question + self.min_gap + 1
        if not need <= self.split < self.seq_len + 1 - answer:
            raise ValueError(
                f"recall split: expected room for the fact, the gap and the question before it ({need} tokens) and "
                f"for the answer ({answer} tokens) after it in windows of {self.seq_len + 1}, got split={self.split}")
        self._line_end = self._line_end_ids()

    def _encode(self, text: str) -> list:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _line_end_ids(self) -> np.ndarray:
        """Sorted ids of the tokens whose text ends with a line break (where a fact may be inserted)."""
        vocab = len(self.tokenizer)
        ids = [i for i in range(vocab) if self.tokenizer.decode([i]).endswith("\n")]
        return np.asarray(ids, np.int64)

    def sequence(self, window: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """One recall sequence of ``len(window)`` tokens built on ``window``'s text, and its facts (noun, key,
        fact_start, fact_end, answer_start)."""
        n = len(window)
        noun = NOUNS[int(rng.integers(len(NOUNS)))]
        key = int(rng.integers(10000, 100000))
        fact = self._encode(FACT.format(noun=noun, key=key))
        question = self._encode(QUESTION.format(noun=noun))
        answer = self._encode(ANSWER.format(noun=noun, key=key))
        body_len = self.split - len(fact) - len(question)
        last = body_len - self.min_gap  # the fact starts at or before this index of the body
        cut = np.flatnonzero(np.isin(window[:last], self._line_end)) + 1  # insert just after a line break
        cut = cut[(cut >= 1) & (cut <= last)]
        at = int(rng.choice(cut)) if len(cut) else int(rng.integers(1, last + 1))
        body = window[:body_len]
        rest = window[body_len:body_len + n - self.split - len(answer)]
        out = np.concatenate([body[:at], fact, body[at:], question, answer, rest]).astype(window.dtype)
        assert len(out) == n, (len(out), n)
        return out, {"noun": noun, "key": key, "fact_start": at, "fact_end": at + len(fact),
                     "answer_start": self.split}

    def apply(self, windows: np.ndarray, position: int) -> np.ndarray:
        """``windows`` (the batch starting at training position ``position``) with a share ``rate`` rewritten."""
        if self.rate == 0.0:
            return windows
        if windows.shape[1] != self.seq_len + 1:
            raise ValueError(f"recall: expected windows of {self.seq_len + 1} tokens, got {windows.shape[1]}")
        out = np.array(windows, copy=True)
        for i in range(len(out)):
            rng = np.random.default_rng([self.seed, 0x5EC, position + i])
            if rng.random() < self.rate:
                out[i], _ = self.sequence(out[i], rng)
        return out


__all__ = ["ANSWER", "FACT", "NOUNS", "QUESTION", "RecallMixer"]
