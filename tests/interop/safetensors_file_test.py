"""The small `.safetensors` reader/writer: dtypes, byte order, and malformed files."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from kswap_jax.interop import safetensors_file


def test_round_trip_of_dtypes_and_metadata(tmp_path):
  tensors = {"bf16": np.array([1.5, -2.0], ml_dtypes.bfloat16), "f16": np.ones((2, 3), np.float16),
             "mask": np.array([True, False]), "step": np.arange(3, dtype=np.int64),
             "big_endian": np.arange(4, dtype=">f4").reshape(2, 2), "scalar": np.float32(3.0)}
  path = str(tmp_path / "t.safetensors")
  safetensors_file.save(tensors, path, metadata={"format": "pt"})
  raw = open(path, "rb").read()
  (n,) = struct.unpack("<Q", raw[:8])
  assert n % 8 == 0  # data starts 8-byte aligned
  assert json.loads(raw[8:8 + n])["big_endian"]["dtype"] == "F32"
  out, meta = safetensors_file.load(path)
  assert meta == {"format": "pt"}
  for k, v in tensors.items():
    assert out[k].shape == np.shape(v)
    np.testing.assert_array_equal(out[k].astype(np.float64), np.asarray(v).astype(np.float64))
  assert out["bf16"].dtype == ml_dtypes.bfloat16 and out["big_endian"].dtype == np.float32


def _write(path, header: dict, data: bytes, n=None):
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob) if n is None else n) + blob + data)


@pytest.mark.parametrize("header,data,n,match", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "bytes"),
    ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad header"),
    ({"w": {"shape": [1]}}, b"", None, "bad header"),
    ({}, b"", 10 ** 9, "does not fit"),
])
def test_malformed_files_raise_one_line_errors(tmp_path, header, data, n, match):
  path = str(tmp_path / "bad.safetensors")
  _write(path, header, data, n)
  with pytest.raises(safetensors_file.SafetensorsError, match=match) as e:
    safetensors_file.load(path)
  assert "\n" not in str(e.value)
  (tmp_path / "tiny.safetensors").write_bytes(b"\1\0")
  with pytest.raises(safetensors_file.SafetensorsError, match="shorter"):
    safetensors_file.load(str(tmp_path / "tiny.safetensors"))
