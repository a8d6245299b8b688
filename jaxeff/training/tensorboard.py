"""A dependency-free TensorBoard event-file writer (and reader) for scalar metrics.

An event file is a sequence of TFRecords; each record frames one serialized ``tensorflow.Event`` protobuf::

    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with CRC-32C (Castagnoli) masked as ``((crc >> 15 | crc << 17) + 0xa282ead8) mod 2**32``. The few protobuf
messages needed are encoded by hand (field numbers from TensorFlow's ``event.proto`` / ``summary.proto``)::

    Event      { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
                 SessionLog session_log = 7; }
    Summary    { repeated Value value = 1; }
    Value      { string tag = 1; float simple_value = 2; }
    SessionLog { SessionStatus status = 1; }          // START = 1

A ``SessionLog START`` event at step ``s`` tells TensorBoard to drop earlier-written points with step >= ``s``:
the writer emits one when a run resumes from a checkpoint, so steps redone after a crash are not shown twice.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time
from typing import Iterator, Mapping, Optional

# ---- CRC-32C ----------------------------------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli polynomial, bit-reversed
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ---- protobuf encoding --------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: Optional[str] = None,
                 scalars: Optional[Mapping[str, float]] = None, session_start: bool = False) -> bytes:
    """A serialized ``Event`` carrying a file version, scalar summaries, or a ``SessionLog START``."""
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _len_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _len_field(1, _len_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items()
        )
        out += _len_field(5, summary)
    if session_start:
        out += _len_field(7, _key(1, 0) + _varint(1))
    return out


# ---- writer -------------------------------------------------------------------------------------------------------


class EventWriter:
    """Appends scalar events to a new ``events.out.tfevents.*`` file in ``logdir``.

        w = EventWriter("runs/x/tb"); w.scalars(10, {"train/loss": 2.3}); w.flush(); w.close()
    """

    def __init__(self, logdir: str | pathlib.Path, filename_suffix: str = ""):
        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        base = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}"
        n = 0
        while (self.logdir / f"{base}.{n}{filename_suffix}").exists():  # a second writer within the same second
            n += 1
        self.path = self.logdir / f"{base}.{n}{filename_suffix}"
        self._file = open(self.path, "ab")
        self._write(encode_event(now, 0, file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: bytes) -> None:
        self._file.write(frame_record(event))

    def scalars(self, step: int, values: Mapping[str, float], wall_time: Optional[float] = None) -> None:
        self._write(encode_event(time.time() if wall_time is None else wall_time, step, scalars=values))

    def session_start(self, step: int) -> None:
        """Marks a restart at ``step``: TensorBoard discards points at ``>= step`` written before this event."""
        self._write(encode_event(time.time(), step, session_start=True))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()


# ---- reader (tests, tools) ------------------------------------------------------------------------------------------


def read_records(path: str | pathlib.Path) -> Iterator[bytes]:
    """The payloads of a TFRecord file, checking both CRCs of every record."""
    data = pathlib.Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if len_crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        payload = data[start:end]
        (data_crc,) = struct.unpack("<I", data[end:end + 4])
        if data_crc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        yield payload
        pos = end + 4


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of a serialized message (bytes for length-delimited fields)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _read_varint(buf, pos)
        elif wt == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            n, pos = _read_varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wt == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield field, wt, val


def decode_event(buf: bytes) -> dict:
    """``{"wall_time", "step", "file_version"?, "scalars"?: {tag: value}, "session_status"?}``."""
    ev: dict = {"step": 0}
    for field, _, val in _fields(buf):
        if field == 1:
            ev["wall_time"] = struct.unpack("<d", val)[0]
        elif field == 2:
            ev["step"] = val - (1 << 64) if val >= 1 << 63 else val
        elif field == 3:
            ev["file_version"] = val.decode()
        elif field == 5:
            scalars = ev.setdefault("scalars", {})
            for f, _, value_msg in _fields(val):
                if f != 1:
                    continue
                tag, simple = None, None
                for vf, _, vv in _fields(value_msg):
                    if vf == 1:
                        tag = vv.decode()
                    elif vf == 2:
                        simple = struct.unpack("<f", vv)[0]
                if tag is not None and simple is not None:
                    scalars[tag] = simple
        elif field == 7:
            for f, _, vv in _fields(val):
                if f == 1:
                    ev["session_status"] = vv
    return ev


def read_events(path: str | pathlib.Path) -> list[dict]:
    return [decode_event(r) for r in read_records(path)]
