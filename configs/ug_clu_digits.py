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
    python run.py --config=configs/ug_clu_digits.py:runlocal           # smoke run, ~30 s on 2 CPU cores
    python run.py --config=configs/ug_clu_digits.py:method=clu_salun   # a baseline (also clu_ft,
                                                   # clu_ga, clu_rl, clu_l1_sparse)
    python run.py --config=configs/ug_clu_digits.py:request=random     # one request (10 % random
                                                   # images; request=class: digit 3) on a model
                                                   # pretrained on all ten digits
    python -m kswap_jax.compare --config=configs/ug_clu_digits.py      # all nine, one oracle

The baselines keep the reference's CIFAR-10 epochs and learning rates with batch 64
(docs/unlearning_baselines.md, with the measured leaderboards: the stream compare took
6 min 10 s wall on 2 idle cores).

The demo's schedule (iterations, learning rates, forget_alpha) is ours, sized for 1,258
training images; the method and its other constants are SFR-on's. Measured table: see
docs/ug_clu.md.
"""

from kswap_jax import methods
from kswap_jax.config import parse_arg, require_method
from kswap_jax.errors import ConfigError


def baseline_sections(c, *, batch_size: int, iterations: int = 0):
  """The machine-unlearning baselines' sections (clu_ft, clu_ga, clu_rl, clu_salun,
  clu_l1_sparse), present whatever `method` is so that `python -m kswap_jax.compare` runs
  them all on this config: the reference's CIFAR-10 settings (epochs, learning rates)
  with digits-sized batches; `iterations` > 0 overrides the epochs (smoke runs)."""
  from kswap_jax.methods.baselines import unlearning  # pylint: disable=import-outside-toplevel
  for name, section in unlearning.sections().items():
    if name not in c:
      c[name] = section
  for name in unlearning.SECTIONS.values():
    c[name].batch_size = batch_size
    c[name].iterations = iterations
  c.salun.mask_batch_size = max(batch_size, 64)


def get_config(arg=None):
  a = parse_arg(arg, method="ug_clu", request="stream", runlocal=False)
  require_method(a.method, methods.FAMILIES["unlearning"])
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

  if a.request in ("random", "class"):
    # One request on a model that already knows all ten digits (pretrained here, AdamW,
    # into <workdir>/pretrain; shared by every method under kswap_jax.compare).
    c.init.kind = "pretrain"
    c.pretrain.epochs, c.pretrain.warmup_epochs, c.pretrain.batch_size = 30, 2, 64
    c.clu.tasks = (tuple(range(10)),)
    c.clu.initial_tasks = (1,)
    c.clu.requests = (("forget:random:0.1",) if a.request == "random" else
                      ("forget:class:3",))
  elif a.request != "stream":
    raise ConfigError(f"--config arg: request={a.request!r} (expected stream, random or "
                      f"class)")

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
  baseline_sections(c, batch_size=64)

  if a.runlocal:
    c.model.width = 8
    c.model.stage_blocks = (1, 1)
    c.pretrain.epochs, c.pretrain.warmup_epochs = 1, 0
    if a.request == "stream":
      c.clu.requests = ("learn:1", "learn:2", "forget:class:1,4", "forget:random:0.1")
      c.clu.tasks = ((0, 1, 2), (3, 4, 5))
    c.learn.iterations = 6
    c.oracle.iterations = 6
    c.unlearn.iterations = 6
    c.unlearn.forget_every = 2
    c.learn.batch_size = c.unlearn.batch_size = 32
    c.unlearn.fisher_batch_size = 128
    baseline_sections(c, batch_size=32, iterations=6)
    c.train.log_every_steps = 2
  return c
