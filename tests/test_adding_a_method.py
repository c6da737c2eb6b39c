"""docs/adding_a_method.md: its example method and config file, run exactly as the page
shows them, and `methods.register`."""

import json
import os
import re
import types

import pytest

from conftest import REPO, method_config, method_run
from kswap_jax import cli, methods
from kswap_jax.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture
def example(tmp_path, monkeypatch):
  """The page's two files, written into tmp_path; registrations stay inside the test."""
  monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
  monkeypatch.setattr(methods, "FAMILIES", dict(methods.FAMILIES))
  with open(os.path.join(REPO, "docs", "adding_a_method.md")) as f:
    page = f.read()
  blocks = re.findall(r"^`([\w.]+\.py)`[^\n]*\n(?:[^\n]+\n)*?\n?```python\n(.*?)^```", page,
                      re.M | re.S)
  assert [name for name, _ in blocks] == ["lbf_rl.py", "my_lbf_rl.py"]
  for name, code in blocks:
    (tmp_path / name).write_text(code)
  return tmp_path / "my_lbf_rl.py"


def _stage_losses(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in r.items() if "loss" in k or k.startswith("ce_")}
            for r in map(json.loads, f) if r.get("stage") == stage]


def test_the_example_method_runs_as_lbf_except_in_its_own_forgetting_stage(
    example, tmp_path, tmp_path_factory, capsys):
  lbf_dir, lbf = method_run(tmp_path_factory, "demo", "runlocal")
  config, _ = cli.load_config(["run.py", f"--config={example}:runlocal",
                               "--config.train.log_every_steps=1"])
  assert config.method == "lbf_rl" and config.rl.weight == 1.0
  assert "lbf_rl" in methods.FAMILIES["knowledge_swap"]
  results = methods.run(config, str(tmp_path / "run"))
  assert results["method"] == "lbf_rl"
  assert [s["name"] for s in results["stages"]] == ["before", "learn", "forget"]
  # The learning stage is lbf's, step for step; the forgetting stage is the example's own.
  assert results["stages"][:2] == lbf["stages"][:2]
  assert _stage_losses(tmp_path / "run", "learn") == _stage_losses(lbf_dir, "learn")
  forget = _stage_losses(tmp_path / "run", "forget")
  assert forget and all("ce_forget_rl" in r and "ce_forget" not in r for r in forget)
  assert results["final"] != lbf["final"] and results["num_trainable"] == lbf["num_trainable"]

  # The command line: its own field's check, and compare running it beside lbf.
  assert cli.main(["run.py", f"--config={example}:runlocal", "--config.rl.weight=-1",
                   f"--workdir={tmp_path / 'bad'}"]) == 2
  assert "error: rl.weight: expected a value >= 0, got -1.0" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()
  from kswap_jax import compare  # pylint: disable=import-outside-toplevel
  assert compare.main(["compare", f"--config={example}:runlocal", "--methods=lbf,lbf_rl",
                       f"--workdir={tmp_path / 'cmp'}", "--dry_run"]) == 0


