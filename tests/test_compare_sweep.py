"""`python -m kswap_jax.compare --sweep=FIELD=V1,V2`: the runs, folders, shared work and
leaderboard rows of a sweep. The methods themselves are replaced by a recorder (their runs
are tested elsewhere): these tests are about what compare runs, where, and what it reports."""

import json
import os

import pytest

from conftest import REPO, load_config
from kswap_jax import compare, methods
from kswap_jax.errors import ConfigError


@pytest.fixture
def recorded(monkeypatch):
  """Replaces `methods.run` by one that records (method, workdir, config) and writes a
  results envelope whose acc_r is 100·ks.beta (or 50), as a finished run would."""
  calls = []

  def fake_run(cfg, wd, dry_run=False):
    calls.append((str(cfg.method), wd, cfg))
    if dry_run:
      return None
    os.makedirs(wd, exist_ok=True)
    beta = float(cfg.ks.beta) if "ks" in cfg else 0.5
    final = {k: 100.0 * beta for k in ("acc_r", "h_mean", "ua", "ra", "ta")}
    with open(os.path.join(wd, "results.json"), "w") as f:
      json.dump({"final": final, "num_trainable": 7,
                 "config": json.loads(cfg.to_json_best_effort())}, f)
    return {}
  monkeypatch.setattr(methods, "run", fake_run)
  return calls


def test_a_sweep_runs_every_method_at_every_value_and_shares_the_pretraining(tmp_path,
                                                                              recorded):
  config = load_config("demo", "runlocal")
  board = compare.run(config, str(tmp_path), ["lbf", "laf"], [0, 1],
                      sweep={"ks.beta": [0.1, 0.4]})
  assert [(m, os.path.relpath(wd, tmp_path)) for m, wd, _ in recorded] == [
      ("lbf", "lbf/ks.beta=0.1/seed_0"), ("lbf", "lbf/ks.beta=0.1/seed_1"),
      ("lbf", "lbf/ks.beta=0.4/seed_0"), ("lbf", "lbf/ks.beta=0.4/seed_1"),
      ("laf", "laf/ks.beta=0.1/seed_0"), ("laf", "laf/ks.beta=0.1/seed_1"),
      ("laf", "laf/ks.beta=0.4/seed_0"), ("laf", "laf/ks.beta=0.4/seed_1")]
  for _, wd, cfg in recorded:
    assert f"ks.beta={cfg.ks.beta}" in wd
    # ks.beta does not change the pretraining: one per seed, shared by every value.
    assert cfg.init.pretrain_workdir == str(tmp_path / "pretrain" / f"seed_{cfg.seed}")
  assert list(board["methods"]) == ["lbf ks.beta=0.1", "lbf ks.beta=0.4", "laf ks.beta=0.1",
                                    "laf ks.beta=0.4"]
  assert board["sweep"] == {"ks.beta": [0.1, 0.4]}
  row = board["methods"]["laf ks.beta=0.4"]
  assert row["method"] == "laf" and row["values"] == {"ks.beta": 0.4}
  assert row["acc_r"]["mean"] == pytest.approx(40.0) and row["acc_r"]["n"] == 2
  table = (tmp_path / "leaderboard.md").read_text()
  assert "| method | ks.beta | Acc_r" in table and "| laf | 0.4 | 40.00 ± 0.00 |" in table
  tex = (tmp_path / "leaderboard.tex").read_text().splitlines()
  assert tex[2].startswith(r"Method & ks.beta & Acc\_r $\uparrow$ & ")
  assert any(line.startswith(r"laf & 0.4 & ") for line in tex)
  assert json.loads((tmp_path / "leaderboard.json").read_text())["sweep"] == {
      "ks.beta": [0.1, 0.4]}
  timings = json.loads((tmp_path / "compare_seconds.json").read_text())
  assert "lbf/ks.beta=0.1/seed_1" in timings
  assert os.path.getsize(tmp_path / "sweep.png") > 0  # the metrics against ks.beta

  recorded.clear()  # a rerun reads every finished run and trains nothing
  again = compare.run(config, str(tmp_path), ["lbf", "laf"], [0, 1],
                      sweep={"ks.beta": [0.1, 0.4]})
  assert recorded == [] and again["methods"] == board["methods"]


