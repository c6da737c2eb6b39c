"""Reads `torch.save` files into numpy arrays without torch and without running their code.

A `torch.save` file is a pickle. Unpickling calls whatever functions the pickle names, so a
plain `pickle.load` (or `torch.load(weights_only=False)`) of a downloaded checkpoint can run
arbitrary commands. This reader uses a `pickle.Unpickler` whose `find_class` admits only the
handful of globals a state dict needs and maps each to an inert numpy stand-in:

    collections.OrderedDict                      -> OrderedDict (plain container)
    torch._utils._rebuild_tensor_v2              -> a view (storage, offset, size, stride)
    torch._utils._rebuild_parameter[_with_state] -> the same tensor
    torch._tensor._rebuild_from_type_v2          -> the tensor (subclass type ignored)
    torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage, torch.UntypedStorage
                                                 -> a dtype marker
    torch.Tensor, torch.nn.parameter.Parameter   -> type markers (for `_rebuild_from_type_v2`)

Every other global (`os.system`, `builtins.eval`, `argparse.Namespace`, ...) raises
`UnsafePickleError` naming `module.name`, before anything is called. Callers that trust a
specific harmless class (say `argparse.Namespace` in a training checkpoint) can list it in
`inert=`: it is then replaced by a record of its arguments, and still never called.

Two container formats are read:

  * the zip format of `torch.save` (torch >= 1.6): `<prefix>/data.pkl` with storages as
    persistent ids `("storage", storage_type, key, location, numel)` and their raw
    little-endian bytes in `<prefix>/data/<key>`;
  * the legacy format (torch < 1.6, or `_use_new_zipfile_serialization=False`): magic
    number, protocol, system-info pickles, the object pickle with persistent ids
    `("storage", storage_type, root_key, location, numel, view_metadata)`, the list of
    storage keys, then each storage as an int64 element count and its bytes.

Tensors become numpy arrays (`ml_dtypes.bfloat16` for bfloat16), built as strided views of
their storage with bounds checked first, then copied, so shared storages, offsets and
non-contiguous strides come out as torch would give them.

Example:
  >>> state = torch_pickle.load("model.pth")        # {"blocks.0.attn.qkv.weight": ndarray, ...}
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Iterable

import ml_dtypes
import numpy as np

# torch storage class name -> numpy dtype
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# A tensor may hold more elements than its storage only through zero strides (an expanded
# view); beyond this many elements that is treated as a memory bomb.
MAX_EXPANDED = 2 ** 27
LEGACY_PROTOCOL = 1001


class UnsafePickleError(ValueError):
  """The pickle names a global outside the whitelist; nothing was called."""


class TorchFileError(ValueError):
  """The file is not a readable torch checkpoint (truncated, corrupt, unknown format)."""


class _StorageType:
  """Stand-in for a torch storage class: only its dtype matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]

  def __repr__(self):
    return f"torch.{self.name}"


class _TypeMarker:
  """Stand-in for torch.Tensor / Parameter, only ever passed as an argument."""

  def __init__(self, name: str):
    self.name = name


class _Storage:
  """A storage named by a persistent id; its bytes are attached after unpickling."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, int(numel)
    self.array: np.ndarray | None = None


class _StorageView:
  """Legacy format: a view (offset, size) into a root storage."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, int(offset), int(numel)


