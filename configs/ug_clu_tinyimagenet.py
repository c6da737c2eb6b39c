r"""UG-CLU on TinyImageNet: 10 tasks x 20 classes with a pretrained ViT-B/16.

TinyImageNet (200 classes, 64x64, resized to 224 bicubic as the reference) as 10 class-incremental tasks of 20
classes; after tasks 2, 4, 6 and 8 an unlearning request of the chosen type (task-aware:
the task learned two stages before; cross-task category: one class from each of the two
latest tasks; random: 10 % of the kept images). The SFR-on TinyImageNet constants apply
to the unlearning stages (AdamW lr 2e-5, wd 0.05, T 500, N_f 1, c₀ 500, λ 0.6, γ 1,
clip 7, batch 128); learning stages and the oracle use the reference's TinyImageNet
retrain recipe (AdamW lr 1e-4, wd 0.05, 10 epochs), the oracle re-fine-tuned from the
same ImageNet weights (`oracle.start = init`). The reference uses Swin-T; we use the ViT
(full weights, or LoRA with `params=lora`), the architecture this library has, and a
random horizontal flip where the reference's training transform is RandAugment(2, 2). The
split, stream and epochs are our reconstruction, and no expected numbers are quoted.

Prepare the data once as an array_record tfds dataset with class folders
(TinyImageNet's val/ images need sorting into class folders from val_annotations.txt
first):
    python -m kswap_jax.data.image_folder --root tiny-imagenet-200 --name tiny_imagenet \
        --data_dir DIR
    python run.py --config=configs/ug_clu_tinyimagenet.py:request=class,data_dir=DIR \
        --config.init.checkpoint=/ckpt/ViT-B_16.npz
    python run.py --config=configs/ug_clu_tinyimagenet.py:runlocal   # synthetic, ~50 s
    python run.py --config=configs/ug_clu_tinyimagenet.py:request=class,params=lora,...
        # LoRA on the FFN kernels + the head instead of full weights (docs/ug_clu.md "LoRA")
"""

import ml_collections

from kswap_jax import methods
from kswap_jax.config import parse_arg, require_method

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def stream(request: str, num_tasks: int, classes_per_task: int) -> tuple[str, ...]:
  out = []
  for t in range(1, num_tasks + 1):
    out.append(f"learn:{t}")
    if t % 2 == 0 and t < num_tasks:
      if request == "task":
        out.append(f"forget:task:{t - 1}")
      elif request == "class":
        out.append(f"forget:class:{(t - 2) * classes_per_task},{(t - 1) * classes_per_task}")
      elif request == "random":
        out.append("forget:random:0.1")
      else:
        from kswap_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
        raise ConfigError(f"--config arg: request={request!r} (expected task, class or "
                          f"random)")
  return tuple(out)


def get_config(arg=None):
  a = parse_arg(arg, method="ug_clu", request="class", buffer=0, data_dir="", params="full",
                runlocal=False)
  require_method(a.method, methods.FAMILIES["unlearning"])
  c = methods.default_config(a.method)
  c.method = a.method
  c.seed = 0
  c.data.old = dict(kind="tfds", name="tiny_imagenet", data_dir=a.data_dir,
                    train_split="train", test_split="val", image_key="image",
                    label_key="label")
  c.data.new = c.data.old.to_dict()
  # Per-channel statistics: the section is rebuilt, as the shared default is a scalar.
  c.data = ml_collections.ConfigDict(dict(c.data.to_dict(), mean=IMAGENET_MEAN, std=IMAGENET_STD))
  # The reference trains with RandAugment(2 ops, magnitude 2), which this library does not
  # have; the random flip is the closest augmentation it does have.
  c.data.augment = "flip"
  c.data.resample = "bicubic"   # the reference's Resize(224, BICUBIC) of the 64 px images
  c.model.variant = "B/16"
  c.model.num_classes = 200
  c.model.image_size = 224
  c.init.kind = "npz"          # ImageNet ViT-B/16 weights: --config.init.checkpoint=...
  c.init.head = "replace"
  num_tasks, per_task = 10, 20
  c.clu.tasks = tuple(tuple(range(t * per_task, (t + 1) * per_task)) for t in range(num_tasks))
  c.clu.requests = stream(a.request, num_tasks, per_task)
  c.clu.buffer_size = a.buffer
  c.clu.params = a.params        # full | lora (the `lora` section: FFN kernels, rank 8, s = 1)

  u = c.unlearn
  u.base, u.lr, u.weight_decay, u.iterations, u.forget_every = "adamw", 2e-5, 0.05, 500, 1
  u.forget_alpha, u.lambd = 500.0, 0.6
  c.learn.base, c.learn.lr, c.learn.weight_decay, c.learn.epochs = "adamw", 1e-4, 0.05, 10
  c.oracle.epochs, c.oracle.start = 10, "init"
  c.eval.batch_size = 256
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500

  if a.runlocal:
    num_tasks, per_task = 4, 5
    c.data.old = dict(kind="synthetic", num_classes=20, image_size=16, channels=3,
                      train_per_class=12, test_per_class=6, seed=0)
    c.data.new = c.data.old.to_dict()
    c.model.variant, c.model.num_classes, c.model.image_size = "test/4", 20, 16
    c.init.kind = "random"
    c.oracle.start = "random"
    c.clu.tasks = tuple(tuple(range(t * per_task, (t + 1) * per_task))
                        for t in range(num_tasks))
    c.clu.requests = stream(a.request, num_tasks, per_task)
    c.learn.epochs = c.oracle.epochs = 0
    c.learn.iterations = c.oracle.iterations = 10
    c.unlearn.iterations = 6
    c.learn.batch_size = c.unlearn.batch_size = c.unlearn.fisher_batch_size = 32
    c.eval.batch_size = 128
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 50
  return c
