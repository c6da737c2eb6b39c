"""The torch-free `torch.save` reader: real zip and legacy formats, dtypes, shared storages,
offsets and strides, and refusal of every pickle that would run code."""

import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

import _torch_writer as tw
from kswap_jax.interop import torch_pickle


def _checkpoint():
  base = np.arange(30, dtype=np.float32)
  shared = tw.Storage(base)
  sd = collections.OrderedDict()
  sd["rows"] = tw.Tensor(shared, 0, (2, 3), (3, 1))
  sd["transposed"] = tw.Tensor(shared, 6, (3, 2), (1, 3))      # same storage, offset 6
  sd["strided"] = tw.Tensor(shared, 1, (2, 2, 2), (12, 5, 2))   # non-contiguous
  sd["scalar"] = tw.Tensor(shared, 29, (), ())
  sd["empty"] = tw.Tensor(shared, 0, (0, 4), (4, 1))
  sd["half"] = tw.tensor(np.array([[0.5, -1.25]], np.float16))
  sd["bf16"] = tw.tensor(np.array([1.5, -2.0, 3.0e8], ml_dtypes.bfloat16))
  sd["steps"] = tw.tensor(np.array([2 ** 40, -3], np.int64))
  sd["mask"] = tw.tensor(np.array([True, False, True]))
  sd["weight"] = tw.tensor(np.ones((2, 2), np.float32), parameter=True)
  sd._metadata = collections.OrderedDict([("", {"version": 1})])
  return base, {"state_dict": sd, "epoch": 12, "lr": 0.5, "tags": ["a", "b"], "none": None}


@pytest.mark.parametrize("save", [tw.save_zip, tw.save_legacy], ids=["zip", "legacy"])
def test_reads_dtypes_views_and_plain_values(tmp_path, save):
  base, obj = _checkpoint()
  path = str(tmp_path / "m.pth")
  save(obj, path)
  out = torch_pickle.load(path)
  assert (out["epoch"], out["lr"], out["tags"], out["none"]) == (12, 0.5, ["a", "b"], None)
  sd = out["state_dict"]
  assert isinstance(sd, collections.OrderedDict) and list(sd) == list(obj["state_dict"])
  np.testing.assert_array_equal(sd["rows"], base[:6].reshape(2, 3))
  np.testing.assert_array_equal(sd["transposed"], base[6:12].reshape(2, 3).T)
  want = np.lib.stride_tricks.as_strided(base[1:], (2, 2, 2), (48, 20, 8))
  np.testing.assert_array_equal(sd["strided"], want)
  assert sd["scalar"].shape == () and sd["scalar"] == 29.0
  assert sd["empty"].shape == (0, 4)
  assert sd["half"].dtype == np.float16 and sd["half"].tolist() == [[0.5, -1.25]]
  assert sd["bf16"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(sd["bf16"].astype(np.float32),
                                np.array([1.5, -2.0, 3.0e8], ml_dtypes.bfloat16).astype(np.float32))
  assert sd["steps"].dtype == np.int64 and sd["steps"].tolist() == [2 ** 40, -3]
  assert sd["mask"].dtype == np.bool_ and sd["mask"].tolist() == [True, False, True]
  np.testing.assert_array_equal(sd["weight"], np.ones((2, 2)))
  sd["rows"][0, 0] = -1  # every tensor owns its data: views were copied
  assert sd["transposed"][0, 0] == 6


class _Hostile:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["zip", "legacy", "inside_state_dict"])
def test_a_pickle_that_would_run_a_command_is_refused(tmp_path, container):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "evil.pth")
  if container == "zip":
    tw.save_zip(None, path, data_pkl=pickle.dumps(_Hostile(marker), protocol=2))
  elif container == "legacy":
    with open(path, "wb") as f:  # the very first pickle of a legacy file
      f.write(pickle.dumps(_Hostile(marker), protocol=4))
  else:
    sd = tw.state_dict({"w": np.ones(2, np.float32)})
    sd["evil"] = tw.Call(tw.Global("posix", "system"), (f"touch {marker}",))
    tw.save_zip(sd, path)
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"refusing to load global (posix|os)\.system"):
    torch_pickle.load(path)
  assert not marker.exists()
  # Listing a global as "inert" never makes a command run either: it is recorded, not called.
  if container == "inside_state_dict":
    out = torch_pickle.load(path, inert=["posix.system"])
    assert isinstance(out["evil"], torch_pickle.Inert)
    assert out["evil"].args == (f"touch {marker}",)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("subprocess", "Popen"),
                                         ("numpy.core.multiarray", "_reconstruct"),
                                         ("torch", "load"), ("argparse", "Namespace")])
def test_only_whitelisted_globals_resolve(tmp_path, module, name):
  path = str(tmp_path / "m.pth")
  tw.save_zip({"x": tw.Call(tw.Global(module, name), ("1",))}, path)
  with pytest.raises(torch_pickle.UnsafePickleError, match=f"{module}.{name}"):
    torch_pickle.load(path)


