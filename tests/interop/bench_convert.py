"""Conversion speed on a ViT-S/16-sized timm checkpoint (torch zip and safetensors); prints figures.

Run from the repository root: `PYTHONPATH=. python tests/interop/bench_convert.py`.
"""
import collections
import sys
import tempfile
import time
sys.path[:0] = [__import__("os").path.dirname(__file__)]
import numpy as np
import _torch_writer as tw
from kswap_jax import interop
from kswap_jax.interop import safetensors_file
TMP = tempfile.mkdtemp()
w, d, mlp, p, img, cls = 384, 12, 1536, 16, 224, 1000   # ViT-S/16
rng = np.random.default_rng(0)
sd = collections.OrderedDict()
sd["cls_token"] = rng.standard_normal((1, 1, w), np.float32)
sd["pos_embed"] = rng.standard_normal((1, (img // p) ** 2 + 1, w), np.float32)
sd["patch_embed.proj.weight"] = rng.standard_normal((w, 3, p, p), np.float32)
sd["patch_embed.proj.bias"] = rng.standard_normal(w, np.float32)
for i in range(d):
  t = f"blocks.{i}"
  for n, s in [("norm1.weight", (w,)), ("norm1.bias", (w,)), ("attn.qkv.weight", (3 * w, w)),
               ("attn.qkv.bias", (3 * w,)), ("attn.proj.weight", (w, w)), ("attn.proj.bias", (w,)),
               ("norm2.weight", (w,)), ("norm2.bias", (w,)), ("mlp.fc1.weight", (mlp, w)),
               ("mlp.fc1.bias", (mlp,)), ("mlp.fc2.weight", (w, mlp)), ("mlp.fc2.bias", (w,))]:
    sd[f"{t}.{n}"] = rng.standard_normal(s, np.float32)
sd["norm.weight"], sd["norm.bias"] = np.ones(w, np.float32), np.zeros(w, np.float32)
sd["head.weight"], sd["head.bias"] = rng.standard_normal((cls, w), np.float32), np.zeros(cls, np.float32)
tw.save_zip(tw.state_dict(sd), TMP + "/vit_s16.pth")
safetensors_file.save(dict(sd), TMP + "/vit_s16.safetensors")
for src in (TMP + "/vit_s16.pth", TMP + "/vit_s16.safetensors"):
  t0 = time.perf_counter(); conv = interop.convert(src, "timm", num_heads=6); t1 = time.perf_counter()
  interop.save(conv, TMP + "/vit_s16_ours.npz"); t2 = time.perf_counter()
  print(f"{src}: {interop.count(conv.params):,} params; read+convert {t1 - t0:.2f}s, save {t2 - t1:.2f}s")
t0 = time.perf_counter(); interop.export(interop.merged(conv), TMP + "/back.safetensors", to="timm", model=conv.model)
print(f"export timm {time.perf_counter() - t0:.2f}s")
__import__("shutil").rmtree(TMP)
