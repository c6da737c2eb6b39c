r"""GS-LoRA demo on scikit-learn's bundled 8x8 digits: 3 continual forgetting tasks.

A small face-style model (the Face Transformer's design at demo size: bias-free qkv, the
width^-0.5 attention scale, LayerNorm eps 1e-5 and a CosFace head with s = 64, m = 0.35) is
pretrained on all 10 digits, then asked to forget two digits per task, three times, in the
order of a seed-0 shuffle of 0..9. Each task trains a fresh LoRA on the FFN kernels with
the reference's loss (retain CE + β·ReLU(BND − forget CE) + α·group lasso), then folds it into
the backbone.

    python run.py --config=configs/gs_lora_digits.py
    python run.py --config=configs/gs_lora_digits.py:method=gs_lora_pp
    python run.py --config=configs/gs_lora_digits.py:proximal     # exact zero groups
    python run.py --config=configs/gs_lora_digits.py:runlocal     # smoke run, ~40 s on 2 CPU cores
    python run.py --config=configs/gs_lora_digits.py:method=cf_ewc  # a baseline (cf_*)
    # GS-LoRA, GS-LoRA++ and the 12 continual-forgetting baselines on identical data:
    python -m kswap_jax.compare --config=configs/gs_lora_digits.py:compare

The loss, BND = 105, the A-init slopes, AdamW 1e-2 / wd 0.05 and the per-epoch cosine are
the reference's. The demo's own choices (the data is tiny): 8 epochs per task (of 32, 24
and 16 steps: the retained digits shrink), β = 0.2 on every task, α = 1e-3 (penalty).
`proximal` switches to the exact group-lasso proximal step with α = 40 from epoch 3 on
(the reference's sparsity warm-up: first forget, then sparsify); with Adam's normalised
steps a smaller α zeroes nothing and a larger one, or one active from the first step,
zeroes every group and nothing is forgotten (a LoRA group at a = b = 0 has zero gradient
and never comes back).

Expect (measured on 2 CPU cores, 1-4 minutes with pretraining; docs/gs_lora.md):
pretrained Acc_r 89.8 / Acc_f 90.7; after each of the 3 tasks Acc_f = 0 on the task's
digits, Acc_o = 0 on the digits forgotten before, Acc_r 87-97 (the retain CE with the
margin even raises it); with `proximal` block 0's group is exactly zero after tasks 1 and 2.

The `compare` variant (GS-LoRA 4 epochs per task, the baselines 3, LwF/DER/DER++/FDR/LIRF 12) ran
the family's first 12 methods in 683 s (11.4 min) on 2 busy CPU cores (cf_scrub_s and
cf_lirf, added later, take about as long as cf_scrub); its measured
leaderboard and what the baselines do are in docs/continual_forgetting_baselines.md.
"""

from kswap_jax import methods
from kswap_jax.config import parse_arg, require_method


def get_config(arg=None):
  a = parse_arg(arg, method="gs_lora", proximal=False, runlocal=False, compare=False)
  require_method(a.method, methods.FAMILIES["continual_forgetting"])
  # The shared base + the sections of every continual-forgetting method, so `compare`
  # runs them all on this config.
  c = methods.family_config(a.method)
  c.seed = 0

  c.data.old = dict(kind="digits", seed=0, test_fraction=0.3)
  c.data.new = c.data.old.to_dict()
  c.data.mean, c.data.std = 0.0, 1.0   # the Face Transformer reads [0, 1] images

  c.model.update(dict(name="vit_face", variant="demo/4", num_classes=10, image_size=16,
                      channels=1, qkv_bias=False, attention_scale="width",
                      layer_norm_eps=1e-5, head="cosface", attention_output_dropout=0.1))

  c.tasks.update(dict(num_classes=10, num_tasks=3, per_task=2, order_seed=0, data_ratio=1.0,
                      shots=0, seed=0))
  c.gs_lora.update(dict(batch_size=32, epochs=8, bound=105.0, beta=(0.2,)))
  c.group_lasso.alpha = 1e-3
  if a.proximal:
    c.group_lasso.update(dict(mode="proximal", alpha=40.0))
    c.gs_lora.alpha_epoch = 3
  c.eval.batch_size = 128
  # Acc_r, Acc_f, H every 32 iterations (best-H record): once per epoch in task 1; tasks 2
  # and 3 retain fewer digits, so their epochs are 24 and 16 iterations.
  c.eval.every_steps = 32

  c.init.kind = "pretrain"
  c.init.head = "keep"
  c.pretrain.epochs = 30
  c.pretrain.batch_size = 64

  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 50

  # The continual-forgetting baselines (methods cf_*): the reference's losses, weights,
  # relabelling and schedules, with the demo's batch and epochs and learning rates for a
  # small model trained in a few hundred steps (docs/continual_forgetting_baselines.md).
  # LwF, DER, DER++ and FDR take their epoch from the forget subset, a fifth of the replay
  # set here as in the reference, so they get 4x the epochs: about as many steps per task
  # as the others (the reference's 100 epochs give them ~1500 steps; a few dozen do not
  # forget).
  def baselines(epochs):
    c.cf.epochs = epochs
    for name in ("cf_lwf", "cf_der", "cf_der_pp", "cf_fdr", "cf_lirf"):
      c[name].epochs = 4 * epochs

  c.cf.batch_size = 32
  baselines(4)
  for name, lr in (("cf_retrain", 1e-3), ("cf_ft", 3e-4), ("cf_l2", 3e-4), ("cf_ewc", 3e-4),
                   ("cf_mas", 3e-4), ("cf_lwf", 3e-4), ("cf_der", 3e-4), ("cf_der_pp", 3e-4),
                   ("cf_fdr", 1e-3), ("cf_scrub", 3e-4), ("cf_scrub_s", 3e-4),
                   ("cf_lirf", 3e-4)):
    c[name].lr = lr
  c.cf_retrain.warmup_epochs = 1
  c.cf_scrub.update(dict(max_epochs=1, min_epochs=1))
  c.cf_scrub_s.update(dict(max_epochs=1, min_epochs=1))

  if a.compare:  # every method of the family in ~11 minutes on 2 busy CPU cores
    c.gs_lora.epochs = 4
    baselines(3)

  if a.runlocal:
    c.model.variant = "test/4"
    # 8 epochs (160 steps, ~3 s): enough for the CosFace margin rule to score above 0, so
    # the smoke run's table shows forgetting, not a column of zeros.
    c.pretrain.epochs = 8
    c.gs_lora.epochs = 1
    baselines(1)
    c.cf_retrain.warmup_epochs = 0
    c.train.log_every_steps = 5
  return c
