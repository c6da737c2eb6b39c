"""A small `.safetensors` reader and writer on numpy (no dependency on the `safetensors` package).

The format: an unsigned little-endian 64-bit header length N, N bytes of JSON

    {"<name>": {"dtype": "F32", "shape": [768, 3], "data_offsets": [begin, end]}, ...,
     "__metadata__": {"<key>": "<string>"}}

then the tensors' raw little-endian bytes, C-contiguous, at [begin, end) of the data that
follows the header. Nothing in the file is executed; the reader checks every offset against
the file size and each byte count against its shape and dtype before viewing the data.

Example:
  >>> tensors, metadata = safetensors_file.load("model.safetensors")
  >>> safetensors_file.save({"head.weight": w}, "out.safetensors", metadata={"format": "pt"})
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 2 ** 20


class SafetensorsError(ValueError):
  """A malformed or truncated `.safetensors` file."""


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads every tensor of a `.safetensors` file.

  Returns:
    ({name: array}, metadata) with arrays in native byte order (`ml_dtypes.bfloat16` for BF16).

  Raises:
    SafetensorsError: truncated file, bad header, unknown dtype or offsets out of range.
  """
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise SafetensorsError("file shorter than the 8-byte header length (truncated)")
  (n,) = struct.unpack("<Q", data[:8])
  if n > MAX_HEADER or 8 + n > len(data):
    raise SafetensorsError(f"header of {n} bytes does not fit a {len(data)}-byte file (truncated)")
  try:
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(f"header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise SafetensorsError("header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  buffer = memoryview(data)[8 + n:]
  out = {}
  for name, info in header.items():
    try:
      dtype = DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise SafetensorsError(f"{name}: bad header entry {str(info)[:80]} ({e!r})") from None
    want = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= len(buffer) or end - begin != want:
      raise SafetensorsError(
          f"{name}: bytes [{begin}, {end}) do not hold shape {shape} of {info['dtype']} within "
          f"{len(buffer)} data bytes (truncated or corrupt)")
    out[name] = np.frombuffer(buffer[begin:end], dtype).reshape(shape).astype(
        dtype.newbyteorder("="))
  return out, {str(k): str(v) for k, v in metadata.items()}


def save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
  """Writes `{name: array}` as `.safetensors`, atomically (tmp file + rename)."""
  header: dict = {}
  chunks, offset = [], 0
  for name in sorted(tensors):
    x = np.asarray(tensors[name])  # tobytes() below is C-ordered; keeps 0-d shapes
    key = _NAMES.get(x.dtype.newbyteorder("<") if x.dtype.itemsize > 1 else x.dtype)
    if key is None:
      raise ValueError(f"tensors[{name!r}]: dtype {x.dtype} has no safetensors name")
    raw = x.astype(DTYPES[key]).tobytes()
    header[name] = {"dtype": key, "shape": list(x.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for raw in chunks:
      f.write(raw)
  os.replace(tmp, path)
