"""The benchmark's step written plainly in PyTorch, for `python -m kswap_jax.bench --compare_torch`.

The same computation as the JAX step of `kswap_jax.bench` (and as the authors' PyTorch
code: a ViT with loralib-style LoRA on fc1/fc2, exact GELU, `F.dropout`, AdamW on the LoRA
factors only), initialised from the very same base parameters, LoRA factors and batch:

    forget  L = CE(b_r) + β·ReLU(BND − CE(b_f)) + α·Ω
    learn   L = CE(b_n) + β·CE(b_r) + α·Ω
    ce      L = CE(b)

with Ω the per-block group lasso Σ_l sqrt(Σ_{leaves of block l} ||·||²). Dropout masks come
from torch's generator, so losses agree in distribution, not bitwise. Needs the optional
`[torch]` extra (`pip install 'kswap_jax[torch]'`); everything else in the package runs
without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from typing import Any

import numpy as np

from kswap_jax import hostmem


class TorchMissing(Exception):
  """PyTorch is not installed, or the requested step has no PyTorch version."""


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise TorchMissing(
        "--compare_torch: PyTorch is not installed; install the optional extra with "
        "`pip install 'kswap_jax[torch]'` (CPU wheels are enough) and rerun") from None
  return torch


def _np(x) -> np.ndarray:
  return np.array(x, dtype=np.float32)  # a host copy torch may own


STEP_KINDS = ("forget", "learn", "ce")


def _check_step(step: str) -> None:
  if step not in STEP_KINDS:
    raise TorchMissing(f"--compare_torch: no PyTorch version of --step={step}")


class TorchStep:
  """Builds the PyTorch model and optimizer; `time_step()` runs one step and returns seconds.

  Args:
    step: "forget", "learn" or "ce".
    gelu: the bench's `--gelu` ("tanh" gives torch's tanh GELU, anything else the exact one).
    cfg: the ViT's fields (`vit.ViTConfig` or any object with the same attributes).
    base: base parameters (vit_jax names, random head).
    tree: the LoRA tree (unscanned layout).
    scale: the LoRA scale alpha / rank.
    host_batch: {stream: {"image", "label", ...}} numpy arrays.
  """

  def __init__(self, step: str, gelu: str, cfg, base, tree, scale: float, host_batch):
    torch = _import_torch()
    _check_step(step)
    self.torch = torch
    self.version = torch.__version__
    self.threads = torch.get_num_threads()
    self.step_kind = step
    self.model = _build_model(torch, cfg, base, tree, scale,
                              approximate="tanh" if gelu == "tanh" else "none")
    self.lora_params = [p for n, p in self.model.named_parameters() if p.requires_grad]
    self.blocks = [[p for n, p in blk.named_parameters() if p.requires_grad]
                   for blk in self.model.blocks]
    self.opt = torch.optim.AdamW(self.lora_params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.05)
    self.batch = {name: (torch.from_numpy(np.ascontiguousarray(
                             b["image"].transpose(0, 3, 1, 2))),
                         torch.from_numpy(b["label"].astype(np.int64)))
                  for name, b in host_batch.items()}
    self.last_loss = float("nan")
    self.cpu_s: list[float] = []

  @classmethod
  def from_setup(cls, args, setup: dict[str, Any]) -> "TorchStep":
    """The bench's model, weights and batch (`kswap_jax.bench.setup(args)`), in this process."""
    from kswap_jax.models import vit  # pylint: disable=import-outside-toplevel
    return cls(args.step, args.gelu, vit.vit_config(setup["model_cfg"]), setup["base"],
               setup["lora_tree_unscanned"], setup["spec"].scale, setup["host_batch"])

  def _loss(self):
    torch = self.torch
    F = torch.nn.functional
    ce = lambda name: F.cross_entropy(self.model(self.batch[name][0]), self.batch[name][1])
    omega = sum(torch.sqrt(sum((p * p).sum() for p in ps)) for ps in self.blocks)
    if self.step_kind == "forget":
      ce_f = ce("forget")
      ce_r = ce("retain")
      return ce_r + 0.2 * F.relu(105.0 - ce_f) + 0.005 * omega
    if self.step_kind == "learn":
      ce_n = ce("learn")
      ce_r = ce("retain")
      return ce_n + 0.2 * ce_r + 0.005 * omega
    return ce("retain")

  def time_step(self) -> float:
    """Runs one step; returns its wall seconds and appends its CPU seconds to `cpu_s`."""
    c0 = hostmem.cpu_seconds()
    t0 = time.perf_counter()
    self.model.train()
    loss = self._loss()
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.last_loss = float(loss.detach())
    wall = time.perf_counter() - t0
    self.cpu_s.append(hostmem.cpu_seconds() - c0)
    return wall


