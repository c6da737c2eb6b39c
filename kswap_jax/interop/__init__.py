"""Interop: read other code bases' checkpoints (without torch), convert, and export back.

    read(path)                 -> {key: ndarray} from .pth/.pt/.bin (torch zip or legacy
                                  pickle, read by a restricted unpickler), .safetensors, .npz
    convert(path, layout, ...) -> Converted(params, lora, model, ...) in our layout
    save(converted, out)       -> OUT.npz (base) and OUT.lora.npz (LoRA, when kept)
    load_lora(path)            -> the LoRA tree of an OUT.lora.npz
    export(params, out, to=...)  our (merged) parameters -> vit_jax .npz or timm .safetensors

Loading never executes code from the file: see `kswap_jax.interop.torch_pickle`.

Example:
  >>> conv = interop.convert("vit_small.pth", "timm", num_heads=6)
  >>> interop.save(conv, "vit_small.npz")     # then init.checkpoint = "vit_small.npz"
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import struct
import zipfile
from typing import Any, Iterable

import ml_collections
import numpy as np

from kswap_jax.interop import layouts, safetensors_file, torch_pickle
from kswap_jax.interop.layouts import LAYOUTS, LORA_MODES, Converted

__all__ = ["read", "convert", "save", "load_lora", "export", "lora_path", "LAYOUTS",
           "LORA_MODES", "Converted"]


def _kind(path: str) -> str:
  with open(path, "rb") as f:
    head = f.read(9)
  if head.startswith(b"PK"):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
      return "torch" if path.endswith((".pth", ".pt", ".bin", ".ckpt")) else "npz"
    return "torch" if any(n.endswith("data.pkl") for n in names) else "npz"
  if head[:1] == b"\x80":
    return "torch"
  if len(head) >= 9 and head[8:9] == b"{":
    return "safetensors"
  raise ValueError(f"{path}: not a .npz, .safetensors or torch.save file "
                   f"(unrecognised first bytes {head[:8]!r})")


def _flatten(obj: Any, prefix: str, out: dict[str, Any], sep: str = ".") -> None:
  if isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), out, sep)
  elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, np.ndarray)) for v in obj):
    for i, v in enumerate(obj):
      _flatten(v, f"{prefix}{sep}{i}" if prefix else str(i), out, sep)
  else:
    out[prefix] = obj


def read(path: str, *, inert: Iterable[str] = ()) -> dict[str, Any]:
  """All entries of a checkpoint file as a flat {key: value} dict, without running code.

  `.npz` keys are kept as they are ("/"-joined in vit_jax and big_vision files). Torch
  files are unpickled by `torch_pickle.load` and nested containers are flattened with "."
  (a `{"model": state_dict, "epoch": 3}` checkpoint gives "model.<key>" and "epoch").

  Args:
    path: a `.npz`, `.safetensors` or `torch.save` file (the format is read from its bytes).
    inert: class names a torch pickle may contain as inert records (see `torch_pickle.load`).

  Returns:
    {key: numpy array, or a non-tensor value (ints, strings, `Inert` records)}.

  Raises:
    FileNotFoundError, ValueError (unreadable, truncated or unsafe files; the message is one
    line and names the file).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  kind = _kind(path)
  try:
    if kind == "npz":
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    if kind == "safetensors":
      return safetensors_file.load(path)[0]
    out: dict[str, Any] = {}
    _flatten(torch_pickle.load(path, inert=inert), "", out)
    return out
  except (torch_pickle.UnsafePickleError, torch_pickle.TorchFileError,
          safetensors_file.SafetensorsError) as e:
    raise type(e)(f"{path}: {e}") from None
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, struct.error) as e:
    why = " ".join(str(e).split())[:160] or type(e).__name__
    raise ValueError(f"{path}: cannot read as {kind} ({why})") from None


def _select(tensors: dict[str, Any], layout: str, prefix: str | None
            ) -> tuple[dict[str, Any], dict[str, str], list[str], str]:
  """Keeps the keys under `prefix` (found from the layout's anchor key when None)."""
  notes = []
  if prefix is None:
    anchor = layouts.ANCHORS[layout]
    found = sorted({k[:-len(anchor)] for k in tensors if k.endswith(anchor)
                    and (len(k) == len(anchor) or k[-len(anchor) - 1] in "./")})
    if len(found) > 1:
      raise ValueError(f"prefix: the checkpoint holds several {layout} state dicts "
                       f"({', '.join(repr(p) for p in found)}); pick one with --prefix")
    prefix = found[0] if found else ""
    if prefix:
      notes.append(f"state dict found under prefix {prefix!r}")
  kept, ignored = {}, {}
  for k, v in tensors.items():
    if not k.startswith(prefix):
      ignored[k] = f"outside the prefix {prefix!r}"
    elif not isinstance(v, np.ndarray):
      ignored[k] = f"not a tensor ({type(v).__name__})"
    else:
      kept[k[len(prefix):]] = v
  return kept, ignored, notes, prefix


