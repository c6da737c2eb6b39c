"""kswap_jax.field_docs: the comments beside config defaults, as the config printer shows
them."""

import importlib.util

from kswap_jax import field_docs

SOURCE = '''
import ml_collections

DEFAULTS = dict(
    width=64,          # hidden size
    depth=2,
)
# The other model: DEFAULTS' comments where its own keywords have none.
OTHER = dict(DEFAULTS, depth=4)


def helper(**fields):
  return ml_collections.ConfigDict(fields)


def with_defaults(**overrides):
  return ml_collections.ConfigDict(dict(dict(
      k=1,                 # the helper's k
      m=2,                 # the helper's m: not where a call sets m
  ), **overrides))


def recursive(depth=2):
  if depth:
    return dict(x=recursive(depth - 1))  # a helper calling itself: read once
  return dict(y=1)                       # the innermost


TOP = dict(
    # Above a top-level field that has its own comment: the field's (no section).
    level=1,           # its own
)


def sections():
  def inner():
    return dict(wrong=1)   # a nested function's dict: not these sections' field
  shared = dict(z=1)       # a local dict, used below
  out = dict(
      # The first section: a comment above it.
      first=ml_collections.ConfigDict(dict(
          a=1,             # one
          b=2, c=3,        # shared by b and c
          # above d
          d=4,
          g=6,             # beside g
                           # and continued
          e=(1,
             2),           # a field over two lines keeps no end comment
          f=5,
      )),
      fifth=ml_collections.ConfigDict(dict(
          # Recipe of p and q: a heading of the section (fields sharing a line).
          p=1, q=2,
          # Speed options: a heading too (r has its own comment).
          r=3,             # beside r
      )),
      second=helper(x=1),  # helper keywords are fields too
      sixth=with_defaults(m=5),
      seventh=recursive(),
      fourth=ml_collections.ConfigDict(shared),
  )
  out["third"] = ml_collections.ConfigDict(dict(y=2))  # set by subscript
  return out
'''


def test_comments_beside_above_and_continued_are_each_fields_and_headings_the_sections(
    tmp_path):
  path = tmp_path / "toy_sections.py"
  path.write_text(SOURCE)
  spec = importlib.util.spec_from_file_location("toy_sections", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  docs = field_docs.comments(module, "sections")
  assert docs == {
      "first": "The first section: a comment above it.",
      "first.a": "one",
      "first.b": "shared by b and c", "first.c": "shared by b and c",
      "first.d": "above d", "first.g": "beside g and continued",
      "fifth": "Recipe of p and q: a heading of the section (fields sharing a line). "
               "Speed options: a heading too (r has its own comment).",
      "fifth.r": "beside r",
      "second": "helper keywords are fields too",  # one line: the section's and its field's
      "second.x": "helper keywords are fields too",
      "third": "set by subscript", "third.y": "set by subscript",
      "fourth.z": "a local dict, used below",  # where the local is used
      "sixth.k": "the helper's k",  # followed into the helper; m is set by the call
      "seventh.x": "a helper calling itself: read once", "seventh.y": "the innermost",
  }
  assert field_docs.comments(module, "DEFAULTS", "model.") == {"model.width": "hidden size"}
  assert field_docs.comments(module, "OTHER") == {"width": "hidden size"}
  assert field_docs.comments(module, "TOP") == {
      "level": "Above a top-level field that has its own comment: the field's (no section). "
               "its own"}
  assert field_docs.comments(module, "missing") == {}
  assert field_docs.comments(object(), "sections") == {}  # no source: no comments


def test_the_printer_shows_a_reconstructed_choice_beside_its_value(capsys):
  from kswap_jax import config  # pylint: disable=import-outside-toplevel
  assert config.main(["lbf"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert "swap.forget_classes = (0, 1, 2, 3, 4)  # [unknown] in the paper: the authors' " \
      "folders fix them" in out
  assert "ks.learn_epochs = 5" in out  # no comment: the value alone
  # The lines above the section's first field introduce the section, printed on their own.
  assert "distributed.coordinator_address = ''  # host:port of process 0" in out
  assert any(line.startswith("# distributed: Several processes (hosts) train one model")
             for line in out)
  # The base's comment on `model` and the model's heading of its speed options, both.
  [model] = [line for line in out if line.startswith("# model: ")]
  assert model.startswith("# model: Architecture fields") and "Speed options" in model
  # A value the command line changed: the comment describes the default, and says so.
  assert config.main(["--config=demo", "--config.seed=4", "--config.ks.learn_epochs=7"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert "seed = 4  # default 1337: the references' torch.manual_seed(1337)" in out
  assert "ks.learn_epochs = 7  # default 5" in out  # changed, with no comment in the source
