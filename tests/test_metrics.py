"""The TensorBoard event writer (TFRecord framing, CRC-32C, hand-encoded protobuf) and the JSONL metrics log."""

import json
import struct

import pytest

from jaxeff.training import tensorboard as tb
from jaxeff.training.metrics import MetricsLogger, read_metrics


def test_crc32c_check_value():
    assert tb.crc32c(b"123456789") == 0xE3069283
    assert tb.crc32c(b"") == 0
    # RFC 3720 (iSCSI) test vector: 32 zero bytes.
    assert tb.crc32c(bytes(32)) == 0x8A9136AA


def test_masked_crc_and_framing():
    payload = b"hello event"
    rec = tb.frame_record(payload)
    assert len(rec) == 8 + 4 + len(payload) + 4
    assert struct.unpack("<Q", rec[:8])[0] == len(payload)
    crc = tb.crc32c(payload)
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert struct.unpack("<I", rec[-4:])[0] == masked


def test_event_file_roundtrip(tmp_path):
    w = tb.EventWriter(tmp_path)
    w.scalars(1, {"train/loss": 2.5, "train/lr": 1e-3}, wall_time=123.0)
    w.scalars(2, {"train/loss": -0.125})
    w.session_start(2)
    w.scalars(1 << 40, {"eval/ppl": 7.0})
    w.close()
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert files == [w.path]
    events = tb.read_events(w.path)
    assert events[0]["file_version"] == "brain.Event:2"
    assert events[1] == {"step": 1, "wall_time": 123.0, "scalars": {"train/loss": 2.5, "train/lr": pytest.approx(1e-3)}}
    assert events[2]["scalars"] == {"train/loss": -0.125} and events[2]["step"] == 2
    assert events[3]["session_status"] == 1 and events[3]["step"] == 2
    assert events[4]["step"] == 1 << 40 and events[4]["scalars"] == {"eval/ppl": 7.0}


def test_corrupted_record_is_detected(tmp_path):
    w = tb.EventWriter(tmp_path)
    w.scalars(3, {"x": 1.0})
    w.close()
    data = bytearray(w.path.read_bytes())
    data[-6] ^= 0xFF  # inside the last payload
    w.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        tb.read_events(w.path)


def test_tensorboard_reads_our_file(tmp_path):
    loader_mod = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    w = tb.EventWriter(tmp_path)
    w.scalars(5, {"train/loss": 1.5})
    w.close()
    events = list(loader_mod.EventFileLoader(str(w.path)).Load())
    assert events[0].file_version == "brain.Event:2"
    # Newer loaders migrate simple_value into a scalar tensor.
    scalars = [(e.step, v.tag, v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value)
               for e in events for v in e.summary.value]
    assert scalars == [(5, "train/loss", 1.5)]


def test_metrics_logger_resume_drops_later_steps(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log("baseline", 0, {"unigram_ppl": 100.0})
    for s in range(1, 6):
        log.log("train", s, {"loss": 1.0 / s})
    log.log("eval", 4, {"ppl": 3.0})
    log.close()
    # A run resumed from the checkpoint at step 3 redoes steps 4 and 5.
    log = MetricsLogger(tmp_path, resume_step=3)
    log.log("train", 4, {"loss": 0.2})
    log.close()
    recs = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in recs] == [("baseline", 0), ("train", 1), ("train", 2), ("train", 3),
                                                      ("train", 4)]
    assert recs[-1]["loss"] == 0.2
    # TensorBoard gets a SessionLog START at the first redone step in the new event file.
    files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    starts = [e for f in files for e in tb.read_events(f) if e.get("session_status") == 1]
    assert [e["step"] for e in starts] == [4]
    # Floats go to JSON with full precision (bit-exact comparisons of losses across runs rely on it).
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])["loss"] == 0.5


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", enabled=False)
    log.log("train", 1, {"loss": 1.0})
    log.flush()
    log.close()
    assert not (tmp_path / "run").exists()


class _Bar:
    """Records what a training loop tells its tqdm bar."""

    def __init__(self):
        self.n, self.postfix = 0, None

    def set_postfix(self, refresh=True, **kw):
        self.postfix = kw

    def update(self, n):
        self.n += n


def test_step_metrics_logs_each_step_once_with_lr_and_rate(tmp_path):
    import jax.numpy as jnp

    from jaxeff.training.metrics import StepMetrics

    logger, bar = MetricsLogger(tmp_path), _Bar()
    steps = StepMetrics(logger, bar, schedule=lambda s: 0.1 * (s + 1), units_per_step=4, rate_name="items_per_s",
                        postfix=lambda v, r: {"loss": f"{v['loss']:.1f}"}, max_in_flight=2)
    assert steps.flush() is None and not steps
    for s in range(1, 6):
        steps.add(s, {"loss": jnp.float32(s), "acc": jnp.float32(s / 10)})
        if s in (3, 5):
            last = steps.flush()
            assert last == pytest.approx({"loss": float(s), "acc": s / 10})
    assert not steps and bar.n == 5 and bar.postfix == {"loss": "5.0"}
    assert steps.losses == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0}
    assert steps.units_done == 20 and steps.train_time > 0 and steps.rate() > 0
    logger.close()
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])  # schedule(step - 1)
    # the throughput goes on the last record of each flush only
    assert [("items_per_s" in r) for r in rows] == [False, False, True, False, True]