def test_a_field_that_changes_the_pretraining_gets_one_pretraining_per_value(tmp_path,
                                                                            recorded):
  config = load_config("demo", "runlocal")
  assert config.pretrain.epochs == 2
  compare.run(config, str(tmp_path), ["lbf"], [0], sweep={"pretrain.epochs": [1, 2]})
  # The config's own value uses the config's pretraining folder; another value its own.
  assert [os.path.relpath(cfg.init.pretrain_workdir, tmp_path) for _, _, cfg in recorded] == [
      "pretrain/pretrain.epochs=1/seed_0", "pretrain/seed_0"]
  # A folder depends on its value alone: a rerun with one more value runs only that one, and
  # a grid given in the other flag order finds the same runs.
  recorded.clear()
  compare.run(config, str(tmp_path), ["lbf"], [0], sweep={"pretrain.epochs": [1, 2, 3]})
  assert [os.path.relpath(wd, tmp_path) for _, wd, _ in recorded] == [
      "lbf/pretrain.epochs=3/seed_0"]
  recorded.clear()
  grid = {"ks.beta": [0.1], "pretrain.epochs": [1, 3]}
  compare.run(config, str(tmp_path / "g"), ["lbf"], [0], sweep=grid)
  assert [os.path.relpath(wd, tmp_path / "g") for _, wd, _ in recorded] == [
      "lbf/ks.beta=0.1,pretrain.epochs=1/seed_0", "lbf/ks.beta=0.1,pretrain.epochs=3/seed_0"]
  assert [os.path.relpath(cfg.init.pretrain_workdir, tmp_path / "g")
          for _, _, cfg in recorded] == [  # ks.beta does not change the pretraining
      "pretrain/pretrain.epochs=1/seed_0", "pretrain/pretrain.epochs=3/seed_0"]
  recorded.clear()
  board = compare.run(config, str(tmp_path / "g"), ["lbf"], [0],
                      sweep=dict(reversed(grid.items())))
  assert recorded == [] and list(board["methods"]) == [
      "lbf pretrain.epochs=1 ks.beta=0.1", "lbf pretrain.epochs=3 ks.beta=0.1"]
  # With one folder named for every value, the sweep is refused before anything runs.
  recorded.clear()
  config.init.pretrain_workdir = str(tmp_path / "mine")
  with pytest.raises(ConfigError, match=r"^--sweep: pretrain\.epochs=1 changes the pretraining, "
                                        r"but init\.pretrain_workdir names one folder"):
    compare.run(config, str(tmp_path / "other"), ["lbf"], [0],
                sweep={"pretrain.epochs": [1, 2]})
  assert recorded == [] and not (tmp_path / "other").exists()


