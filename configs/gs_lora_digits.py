r"""GS-LoRA demo on scikit-learn's bundled 8x8 digits: 3 continual forgetting tasks.

A small face-style model (the Face Transformer's design at demo size: bias-free qkv, the
width^-0.5 attention scale, LayerNorm eps 1e-5 and a CosFace head with s = 64, m = 0.35) is
pretrained on all 10 digits, then asked to forget two digits per task, three times, in the
order of a seed-0 shuffle of 0..9. Each task trains a fresh LoRA on the FFN kernels with
the reference's loss (retain CE + β·ReLU(BND − forget CE) + α·group lasso), then folds it into
the backbone.

    python run.py --config=configs/gs_lora_digits.py
    python run.py --config=configs/gs_lora_digits.py:method=gs_lora_pp
    python run.py --config=configs/gs_lora_digits.py --config.group_lasso.mode=proximal
    python run.py --config=configs/gs_lora_digits.py:runlocal     # a few-second smoke run

Expect (2 CPU cores, a few minutes with pretraining): after every task Acc_f <= 10 on the
task's digits, Acc_o <= 10 on the digits forgotten before, Acc_r within 5 points of the
pretrained model's; with group_lasso.mode=proximal some groups end exactly at zero.
"""

from kswap_jax import methods
from kswap_jax.config import parse_arg
from kswap_jax.errors import ConfigError


def get_config(arg=None):
  a = parse_arg(arg, method="gs_lora", runlocal=False)
  if a.method not in ("gs_lora", "gs_lora_pp"):
    raise ConfigError(f"--config arg: method={a.method!r} (expected gs_lora or gs_lora_pp)")
  c = methods.default_config(a.method)  # the shared base + GS-LoRA's sections
  c.seed = 0

  c.data.old = dict(kind="digits", seed=0, test_fraction=0.3)
  c.data.new = c.data.old.to_dict()
  c.data.mean, c.data.std = 0.0, 1.0   # the Face Transformer reads [0, 1] images

  c.model.update(dict(name="vit_face", variant="demo/4", num_classes=10, image_size=16,
                      channels=1, qkv_bias=False, attention_scale="width",
                      layer_norm_eps=1e-5, head="cosface", attention_output_dropout=0.1))

  c.tasks.update(dict(num_classes=10, num_tasks=3, per_task=2, order_seed=0, data_ratio=1.0,
                      shots=0, seed=0))
  c.gs_lora.update(dict(batch_size=32, epochs=8, bound=30.0, beta=(0.2,)))
  c.group_lasso.alpha = 1e-3
  c.eval.batch_size = 128
  c.eval.every_steps = 0

  c.init.kind = "pretrain"
  c.init.head = "keep"
  c.pretrain.epochs = 30
  c.pretrain.batch_size = 64

  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 50

  if a.runlocal:
    c.model.variant = "test/4"
    c.pretrain.epochs = 2
    c.gs_lora.epochs = 1
    c.train.log_every_steps = 5
  return c