# The child process imports neither jax nor flax (its memory is PyTorch's alone), so these
# two stand in for `lora.named_leaves` / `lora.set_by_name` on plain nested dicts.
def _flatten(prefix: str, tree, out: dict) -> dict:
  for k, v in tree.items():
    if isinstance(v, dict):
      _flatten(f"{prefix}/{k}", v, out)
    else:
      out[f"{prefix}/{k}"] = np.asarray(v)
  return out


def _unflatten(arrays) -> dict:
  tree: dict = {}
  for key in arrays.files:
    *path, leaf = key.split("/")
    node = tree
    for k in path:
      node = node.setdefault(k, {})
    node[leaf] = arrays[key]
  return tree


class TorchProcess:
  """The PyTorch step in a child process, run one step at a time on request.

  Each framework then has its own process: its own threads, allocator and peak memory,
  as when either runs alone, while alternating steps still expose both to the same
  machine state. The child gets the parent's environment (thread counts, glibc tunables)
  and the very same weights and batch, handed over as an `.npz` (no pickle).

  Args:
    args: the bench's parsed arguments (`step`, `gelu`).
    setup: the bench's `setup(args)` dict.
  """

  def __init__(self, args, setup: dict[str, Any]):
    if importlib.util.find_spec("torch") is None:
      _import_torch()  # raises TorchMissing with the install hint
    _check_step(args.step)
    from kswap_jax.models import vit  # pylint: disable=import-outside-toplevel
    self._dir = tempfile.mkdtemp(prefix="kswap_bench_torch_")
    arrays = _flatten("base", setup["base"], {})
    _flatten("lora", setup["lora_tree_unscanned"], arrays)
    _flatten("batch", setup["host_batch"], arrays)
    np.savez(os.path.join(self._dir, "arrays.npz"), **arrays)
    with open(os.path.join(self._dir, "spec.json"), "w") as f:
      json.dump({"step": args.step, "gelu": args.gelu, "scale": setup["spec"].scale,
                 "vit": dataclasses.asdict(vit.vit_config(setup["model_cfg"]))}, f)
    self._proc = subprocess.Popen([sys.executable, "-m", "kswap_jax.bench_torch", self._dir],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hello = self._read()
    self.version, self.threads = hello["version"], hello["threads"]
    self.cpu_s: list[float] = []
    self.last_loss = float("nan")

  def _read(self) -> dict:
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the PyTorch worker stopped (exit {self._proc.wait()}); its "
                         "error is above")
    return json.loads(line)

  def _ask(self, command: str) -> dict:
    self._proc.stdin.write(command + "\n")
    self._proc.stdin.flush()
    return self._read()

  def time_step(self) -> float:
    """Runs one step in the child; returns its wall seconds (CPU seconds to `cpu_s`)."""
    r = self._ask("step")
    self.cpu_s.append(r["cpu_s"])
    self.last_loss = r["loss"]
    return r["wall_s"]

  def reset_peak_rss(self) -> None:
    """Restarts the child's peak-memory count (call after its warm-up)."""
    self._ask("reset_peak")

  def close(self) -> dict:
    """Stops the child; returns {"peak_rss_bytes"}: its peak since `reset_peak_rss`."""
    try:
      return self._ask("exit")
    finally:
      self._proc.wait()
      for name in ("arrays.npz", "spec.json"):
        os.remove(os.path.join(self._dir, name))
      os.rmdir(self._dir)


def _worker(directory: str) -> None:
  """The child of `TorchProcess`: answers one JSON line per command read from stdin."""
  with open(os.path.join(directory, "spec.json")) as f:
    spec = json.load(f)
  with np.load(os.path.join(directory, "arrays.npz"), allow_pickle=False) as arrays:
    tree = _unflatten(arrays)
  step = TorchStep(spec["step"], spec["gelu"], types.SimpleNamespace(**spec["vit"]),
                   tree["base"], tree.get("lora", {}), spec["scale"], tree["batch"])
  del tree
  say = lambda **kw: print(json.dumps(kw), flush=True)
  say(version=step.version, threads=step.threads)
  for line in sys.stdin:
    command = line.strip()
    if command == "step":
      wall = step.time_step()
      say(wall_s=wall, cpu_s=step.cpu_s[-1], loss=step.last_loss)
    elif command == "reset_peak":
      say(reset=hostmem.reset_peak_rss())
    elif command == "exit":
      say(peak_rss_bytes=hostmem.peak_rss_bytes())
      return
    else:
      raise ValueError(f"bench_torch worker: unknown command {command!r}")


