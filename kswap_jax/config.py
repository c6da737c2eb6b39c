"""Config fields shared by every method, section builders, and the `arg` string parser.

Every field a user may override (`--config.<field>=value`) has a default: the shared ones
here, a method's own sections in its module's `sections()` (e.g.
`kswap_jax/methods/knowledge_swap.py`), the model's in its module's `DEFAULTS`.
Fields for reconstructed choices say so in their comment.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys

import ml_collections

from kswap_jax import models
from kswap_jax.errors import ConfigError, exit_with
from kswap_jax.lora import FFN_TARGETS


def configs_folder() -> str:
  """The folder of the shipped configs: `configs/` of a checkout, or the copy installed as
  `kswap_jax/configs` by `pip install .` (pyproject maps one onto the other)."""
  here = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(here, "configs")
  if os.path.isfile(os.path.join(installed, "demo.py")):
    return installed
  return os.path.join(os.path.dirname(here), "configs")


def shipped_configs() -> list[str]:
  """The names of the shipped config files ("demo", "gs_lora_digits", ...)."""
  folder = configs_folder()
  return sorted(os.path.splitext(f)[0] for f in (os.listdir(folder) if os.path.isdir(folder)
                                                 else []) if f.endswith(".py")
                and not f.startswith("_"))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config arg like "method=laf,runlocal" into a ConfigDict over `defaults`.

  A bare word sets a boolean to True; a boolean's value is one of 1/true/yes, 0/false/no
  (any case). Other values are converted to the default's type.

  Raises:
    ConfigError: unknown key or unparsable value.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"--config arg: unknown key {key!r} (known: {', '.join(defaults)})")
    kind = type(defaults[key])
    if not eq:
      if kind is not bool:
        raise ConfigError(f"--config arg: {key} needs a value ({key}=...)")
      out[key] = True
      continue
    try:
      if kind is bool:
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
          raise ValueError(value)
        out[key] = value.lower() in ("1", "true", "yes")
      else:
        out[key] = kind(value)
    except ValueError:
      raise ConfigError(f"--config arg: {key}={value!r} is not a valid {kind.__name__}") from None
  return out


def given_keys(arg: str | None) -> set[str]:
  """The keys a config arg like "method=laf,runlocal" sets explicitly (to refuse a key the
  chosen setting would ignore)."""
  return {part.partition("=")[0].strip() for part in filter(None, (arg or "").split(","))}


def require_method(method: str, allowed) -> None:
  """For a config file: `method` (its `method=` arg) must be one of `allowed`, the methods
  the file sets up (e.g. a family of `kswap_jax.methods.FAMILIES`).

  Raises:
    ConfigError: naming the method and the allowed ones.
  """
  if method not in allowed:
    raise ConfigError(f"--config arg: method={method!r} (expected one of {', '.join(allowed)})")


def base_config() -> ml_collections.ConfigDict:
  """The fields every method uses. A method adds its own sections (`methods.default_config`),
  then a config file sets data, model and classes."""
  c = ml_collections.ConfigDict()
  c.method = "lbf"          # a name in kswap_jax.methods.METHODS
  c.seed = 1337             # the references' torch.manual_seed(1337)

  # Architecture fields and defaults belong to the model (kswap_jax/models/vit.py DEFAULTS).
  c.model = models.default_config("vit")

  c.data = ml_collections.ConfigDict(dict(
      # the dataset the model was pretrained on
      old=dict(kind="tfds", name="", data_dir="", train_split="train", test_split="test",
               image_key="image", label_key="label"),
      # a second source of classes to learn (Knowledge Swapping), may equal old
      new=dict(kind="tfds", name="", data_dir="", train_split="train", test_split="test",
               image_key="image", label_key="label"),
      mean=0.5, std=0.5,     # (x/255 − 0.5)/0.5 as the Knowledge Swapping reference
      num_threads=0,         # grain read threads; 0 reads in the main thread
      augment="none",        # training streams: none | flip | crop_flip (kswap_jax.data.augment)
      crop_padding=4,        # crop_flip: pad this many black pixels per side, crop back
      resample="bilinear",   # resizing images of another size: bilinear | bicubic (PIL)
  ))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=80,
      every_steps=0,         # >0: also evaluate every N iterations of a stage
  ))

  c.init = ml_collections.ConfigDict(dict(
      kind="npz",            # npz | pretrain | random
      checkpoint="",         # the vit_jax-layout .npz for kind=npz
      head="extend",         # extend | replace | keep (see checkpoint.load_npz)
      pretrain_workdir="",   # kind=pretrain: default <workdir>/pretrain
      lora_checkpoint="",    # start from this LoRA tree (an OUT.lora.npz of
                             # `python -m kswap_jax.convert`) instead of a fresh init
  ))

  c.pretrain = ml_collections.ConfigDict(dict(
      num_classes=0,         # train on classes [0, n) of data.old; 0 = model.num_classes
      epochs=30, warmup_epochs=2, batch_size=64,
      optim=adamw_section(lr=1e-3),
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_devices=0,         # data-parallel over the first n devices; 0 = all of them
      log_every_steps=10,
      checkpoint_every_steps=100,
      max_checkpoints_to_keep=2,
      tensorboard=True,      # also write metrics.jsonl as a TensorBoard event file in the
                             # workdir (no TensorFlow needed): tensorboard --logdir WORKDIR
  ))

  c.distributed = ml_collections.ConfigDict(dict(
      # Several processes (hosts) train one model together (see docs/scaling.md). Empty
      # fields fall back to the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
      # JAX_PROCESS_ID; with none set the run is a single process.
      coordinator_address="",  # host:port of process 0
      num_processes=0,
      process_id=-1,
      auto=False,              # jax.distributed.initialize() with cluster auto-detection
                               # (Cloud TPU pods, SLURM, Open MPI)
      cpu_collectives="gloo",  # collectives of CPU-only multi-process runs
  ))

  c.export = ml_collections.ConfigDict(dict(
      merged_npz=True,       # write the final model as merged_params.npz (init.kind=npz loads it)
  ))
  c.debug = ml_collections.ConfigDict(dict(interrupt_at_step=0))  # simulate a kill (tests)
  return c


# Section builders: methods that share a section's shape (LoRA, group lasso, AdamW) own
# their defaults by passing overrides.

def lora_section(**overrides) -> ml_collections.ConfigDict:
  """`lora`: which kernels get LoRA, rank, scale and init (see `lora.LoraSpec`)."""
  return ml_collections.ConfigDict(dict(dict(
      targets=FFN_TARGETS,   # regex over "/"-joined kernel names; FFN fc1/fc2 of every block
      rank=8,
      alpha=1.0,             # the LoRA scale is alpha / rank (loralib's default alpha 1:
                             # 1/8 at rank 8)
      init_slope=math.sqrt(50.0),  # kaiming-uniform slope of A (loralib: sqrt(5))
  ), **overrides))


def group_lasso_section(**overrides) -> ml_collections.ConfigDict:
  """`group_lasso`: the group-sparse term over LoRA groups (see `optim.group_lasso`)."""
  return ml_collections.ConfigDict(dict(dict(
      mode="penalty",        # penalty: α·Ω in the loss (references); proximal: exact prox step
      alpha=0.005,
      grouping="block",      # block | module | leaf
  ), **overrides))


def adamw_section(**overrides) -> ml_collections.ConfigDict:
  """AdamW with a per-epoch cosine learning rate from `lr` down to `min_lr`."""
  return ml_collections.ConfigDict(dict(dict(
      lr=1e-2,               # peak learning rate
      min_lr=1e-5,           # where the cosine ends
      weight_decay=0.05,     # decoupled from the gradient (AdamW)
      b1=0.9, b2=0.999, eps=1e-8,  # Adam's moment decays and ε
  ), **overrides))


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
  """[("model.variant", "B/16"), ...]: every overridable field with its value."""
  out = []
  for key in sorted(config.keys()):
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += flatten(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def main(argv=None) -> int:
  """Prints every config field of each METHOD and its default (all methods when none is
  named); or, given run.py's flags, the config that command line runs, with the checks a
  run makes first: its method's sections and field values, seeds, counts and the files
  `init` names (the data, model and LoRA are checked when a run starts; nothing is trained
  or written)."""
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  names = list(sys.argv[1:] if argv is None else argv) or sorted(methods.METHODS)
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel
  usage = "python -m kswap_jax.config [METHOD ...] | --config=FILE[:ARG] [--config.FIELD=VALUE ...]"
  if cli.wants_help(["config", *names], f"usage: {usage}\n\n"
                    f"{' '.join(main.__doc__.split())}\n\nmethods: "
                    f"{', '.join(sorted(methods.METHODS))}"):
    return 0
  if any(n.startswith(("--config", "-config")) for n in names):
    return _print_command_line(names)
  options = [n for n in names if n.startswith("-")]
  if options:
    print(f"error: unknown option {options[0]} (usage: {usage})", file=sys.stderr)
    return 2
  try:
    for name in names:  # all checked before anything is printed
      methods.get(name)
    lines = []
    for name in names:
      config = methods.default_config(name)
      lines.append(f"# method={name}: --config.<field>=<value> overrides any of these")
      lines += _documented(flatten(config), field_docs(config))
      lines.append("")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return _write("\n".join(lines) + "\n")


def _print_command_line(flags: list[str]) -> int:
  """The config `python run.py FLAGS` would run, every field with its value."""
  from kswap_jax import cli, methods  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING, format="%(message)s")  # warnings as one line
  try:
    config, _ = cli.load_config(["config", *flags])
    methods.check(config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  lines = [f"# python run.py {shlex.join(flags)}  (method={config.method})"]
  name, fields, docs = str(config.method), flatten(config), field_docs(config)
  defaults = _defaults(config)
  read = {field: methods.reads_field(name, field) for field, _ in fields}
  lines += _documented([(f, v) for f, v in fields if read[f]], docs, defaults)
  unread = [field for field, _ in fields if not read[field]]
  if unread:  # the family's other sections and fields, for `compare`: listed last, apart
    section = lambda field: field.split(".")[0]
    whole = {section(f) for f in unread} - {section(f) for f in read if read[f]}
    named = sorted(whole) + [f for f in unread if section(f) not in whole]
    lines += ["", f"# not read by {name} (its results do not depend on them; other methods "
              f"of its family may, under python -m kswap_jax.compare): "
              f"{', '.join(named)}"]
    lines += _documented([(f, v) for f, v in fields if not read[f]], docs, defaults)
  return _write("\n".join(lines) + "\n")


def field_docs(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{dotted field: the comment beside its default in the source}: the shared base's
  (`base_config`), the model's (its `DEFAULTS`) and the sections' of `config.method` and
  of its family's other methods (their modules' `sections()`; `kswap_jax.field_docs`)."""
  from kswap_jax import field_docs as docs_lib  # pylint: disable=import-outside-toplevel
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  docs = docs_lib.comments(sys.modules[__name__], "base_config")
  try:
    module, defaults = models._entry(str(config.model.get("name", "vit")))  # pylint: disable=protected-access
    for field, text in docs_lib.comments(module, defaults, "model.").items():
      # `model` itself has the base's comment and the model's heading of its fields: both.
      docs[field] = f"{docs[field]} {text}" if docs.get(field, text) != text else text
  except ConfigError:
    pass
  for method in _with_family(config):
    for field, text in docs_lib.comments(methods.get(method), "sections").items():
      docs.setdefault(field, text)
  return docs


