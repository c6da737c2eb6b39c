"""TensorBoard event files written without TensorFlow: a live view of `metrics.jsonl`.

A run writes every line it appends to `metrics.jsonl` into its workdir's event file too,
so `tensorboard --logdir WORKDIR` (or a `compare` folder: one run per method and seed)
shows the training curves while the run trains. The event file is a view, never a
source: a resumed run drops the lines logged after its checkpoint from `metrics.jsonl`
and writes the event file afresh from what is left (`rebuild`), so the curves hold no
steps that were redone.

Which scalars a record gives (`scalars`):
- a training record: `train/<key>` for each number (`train/loss`, `train/fast/loss`,
  `train/learning_rate`), `train/<key>/<i>` for each entry of a list (`train/block_n/03`);
- a periodic evaluation (`{"eval": {...}}`): `eval/<key>` (`eval/acc_r`);
- a finished stage's results (a task's, a request's; `train.Run.finish_stage`), at the
  stage's last step: `stage/<key>` (`stage/acc_f`, `stage/ua`, `stage/task_acc/1`); these
  are not lines of `metrics.jsonl`, and a rewrite takes them from the checkpoint;
- `step`, `stage` and `epoch` are the record's position, not curves: `stage` is not a
  number and `step` is the x axis.

The run's config opens the file as the text entry `config` (TensorBoard's Text tab).

The format (TensorFlow's `Event` protocol buffer in TFRecord framing) is written by hand:
each record is `uint64 length, uint32 masked CRC-32C of length, data, uint32 masked
CRC-32C of data`; the first event names the file version (`brain.Event:2`), each later one
holds a wall time, a step and a `Summary` with one `simple_value` per scalar.
"""

from __future__ import annotations

import glob
import math
import os
import socket
import struct
import time
from typing import Iterable

SUFFIX = ".kswap_jax"  # our event files: events.out.tfevents.<time>.<host>.<pid>.kswap_jax
_TMP = ".kswap_jax_events.tmp"
_POSITION = ("step", "stage", "epoch")


def _crc_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # CRC-32C (Castagnoli), reflected
    table.append(crc)
  return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  table = _TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, its masked CRC."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data
          + struct.pack("<I", _masked_crc(data)))