def _guess(tensors: dict[str, Any], layout: str) -> str:
  """' (its keys look like the X layout)' when another layout's anchor key is present."""
  others = [name for name, anchor in layouts.ANCHORS.items()
            if name != layout and any(k.endswith(anchor) for k in tensors)]
  if not others or set(others) == {"vit_jax", "big_vision"} and layout in others:
    return ""
  return f" (its keys look like the {' or '.join(others)} layout)"


def convert(path: str, layout: str, *, prefix: str | None = None, inert: Iterable[str] = (),
            **options) -> Converted:
  """Reads `path` and converts it from `layout` to our parameter tree.

  Args:
    path: the checkpoint file.
    layout: one of `LAYOUTS` (vit_jax, big_vision, timm, torchvision, ks_vit, gslora_face).
    prefix: the key prefix of the state dict inside the file ("module.", "model.", ...);
      found from the layout's patch-embedding key when None.
    inert: see `read`.
    **options: the layout's own arguments (see `layouts`): num_heads, and per layout lora
      (one of `LORA_MODES`), lora_alpha, pool, posemb, image_size, num_classes, face_head,
      channels. None means "not given"; an option the layout does not take is an error.

  Returns:
    A `Converted`; `ignored` also lists the keys outside the prefix and non-tensor entries.

  Example:
    >>> conv = convert("gslora_task1.pth", "gslora_face", num_heads=8)   # lora="merged"
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout: unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
  everything = read(path, inert=inert)
  tensors, ignored, notes, prefix = _select(everything, layout, prefix)
  if not tensors:
    raise ValueError(f"{path}: no tensors under prefix {prefix!r}")
  options = {k: v for k, v in options.items() if v is not None}
  accepted = inspect.signature(LAYOUTS[layout]).parameters
  for name in options:
    if name not in accepted:
      takes = ", ".join(n for n in accepted if n != "tensors")
      raise ValueError(f"{name}: the {layout} layout takes no {name} option (it takes: {takes})")
  try:
    conv = LAYOUTS[layout](tensors, **options)
  except ValueError as e:
    hint = _guess(everything, layout) if "not a" in str(e) else ""
    raise ValueError(f"{path}: {e}{hint}") from None
  if layout == "vit_jax":
    conv = _from_run_record(path, conv)
  # Report the file's own key names (with the prefix) for everything used or ignored.
  return conv._replace(
      used=[prefix + k for k in conv.used],
      ignored={**ignored, **{prefix + k: why for k, why in conv.ignored.items()}},
      notes=notes + conv.notes)


# `model` fields a vit_jax-layout .npz cannot record: its reader reports vit_jax's own
# conventions for them (tanh GELU, eps 1e-6, 1/sqrt(head dim)).
UNRECORDED = ("gelu", "layer_norm_eps", "attention_scale")


def _from_run_record(path: str, conv: Converted) -> Converted:
  """This repo's own export (a run's `merged_params.npz`, a pretraining run's `params.npz`):
  the fields the file cannot record are taken from the `config.json` beside it when that
  run's ViT has the file's sizes (its head: model.num_classes or pretrain.num_classes);
  otherwise a note says they are vit_jax's conventions, not read from the file."""
  record = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  try:
    with open(record) as f:
      recorded = json.load(f)
    model = recorded["model"]
    # A pretraining run's params.npz has the pretraining head (pretrain.num_classes, when
    # set), not model.num_classes.
    heads = {model["num_classes"], (recorded.get("pretrain") or {}).get("num_classes")}
    same = model["name"] == conv.model["name"] and any(
        _sizes({**model, "num_classes": n}) == _sizes(conv.model) for n in heads if n)
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    same = False  # no record, or not one of ours
  if not same:
    guessed = ", ".join(f"{k}={conv.model[k]}" for k in UNRECORDED)
    return conv._replace(notes=conv.notes + [
        f"{guessed}: vit_jax's conventions, not stored in the file (for a run of this repo, "
        f"use the model fields of its config.json)"])
  taken = {k: model[k] for k in UNRECORDED if k in model}
  return conv._replace(model={**conv.model, **taken}, notes=conv.notes + [
      f"{', '.join(f'{k}={v}' for k, v in taken.items())}: from the run's {record}"])