def _with_family(config: ml_collections.ConfigDict) -> list[str]:
  """`config.method` and the other registered methods of its family, the method first."""
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  name = str(config.method)
  family = methods.family_of(name) if name in methods.METHODS else None
  return [m for m in (name, *methods.FAMILIES.get(family, ())) if m in methods.METHODS]


def _defaults(config: ml_collections.ConfigDict) -> dict[str, object]:
  """{field: default} of `config`'s method, its family's and its model's: what the source
  comments describe."""
  from kswap_jax import methods  # pylint: disable=import-outside-toplevel
  out: dict[str, object] = {}
  for method in _with_family(config):
    for field, value in flatten(methods.default_config(method)):
      out.setdefault(field, value)
  try:
    model = models.default_config(str(config.model.get("name", "vit")))
    out.update(flatten(model, "model."))
  except ConfigError:
    pass
  return out


def _documented(fields: list[tuple[str, object]], docs: dict[str, str],
                defaults: dict[str, object] | None = None) -> list[str]:
  """`field = value`, with its comment from `docs` after `#` (a comment on a default the
  config changed starts "default X:", as it describes that default; a changed value
  without a comment gets "# default X"); a section's own comment as a line of its own."""
  lines, said = [], set()
  for field, value in fields:
    parts = field.split(".")
    for depth in range(1, len(parts)):
      section = ".".join(parts[:depth])
      if section in docs and section not in said:
        said.add(section)
        if docs[section] != docs.get(field):  # not the one comment of a one-line section
          lines.append(f"# {section}: {docs[section]}")
    changed = defaults is not None and field in defaults and defaults[field] != value
    note = (f"  # default {defaults[field]!r}: {docs[field]}" if field in docs and changed
            else f"  # default {defaults[field]!r}" if changed
            else f"  # {docs[field]}" if field in docs else "")
    lines.append(f"{field} = {value!r}{note}")
  return lines


def _write(text: str) -> int:
  """Prints `text` (a reader that stops early, `| head`, is `errors.exit_with`'s case)."""
  if sys.stdout is not None:  # None: no standard output at all
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  exit_with(main)