def test_a_sweep_shares_the_oracle_unless_the_field_changes_it(tmp_path, recorded):
  config = load_config("ug_clu_digits", "runlocal")
  # unlearn.* and ft.* do not change the Retrain oracle; ug_clu does not read ft.*, nor
  # clu_ft unlearn.* (`fields_unread`: it unlearns with its own section).
  compare.run(config, str(tmp_path / "a"), ["ug_clu", "clu_ft"], [0],
              sweep={"unlearn.forget_alpha": [25.0, 10.0], "ft.lr": [0.01, 0.1]})
  runs = [(m, os.path.relpath(wd, tmp_path / "a")) for m, wd, _ in recorded]
  assert runs == [
      ("ug_clu", "ug_clu/seed_0"),  # the config's own forget_alpha: the plain run's folder
      ("ug_clu", "ug_clu/unlearn.forget_alpha=10.0/seed_0"),
      ("clu_ft", "clu_ft/seed_0"),  # the config's own ft.lr
      ("clu_ft", "clu_ft/ft.lr=0.1/seed_0")]
  assert {cfg.oracle.workdir for _, _, cfg in recorded} == {
      str(tmp_path / "a" / "oracle" / "seed_0")}
  table = (tmp_path / "a" / "leaderboard.md").read_text()
  assert "| method | unlearn.forget_alpha | ft.lr |" in table
  assert "| ug_clu | 25.0 | – |" in table and "| clu_ft | – | 0.1 |" in table
  assert os.path.getsize(tmp_path / "a" / "sweep.png") > 0

  recorded.clear()  # the stream's requests change what the oracle trains: one per value
  compare.run(config, str(tmp_path / "b"), ["clu_ft"], [0],
              sweep={"clu.requests": [("learn:1", "forget:class:1"), ("learn:1",)]})
  assert [os.path.relpath(cfg.oracle.workdir, tmp_path / "b") for _, _, cfg in recorded] == [
      "oracle/clu.requests=learn_1-forget_class_1/seed_0", "oracle/clu.requests=learn_1/seed_0"]
  assert not (tmp_path / "b" / "sweep.png").exists()  # values that are not numbers: no axis


def test_fields_that_change_the_oracle_only_together_get_their_own_oracles(tmp_path, recorded):
  """lora.rank changes the Retrain oracle only when the oracle trains LoRA (clu.params):
  every point of the grid gets an oracle folder that no point with another oracle config
  shares, and points with the same oracle config share one."""
  from kswap_jax.methods import ug_clu  # pylint: disable=import-outside-toplevel
  config = load_config("ug_clu_digits", "runlocal")
  assert config.clu.params == "full" and config.lora.rank == 8
  compare.run(config, str(tmp_path), ["ug_clu"], [0],
              sweep={"clu.params": ["full", "lora"], "lora.rank": [4, 8]})
  folders = {}
  for _, _, cfg in recorded:
    oracle = json.loads(ug_clu.oracle_config(cfg).to_json_best_effort())
    folders.setdefault(os.path.relpath(cfg.oracle.workdir, tmp_path), []).append(oracle)
  assert sorted(folders) == ["oracle/clu.params=lora,lora.rank=4/seed_0",
                             "oracle/clu.params=lora/seed_0", "oracle/seed_0"]
  assert len(folders["oracle/seed_0"]) == 2  # full parameters: the LoRA rank is not read
  assert all(configs.count(configs[0]) == len(configs) for configs in folders.values())
  oracles = [configs[0] for configs in folders.values()]
  assert all(oracles.count(o) == 1 for o in oracles)


def test_a_plot_of_an_earlier_sweep_is_removed_when_the_new_board_has_none(tmp_path,
                                                                          recorded):
  config = load_config("demo", "runlocal")
  compare.run(config, str(tmp_path), ["lbf"], [0], sweep={"ks.beta": [0.1, 0.4]})
  assert (tmp_path / "sweep.png").exists()
  compare.run(config, str(tmp_path), ["lbf"], [0])
  assert not (tmp_path / "sweep.png").exists()


