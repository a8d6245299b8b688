"""A labelled offline task in real text: **KJV book classification** (which book does a passage come from?).

A passage is ``verses`` consecutive verses of one book, one verse per line (the layout the language models saw in
pre-training); the example is ``"<passage><prompt> <label>"`` (prompt ``"\\nBook:"`` by default) and the model is
fine-tuned to produce the label after the prompt. Accuracy is the argmax of the logits at the answer position
over the labels' first tokens only (a closed-set decision, no free generation).

The split is by **verse ranges**: the last ``test_fraction`` of each book's verses is the test range, the rest the
training range, so no verse is in both (a contiguous range rather than interleaved blocks, so that neighbouring,
near-paraphrase verses never straddle the split). Training passages start at any verse of the training range (a
random start per example, drawn from ``(seed, position)``: a checkpoint's data state is one integer); test passages
are non-overlapping blocks spread evenly over the test range, the same number for every label (balanced: chance is
``1 / len(books)``), interleaved by label so that the first ``n * len(books)`` of them are balanced too.

Every passage is cut to the same token budget (``seq_len`` minus the prompt and the *longest* label), so that the
cut point never reveals the label. Labels default to the book names; their first tokens must differ under the
model's tokenizer (a small BPE may split "Psalms" and "Proverbs" into " P" + ...: pick other label words then).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import numpy as np

from jaxeff.config import config_error
from jaxeff.data import kjv


@dataclasses.dataclass(frozen=True)
class KJVBooksTask:
    """KJV book classification (see the module docstring).

    Attributes:
      kind: the task (one for now).
      books: the classes: KJV book names (at least two, distinct).
      labels: the answer word of each book (same order); null: the book names.
      verses: consecutive verses per passage.
      test_fraction: the share of each book's verses (its last ones) held out for testing.
      test_per_label: test passages per label; null: as many as the smallest test range holds.
      prompt: the text between the passage and the answer.
      seq_len: tokens per training sequence (passage + prompt + answer); passages are cut to fit.
    """

    kind: Literal["kjv_books"] = "kjv_books"
    books: tuple[str, ...] = ("Genesis", "Psalms", "Proverbs", "Matthew")
    labels: Optional[tuple[str, ...]] = None
    verses: int = 3
    test_fraction: float = 0.2
    test_per_label: Optional[int] = None
    prompt: str = "\nBook:"
    seq_len: int = 128

    def __post_init__(self):
        if len(self.books) < 2:
            raise config_error("task.books", "at least two KJV books (the classes)", list(self.books))
        kjv.check_books(self.books, "task.books")
        if len(set(self.books)) != len(self.books):
            raise config_error("task.books", "distinct book names", list(self.books))
        if self.labels is not None:
            if len(self.labels) != len(self.books):
                raise config_error("task.labels", f"{len(self.books)} answer words (one per book in task.books) "
                                   "or null", list(self.labels))
            if len(set(self.labels)) != len(self.labels) or not all(s.strip() for s in self.labels):
                raise config_error("task.labels", "distinct non-empty answer words", list(self.labels))
        if self.verses <= 0:
            raise config_error("task.verses", "a positive int", self.verses)
        if not 0.0 < self.test_fraction < 1.0:
            raise config_error("task.test_fraction", "a float in (0, 1)", self.test_fraction)
        if self.test_per_label is not None and self.test_per_label <= 0:
            raise config_error("task.test_per_label", "a positive int or null (all)", self.test_per_label)
        if self.seq_len <= 0:
            raise config_error("task.seq_len", "a positive int", self.seq_len)
        for b in self.books:
            n_train, n_test = self.verse_split(b)
            if n_train < self.verses or n_test < self.verses:
                raise config_error("task.test_fraction", f"a split leaving at least task.verses={self.verses} "
                                   f"verses of {b} ({len(kjv.book_verses(b))} verses) on each side",
                                   self.test_fraction)

    @property
    def label_words(self) -> tuple[str, ...]:
        return self.books if self.labels is None else self.labels

    def verse_split(self, book: str) -> tuple[int, int]:
        """``(n_train, n_test)``: verses ``[0, n_train)`` train, ``[n_train, n_train + n_test)`` test."""
        n = len(kjv.book_verses(book))
        n_test = math.ceil(self.test_fraction * n)
        return n - n_test, n_test


@dataclasses.dataclass(frozen=True)
class Passage:
    """``verses`` consecutive verses of ``book`` starting at verse index ``start`` (0-based over the book)."""

    label: int
    book: str
    start: int
    stop: int

    def text(self) -> str:
        return "\n".join(kjv.book_verses(self.book)[self.start:self.stop])


class BookClassification:
    """The task bound to a tokenizer: passages, token arrays for training and testing, and the answer tokens.

    Training batch (``train_batch``): ``tokens [B, T + 1]`` int32 (inputs ``[:, :-1]``, targets ``[:, 1:]``),
    ``valid [B, T]`` (input tokens that exist; the rest is right padding), ``answer_pos [B]`` (the input index whose
    next token is the label's first token, i.e. the prompt's last token), ``label_len [B]`` and ``label [B]``.
    Test arrays (``test_arrays``): the same without the answer: the inputs end at the prompt.
    """

    def __init__(self, task: KJVBooksTask, tokenizer, seed: int = 0):
        self.task = task
        self.seed = int(seed)
        self.num_labels = len(task.books)
        self.pad_id = next((int(i) for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self._tokenizer = tokenizer
        self.prompt_ids = self._encode(task.prompt, specials=False)
        self.label_ids = [self._encode(" " + w.strip(), specials=False) for w in task.label_words]
        firsts = [ids[0] for ids in self.label_ids]
        if len(set(firsts)) != len(firsts):
            pieces = {w: tokenizer.convert_ids_to_tokens(ids) for w, ids in zip(task.label_words, self.label_ids)}
            raise config_error("task.labels", "answer words whose first tokens differ under the model's tokenizer "
                               f"(the decision is made on the first token; these tokenize as {pieces})",
                               list(task.label_words))
        self.answer_ids = np.asarray(firsts, np.int32)  # [K]
        self.max_label_len = max(len(ids) for ids in self.label_ids)
        self.passage_budget = task.seq_len + 1 - len(self.prompt_ids) - self.max_label_len
        if self.passage_budget < 8:
            raise config_error("task.seq_len", f"room for at least 8 passage tokens besides the prompt "
                               f"({len(self.prompt_ids)} tokens) and the longest label ({self.max_label_len})",
                               task.seq_len)
        self.splits = {b: task.verse_split(b) for b in task.books}
        self.test_passages = self._test_passages()

    def _encode(self, text: str, specials: bool) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=specials))

    # ---- passages -----------------------------------------------------------------------------------------------

    def _test_passages(self) -> list[Passage]:
        v = self.task.verses
        blocks = {b: n_test // v for b, (_, n_test) in self.splits.items()}
        per_label = min(blocks.values())
        if self.task.test_per_label is not None:
            if self.task.test_per_label > per_label:
                raise config_error("task.test_per_label", f"at most {per_label} (non-overlapping test passages of "
                                   f"{v} verses in the smallest test range)", self.task.test_per_label)
            per_label = self.task.test_per_label
        by_label = []
        for label, book in enumerate(self.task.books):
            n_train, _ = self.splits[book]
            # evenly spread over the whole test range, not only its beginning
            starts = [n_train + int(i) * v for i in np.linspace(0, blocks[book] - 1, per_label).round().astype(int)]
            by_label.append([Passage(label, book, s, s + v) for s in starts])
        # interleaved by label, so that any prefix (train.eval_batches caps the test batches) stays balanced
        return [p for group in zip(*by_label) for p in group]

    def train_passage(self, position: int) -> Passage:
        """The training passage at ``position``: label ``position % K`` (every K consecutive examples are
        balanced) and a start verse drawn from ``(seed, position)`` inside that book's training range."""
        label = int(position) % self.num_labels
        book = self.task.books[label]
        n_train, _ = self.splits[book]
        start = int(np.random.default_rng([self.seed, int(position)]).integers(0, n_train - self.task.verses + 1))
        return Passage(label, book, start, start + self.task.verses)

    # ---- token arrays -------------------------------------------------------------------------------------------

    def _prompt_tokens(self, passage: Passage) -> list[int]:
        return self._encode(passage.text(), specials=True)[:self.passage_budget] + self.prompt_ids

    def encode_train(self, passages: list[Passage]) -> dict:
        t = self.task.seq_len
        n = len(passages)
        tokens = np.full((n, t + 1), self.pad_id, np.int32)
        valid = np.zeros((n, t), bool)
        answer_pos = np.zeros(n, np.int32)
        label_len = np.zeros(n, np.int32)
        for i, p in enumerate(passages):
            prompt = self._prompt_tokens(p)
            ids = prompt + self.label_ids[p.label]
            tokens[i, :len(ids)] = ids
            valid[i, :len(ids) - 1] = True
            answer_pos[i] = len(prompt) - 1
            label_len[i] = len(self.label_ids[p.label])
        labels = np.asarray([p.label for p in passages], np.int32)
        return {"tokens": tokens, "valid": valid, "answer_pos": answer_pos, "label_len": label_len, "label": labels}

    def train_batch(self, position: int, batch_size: int) -> dict:
        """The training batch of examples ``[position, position + batch_size)`` (see the class docstring)."""
        return self.encode_train([self.train_passage(p) for p in range(position, position + batch_size)])

    def test_arrays(self, multiple_of: int = 1) -> dict:
        """``tokens [N, T]``, ``valid [N, T]`` (the passage and prompt only), ``answer_pos [N]``, ``label [N]`` and
        ``weight [N]`` (1 for a test passage, 0 for padding rows that fill the last batch up to ``multiple_of``;
        padding rows have no valid token, so they count for nothing in accuracy or keep rates)."""
        t = self.task.seq_len
        n = len(self.test_passages)
        rows = -(-n // multiple_of) * multiple_of
        tokens = np.full((rows, t), self.pad_id, np.int32)
        valid = np.zeros((rows, t), bool)
        answer_pos = np.zeros(rows, np.int32)
        label = np.zeros(rows, np.int32)
        weight = np.zeros(rows, np.float32)
        for i, p in enumerate(self.test_passages):
            prompt = self._prompt_tokens(p)
            tokens[i, :len(prompt)] = prompt
            valid[i, :len(prompt)] = True
            answer_pos[i] = len(prompt) - 1
            label[i] = p.label
            weight[i] = 1.0
        return {"tokens": tokens, "valid": valid, "answer_pos": answer_pos, "label": label, "weight": weight}

    def summary(self) -> dict:
        """The split, for the run directory and the log: verse ranges and passage counts per label."""
        out = {"labels": list(self.task.label_words), "answer_tokens": [int(i) for i in self.answer_ids],
               "test_passages_per_label": len(self.test_passages) // self.num_labels, "books": {}}
        for book, (n_train, n_test) in self.splits.items():
            out["books"][book] = {"train_verses": [0, n_train], "test_verses": [n_train, n_train + n_test]}
        return out

    def check_position(self, state: dict) -> int:
        """The saved data position after checking that the task and seed are unchanged."""
        mine = self.data_state(0)
        for k in ("seed", "task"):
            if state.get(k) != mine[k]:
                raise ValueError(f"checkpoint data state: '{k}' was {state.get(k)!r} when saved, the current config "
                                 f"gives {mine[k]!r}; the task or seed changed since the checkpoint")
        return int(state["position"])

    def data_state(self, position: int) -> dict:
        return {"position": int(position), "seed": self.seed, "task": dataclasses.asdict(self.task) | {
            "books": list(self.task.books), "labels": None if self.task.labels is None else list(self.task.labels)}}


__all__ = ["BookClassification", "KJVBooksTask", "Passage"]
