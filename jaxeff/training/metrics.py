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
import time
from typing import Callable, Mapping, Optional

import jax

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


class StepMetrics:
    """The device metrics of a training loop's steps between two host reads.

    Steps are dispatched without waiting for their results: :meth:`add` queues a step's metrics (and waits only
    while more than ``max_in_flight`` steps are queued ahead of the devices), :meth:`flush` fetches every queued one
    in one transfer, writes one ``"train"`` record per step (plus ``lr`` when ``schedule`` is given, and on the last
    record the throughput ``rate_name`` = ``units_per_step`` x steps / seconds), keeps each step's ``loss`` in
    ``losses``, advances ``bar`` (with the postfix ``postfix(values, rate)`` returns) and returns the last step's
    values. Time spent between a flush and :meth:`restart_clock` (evaluation, checkpoints) does not count in
    ``train_time`` and ``units_done``, the totals for a final throughput.

    Args:
      logger: the run's :class:`MetricsLogger`.
      bar: a tqdm progress bar.
      schedule: step -> learning rate (called with ``step - 1``), or None.
      units_per_step: tokens, clips or examples per step, for the throughput.
      rate_name: the record key of the throughput, or None for no throughput.
      postfix: ``(values, rate) -> dict`` of the bar's postfix, or None.
      max_in_flight: steps queued ahead of the devices at most (None: no bound). Without a bound, dozens of queued
        steps with collectives over many simulated CPU devices can stall XLA's CPU all-reduce rendezvous (observed
        with jax 0.10.2 and 8 host devices); waiting for a step 8 behind costs nothing measurable.
    """

    def __init__(self, logger: MetricsLogger, bar, *, schedule: Optional[Callable] = None, units_per_step: int = 0,
                 rate_name: Optional[str] = None, postfix: Optional[Callable[[dict, float], dict]] = None,
                 max_in_flight: Optional[int] = 8):
        self.logger, self.bar, self.schedule = logger, bar, schedule
        self.units_per_step, self.rate_name, self.postfix = units_per_step, rate_name, postfix
        self.max_in_flight = max_in_flight
        self.losses: dict[int, float] = {}
        self.train_time = 0.0
        self.units_done = 0
        self._pending: list = []
        self._mark = time.time()

    def __bool__(self) -> bool:
        """True while steps are queued that no flush has read."""
        return bool(self._pending)

    def add(self, step: int, metrics) -> None:
        self._pending.append((step, metrics))
        if self.max_in_flight and len(self._pending) > self.max_in_flight:
            jax.block_until_ready(self._pending[-self.max_in_flight][1])

    def flush(self) -> Optional[dict]:
        """Reads, logs and clears the queued steps; the last step's values (floats), or None when none was queued."""
        if not self._pending:
            return None
        fetched = jax.device_get([m for _, m in self._pending])
        dt = time.time() - self._mark
        n = len(self._pending)
        self.train_time += dt
        self.units_done += n * self.units_per_step
        rate = n * self.units_per_step / dt if dt > 0 else float("nan")
        last = self._pending[-1][0]
        for (s, _), m in zip(self._pending, fetched):
            vals = {k: float(v) for k, v in m.items()}
            if "loss" in vals:
                self.losses[s] = vals["loss"]
            row = dict(vals)
            if self.schedule is not None:
                row["lr"] = float(self.schedule(s - 1))
            if self.rate_name and s == last:
                row[self.rate_name] = rate
            self.logger.log("train", s, row)
        self._pending.clear()
        if self.postfix is not None:
            self.bar.set_postfix(**self.postfix(vals, rate), refresh=False)
        self.bar.update(n)
        self.logger.flush()
        self._mark = time.time()
        return vals

    def restart_clock(self) -> None:
        """Starts the next throughput interval now (call after work that is not training: eval, checkpoints)."""
        self._mark = time.time()

    def rate(self) -> float:
        """``units_done / train_time`` over the whole loop so far (NaN before any flush)."""
        return self.units_done / self.train_time if self.train_time > 0 else float("nan")