@pytest.mark.parametrize("sweep, message", [
    ({"seed": [0, 1]}, r"--sweep: seed: use --seeds=a,b,\.\.\. to run several"),
    ({"ks.betta": [0.1]}, r"--sweep: ks\.betta: no such config field"),
    ({"ks.beta": [0.1, 0.1]}, r"--sweep: ks\.beta: 0\.1 given twice"),
    ({"ks.beta": ["high"]}, r"--sweep: ks\.beta='high': "),
    ({"gs_lora.beta": [0.1]}, r"--sweep: gs_lora\.beta: no such config field"),
    ({"model.variant": ["x/4", "x_4"]}, r"two values would share the folder"),
    ({"ks.bound": [-1.0]}, r"^--sweep ks\.bound=-1\.0: ks\.bound: "),  # the method's own check
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, recorded, sweep, message):
  with pytest.raises(ConfigError, match=message):
    compare.run(load_config("demo", "runlocal"), str(tmp_path / "w"), ["lbf"], [0],
                sweep=sweep)
  assert recorded == [] and not (tmp_path / "w").exists()


def test_the_command_line_reads_sweep_values_as_overrides_are_read(tmp_path, recorded, capsys):
  common = ["compare", f"--config={REPO}/configs/demo.py:runlocal", f"--workdir={tmp_path}",
            "--methods=lbf"]
  # An override of a swept field is replaced by each value (one warning, whatever its form).
  assert compare.main(common + ["--config.ks.beta", "0.3", "--sweep=ks.beta=0.1,0.4",
                                "--sweep", "swap.forget_classes=(0,1),(2,3)",
                                "--sweep=ks.aux_batches='per_epoch',continuous"]) == 0
  log = capsys.readouterr().out  # the command's log
  assert log.count("--config.ks.beta=... is replaced by each value of --sweep=ks.beta") == 1
  assert "given 2 times" not in log
  got = [(cfg.ks.beta, tuple(cfg.swap.forget_classes), cfg.ks.aux_batches)
         for _, _, cfg in recorded]
  assert got == [(b, c, a) for b in (0.1, 0.4) for c in ((0, 1), (2, 3))
                 for a in ("per_epoch", "continuous")]
  assert os.path.isdir(tmp_path / "lbf" / "ks.aux_batches=continuous,ks.beta=0.4,"
                                          "swap.forget_classes=2-3" / "seed_0")
  recorded.clear()  # class names unquoted in brackets: each bracket one tuple of names
  assert compare.main(common[:2] + [f"--workdir={tmp_path / 'n'}", "--methods=lbf",
                                    "--sweep=swap.forget_classes=(cat,dog),(eel,3)"]) == 0
  assert [tuple(cfg.swap.forget_classes) for _, _, cfg in recorded] == [("cat", "dog"),
                                                                         ("eel", 3)]
  recorded.clear()  # scalars for a tuple field: a run each, as one-item tuples, and a warning
  assert compare.main(common[:2] + [f"--workdir={tmp_path / 't'}", "--methods=lbf",
                                    "--sweep=swap.forget_classes=0,1"]) == 0
  assert [tuple(cfg.swap.forget_classes) for _, _, cfg in recorded] == [(0,), (1,)]
  assert "each a tuple of one item; write a tuple of several in brackets" in \
      capsys.readouterr().out
  recorded.clear()
  for bad, message in (
      (["--sweep=ks.beta"], "error: --sweep=ks.beta: expected --sweep=FIELD=V1,V2,..."),
      (["--sweep=ks.beta=0.1", "--sweep=ks.beta=0.2"], "error: --sweep: ks.beta given twice"),
      (["--sweep=ks.beta=high"], "error: --sweep=ks.beta=...: value 'high': "),
      (["--sweep=ks.betta=1"], "error: --sweep=ks.betta: this config's ks has no field "
                               "'betta'; did you mean \"beta\""),
      (["--sweep=seed=1,2"], "error: --sweep: seed: use --seeds=a,b,... to run several"),
      (["--seed=1"], "error: --seed: unknown flag (expected --config=FILE[:ARG], "
                     "--workdir=DIR, --config.FIELD=VALUE, --methods=a,b,..., --seeds=0,1,..., "
                     "--sweep=FIELD=V1,V2,... or --dry_run); did you mean --seeds?")):
    capsys.readouterr()
    assert compare.main(common[:2] + [f"--workdir={tmp_path / 'bad'}"] + common[3:] + bad) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, (bad, err)
  assert recorded == [] and not (tmp_path / "bad").exists()


def test_fields_swept_together_run_their_pairs_not_the_grid(tmp_path, recorded, capsys):
  common = ["compare", f"--config={REPO}/configs/demo.py:runlocal", f"--workdir={tmp_path}",
            "--methods=lbf,laf"]
  assert compare.main(common + ["--sweep=ks.beta,swap.forget_classes=(0.1,(0,1)),(0.4,(2,3))",
                                "--sweep=ks.aux_batches=per_epoch,continuous"]) == 0
  got = [(m, cfg.ks.beta, tuple(cfg.swap.forget_classes), cfg.ks.aux_batches)
         for m, _, cfg in recorded]
  assert got == [(m, b, c, a) for m in ("lbf", "laf") for b, c in ((0.1, (0, 1)), (0.4, (2, 3)))
                 for a in ("per_epoch", "continuous")]
  board = json.loads((tmp_path / "leaderboard.json").read_text())
  assert board["sweep"] == {"ks.beta": [0.1, 0.4], "swap.forget_classes": [[0, 1], [2, 3]],
                            "ks.aux_batches": ["per_epoch", "continuous"]}
  assert board["zipped"] == [["ks.beta", "swap.forget_classes"]]
  assert "| lbf | 0.4 | (2,3) | continuous | 40.00 |" in (tmp_path / "leaderboard.md").read_text()
  assert os.path.getsize(tmp_path / "sweep.png") > 0  # x: ks.beta, its partner along the line
  # A value in one field may repeat across pairs; a pair may not.
  recorded.clear()
  assert compare.main(common[:2] + [f"--workdir={tmp_path / 'r'}", "--methods=lbf",
                                    "--sweep=ks.beta,ks.bound=(0.1,1.0),(0.1,2.0)"]) == 0
  assert [(cfg.ks.beta, cfg.ks.bound) for _, _, cfg in recorded] == [(0.1, 1.0), (0.1, 2.0)]
  recorded.clear()
  for bad, message in (
      (["--sweep=ks.beta,ks.bound=(0.1,1.0),(0.1,1.0)"],
       "error: --sweep: ks.beta,ks.bound: (0.1,1.0) given twice"),
      (["--sweep=ks.beta,ks.bound=0.1,0.2"],
       "error: --sweep=ks.beta,ks.bound=...: value '0.1': expected (2 values in brackets"),
      (["--sweep=ks.beta,ks.bound=(0.1,1.0,3)"], "value '(0.1,1.0,3)': expected (2 values"),
      (["--sweep=ks.beta,ks.beta=(0.1,0.2)"], "error: --sweep: ks.beta given twice"),
      (["--sweep=ks.beta,ks.bound=(0.1,1.0)", "--sweep=ks.bound=2.0"],
       "error: --sweep: ks.bound given twice"),
      (["--sweep=ks.beta,=(0.1,1.0)"], "expected --sweep=FIELD=V1,V2,...")):
    capsys.readouterr()
    assert compare.main(common[:2] + [f"--workdir={tmp_path / 'bad'}", "--methods=lbf"]
                        + bad) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, (bad, err)
  assert recorded == [] and not (tmp_path / "bad").exists()


def test_a_method_that_reads_one_field_of_a_pair_runs_each_of_its_values_once(tmp_path,
                                                                               recorded):
  """gs_lora.bound is GS-LoRA's, cf_ft.lr the fine-tuning baseline's: swept together over
  both, each runs once per value of its own field, not once per pair."""
  config = load_config("gs_lora_casia100", "runlocal")
  compare.run(config, str(tmp_path), ["gs_lora", "cf_ft"], [0],
              sweep={"gs_lora.bound,cf_ft.lr": [(1.0, 1e-4), (2.0, 1e-4), (3.0, 2e-4)]})
  runs = [(m, os.path.relpath(wd, tmp_path)) for m, wd, _ in recorded]
  assert runs == [("gs_lora", f"gs_lora/gs_lora.bound={b}/seed_0") for b in (1.0, 2.0, 3.0)] + [
      ("cf_ft", "cf_ft/seed_0"),  # the config's own cf_ft.lr: the plain run's folder
      ("cf_ft", "cf_ft/cf_ft.lr=0.0002/seed_0")]


def test_the_sweep_plot_runs_along_a_field_whose_paired_values_do_not_repeat():
  board = lambda sweep, zipped: {"sweep": sweep, "zipped": zipped}
  # ks.beta repeats within the pairs: the lines run along ks.bound, ks.beta changing on them.
  assert compare._x_field(board({"ks.beta": [0.1, 0.1], "ks.bound": [1.0, 2.0]},
                                [["ks.beta", "ks.bound"]])) == ("ks.bound", ["ks.beta"])
  # No numeric field is free of repeats: the first, its partner telling the lines apart.
  assert compare._x_field(board({"ks.beta": [0.1, 0.1, 0.2], "x": ["a", "b", "c"]},
                                [["ks.beta", "x"]])) == ("ks.beta", [])
  # One number throughout, tuples (per-task lists), strings: no axis, no plot.
  assert compare._x_field(board({"ks.beta": [0.1, 0.1], "x": ["a", "b"]},
                                [["ks.beta", "x"]])) == (None, [])
  assert compare._x_field(board({"gs_lora.beta": [[0.2], [0.5]]}, [])) == (None, [])
  assert compare._x_field(board({"x": ["a"]}, [])) == (None, [])
  assert compare._show((0.2,)) == "(0.2,)" and compare._show((0, 1)) == "(0,1)"


def test_string_values_with_commas_are_told_apart(tmp_path, recorded):
  """("a,b", "c") and ("a", "b,c") print alike but are two pairs."""
  config = load_config("demo", "runlocal")
  sweep = {"ks.aux_batches,data.resample": [("a,b", "c"), ("a", "b,c")]}
  grid = compare._Sweep(config, sweep, ["lbf"], str(tmp_path))  # not "given twice"
  assert grid.points("lbf") == [{"ks.aux_batches": "a,b", "data.resample": "c"},
                                {"ks.aux_batches": "a", "data.resample": "b,c"}]


def test_a_point_at_the_config_s_own_values_is_the_plain_run(tmp_path, recorded, caplog):
  """A sweep value equal to the config's runs in (or is read from) the plain compare's
  folder: the same run is not trained twice. A point that an earlier sweep ran in its own
  folder keeps it."""
  config = load_config("demo", "runlocal")
  compare.run(config, str(tmp_path), ["lbf"], [0])
  recorded.clear()
  with caplog.at_level("INFO"):
    board = compare.run(config, str(tmp_path), ["lbf"], [0],
                        sweep={"ks.beta": [0.1, float(config.ks.beta)]})
  assert [os.path.relpath(wd, tmp_path) for _, wd, _ in recorded] == ["lbf/ks.beta=0.1/seed_0"]
  assert "is the config's own run" in caplog.text
  own = f"lbf ks.beta={config.ks.beta}"
  assert board["methods"][own]["acc_r"]["mean"] == pytest.approx(100.0 * config.ks.beta)
  assert not (tmp_path / "lbf" / f"ks.beta={config.ks.beta}").exists()
  other = tmp_path / "other"  # a plain run of another value in the plain folder: not this point's
  config.ks.beta = 0.77
  compare.run(config, str(other), ["lbf"], [0])
  config.ks.beta = 0.2
  recorded.clear()
  compare.run(config, str(other), ["lbf"], [0], sweep={"ks.beta": [0.2]})
  assert [os.path.relpath(wd, other) for _, wd, _ in recorded] == ["lbf/ks.beta=0.2/seed_0"]
  earlier = tmp_path / "earlier"
  (earlier / "lbf" / f"ks.beta={config.ks.beta}").mkdir(parents=True)
  recorded.clear()
  compare.run(config, str(earlier), ["lbf"], [0], sweep={"ks.beta": [float(config.ks.beta)]})
  assert [os.path.relpath(wd, earlier) for _, wd, _ in recorded] == [
      f"lbf/ks.beta={config.ks.beta}/seed_0"]


def test_a_method_whose_results_never_read_a_field_runs_once_over_it(tmp_path, recorded,
                                                                     caplog):
  """`fields_unread`: the Retrain oracle method reads no unlearn.* field, the baselines no
  UG-CLU mask field, sfr_on no fused-stage field; ug_clu reads them all. The log says so."""
  config = load_config("ug_clu_digits", "runlocal")
  names = ["ug_clu", "sfr_on", "clu_retrain", "clu_salun"]
  with caplog.at_level("INFO", logger="kswap_jax"):
    compare.run(config, str(tmp_path), names, [0],
                sweep={"unlearn.gamma": [1.0, 2.0], "clu.variant": ["A", "B"]})
  assert "[compare] clu_retrain does not read unlearn.gamma, clu.variant: it runs once, at " \
      "the config's value (– in the table)" in caplog.text
  counts = {name: sum(m == name for m, _, _ in recorded) for name in names}
  assert counts == {"ug_clu": 4, "sfr_on": 2, "clu_retrain": 1, "clu_salun": 1}
  assert methods.reads_field("clu_joint", "unlearn.forget_alpha")  # its joint coefficient
  assert not methods.reads_field("clu_joint", "unlearn.forget_every")
  assert not methods.reads_field("gs_lora", "unlearn.gamma")  # not its section


def test_the_continual_forgetting_family_reads_its_shared_fields_per_method(tmp_path, recorded):
  """The `cf` fields each baseline's loss or streams use (`fields_unread`), and GS-LoRA++'s
  prototype term, which GS-LoRA has not."""
  config = load_config("gs_lora_casia100", "runlocal")
  names = ["gs_lora", "gs_lora_pp", "cf_ft", "cf_ewc", "cf_lwf", "cf_scrub"]
  compare.run(config, str(tmp_path), names, [0],
              sweep={"cf.teacher": ["pretrained", "task_start"],
                     "gs_lora.prototype.bound": [18.0, 20.0]})
  counts = {name: sum(m == name for m, _, _ in recorded) for name in names}
  assert counts == {"gs_lora": 1, "gs_lora_pp": 2, "cf_ft": 1, "cf_ewc": 1, "cf_lwf": 2,
                    "cf_scrub": 2}
  assert methods.reads_field("cf_ewc", "cf.importance_data")
  assert not methods.reads_field("cf_lwf", "cf.importance_data")
  assert not methods.reads_field("cf_scrub", "cf.min_lr") and methods.reads_field("cf_ft",
                                                                                   "cf.min_lr")
  assert not methods.reads_field("gs_lora", "gs_lora.prototype")  # the whole sub-section
  assert methods.reads_field("gs_lora", "gs_lora.bound")
  # data.new is Knowledge Swapping's alone: the other families forget classes of data.old.
  assert methods.reads_field("lbf", "data.new.seed")
  for name in ("gs_lora", "cf_ft", "ug_clu", "clu_ft", "clu_retrain"):
    assert not methods.reads_field(name, "data.new") and methods.reads_field(name, "data.old")


def test_a_field_the_oracle_never_reads_shares_the_oracle(tmp_path, recorded):
  """The Retrain oracle trains by oracle.*, not by the learning stages' length: a sweep of
  learn.iterations retrains the methods, not the oracle they are measured against."""
  config = load_config("ug_clu_digits", "runlocal")
  compare.run(config, str(tmp_path), ["ug_clu"], [0], sweep={"learn.iterations": [6, 3]})
  assert len(recorded) == 2 and {cfg.oracle.workdir for _, _, cfg in recorded} == {
      str(tmp_path / "oracle" / "seed_0")}