def test_register_refuses_what_would_not_work(example, tmp_path):
  here = os.path.dirname(example)
  methods.register("lbf_rl", os.path.join(here, "lbf_rl.py"), family="knowledge_swap")
  methods.register("lbf_rl", os.path.join(here, "lbf_rl.py"), family="knowledge_swap")
  assert methods.FAMILIES["knowledge_swap"].count("lbf_rl") == 1  # again: nothing changes
  with pytest.raises(ConfigError, match=r"register\('lbf'\): the name is taken by "
                                        r".*kswap_jax/methods/knowledge_swap\.py; "):
    methods.register("lbf", os.path.join(here, "lbf_rl.py"))
  # A refused file is not even run: the name stays its first module's.
  (tmp_path / "other.py").write_text("raise SystemExit('ran')\n")
  with pytest.raises(ConfigError, match=r"register\('lbf_rl'\): the name is taken by "
                                        r".*lbf_rl\.py"):
    methods.register("lbf_rl", str(tmp_path / "other.py"))
  methods.register("lbf_rl", os.path.join(here, "lbf_rl.py"))
  for bad in ("a/b", "p,q", "", "lbf.rl", "Lbf"):
    with pytest.raises(ConfigError, match=r"expected a name of lower-case letters"):
      methods.register(bad, os.path.join(here, "lbf_rl.py"))
  with pytest.raises(ConfigError, match=r"already a member of the knowledge_swap family"):
    methods.register("lbf_rl", os.path.join(here, "lbf_rl.py"), family="unlearning")
  with pytest.raises(ConfigError, match=r"expected a module, an import path or a \.py"):
    methods.register("y", None)
  with pytest.raises(ConfigError, match=r"a method of the library joins no other family"):
    methods.register("pretrain", "kswap_jax.methods.pretrain", family="knowledge_swap")
  # A file with a dataclass under postponed annotations (the house style), which looks its
  # module up in sys.modules while it runs.
  (tmp_path / "typed.py").write_text(
      "from __future__ import annotations\nimport dataclasses\n\n\n@dataclasses.dataclass\n"
      "class Options:\n  weight: float = 1.0\n\n\ndef sections():\n  return {}\n\n\n"
      "def run(config, workdir):\n  return {}\n")
  methods.register("typed", str(tmp_path / "typed.py"))
  assert methods.get("typed").Options().weight == 1.0
  with pytest.raises(ConfigError, match=r"unknown family 'swap' \(expected one of "):
    methods.register("x", os.path.join(here, "lbf_rl.py"), family="swap")
  (tmp_path / "half.py").write_text("def run(config, workdir):\n  return {}\n")
  with pytest.raises(ConfigError, match=r"has no sections function"):
    methods.register("half", str(tmp_path / "half.py"))
  (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
  with pytest.raises(ConfigError, match=r"broken\.py: ModuleNotFoundError"):
    methods.register("broken", str(tmp_path / "broken.py"))
  with pytest.raises(ConfigError, match=r"cannot import 'no_such_pkg\.m'"):
    methods.register("m", "no_such_pkg.m")
  assert "half" not in methods.METHODS and "broken" not in methods.METHODS


_GS_LORA_VARIANT = '''
from kswap_jax.methods import gs_lora

sections = gs_lora.sections
present = gs_lora.present


def validate(config):
  gs_lora.validate(config, variant=True)


def loss(model, scale, grouping, **kwargs):
  inner = gs_lora.make_loss(model, scale, grouping, **kwargs)

  def loss_fn(params, frozen, batch, rng, hparams):
    value, aux = inner(params, frozen, batch, rng, hparams)
    return value, {**aux, "ce_forget_logged_twice": aux["ce_forget"]}
  return loss_fn


def run(config, workdir):
  return gs_lora.run(config, workdir, prototypes=False, loss=loss)
'''


def test_a_gs_lora_variant_through_run_s_hooks_is_gs_lora_with_its_own_loss(
    tmp_path, tmp_path_factory, monkeypatch):
  """`gs_lora.run(config, workdir, prototypes=..., loss=...)`: a variant that logs one more
  term and changes nothing else trains as GS-LoRA, step for step, under its own name."""
  monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
  monkeypatch.setattr(methods, "FAMILIES", dict(methods.FAMILIES))
  (tmp_path / "gs_lora_x.py").write_text(_GS_LORA_VARIANT)
  methods.register("gs_lora_x", str(tmp_path / "gs_lora_x.py"), family="continual_forgetting")
  reference_dir, reference = method_run(tmp_path_factory, "gs_lora_casia100", "runlocal")
  config = method_config("gs_lora_casia100", "runlocal", str(tmp_path_factory.getbasetemp()))
  config.method = "gs_lora_x"
  results = methods.run(config, str(tmp_path / "run"))
  assert results["method"] == "gs_lora_x" and results["final"] == reference["final"]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  with open(os.path.join(reference_dir, "metrics.jsonl")) as f:
    want = [json.loads(line) for line in f]
  logged = [r for r in records if "ce_forget_logged_twice" in r]
  assert logged and all(r["ce_forget_logged_twice"] == r["ce_forget"] for r in logged)
  strip = lambda rs: [{k: v for k, v in r.items() if "loss" in k or (
      k.startswith("ce_") and k != "ce_forget_logged_twice")} for r in rs if "ce_forget" in r]
  assert strip(want) and strip(records) == strip(want)
  config.gs_lora.bound = -1.0  # the GS-LoRA fields are checked for a variant too, up front
  with pytest.raises(ConfigError, match=r"gs_lora\.bound"):
    methods.check(config)
  # `report` in a process where the variant is not registered: GS-LoRA's tables, by the
  # envelope's `presenter` (the library's code only), not the bare stage table.
  monkeypatch.delitem(methods.METHODS, "gs_lora_x")
  from kswap_jax import report  # pylint: disable=import-outside-toplevel
  shown = report.present(results, None)
  assert shown.startswith("(gs_lora_x is not registered in this process; its results are "
                          "shown as gs_lora's)\n") and "zero groups" in shown
  assert shown.split("\n", 1)[1].replace("gs_lora_x", "gs_lora") == report.present(
      dict(results, method="gs_lora"), None)
  # A registered variant without a `present` of its own: the same tables in its run.
  monkeypatch.setitem(methods.METHODS, "gs_lora_y", types.SimpleNamespace(run=None))
  assert report.present(dict(results, method="gs_lora_y"), None) == \
      shown.split("\n", 1)[1].replace("gs_lora_x", "gs_lora_y")


def test_a_gs_lora_forget_term_replaces_the_bounded_term_under_beta(tmp_path, tmp_path_factory):
  """`gs_lora.run(..., forget_term=f)`: the loss is CE_r + beta·f(logits_f, forget batch)
  + the rest. Twice the bounded term at beta trains as GS-LoRA at 2·beta (both products
  are exact), and the term is logged; a term the run ignored would train at beta."""
  from kswap_jax import losses  # pylint: disable=import-outside-toplevel
  from kswap_jax.methods import gs_lora  # pylint: disable=import-outside-toplevel
  config = method_config("gs_lora_casia100", "runlocal", str(tmp_path_factory.getbasetemp()))
  bound = float(config.gs_lora.bound)
  twice = lambda logits, b: 2.0 * losses.bounded_forgetting(
      losses.cross_entropy(logits, b["label"], b["mask"]), bound)
  results = gs_lora.run(config, str(tmp_path / "term"), forget_term=twice)
  config.gs_lora.beta = tuple(2.0 * b for b in config.gs_lora.beta)
  reference = methods.run(config, str(tmp_path / "beta"))
  assert results["final"] == reference["final"]
  read = lambda run: [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
  records, want = read("term"), read("beta")
  logged = [r for r in records if "forget_term" in r]
  assert logged and all(r["forget_term"] == pytest.approx(2.0 * max(bound - r["ce_forget"], 0.0),
                                                          rel=1e-5, abs=1e-6) for r in logged)
  strip = lambda rs: [{k: v for k, v in r.items() if "loss" in k or k.startswith("ce_")}
                      for r in rs if "ce_forget" in r]
  assert strip(want) and strip(records) == strip(want)
  with pytest.raises(TypeError, match="loss or forget_term"):
    gs_lora.run(config, str(tmp_path / "both"), loss=gs_lora.make_loss, forget_term=twice)
