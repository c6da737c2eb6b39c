r"""UG-CLU demo on scikit-learn's bundled 8x8 digits (no download).

Three class-incremental tasks are learned one after the other with replay fine-tuning
(full access to the earlier data), then two task-agnostic unlearning requests follow:

    1_learn   learn task 1: digits 0 1 2
    2_learn   learn task 2: digits 3 4 5
    3_learn   learn task 3: digits 6 7 8 9
    4_forget  cross-task category request: forget digits 2 (task 1) and 5 (task 2)
    5_forget  random-sample request: forget 10 % of the kept training images

Each unlearning request runs the fast-slow loop (masked adaptive ascent every N_f
iterations, descent on the retained data every iteration) and is compared with its own
Retrain oracle (a model trained from scratch on what should be known at that point,
trained once in <workdir>/oracle). Model: a small CIFAR-style ResNet (width 16, one
BasicBlock per stage, BatchNorm) on 16x16 upsampled digits.

    python run.py --config=configs/ug_clu_digits.py
    python run.py --config=configs/ug_clu_digits.py:method=sfr_on      # = ug_clu here (D_L = ∅)
    python run.py --config=configs/ug_clu_digits.py:method=clu_joint   # one-step ablation
    python run.py --config=configs/ug_clu_digits.py:method=clu_retrain # the oracle alone
    python run.py --config=configs/ug_clu_digits.py:runlocal           # seconds-long smoke run

The demo's schedule (iterations, learning rates, forget_alpha) is ours, sized for 1,257
training images; the method and its other constants are SFR-on's. Measured table: see
docs/ug_clu.md.
"""

from kswap_jax import methods
from kswap_jax.config import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, method="ug_clu", runlocal=False)
  c = methods.default_config(a.method)
  c.method = a.method
  c.seed = 0

  c.data.old = dict(kind="digits", seed=0, test_fraction=0.3)
  c.data.new = c.data.old.to_dict()
  c.data.mean, c.data.std = 0.5, 0.5

  from kswap_jax import models  # pylint: disable=import-outside-toplevel
  c.model = models.default_config("resnet18_cifar")
  c.model.num_classes = 10
  c.model.image_size = 16
  c.model.channels = 1
  c.model.width = 16
  c.model.stage_blocks = (1, 1, 1, 1)
  c.init.kind = "random"

  c.clu.tasks = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))
  c.clu.requests = ("learn:1", "learn:2", "learn:3", "forget:class:2,5", "forget:random:0.1")

  c.learn.iterations = 100        # per learning stage (batch 64: ~5-13 passes over the data)
  c.learn.lr = 0.05
  c.learn.batch_size = 64
  c.oracle.iterations = 200
  c.unlearn.iterations = 100
  c.unlearn.forget_every = 5
  c.unlearn.lr = 0.01
  c.unlearn.batch_size = 64
  c.unlearn.fisher_batch_size = 64
  c.eval.batch_size = 256

  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 200

  if a.runlocal:
    c.model.width = 8
    c.model.stage_blocks = (1, 1)
    c.clu.requests = ("learn:1", "learn:2", "forget:class:1,4", "forget:random:0.1")
    c.clu.tasks = ((0, 1, 2), (3, 4, 5))
    c.learn.iterations = 6
    c.oracle.iterations = 6
    c.unlearn.iterations = 6
    c.unlearn.forget_every = 2
    c.learn.batch_size = c.unlearn.batch_size = 32
    c.unlearn.fisher_batch_size = 128
    c.train.log_every_steps = 2
  return c