def test_truncated_and_corrupt_files_give_one_line_errors(tmp_path):
  _, obj = _checkpoint()
  good = tmp_path / "m.pth"
  tw.save_zip(obj, good)
  data = good.read_bytes()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(torch_pickle.TorchFileError, match="zip"):
    torch_pickle.load(str(cut))
  legacy = tmp_path / "legacy.pth"
  tw.save_legacy(obj, legacy)
  raw = legacy.read_bytes()
  for n in (len(raw) - 5, len(raw) // 2, 3):
    (tmp_path / "l.pth").write_bytes(raw[:n])
    with pytest.raises(torch_pickle.TorchFileError) as e:
      torch_pickle.load(str(tmp_path / "l.pth"))
    assert "\n" not in str(e.value)
  (tmp_path / "junk.pth").write_bytes(b"hello world")
  with pytest.raises(torch_pickle.TorchFileError, match="neither"):
    torch_pickle.load(str(tmp_path / "junk.pth"))


def test_missing_storage_bytes_and_out_of_bounds_views_are_refused(tmp_path):
  path = tmp_path / "m.pth"
  tw.save_zip({"w": tw.tensor(np.ones(4, np.float32))}, path)
  with zipfile.ZipFile(path) as z:  # drop the storage record
    items = {n: z.read(n) for n in z.namelist() if "/data/" not in n}
  with zipfile.ZipFile(tmp_path / "nodata.pth", "w") as z:
    for n, b in items.items():
      z.writestr(n, b)
  with pytest.raises(torch_pickle.TorchFileError, match="missing"):
    torch_pickle.load(str(tmp_path / "nodata.pth"))
  # A view reaching past its storage would read foreign memory with as_strided.
  s = tw.Storage(np.ones(4, np.float32))
  tw.save_zip({"w": tw.Tensor(s, 2, (3,), (1,))}, tmp_path / "oob.pth")
  with pytest.raises(torch_pickle.TorchFileError, match="reads past"):
    torch_pickle.load(str(tmp_path / "oob.pth"))
  # A storage whose bytes are shorter than numel says so.
  s = tw.Storage(np.ones(4, np.float32))
  tw.save_zip({"w": tw.Tensor(s, 0, (4,), (1,))}, tmp_path / "short.pth")
  with zipfile.ZipFile(tmp_path / "short.pth") as z:
    items = {n: z.read(n) for n in z.namelist()}
  key = next(n for n in items if "/data/" in n)
  items[key] = items[key][:8]
  with zipfile.ZipFile(tmp_path / "short2.pth", "w") as z:
    for n, b in items.items():
      z.writestr(n, b)
  with pytest.raises(torch_pickle.TorchFileError, match="truncated"):
    torch_pickle.load(str(tmp_path / "short2.pth"))


def test_matches_torch_load_when_torch_is_installed(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.arange(24, dtype=torch.float32)
  sd = collections.OrderedDict(
      a=base[:6].view(2, 3), t=base[6:12].view(2, 3).t(), s=base.view(2, 3, 4)[:, ::2, 1:3],
      h=torch.randn(3, 2).half(), b=torch.randn(5).bfloat16(), i=torch.arange(3),
      m=torch.tensor([True, False]), p=torch.nn.Parameter(torch.ones(2)))
  for zip_format in (True, False):
    path = str(tmp_path / f"t{zip_format}.pth")
    torch.save({"sd": sd, "epoch": 1}, path, _use_new_zipfile_serialization=zip_format)
    ours = torch_pickle.load(path)
    assert ours["epoch"] == 1
    for k, v in sd.items():
      want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
      got = ours["sd"][k].astype(np.float32) if v.dtype == torch.bfloat16 else ours["sd"][k]
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("save", [tw.save_zip, tw.save_legacy], ids=["zip", "legacy"])
def test_random_corruption_only_ever_raises_our_errors(tmp_path, save):
  _, obj = _checkpoint()
  path = tmp_path / "m.pth"
  save(obj, path)
  raw = bytearray(path.read_bytes())
  rng = np.random.default_rng(0)
  bad = tmp_path / "bad.pth"
  for _ in range(150):
    data = bytearray(raw)
    for i in rng.integers(0, len(data), size=3):
      data[i] = int(rng.integers(0, 256))
    bad.write_bytes(bytes(data))
    try:
      torch_pickle.load(str(bad))
    except (torch_pickle.TorchFileError, torch_pickle.UnsafePickleError) as e:
      assert "\n" not in str(e)


def test_expanded_views_are_read_but_memory_bombs_refused(tmp_path):
  s = tw.Storage(np.arange(3, dtype=np.float32))
  tw.save_zip({"w": tw.Tensor(s, 0, (4, 3), (0, 1))}, tmp_path / "expand.pth")  # x.expand(4, 3)
  np.testing.assert_array_equal(torch_pickle.load(str(tmp_path / "expand.pth"))["w"],
                                np.tile(np.arange(3), (4, 1)))
  tw.save_zip({"w": tw.Tensor(s, 0, (2 ** 20, 2 ** 20), (0, 0))}, tmp_path / "bomb.pth")
  with pytest.raises(torch_pickle.TorchFileError, match="refusing to expand"):
    torch_pickle.load(str(tmp_path / "bomb.pth"))
