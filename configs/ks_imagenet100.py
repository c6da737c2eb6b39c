r"""Knowledge Swapping, the paper's classification setting (docs/knowledge_swapping.md).

ViT-B/16 fine-tuned on ImageNet-100, 200-row head (rows 100..199 fixed random), LoRA rank 8
on FFN fc1/fc2, retain 95 / forget 5 ImageNet-100 classes, learn 5 or 10 classes of CUB-200,
Oxford-IIIT Pet, RESISC45 or PlantVillage. 5 epochs per stage, batch 80, AdamW 1e-2.

    # once: ImageNet-100 as image folders named like the authors' (`17_n01530575/...`),
    # stored at 224 x 224 (the reference's bilinear squash, done once: decoding is then
    # 1.3x cheaper as lossless PNG, 2.4x with --encoding jpeg; docs/speed.md "Input pipeline")
    python -m kswap_jax.data.image_folder --root /data/imagenet100 --name imagenet100 \
        --data_dir ~/tensorflow_datasets --label_rule imagenet_prefix --image_size 224
    # once: the learn set (needs the optional TensorFlow extra to build official datasets)
    pip install -e '.[tf]' && tfds build caltech_birds2011 --data_dir ~/tensorflow_datasets \
        --file_format array_record
    # the pretrained ViT-B/16 (ImageNet-100) as a vit_jax .npz, then:
    python run.py --config=configs/ks_imagenet100.py:learn=cub,n_learn=5 \
        --config.init.checkpoint=/ckpt/vit_b16_imagenet100.npz --workdir=/runs/ks_cub5

Arg keys: method (lbf | laf), learn (cub | pets | resisc45 | plantvillage), n_learn (5 | 10),
runlocal (tiny model on synthetic data: checks the wiring in ~30 s on 2 CPU cores, no downloads).

[unknown] in the paper, so config fields with reconstructed defaults: which 5 ImageNet-100
classes are forgotten (`swap.forget_classes`, default 0..4) and which learn classes are used
(`swap.learn_classes`, default the first n_learn ids); RESISC45 and PlantVillage ship only a
train split in tfds, so their test split is the last 20 % of it.

Expect (paper, qualitative): after LBF, Acc_f drops sharply and Acc_n rises while Acc_r stays
close to the pretrained baseline; before the swap Acc_n ≈ 0 (the learn rows are random).
"""

from kswap_jax import methods
from kswap_jax.config import parse_arg, require_method

LEARN_SETS = {
    # arg -> (tfds name, train split, test split)
    "cub": ("caltech_birds2011", "train", "test"),
    "pets": ("oxford_iiit_pet", "train", "test"),
    "resisc45": ("resisc45", "train[:80%]", "train[80%:]"),
    "plantvillage": ("plant_village", "train[:80%]", "train[80%:]"),
}


def get_config(arg=None):
  a = parse_arg(arg, method="lbf", learn="cub", n_learn=5, runlocal=False)
  require_method(a.method, ("pretrain",) + methods.FAMILIES["knowledge_swap"])
  # Knowledge Swapping's sections (pretrain shares them), and those of any method
  # registered into the family (methods.register, docs/adding_a_method.md).
  c = methods.family_config("lbf")
  c.method = a.method
  if a.learn not in LEARN_SETS:
    from kswap_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError(f"--config arg: learn={a.learn!r} (expected one of {', '.join(LEARN_SETS)})")
  name, train_split, test_split = LEARN_SETS[a.learn]
  c.data.old.update(kind="tfds", name="imagenet100", train_split="train", test_split="test")
  c.data.new.update(kind="tfds", name=name, train_split=train_split, test_split=test_split)

  c.model.variant = "B/16"
  c.model.num_classes = 200
  c.swap.num_old_classes = 100
  c.swap.forget_classes = (0, 1, 2, 3, 4)
  c.swap.learn_classes = tuple(range(a.n_learn))
  c.init.kind = "npz"
  c.train.log_every_steps = 10
  c.train.checkpoint_every_steps = 200

  if a.runlocal:
    synthetic = dict(kind="synthetic", num_classes=20, image_size=16, channels=3,
                     train_per_class=20, test_per_class=8, seed=0)
    c.data.old = synthetic
    c.data.new = dict(synthetic, seed=1)
    c.model.variant = "test/4"
    c.model.image_size = 16
    c.model.num_classes = 40
    c.swap.num_old_classes = 20
    c.swap.retain_ratio = c.swap.forget_ratio = 1.0
    c.init.kind = "pretrain"
    c.pretrain.num_classes = 20
    c.pretrain.epochs = 2
    c.ks.learn_epochs = c.ks.forget_epochs = 1
    c.ks.batch_size = c.eval.batch_size = 16
    c.train.log_every_steps = 5
  return c
