r"""GS-LoRA / GS-LoRA++ continual forgetting on ImageNet-100 with ViT-B/16 (4 tasks x 20).

torchvision's ViT-B/16 (ImageNet-1k weights) with its head cut to the 100 classes and frozen,
plain linear logits (no CosFace), LoRA r 8 on the 24 MLP kernels (737,280 parameters, 12
groups), 5 % of the training images per task, b 48, BND 105, β (0.2, 0.25, 0.25, 0.25),
α 1e-4 constant, λ_f 0.05, 100 epochs per task, AdamW 1e-2 / wd 0.05, per-epoch cosine.

    # once: ImageNet-100 as image folders (`train/<wnid>/...`, `test/<wnid>/...`), stored
    # as the reference preprocesses them: shorter side 256, centre crop 224
    python -m kswap_jax.data.image_folder --root /data/imagenet100 --name imagenet100 \
        --data_dir ~/tensorflow_datasets --label_rule sorted_rank \
        --image_size 224 --resize_shorter 256
    # once: torchvision's ViT-B/16 (IMAGENET1K_V1) with its head cut to the 100 classes'
    # ImageNet-1k indices (rows.txt: one per class, in sorted-wnid order; the reference's
    # modify_head)
    python -m kswap_jax.convert vit_b_16-c867db91.pth --layout torchvision --num_heads 12 \
        --head_rows @rows.txt --out /ckpt/vit_b16_imagenet100_head.npz
    python run.py --config=configs/gs_lora_imagenet100.py \
        --config.init.checkpoint=/ckpt/vit_b16_imagenet100_head.npz --workdir=/runs/gs_in100
    python run.py --config=configs/gs_lora_imagenet100.py:method=gs_lora_pp ...

Arg keys: method (gs_lora | gs_lora_pp); runlocal (tiny model, synthetic data, ~20 s on 2 CPU cores).

Preprocessing: the reference resizes the shorter side to 256 and centre-crops 224, with
ImageNet mean/std; `--resize_shorter 256 --image_size 224` stores the images so (the data
layer then leaves them as they are; without it, it would squash them to 224 x 224).

Expect (paper, T-PAMI Table 4; H / Acc_r / Acc_f [/ Acc_o]; pretrained Acc_r / Acc_f 89.93 /
87.40, 90.03 / 89.60, 89.65 / 90.80, 92.80 / 86.50):
  GS-LoRA    86.13 / 85.00 / 0.10, 87.33 / 85.27 / 0.10 / 1.10, 87.84 / 85.15 / 0.10 / 0.35,
             86.30 / 86.30 / 0.20 / 0.07
  GS-LoRA++  86.63 / 85.98 / 0.10, 87.22 / 85.23 / 0.30 / 0.30, 87.48 / 84.40 / 0.00 / 0.60,
             87.00 / 87.50 / 0.00 / 0.07
"""

import math

import ml_collections

from kswap_jax import methods
from kswap_jax.config import parse_arg, require_method


def get_config(arg=None):
  a = parse_arg(arg, method="gs_lora", runlocal=False)
  require_method(a.method, ("gs_lora", "gs_lora_pp"))
  c = methods.default_config(a.method)  # the shared base + GS-LoRA's sections
  c.seed = 1337

  c.data.old.update(kind="tfds", name="imagenet100", train_split="train", test_split="test")
  c.data.new = c.data.old.to_dict()
  # Per-channel ImageNet statistics (the section's default is one scalar for all channels).
  c.data = ml_collections.ConfigDict(dict(c.data.to_dict(), mean=(0.485, 0.456, 0.406),
                                          std=(0.229, 0.224, 0.225)))

  c.model.update(dict(name="vit", variant="B/16", num_classes=100, image_size=224,
                      head="linear", dropout=0.0))
  c.lora.init_slope = math.sqrt(5.0)   # [inferred] loralib's default on task 1
  c.init.kind = "npz"
  c.init.head = "keep"
  c.eval.batch_size = 256
  c.eval.every_steps = 100
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500

  c.tasks.update(dict(num_classes=100, num_tasks=4, per_task=20, data_ratio=0.05, shots=0))
  c.gs_lora.update(dict(batch_size=48, epochs=100, bound=105.0, beta=(0.2, 0.25, 0.25, 0.25),
                        alpha_epoch=0, warmup_alpha=False, ema_epoch=30, ema_decay=0.9))
  c.group_lasso.alpha = 1e-4
  c.gs_lora.prototype.update(dict(forget_weight=(0.05,), bound=18.0))

  if a.runlocal:
    c.data.old = dict(kind="synthetic", num_classes=10, image_size=16, channels=3,
                      train_per_class=12, test_per_class=6, seed=0)
    c.data.new = c.data.old.to_dict()
    c.data.mean, c.data.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    c.model.update(dict(variant="test/4", image_size=16, num_classes=10))
    c.tasks.update(dict(num_classes=10, per_task=2, data_ratio=0.5))
    c.gs_lora.update(dict(epochs=1, batch_size=8, ema_epoch=0))
    c.init.kind = "pretrain"
    c.pretrain.epochs = 1
    c.pretrain.batch_size = 16
    c.eval.batch_size = 32
    c.eval.every_steps = 4
    c.train.log_every_steps = 5
  return c