# Protocol-buffer encoding, the few field kinds an Event needs.
def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # a negative int64 is its two's complement, 10 bytes
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int | None = None, summary: bytes | None = None,
           file_version: str | None = None, start: bool = False) -> bytes:
  """Event: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5,
  session_log = 7 (SessionLog: status = 1, START = 1)."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
  if step:
    out += _varint(2 << 3 | 0) + _varint(int(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary is not None:
    out += _bytes_field(5, summary)
  if start:
    out += _bytes_field(7, _varint(1 << 3 | 0) + _varint(1))
  return out


def _float32(value: float) -> bytes:
  """A float as 4 bytes; beyond float32's range, the signed infinity (a diverging loss
  must not stop the run where it is logged)."""
  try:
    return struct.pack("<f", value)
  except OverflowError:
    return struct.pack("<f", math.copysign(math.inf, value))


def _summary(values: dict[str, float]) -> bytes:
  """Summary: repeated Value value = 1; Value: tag = 1 (string), simple_value = 2 (float)."""
  out = b""
  for tag, value in values.items():
    body = _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + _float32(value)
    out += _bytes_field(1, body)
  return out


def _text_summary(tag: str, text: str) -> bytes:
  """Summary of one text value, as TensorBoard's text plugin reads it: Value tag = 1,
  tensor = 8 (TensorProto: dtype = 1 DT_STRING 7, tensor_shape = 2 a scalar's, string_val
  = 8), metadata = 9 (SummaryMetadata: plugin_data = 1, PluginData: plugin_name = 1)."""
  tensor = (_varint(1 << 3 | 0) + _varint(7) + _bytes_field(2, b"")
            + _bytes_field(8, text.encode()))
  plugin = _bytes_field(1, _bytes_field(1, b"text"))
  return _bytes_field(1, _bytes_field(1, tag.encode()) + _bytes_field(8, tensor)
                      + _bytes_field(9, plugin))


def scalars(record: dict) -> dict[str, float]:
  """The scalars of one `metrics.jsonl` record, by tag (the module's docstring)."""
  if isinstance(record.get("eval"), dict):
    prefix, values = "eval", record["eval"]
  elif isinstance(record.get("result"), dict):
    prefix, values = "stage", record["result"]
  else:
    prefix, values = "train", {k: v for k, v in record.items() if k not in _POSITION}
  out: dict[str, float] = {}

  def add(tag: str, value) -> None:
    if isinstance(value, bool) or value is None:
      return
    if isinstance(value, (int, float)):
      out[tag] = float(value)  # a non-finite value is kept: TensorBoard shows it
    elif isinstance(value, (list, tuple)):
      width = len(str(max(len(value) - 1, 0)))
      for i, item in enumerate(value):
        add(f"{tag}/{i:0{width}d}", item)
    elif isinstance(value, dict):
      for key, item in value.items():
        add(f"{tag}/{key}", item)

  for key, value in values.items():
    add(f"{prefix}/{key}", value)
  return out


def remove_event_files(logdir: str) -> None:
  """Removes the event files of ours in `logdir` (and a file of ours cut short while it was
  written); another program's event files stay."""
  folder = glob.escape(logdir)
  for old in (glob.glob(os.path.join(folder, f"events.out.tfevents.*{SUFFIX}"))
              + glob.glob(os.path.join(folder, _TMP))):
    os.remove(old)


class EventWriter:
  """Appends `metrics.jsonl` records to the workdir's event file (the first process only);
  `config_text`, when given, opens every file it writes as the text entry `config`
  (TensorBoard's Text tab)."""

  def __init__(self, logdir: str, config_text: str | None = None):
    self.logdir = logdir
    self.path = None
    self.config_text = config_text

  def rebuild(self, records: Iterable[dict]) -> None:
    """Removes the workdir's earlier event files of ours and writes `records` to a new one
    (none while there is nothing to show: a run refused before its first log leaves no
    file behind)."""
    remove_event_files(self.logdir)
    self.path = None
    now = time.time()
    data = b"".join(self._encoded(r, now) for r in records)
    if data:
      self._start(data, now)

  def write(self, record: dict) -> None:
    now = time.time()
    data = self._encoded(record, now)
    if not data:
      return
    if self.path is None:
      self._start(data, now)
    else:
      with open(self.path, "ab") as f:
        f.write(data)

  def _start(self, data: bytes, now: float) -> None:
    """A new event file: the version event, a session start at step 0 (the mark a restarted
    TensorFlow writer leaves: a loader may drop the steps it read from there on), then
    `data`, written whole (renamed in place). The name sorts after the earlier files' (the
    nanosecond clock): loaders read a run's files in name order. Measured with TensorBoard
    2.21.0: its default loader (the Rust data server) shows the rewritten file in place of
    the removed one while it runs; the Python loader (`--load_fast=false`) keeps what it
    read until TensorBoard restarts."""
    name = (f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}."
            f"{time.time_ns()}{SUFFIX}")
    path, tmp = os.path.join(self.logdir, name), os.path.join(self.logdir, _TMP)
    config = (_frame(_event(now, summary=_text_summary("config", self.config_text)))
              if self.config_text is not None else b"")
    with open(tmp, "wb") as f:  # a name TensorBoard does not read while it is written
      f.write(_frame(_event(now, file_version="brain.Event:2"))
              + _frame(_event(now, start=True)) + config + data)
    os.replace(tmp, path)
    self.path = path

  @staticmethod
  def _encoded(record: dict, wall_time: float) -> bytes:
    values = scalars(record)
    if not values or not isinstance(record.get("step"), int):
      return b""
    return _frame(_event(wall_time, record["step"], summary=_summary(values)))