def _sizes(model: dict) -> tuple:
  c = layouts.vit_lib.vit_config(ml_collections.ConfigDict(model))
  return (c.width, c.depth, c.mlp_dim, c.num_heads, c.patch_size, c.num_classes)


def lora_path(out: str) -> str:
  """Where `save` puts the LoRA tree of OUT.npz: OUT.lora.npz."""
  return (out[:-4] if out.endswith(".npz") else out) + ".lora.npz"


def save(conv: Converted, out: str) -> list[str]:
  """Writes the base (and the LoRA tree, when kept) as `.npz`, all or nothing.

  Returns:
    The paths written: [OUT.npz] or [OUT.npz, OUT.lora.npz].
  """
  items = [(out, conv.params)] + ([(lora_path(out), conv.lora)] if conv.lora else [])
  tmps = []
  try:
    for path, flat in items:
      tmp = path + ".tmp.npz"
      np.savez(tmp, **flat)
      tmps.append((tmp, path))
  except BaseException:
    for tmp, _ in tmps:
      os.remove(tmp)
    raise
  for tmp, path in tmps:
    os.replace(tmp, path)
  return [path for _, path in tmps]


def load_lora_flat(path: str) -> dict[str, np.ndarray]:
  """{"<module>/a" | "<module>/b": array} of an OUT.lora.npz written by `save`, or of a
  run's `lora_<stage>.npz` (its leaves named `<module>/lora_a`, `<module>/lora_b`)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      flat = {re.sub(r"/lora_([ab])$", r"/\1", k): f[k] for k in f.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:  # numpy's names neither file nor why
    raise ValueError(f"{path}: not a LoRA .npz of plain arrays ({e})") from None
  bad = [k for k in flat if not k.endswith(("/a", "/b"))]
  if bad or not flat:
    raise ValueError(f"{path}: {bad[0]!r} is not a LoRA leaf (names end in /a or /b, or "
                     f"/lora_a or /lora_b)" if bad else f"{path}: holds no arrays")
  return flat


def load_lora(path: str) -> dict:
  """The LoRA tree ({module path: {"a", "b"}}) of `load_lora_flat(path)`."""
  from kswap_jax import checkpoint  # local import: checkpoint pulls in orbax
  return checkpoint.unflatten(load_lora_flat(path))


def merged(conv: Converted) -> dict[str, np.ndarray]:
  """The converted base with its LoRA tree (if any) folded in: W + (alpha / r)·a·b."""
  params = dict(conv.params)
  for name in [k[:-2] for k in conv.lora if k.endswith("/a")]:
    a, b = conv.lora[name + "/a"], conv.lora[name + "/b"]
    kernel = params[name + "/kernel"]
    params[name + "/kernel"] = kernel + ((conv.lora_alpha / a.shape[1]) * (a @ b)).reshape(
        kernel.shape).astype(kernel.dtype)
  return params


EXPORTS = ("vit_jax", "timm")


def export(params: dict[str, np.ndarray], out: str, *, to: str = "vit_jax",
           model: dict[str, Any] | None = None) -> None:
  """Writes our flat (merged) parameters as a vit_jax `.npz` or a timm `.safetensors`.

  Args:
    params: {our "/"-joined name: array}, LoRA already merged (see `merged`,
      `kswap_jax.lora.merge`, `kswap_jax.checkpoint.flatten`).
    out: the file to write (atomically).
    to: "vit_jax" or "timm".
    model: `model` fields, checked against what timm's ViT can express.
  """
  if to == "vit_jax":
    tmp = out + ".tmp.npz"
    np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in params.items()})
    os.replace(tmp, out)
  elif to == "timm":
    safetensors_file.save(layouts.to_timm(params, model), out, metadata={"format": "pt"})
  else:
    raise ValueError(f"to: unknown export format {to!r} (expected one of {', '.join(EXPORTS)})")


def count(flat: dict[str, np.ndarray]) -> int:
  return int(sum(math.prod(np.shape(x)) for x in flat.values()))
