r"""UG-CLU on CIFAR-10: 5 tasks x 2 classes, learning interleaved with unlearning requests.

Class-incremental tasks T1 = {0, 1}, ..., T5 = {8, 9} on one 10-row head (ResNet-18),
learned with replay fine-tuning; after every second task an unlearning request of the
chosen type:

    request=task     L1 L2 U(task 1)        L3 L4 U(task 3)        L5    (task-aware)
    request=class    L1 L2 U(class 1, 2)    L3 L4 U(class 4, 7)    L5    (cross-task category)
    request=random   L1 L2 U(random 10 %)   L3 L4 U(random 10 %)   L5    (random samples)

With `fused` each request is fused with the following learning stage (L3+U, L5+U: D_L and
D_U in the same stage, which only ug_clu accepts). `buffer=N` limits the old data to a
class-balanced replay memory of N images kept across the stream (0: full access;
`clu.buffer_kind=resample` draws it afresh from all old data each stage). Each unlearning stage uses the
SFR-on constants (T 1500, N_f 5, lr 0.01, c₀ 25, λ 0.5, γ 1, clip 7, batch 128); the
learning stages (30 epochs per task) and the oracle (60 epochs from scratch) use SGD
lr 0.1, momentum 0.9, wd 5e-4, batch 128. The task split, stream, epochs and buffer are
our reconstruction: the UG-CLU paper's protocol is not available to us, and no expected
numbers are quoted.

    python run.py --config=configs/ug_clu_cifar10.py:request=class,data_dir=DIR
    python run.py --config=configs/ug_clu_cifar10.py:request=random,fused,buffer=2000,data_dir=DIR
    python run.py --config=configs/ug_clu_cifar10.py:request=task,method=sfr_on,data_dir=DIR
    python run.py --config=configs/ug_clu_cifar10.py:request=class,runlocal   # synthetic, ~35 s
"""

import ml_collections

from kswap_jax import methods, models
from kswap_jax.config import parse_arg, require_method

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
REQUESTS = {
    "task": ("forget:task:1", "forget:task:3"),
    "class": ("forget:class:1,2", "forget:class:4,7"),
    "random": ("forget:random:0.1", "forget:random:0.1"),
}


def stream(request: str, fused: bool) -> tuple[str, ...]:
  """The request stream of the module docstring."""
  if request not in REQUESTS:
    from kswap_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError(f"--config arg: request={request!r} (expected one of "
                      f"{', '.join(REQUESTS)})")
  u1, u2 = REQUESTS[request]
  if fused:
    return ("learn:1", "learn:2", f"learn:3+{u1}", "learn:4", f"learn:5+{u2}")
  return ("learn:1", "learn:2", u1, "learn:3", "learn:4", u2, "learn:5")


def get_config(arg=None):
  a = parse_arg(arg, method="ug_clu", request="class", fused=False, buffer=0, data_dir="",
                runlocal=False)
  require_method(a.method, methods.FAMILIES["unlearning"])
  c = methods.default_config(a.method)
  c.method = a.method
  c.seed = 0
  c.data.old = dict(kind="tfds", name="cifar10", data_dir=a.data_dir, train_split="train",
                    test_split="test", image_key="image", label_key="label")
  c.data.new = c.data.old.to_dict()
  # Per-channel statistics: the section is rebuilt, as the shared default is a scalar.
  c.data = ml_collections.ConfigDict(dict(c.data.to_dict(), mean=CIFAR_MEAN, std=CIFAR_STD))
  c.data.augment = "crop_flip"   # the reference's RandomCrop(32, padding=4) + horizontal flip
  c.model = models.default_config("resnet18_cifar")
  c.init.kind = "random"
  c.eval.batch_size = 500

  c.clu.tasks = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
  c.clu.requests = stream(a.request, a.fused)
  c.clu.buffer_size = a.buffer
  c.learn.epochs = 30          # [R] per learning stage (not given in the papers)
  c.oracle.epochs = 60         # [R] from scratch on D_R ∪ D_L
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 1000

  if a.runlocal:
    c.data.old = dict(kind="synthetic", num_classes=10, image_size=32, channels=3,
                      train_per_class=30, test_per_class=10, seed=0)
    c.data.new = c.data.old.to_dict()
    c.model.width = 8
    c.model.stage_blocks = (1, 1)
    c.learn.epochs = c.oracle.epochs = 0
    c.learn.iterations = c.oracle.iterations = 10
    c.unlearn.iterations = 8
    c.learn.batch_size = c.unlearn.batch_size = c.unlearn.fisher_batch_size = 32
    c.eval.batch_size = 128
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 50
  return c
