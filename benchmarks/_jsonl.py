"""The result rows of a benchmark run, as JSON lines."""

from __future__ import annotations

import json


class JsonLines:
    """Collects the rows of one benchmark run.

    Each row, ``{"bench": bench, **row, **common}``, is printed to stdout as one JSON line, kept in ``rows`` and,
    when ``out_path`` is given, appended to that file and flushed at once, so a run stopped part-way keeps what it
    has measured. Use it as a context manager (or call ``close()``) to close the file.
    """

    def __init__(self, bench: str, out_path: str | None = None, common: dict | None = None):
        self.bench = bench
        self.common = dict(common or {})
        self.rows: list[dict] = []
        self._out = open(out_path, "a") if out_path else None  # noqa: SIM115 (closed by close())

    def __call__(self, **row) -> dict:
        row = {"bench": self.bench, **row, **self.common}
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if self._out is not None:
            self._out.write(line + "\n")
            self._out.flush()
        return row

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