def _build_model(torch, cfg, base, tree, scale: float, approximate: str):
  nn, F = torch.nn, torch.nn.functional
  t = lambda x: torch.from_numpy(_np(x))
  width, heads = cfg.width, cfg.num_heads
  head_dim = width // heads

  def frozen(x):
    return nn.Parameter(t(x), requires_grad=False)

  class Linear(nn.Module):
    """y = x Wᵀ + b (+ s·(x A) B with LoRA, as loralib's `lora.Linear`)."""

    def __init__(self, p, lp=None, in_dim=None):
      super().__init__()
      k = np.asarray(p["kernel"])
      in_dim = in_dim or k.shape[0]
      self.weight = frozen(k.reshape(in_dim, -1).T)
      self.bias = frozen(np.asarray(p["bias"]).reshape(-1)) if "bias" in p else None
      self.lora = lp is not None
      if self.lora:
        self.lora_a = nn.Parameter(t(lp["a"]))
        self.lora_b = nn.Parameter(t(lp["b"]))

    def forward(self, x):
      y = F.linear(x, self.weight, self.bias)
      if self.lora:
        y = y + (x @ self.lora_a @ self.lora_b) * scale
      return y

  def layer_norm(p):
    ln = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
    ln.weight = frozen(p["scale"])
    ln.bias = frozen(p["bias"])
    return ln

  class Block(nn.Module):
    def __init__(self, p, lp):
      super().__init__()
      att = p["MultiHeadDotProductAttention_1"]
      self.ln0 = layer_norm(p["LayerNorm_0"])
      self.q, self.k, self.v = (Linear(att[n]) for n in ("query", "key", "value"))
      self.out = Linear(att["out"], in_dim=width)
      self.ln2 = layer_norm(p["LayerNorm_2"])
      mlp, lmlp = p["MlpBlock_3"], (lp or {}).get("MlpBlock_3", {})
      self.fc1 = Linear(mlp["Dense_0"], lmlp.get("Dense_0"))
      self.fc2 = Linear(mlp["Dense_1"], lmlp.get("Dense_1"))

    def forward(self, x):
      n, tokens, _ = x.shape
      y = self.ln0(x)
      split = lambda z: z.view(n, tokens, heads, head_dim).transpose(1, 2)
      q, k, v = split(self.q(y)), split(self.k(y)), split(self.v(y))
      w = torch.softmax(q @ k.transpose(-2, -1) * head_dim ** -0.5, dim=-1)
      y = (w @ v).transpose(1, 2).reshape(n, tokens, width)
      x = x + F.dropout(self.out(y), cfg.attention_output_dropout, self.training)
      y = F.gelu(self.fc1(self.ln2(x)), approximate=approximate)
      y = F.dropout(y, cfg.dropout, self.training)
      return x + F.dropout(self.fc2(y), cfg.dropout, self.training)

  class ViT(nn.Module):
    def __init__(self):
      super().__init__()
      emb = base["embedding"]
      self.embed = nn.Conv2d(np.asarray(emb["kernel"]).shape[2], width, cfg.patch_size, stride=cfg.patch_size)
      self.embed.weight = frozen(np.asarray(emb["kernel"]).transpose(3, 2, 0, 1))
      self.embed.bias = frozen(emb["bias"])
      self.cls = frozen(base["cls"])
      enc = base["Transformer"]
      self.pos = frozen(enc["posembed_input"]["pos_embedding"])
      ltree = tree.get("Transformer", {})
      self.blocks = nn.ModuleList(
          [Block(enc[f"encoderblock_{i}"], ltree.get(f"encoderblock_{i}"))
           for i in range(cfg.depth)])
      self.norm = layer_norm(enc["encoder_norm"])
      self.head = Linear(base["head"])

    def forward(self, images):
      x = self.embed(images).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
      x = F.dropout(x, cfg.dropout, self.training)
      for blk in self.blocks:
        x = blk(x)
      return self.head(self.norm(x)[:, 0])

  if cfg.representation_size or cfg.head != "linear":
    raise TorchMissing("--compare_torch: only the plain linear-head ViT has a PyTorch version")
  return ViT()


if __name__ == "__main__":
  _worker(sys.argv[1])
