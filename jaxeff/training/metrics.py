"""Metric sinks of a training run: a JSONL file (one record per line, exact floats) and TensorBoard event files.

Records carry a ``kind`` (``"train"``, ``"eval"``, ``"baseline"``, ``"final"``) and a ``step``. Only process 0 of a
multi-process run writes (the others get a logger with ``enabled=False``). When a run resumes from the checkpoint
at step ``s``, records with ``step > s`` (written after that checkpoint by the interrupted run, and about to be
recomputed) are dropped from the JSONL file and TensorBoard is told to drop them too, so each step appears once.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Mapping, Optional

from jaxeff.training.tensorboard import EventWriter

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_metrics(run_dir, kind: Optional[str] = None) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (optionally of one ``kind``), in file order."""
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


def _clean(v):
    """JSON has no NaN/inf: they are written as strings rather than producing an invalid file."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Writes metric records to ``<run_dir>/metrics.jsonl`` and ``<run_dir>/tb/``.

    Args:
      run_dir: the run directory.
      enabled: False makes every method a no-op (processes other than 0).
      resume_step: the checkpoint step a resumed run restarts from; None starts new files.
    """

    def __init__(self, run_dir, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = pathlib.Path(run_dir) / METRICS_FILE
        self._tb: Optional[EventWriter] = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self._file = open(self.path, "w")
        else:
            kept = [r for r in read_metrics(run_dir) if int(r.get("step", 0)) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
            self._file = open(self.path, "a")
        self._tb = EventWriter(pathlib.Path(run_dir) / TB_DIR)
        if resume_step is not None:
            self._tb.session_start(resume_step + 1)

    def log(self, kind: str, step: int, values: Mapping[str, float], tb: bool = True) -> None:
        """Appends one record ``{"kind", "step", **values}``; numeric values also go to TensorBoard as
        ``<kind>/<name>``."""
        if not self.enabled:
            return
        rec = {"kind": kind, "step": int(step), **{k: _clean(v) for k, v in values.items()}}
        self._file.write(json.dumps(rec) + "\n")
        if tb:
            scalars = {f"{kind}/{k}": float(v) for k, v in values.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if scalars:
                self._tb.scalars(int(step), scalars)

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
