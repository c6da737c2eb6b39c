"""Convert a checkpoint from another code base to ours (or export ours back), without torch.

    python -m kswap_jax.convert SRC --out OUT.npz [--num_heads N] [--lora MODE] [...] \\
        --layout {vit_jax,big_vision,timm,ks_vit,gslora_face,torchvision}

writes OUT.npz in our (vit_jax-named) layout, and OUT.lora.npz when the source holds a
LoRA that is kept, then prints a summary: parameter counts, the LoRA found and what was
done with it, the `model` config fields that describe the source, and every source key
that was not used. `init.checkpoint = "OUT.npz"` then loads it.

    python -m kswap_jax.convert OUT.npz --layout vit_jax --to timm --out model.safetensors

exports (LoRA merged) to a timm-layout `.safetensors` (`--to vit_jax` writes a merged `.npz`).
Our own runs' base + LoRA export with `--lora_file OUT.lora.npz --lora_alpha A`.

Loading never runs code from the file: torch pickles are read by a restricted unpickler
that refuses every global but tensors, storages and plain containers. Bad input (missing or
truncated file, unsafe pickle, wrong layout, shape mismatch, a missing --num_heads) prints
one line `error: ...` and exits with status 2, leaving no partial output.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from kswap_jax import errors, interop
from kswap_jax.interop import layouts
from kswap_jax.models import vit

MAX_LISTED = 20


def parser() -> argparse.ArgumentParser:
  p = errors.ArgumentParser(prog="python -m kswap_jax.convert", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help="checkpoint: .pth/.pt/.bin (torch.save), .safetensors or .npz")
  p.add_argument("--layout", required=True, choices=sorted(interop.LAYOUTS))
  p.add_argument("--out", required=True, help="output .npz (or .safetensors with --to timm)")
  p.add_argument("--to", default="ours", choices=("ours", "vit_jax", "timm"),
                 help="ours: base + LoRA tree as converted (default); vit_jax / timm: "
                      "LoRA merged into the weights")
  p.add_argument("--num_heads", type=int,
                 help="attention heads (timm, ks_vit, gslora_face, torchvision)")
  p.add_argument("--lora", choices=interop.LORA_MODES,
                 help="whether the stored weights include the LoRA update: separate (no: "
                      "keep A/B), merged (yes: drop A/B; gslora_face default), unmerge (yes: "
                      "subtract, keep A/B), merge (no: fold A/B in)")
  p.add_argument("--lora_alpha", type=float, help="loralib alpha (default 1, as in loralib)")
  p.add_argument("--lora_file", help="our OUT.lora.npz to merge (with --layout vit_jax)")
  p.add_argument("--pool", choices=("tok", "gap"), help="big_vision pooling (inferred if cls)")
  p.add_argument("--posemb", choices=("learn", "sincos2d"),
                 help="big_vision position embedding (default learn)")
  p.add_argument("--image_size", type=int, help="input size (big_vision --posemb sincos2d)")
  p.add_argument("--num_classes", type=int, help="zero head size for a big_vision or timm file without a head")
  p.add_argument("--face_head", choices=layouts.FACE_HEADS,
                 help="gslora_face head type of loss.weight (default cosface)")
  p.add_argument("--channels", type=int, help="image channels (gslora_face; default 3)")
  p.add_argument("--prefix", help="key prefix of the state dict in the file (e.g. 'module.'); "
                                  "found automatically when unique")
  p.add_argument("--head_rows", metavar="ROWS",
                 help="keep only these rows of the classifier head, in this order: "
                      "'3,17,42' or @FILE (ints separated by commas or whitespace), e.g. "
                      "ImageNet-1k indices of a 100-class subset (GS-LoRA's modify_head)")
  p.add_argument("--inert", action="append", default=[], metavar="MODULE.NAME",
                 help="a class a torch pickle may hold as an inert record, never called "
                      "(e.g. argparse.Namespace); repeatable")
  return p


def _summary(conv: interop.Converted, args, written: list[str]) -> str:
  lines = [f"converted {args.src} ({args.layout}) -> {', '.join(written)}"]
  lines.append(f"  base: {len(conv.params)} arrays, {interop.count(conv.params):,} parameters")
  if conv.lora:
    rank = next(v.shape[1] for k, v in conv.lora.items() if k.endswith("/a"))
    lines.append(f"  LoRA: {len(conv.lora) // 2} modules, rank {rank}, "
                 f"{interop.count(conv.lora):,} parameters (scale = alpha/r with alpha "
                 f"{conv.lora_alpha:g})")
  else:
    lines.append("  LoRA: none kept")
  for note in conv.notes:
    lines.append(f"  note: {note}")
  fields = " ".join(f"{k}={v}" for k, v in conv.model.items())
  lines.append(f"  model: {fields}")
  if args.to == "ours" and conv.model:
    # Ready to paste; a size given by the variant (0: "from the variant") is left out, and
    # the head rows are the run's choice (Knowledge Swapping extends the head).
    flags = [f"--config.model.{k}={v}" for k, v in conv.model.items()
             if k != "num_classes"
             and not (k in vit.VARIANT_FIELDS and v == 0)]
    rows = conv.model.get("num_classes")
    lines.append(f"  start a run from it: --config.init.kind=npz "
                 f"--config.init.checkpoint={written[0]} {' '.join(flags)}"
                 + (f" (and model.num_classes: the run's head rows, at least the "
                    f"checkpoint's {rows})" if rows else ""))
  lines.append(f"  used {len(conv.used)} source key(s); ignored {len(conv.ignored)}"
               + (":" if conv.ignored else ""))
  for k, why in list(conv.ignored.items())[:MAX_LISTED]:
    lines.append(f"    {k}: {why}")
  if len(conv.ignored) > MAX_LISTED:
    lines.append(f"    ... and {len(conv.ignored) - MAX_LISTED} more")
  return "\n".join(lines)


def _check_args(args) -> None:
  """--out names a file this command can write, with the extension of what --to writes;
  --num_heads, when given, is positive."""
  want = ".safetensors" if args.to == "timm" else ".npz"
  folder = os.path.dirname(os.path.abspath(args.out)) if args.out else ""
  if not args.out or os.path.isdir(args.out):
    raise ValueError(f"--out {args.out!r}: expected a file path ending in {want}")
  if not args.out.endswith(want):
    raise ValueError(f"--out {args.out}: --to {args.to} writes a {want} file; name it so")
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
    raise ValueError(f"--out {args.out}: its folder {folder} does not exist or is not writable")
  if args.num_heads is not None and args.num_heads < 1:
    raise ValueError(f"--num_heads: expected a positive int, got {args.num_heads}")


def _select_head_rows(conv: interop.Converted, spec: str) -> interop.Converted:
  """`conv` with its head cut to the rows named by `spec` ("3,17" or "@file"), in order."""
  text = spec
  if spec.startswith("@"):
    if not os.path.isfile(spec[1:]):
      raise ValueError(f"--head_rows {spec}: no such file")
    with open(spec[1:]) as f:
      text = f.read()
  try:
    rows = [int(t) for t in text.replace(",", " ").split()]
  except ValueError:
    raise ValueError(f"--head_rows {spec}: expected ints separated by commas or "
                     f"whitespace") from None
  if "head/kernel" not in conv.params:
    raise ValueError("--head_rows: the source has no classifier head (head/kernel)")
  kernel, bias = conv.params["head/kernel"], conv.params.get("head/bias")
  n = kernel.shape[-1]
  bad = [r for r in rows if not 0 <= r < n]
  if not rows or bad or len(set(rows)) != len(rows):
    raise ValueError(f"--head_rows: expected distinct rows in [0, {n}) of the {n}-row head, "
                     f"got {'none' if not rows else bad[:3] or 'a repeated row'}")
  params = dict(conv.params, **{"head/kernel": kernel[:, rows]})
  if bias is not None:
    params["head/bias"] = bias[rows]
  model = dict(conv.model, num_classes=len(rows))
  return conv._replace(params=params, model=model,
                       notes=conv.notes + [f"head cut to {len(rows)} of its {n} rows"])


def run(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  _check_args(args)
  options = dict(num_heads=args.num_heads, lora=args.lora, lora_alpha=args.lora_alpha,
                 pool=args.pool, posemb=args.posemb, image_size=args.image_size,
                 num_classes=args.num_classes, face_head=args.face_head, channels=args.channels)
  if args.lora_file:
    options.pop("lora_alpha")  # it scales the tree of --lora_file, not one in SRC
  conv = interop.convert(args.src, args.layout, prefix=args.prefix, inert=args.inert, **options)
  if args.lora_file:
    if conv.lora:
      raise ValueError("lora_file: the source already holds a LoRA tree")
    if not os.path.isfile(args.lora_file):
      raise ValueError(f"--lora_file {args.lora_file}: no such file")
    try:
      lora = {k: np.asarray(v, np.float32)
              for k, v in interop.load_lora_flat(args.lora_file).items()}
    except ValueError as e:
      raise ValueError(f"--lora_file {e}") from None
    missing = [k[:-2] for k in lora if k.endswith("/a") and k[:-2] + "/kernel" not in conv.params]
    if missing:
      raise ValueError(f"lora_file: {args.lora_file}: module {missing[0]} has no kernel in "
                       f"{args.src}")
    conv = conv._replace(lora=lora, lora_alpha=args.lora_alpha or 1.0,
                         notes=conv.notes + [f"LoRA from {args.lora_file}"])
  if args.head_rows:
    conv = _select_head_rows(conv, args.head_rows)
  if args.to == "ours":
    written = interop.save(conv, args.out)
  else:
    interop.export(interop.merged(conv), args.out, to=args.to, model=conv.model)
    written = [args.out]
  print(_summary(conv, args, written))
  return 0


def main(argv: list[str] | None = None) -> int:
  try:
    return run(argv)
  except (ValueError, OSError) as e:
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
