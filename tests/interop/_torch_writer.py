"""Writes `torch.save` files without torch, opcode by opcode, for the reader's tests.

The output follows torch's own serialization: the zip format (`<prefix>/data.pkl` with
storages as persistent ids ("storage", torch.<T>Storage, key, location, numel), raw
little-endian bytes in `<prefix>/data/<key>`, `<prefix>/version`, `<prefix>/byteorder`) and
the legacy format (magic number, protocol 1001, system info, the object pickle with
6-tuple persistent ids, the storage keys, then each storage as an int64 count and bytes).
Tensors pickle as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, OrderedDict())`, parameters as `torch._utils._rebuild_parameter(...)`, and
state dicts as `collections.OrderedDict` with a `_metadata` attribute, as torch does.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.bool_): "BoolStorage", np.dtype(np.uint8): "ByteStorage",
}


@dataclasses.dataclass(eq=False)
class Storage:
  data: np.ndarray  # 1-D
  key: str = ""


@dataclasses.dataclass(eq=False)
class Tensor:
  storage: Storage
  offset: int
  size: tuple
  stride: tuple
  parameter: bool = False


@dataclasses.dataclass
class Global:
  """A reference to `module.name`, pickled as GLOBAL (for hostile or odd pickles)."""
  module: str
  name: str


@dataclasses.dataclass
class Call:
  """`func(*args)` pickled as REDUCE."""
  func: Global
  args: tuple


def tensor(array, parameter: bool = False) -> Tensor:
  """A contiguous tensor with its own storage."""
  array = np.asarray(array)
  strides = tuple(int(s) for s in np.cumprod((1,) + array.shape[::-1])[:-1][::-1])
  return Tensor(Storage(np.ascontiguousarray(array).reshape(-1)), 0, tuple(array.shape), strides,
                parameter)


def state_dict(arrays: dict) -> collections.OrderedDict:
  return collections.OrderedDict((k, tensor(v) if isinstance(v, np.ndarray) else v)
                                 for k, v in arrays.items())


class _Writer:
  def __init__(self, legacy: bool):
    self.out = bytearray(b"\x80\x02")
    self.legacy = legacy
    self.storages: dict[int, Storage] = {}

  def op(self, b: bytes):
    self.out += b

  def global_(self, module, name):
    self.op(b"c" + f"{module}\n{name}\n".encode())

  def save(self, x):
    if x is None:
      self.op(b"N")
    elif x is True or x is False:
      self.op(b"\x88" if x else b"\x89")
    elif isinstance(x, int):
      if 0 <= x < 256:
        self.op(b"K" + bytes([x]))
      elif -2 ** 31 <= x < 2 ** 31:
        self.op(b"J" + struct.pack("<i", x))
      else:
        raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
        self.op(b"\x8a" + bytes([len(raw)]) + raw)
    elif isinstance(x, float):
      self.op(b"G" + struct.pack(">d", x))
    elif isinstance(x, str):
      raw = x.encode()
      self.op(b"X" + struct.pack("<I", len(raw)) + raw)
    elif isinstance(x, tuple):
      if not x:
        self.op(b")")
        return
      self.op(b"(")
      for v in x:
        self.save(v)
      self.op(b"t")
    elif isinstance(x, list):
      self.op(b"](")
      for v in x:
        self.save(v)
      self.op(b"e")
    elif isinstance(x, collections.OrderedDict):
      self.global_("collections", "OrderedDict")
      self.op(b")R")
      self._items(x)
      metadata = getattr(x, "_metadata", None)
      if metadata is not None:
        self.save({"_metadata": metadata})
        self.op(b"b")  # BUILD: sets the attribute, as torch's state dicts carry it
    elif isinstance(x, dict):
      self.op(b"}")
      self._items(x)
    elif isinstance(x, Tensor):
      self._tensor(x)
    elif isinstance(x, Global):
      self.global_(x.module, x.name)
    elif isinstance(x, Call):
      self.save(x.func)
      self.save(tuple(x.args))
      self.op(b"R")
    else:
      raise TypeError(type(x))

  def _items(self, d):
    if not d:
      return
    self.op(b"(")
    for k, v in d.items():
      self.save(k)
      self.save(v)
    self.op(b"u")

  def _tensor(self, t: Tensor):
    if t.parameter:
      self.global_("torch._utils", "_rebuild_parameter")
      self.op(b"(")
      self._tensor(dataclasses.replace(t, parameter=False))
      self.save(True)
      self.save(collections.OrderedDict())
      self.op(b"tR")
      return
    s = t.storage
    if id(s) not in self.storages:
      s.key = s.key or str(len(self.storages))
      self.storages[id(s)] = s
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.op(b"(")
    # persistent id
    self.op(b"(")
    self.save("storage")
    self.global_("torch", STORAGE_NAMES[s.data.dtype])
    self.save(s.key)
    self.save("cpu")
    self.save(int(s.data.size))
    if self.legacy:
      self.save(None)
    self.op(b"tQ")
    self.save(int(t.offset))
    self.save(tuple(int(v) for v in t.size))
    self.save(tuple(int(v) for v in t.stride))
    self.save(False)
    self.save(collections.OrderedDict())
    self.op(b"tR")

  def bytes(self, obj) -> bytes:
    self.save(obj)
    self.op(b".")
    return bytes(self.out)


def save_zip(obj, path, prefix: str = "archive", data_pkl: bytes | None = None) -> None:
  """torch.save's zip format; `data_pkl` replaces the pickle (for hostile files)."""
  w = _Writer(legacy=False)
  pkl = w.bytes(obj) if data_pkl is None else data_pkl
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{prefix}/data.pkl", pkl)
    z.writestr(f"{prefix}/byteorder", "little")
    for s in w.storages.values():
      z.writestr(f"{prefix}/data/{s.key}", s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
    z.writestr(f"{prefix}/version", "3\n")
    z.writestr(f"{prefix}/.data/serialization_id", "0123456789")


def save_legacy(obj, path) -> None:
  """torch.save(..., _use_new_zipfile_serialization=False)."""
  w = _Writer(legacy=True)
  body = w.bytes(obj)
  out = io.BytesIO()
  pickle.dump(0x1950A86A20F9469CFC6C, out, protocol=2)
  pickle.dump(1001, out, protocol=2)
  pickle.dump({"protocol_version": 1001, "little_endian": True,
               "type_sizes": {"short": 2, "int": 4, "long": 4}}, out, protocol=2)
  out.write(body)
  keys = [s.key for s in w.storages.values()]
  pickle.dump(keys, out, protocol=2)
  for s in w.storages.values():
    out.write(struct.pack("<q", s.data.size))
    out.write(s.data.tobytes())
  with open(path, "wb") as f:
    f.write(out.getvalue())


def pickle_bytes(obj) -> bytes:
  return _Writer(legacy=False).bytes(obj)