class _TensorRef:
  """A tensor as (storage, storage_offset, size, stride), materialised by `_materialize`."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, (_Storage, _StorageView)):
      raise TorchFileError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    self.storage = storage
    self.offset = _int(offset, "storage_offset")
    self.size = tuple(_int(s, "size") for s in size)
    self.stride = tuple(_int(s, "stride") for s in stride)
    if len(self.size) != len(self.stride):
      raise TorchFileError(f"tensor size {self.size} and stride {self.stride} differ in rank")


class Inert:
  """What a class listed in `inert=` turns into: its arguments and state, never called."""

  def __init__(self, qualname: str, *args, **kwargs):
    self.qualname, self.args, self.kwargs, self.state = qualname, args, kwargs, None

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"Inert({self.qualname})"


def _msg(e: BaseException) -> str:
  """One line of at most 160 characters: the exception type and its message."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _int(x, what: str) -> int:
  if isinstance(x, bool) or not isinstance(x, int):
    raise TorchFileError(f"tensor {what} holds {type(x).__name__}, not an int")
  return x


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, _TensorRef):
    raise TorchFileError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state
  if func not in (_rebuild_tensor_v2, _rebuild_parameter):
    raise TorchFileError("_rebuild_from_type_v2 with a function other than a tensor rebuild")
  return func(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch._tensor", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.parameter.Parameter"),
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` whose globals come only from `_ALLOWED` (or `inert` records)."""

  def __init__(self, file, *, legacy: bool, inert: Iterable[str] = ()):
    super().__init__(file, encoding="utf-8")
    self.legacy = legacy
    self.inert = frozenset(inert)
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    found = _ALLOWED.get((module, name))
    if found is not None:
      return found
    qualname = f"{module}.{name}"
    if qualname in self.inert:
      return lambda *args, **kwargs: Inert(qualname, *args, **kwargs)
    raise UnsafePickleError(
        f"refusing to load global {qualname} (only tensors, storages and plain containers "
        f"are allowed)")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise TorchFileError(f"unknown persistent id {str(pid)[:80]}")
    if self.legacy:
      if len(pid) != 6:
        raise TorchFileError(f"legacy storage id of length {len(pid)}, expected 6")
      _, kind, key, _, numel, view = pid
    else:
      if len(pid) != 5:
        raise TorchFileError(f"storage id of length {len(pid)}, expected 5")
      _, kind, key, _, numel = pid
      view = None
    if not isinstance(kind, _StorageType):
      raise TorchFileError(f"storage of unknown type {kind!r}")
    key = str(key)
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _Storage(key, kind.dtype, _int(numel, "storage numel"))
    if view is not None:  # legacy (view_key, offset, view_size)
      _, offset, view_size = view
      return _StorageView(storage, offset, view_size)
    return storage


def _unpickler(data: bytes, *, legacy: bool, inert: Iterable[str]) -> _RestrictedUnpickler:
  return _RestrictedUnpickler(io.BytesIO(data), legacy=legacy, inert=inert)


def _view(t: _TensorRef, name: str) -> np.ndarray:
  storage, base = t.storage, 0
  if isinstance(storage, _StorageView):
    storage, base = storage.root, storage.offset
  if storage.array is None:
    raise TorchFileError(f"{name}: storage {storage.key} has no data in the file")
  data = storage.array
  if t.offset < 0 or any(s < 0 for s in t.stride) or any(s < 0 for s in t.size):
    raise TorchFileError(f"{name}: negative offset, size or stride")
  if 0 in t.size:
    return np.zeros(t.size, data.dtype)
  last = base + t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
  if last >= data.size:
    raise TorchFileError(
        f"{name}: tensor of size {t.size}, stride {t.stride} at offset {t.offset} reads past "
        f"its storage of {data.size} elements (truncated or corrupt file)")
  numel = math.prod(t.size)
  if numel > max(data.size, MAX_EXPANDED):
    # Zero strides may legally repeat elements, but not into a memory bomb.
    raise TorchFileError(f"{name}: a tensor of {numel} elements from a storage of {data.size} "
                         f"(refusing to expand beyond {MAX_EXPANDED} elements)")
  item = data.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      data[base + t.offset:], shape=t.size, strides=tuple(s * item for s in t.stride),
      writeable=False)
  return np.array(view, copy=True)


def _materialize(obj: Any, name: str = "") -> Any:
  """Replaces every `_TensorRef` in plain containers by its numpy array."""
  if isinstance(obj, _TensorRef):
    return _view(obj, name or "tensor")
  if isinstance(obj, (_Storage, _StorageView)):
    raise TorchFileError(f"{name or 'object'}: a bare storage, not a tensor")
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialize(v, _join(name, k))) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialize(v, _join(name, k)) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialize(v, _join(name, i)) for i, v in enumerate(obj)]
  if isinstance(obj, tuple):
    return tuple(_materialize(v, _join(name, i)) for i, v in enumerate(obj))
  return obj


def _join(prefix: str, key) -> str:
  return f"{prefix}.{key}" if prefix else str(key)


def _storage_array(raw: bytes, storage: _Storage, big_endian: bool) -> np.ndarray:
  nbytes = storage.numel * storage.dtype.itemsize
  if len(raw) < nbytes:
    raise TorchFileError(f"storage {storage.key} holds {len(raw)} bytes, expected {nbytes} "
                         f"(truncated file)")
  dtype = storage.dtype.newbyteorder(">") if big_endian and storage.dtype.itemsize > 1 \
      else storage.dtype
  return np.frombuffer(raw, dtype, count=storage.numel).astype(storage.dtype)


def _load_zip(path: str, inert: Iterable[str]) -> Any:
  try:
    archive = zipfile.ZipFile(path)
  except Exception as e:  # noqa: BLE001 - BadZipFile, NotImplementedError, ... on bad bytes
    raise TorchFileError(f"not a readable torch zip archive ({_msg(e)})") from None
  with archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pkl) != 1:
      raise TorchFileError("zip archive without a single <prefix>/data.pkl: not a torch.save file")
    prefix = pkl[0][:-len("data.pkl")]
    try:
      unpickler = _unpickler(archive.read(pkl[0]), legacy=False, inert=inert)
      obj = unpickler.load()
      big_endian = False
      if prefix + "byteorder" in names:
        big_endian = archive.read(prefix + "byteorder").strip() == b"big"
      for key, storage in unpickler.storages.items():
        record = f"{prefix}data/{key}"
        if record not in names:
          raise TorchFileError(f"storage record {record} is missing (truncated file)")
        nbytes = storage.numel * storage.dtype.itemsize
        if archive.getinfo(record).file_size != nbytes:
          raise TorchFileError(f"storage record {record} holds {archive.getinfo(record).file_size} "
                               f"bytes, expected {nbytes} (truncated or corrupt file)")
        storage.array = _storage_array(archive.read(record), storage, big_endian)
    except (UnsafePickleError, TorchFileError):
      raise
    except Exception as e:  # noqa: BLE001 - any failure to parse hostile bytes is a bad file
      raise TorchFileError(f"corrupt torch zip archive ({_msg(e)})") from None
  return obj


def _load_legacy(path: str, inert: Iterable[str]) -> Any:
  with open(path, "rb") as f:
    data = f.read()
  stream = io.BytesIO(data)

  def next_pickle(legacy=True):
    u = _RestrictedUnpickler(stream, legacy=legacy, inert=inert)
    return u, u.load()

  try:
    _, magic = next_pickle()
    if magic != LEGACY_MAGIC:
      raise TorchFileError("neither a zip archive nor a legacy torch pickle (bad magic number)")
    _, protocol = next_pickle()
    if protocol != LEGACY_PROTOCOL:
      raise TorchFileError(f"legacy torch protocol {protocol!r}, expected {LEGACY_PROTOCOL}")
    _, sys_info = next_pickle()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise TorchFileError("big-endian legacy torch files are not supported")
    unpickler, obj = next_pickle()
    _, keys = next_pickle()
  except (UnsafePickleError, TorchFileError):
    raise
  except Exception as e:  # noqa: BLE001 - any failure to parse hostile bytes is a bad file
    raise TorchFileError(f"truncated or corrupt legacy torch file ({_msg(e)})") from None
  if not isinstance(keys, list):
    raise TorchFileError("legacy torch file without its list of storage keys")
  for key in keys:
    storage = unpickler.storages.get(str(key))
    header = stream.read(8)
    if len(header) != 8:
      raise TorchFileError(f"storage {key}: truncated file")
    (numel,) = struct.unpack("<q", header)
    if storage is None:
      raise TorchFileError(f"storage {key} is listed but never used")
    if numel != storage.numel:
      raise TorchFileError(f"storage {key}: {numel} elements in the data, {storage.numel} "
                           f"in the pickle")
    raw = stream.read(numel * storage.dtype.itemsize)
    storage.array = _storage_array(raw, storage, big_endian=False)
  return obj


def load(path: str, *, inert: Iterable[str] = ()) -> Any:
  """Loads a `torch.save` file (zip or legacy) with tensors as numpy arrays; runs no code.

  Args:
    path: the `.pth` / `.pt` / `.bin` file.
    inert: fully qualified class names (e.g. "argparse.Namespace") to accept as inert
      `Inert` records instead of refusing them; they are never called.

  Returns:
    The pickled object with every tensor replaced by a numpy array (`ml_dtypes.bfloat16`
    for bfloat16), e.g. an `OrderedDict` state dict.

  Raises:
    UnsafePickleError: the pickle names a global outside the whitelist (nothing ran).
    TorchFileError: truncated, corrupt or not a torch file.
    FileNotFoundError: no such file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  with open(path, "rb") as f:
    head = f.read(4)
  if head.startswith(b"PK"):
    obj = _load_zip(path, inert)
  elif head[:1] == b"\x80":  # a pickle PROTO opcode: the legacy format
    obj = _load_legacy(path, inert)
  else:
    raise TorchFileError("neither a torch zip archive nor a legacy torch pickle")
  try:
    return _materialize(obj)
  except TorchFileError:
    raise
  except Exception as e:  # noqa: BLE001
    raise TorchFileError(f"corrupt tensor description ({_msg(e)})") from None
