"""`python -m kswap_jax.compare`: a complete leaderboard, and a rerun after a kill redoes
nothing that finished."""

import json
import os
import re
import shutil

import pytest

from conftest import REPO, load_config, method_run
from kswap_jax import compare, methods
from kswap_jax.errors import ConfigError

pytestmark = pytest.mark.slow


def test_compare_writes_a_leaderboard_and_resumes_without_redoing(tmp_path_factory, tmp_path,
                                                                  monkeypatch):
  pretrained = method_run(tmp_path_factory, "demo", "runlocal,method=pretrain")[0]
  workdir = tmp_path / "cmp"
  shutil.copytree(pretrained, workdir / "pretrain" / "seed_0")  # the demo's seed is 0
  config = load_config("demo", "runlocal")
  real_run = methods.run

  def killed_in_laf(cfg, wd):
    if cfg.method == "laf":  # stopped after its first checkpoint, at step 4
      cfg.train.checkpoint_every_steps = cfg.debug.interrupt_at_step = 4
    return real_run(cfg, wd)
  monkeypatch.setattr(methods, "run", killed_in_laf)
  with pytest.raises(SystemExit):
    compare.run(config, str(workdir), ["lbf", "laf"], [0])
  monkeypatch.setattr(methods, "run", real_run)
  first = json.load(open(workdir / "compare_seconds.json"))
  assert first["laf/seed_0"]["attempts"] == 1 and first["laf/seed_0"]["seconds"] > 0
  assert not first["laf/seed_0"].get("running")  # the stopped attempt recorded its time
  lbf_results = workdir / "lbf" / "seed_0" / "results.json"
  stamp = os.path.getmtime(lbf_results)
  board = compare.run(load_config("demo", "runlocal"), str(workdir), ["lbf", "laf"], [0])
  assert os.path.getmtime(lbf_results) == stamp  # finished methods are not redone
  assert list(board["methods"]) == ["lbf", "laf"] and board["family"] == "knowledge_swap"
  for row in board["methods"].values():
    assert all(row[k]["n"] == 1 for k in board["headline"])
    assert row["num_trainable"] > 0 and row["seconds"]["mean"] > 0
  # laf resumed from its checkpoint: its seconds are both attempts' together.
  timings = json.load(open(workdir / "compare_seconds.json"))
  laf = board["methods"]["laf"]
  assert laf["attempts"] == 2 and board["methods"]["lbf"]["attempts"] == 1
  assert laf["seconds"]["mean"] == timings["laf/seed_0"]["seconds"]
  assert timings["laf/seed_0"]["seconds"] > first["laf/seed_0"]["seconds"]
  assert not any(row["seconds_incomplete"] for row in board["methods"].values())
  def strict(constant):
    raise AssertionError(f"leaderboard.json holds {constant}, which is not JSON")
  on_disk = json.load(open(workdir / "leaderboard.json"), parse_constant=strict)
  assert on_disk["methods"]["laf"]["acc_f"]["mean"] == board["methods"]["laf"]["acc_f"]["mean"]
  table = open(workdir / "leaderboard.md").read()
  assert "| lbf |" in table and "| laf |" in table and "Acc_f" in table
  assert "all its attempts together" in table and "killed outright" not in table
  assert os.path.getsize(workdir / "leaderboard.png") > 0


def test_a_shared_pretrained_model_of_another_config_is_refused(tmp_path_factory, tmp_path):
  """A pretrained model (compare shares one per seed) is reused only by a config that
  pretrains the same way; it used to be reused whatever pretrain.* said."""
  pretrained = method_run(tmp_path_factory, "demo", "runlocal,method=pretrain")[0]
  config = load_config("demo", "runlocal")
  config.init.pretrain_workdir = pretrained
  epochs = config.pretrain.epochs
  config.pretrain.epochs = epochs + 1
  with pytest.raises(ConfigError, match=rf"^init\.pretrain_workdir {re.escape(pretrained)}: "
                                        rf".*\(pretrain\.epochs: was {epochs}, now {epochs + 1}\)"):
    methods.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_compare_command_rejects_bad_lists(tmp_path):
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  proc = subprocess.run([sys.executable, "-m", "kswap_jax.compare",
                         "--config=configs/demo.py:runlocal", f"--workdir={tmp_path}",
                         "--seeds=0, 1.5"], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode == 2 and proc.stderr.startswith(
      "error: --seeds: '1.5' is not an int"), proc.stderr
  assert not os.listdir(tmp_path)
  assert compare._split_list(["--methods= lbf, laf,"], "methods") == ([], ["lbf", "laf"])
  config = load_config("demo", "runlocal")
  config.seed = -1  # the config's seed, not a --seeds entry, is named
  with pytest.raises(ConfigError, match=r"^seed: expected ints >= 0, got -1$"):
    compare.run(config, str(tmp_path / "cmp"))
  with pytest.raises(ConfigError, match=r"^--seeds: expected ints >= 0, got -2$"):
    compare.run(load_config("demo", "runlocal"), str(tmp_path / "cmp"), seeds=[0, -2])


def test_compare_refuses_a_method_of_another_family(tmp_path, monkeypatch):
  """The demo sets up Knowledge Swapping; GS-LoRA is refused by name before anything runs
  (it used to fail on the head size after a pretraining run)."""
  monkeypatch.setattr(methods, "run", lambda *a: pytest.fail("a method ran"))
  with pytest.raises(ConfigError, match=r"--methods: 'gs_lora' is not a knowledge_swap method"):
    compare.run(load_config("demo", "runlocal"), str(tmp_path / "cmp"), ["lbf", "gs_lora"])
  with pytest.raises(ConfigError, match=r"--methods: unknown method 'lbff'"):
    compare.run(load_config("demo", "runlocal"), str(tmp_path / "cmp"), ["lbf", "lbff"])
  # The config's own method must be one the file sets up (`--config.method=gs_lora`).
  config = load_config("demo", "runlocal")
  config.method = "gs_lora"
  with pytest.raises(ConfigError, match=r"method: 'gs_lora' needs config fields .*tasks"):
    compare.run(config, str(tmp_path / "cmp"))
  assert not os.listdir(tmp_path)


def test_compare_refuses_finished_runs_of_another_config_and_repeated_seeds(tmp_path,
                                                                             monkeypatch):
  """A rerun with a changed field names it instead of printing the old runs' leaderboard,
  before any other method trains."""
  workdir = tmp_path / "cmp"
  config = load_config("demo", "runlocal")
  sub = workdir / "lbf" / "seed_0"
  sub.mkdir(parents=True)
  # A finished run as compare left it (its results envelope records its config).
  from kswap_jax import train  # pylint: disable=import-outside-toplevel
  finished = compare._config_for(config, "lbf", 0, str(workdir))
  train.write_json(str(sub / "results.json"), {"config": finished.to_dict(), "final": {}})
  monkeypatch.setattr(methods, "run", lambda *a: pytest.fail("a method ran"))
  compare.run(config, str(workdir), ["lbf"])   # the same config: reused, nothing runs
  config.ks.beta = 0.3
  with pytest.raises(ConfigError, match=r"lbf/seed_0 finished with a different config "
                                        r"\(ks.beta: was 0.2, now 0.3\)"):
    compare.run(config, str(workdir), ["laf", "lbf"])   # laf has not run yet
  with pytest.raises(ConfigError, match=r"--seeds: 0 given twice"):
    compare.run(config, str(tmp_path / "other"), ["lbf"], [0, 0])
  with pytest.raises(ConfigError, match=r"--workdir .*results.json: a file; expected a folder"):
    compare.run(config, str(sub / "results.json"), ["lbf"])


def test_compared_unlearning_methods_train_the_oracle_once(tmp_path, monkeypatch):
  """Two baselines on the UG-CLU stream: one Retrain oracle in <workdir>/oracle/seed_0."""
  from kswap_jax.methods import ug_clu  # pylint: disable=import-outside-toplevel
  trained, real_run = [], ug_clu.run

  def counting(cfg, wd):
    if cfg.method == "clu_retrain":
      trained.append(wd)
    return real_run(cfg, wd)
  monkeypatch.setattr(ug_clu, "run", counting)  # what a method calls to train its oracle
  board = compare.run(load_config("ug_clu_digits", "runlocal"), str(tmp_path),
                      ["clu_ft", "clu_salun"], [0])
  assert trained == [str(tmp_path / "oracle" / "seed_0")]
  assert not (tmp_path / "clu_ft" / "seed_0" / "oracle").exists()
  assert list(board["methods"]) == ["clu_ft", "clu_salun"] and board["family"] == "unlearning"
  for row in board["methods"].values():
    assert row["avg_gap"]["n"] == 1 and row["seconds"]["mean"] > 0
  # Every stage's values, each row's and the oracle's (leaderboard_stages.md).
  ft = json.load(open(tmp_path / "clu_ft" / "seed_0" / "results.json"))
  oracle = json.load(open(tmp_path / "oracle" / "seed_0" / "results.json"))
  assert [s["name"] for s in board["stages"]] == [s["name"] for s in ft["stages"]]
  for stage, mine, its in zip(board["stages"], ft["stages"], oracle["stages"]):
    assert stage["request"] == mine["request"]
    assert {k: v["mean"] for k, v in stage["methods"]["clu_ft"].items()} == \
        {k: mine[k] for k in board["headline"] if k in mine}
    if "oracle" in mine:  # the stages that unlearn: the oracle's own values there
      [shared] = stage["oracles"]
      assert shared["rows"] == ["clu_ft", "clu_salun"]
      assert {k: v["mean"] for k, v in shared["metrics"].items()} == \
          {k: its[k] for k in board["headline"] if k in its}
  assert any("oracles" in s for s in board["stages"])
  text = (tmp_path / "leaderboard_stages.md").read_text()
  assert f"## {ft['stages'][-1]['name']}: {ft['stages'][-1]['request']}" in text
  assert "| Retrain oracle |" in text

  # clu_retrain's run is that oracle: linked, not trained again, its row first as asked.
  board = compare.run(load_config("ug_clu_digits", "runlocal"), str(tmp_path),
                      ["clu_retrain", "clu_ft"], [0])
  assert trained == [str(tmp_path / "oracle" / "seed_0")]
  assert list(board["methods"]) == ["clu_retrain", "clu_ft"]
  rows = [list(s["methods"]) for s in board["stages"]]  # the oracle trains unlearning stages
  assert ["clu_retrain", "clu_ft"] in rows and all(
      r == [m for m in ("clu_retrain", "clu_ft") if m in r] for r in rows)
  linked = tmp_path / "clu_retrain" / "seed_0"
  assert os.path.samefile(linked / "results.json", tmp_path / "oracle" / "seed_0" /
                          "results.json")
  assert board["methods"]["clu_retrain"]["seconds"]["mean"] == oracle["wall_seconds"]
  assert board["methods"]["clu_retrain"]["ta"]["mean"] == oracle["final"]["ta"]
  # Asked first in a new comparison, it runs after the method that trains the oracle.
  board = compare.run(load_config("ug_clu_digits", "runlocal"), str(tmp_path / "new"),
                      ["clu_retrain", "clu_ft"], [0])
  assert trained[1:] == [str(tmp_path / "new" / "oracle" / "seed_0")]
  assert os.path.samefile(tmp_path / "new" / "clu_retrain" / "seed_0" / "metrics.jsonl",
                          tmp_path / "new" / "oracle" / "seed_0" / "metrics.jsonl")

  # That oracle is another stream's for a run with another seed: refused before training.
  other = load_config("ug_clu_digits", "runlocal,method=clu_ga")
  other.seed = 1
  other.oracle.workdir = str(tmp_path / "oracle" / "seed_0")
  with pytest.raises(ConfigError, match=r"oracle\.workdir .*seed_0: .*seed: was 0, now 1"):
    methods.run(other, str(tmp_path / "other"))
  assert not (tmp_path / "other" / "checkpoints").exists() or \
      not os.listdir(tmp_path / "other" / "checkpoints")


def test_report_on_a_compare_workdir_prints_the_leaderboard(tmp_path, capsys):
  from kswap_jax import report  # pylint: disable=import-outside-toplevel
  assert report.main([str(tmp_path)]) == 2
  assert "no results.json: no run's results here" in capsys.readouterr().err
  (tmp_path / "config.json").write_text("{}")  # a run that started and has not finished
  assert report.main([str(tmp_path)]) == 2
  assert "no results.json: the run has not finished: it is running, was stopped" in \
      capsys.readouterr().err
  for bad in ("[1, 2]", '{"method": "nosuch", "stages": []}'):
    (tmp_path / "results.json").write_text(bad)
    assert report.main([str(tmp_path)]) == 2
    assert "not a finished run's results envelope" in capsys.readouterr().err
  (tmp_path / "results.json").unlink()
  (tmp_path / "a_file").write_text("")
  assert report.main([str(tmp_path / "a_file")]) == 2
  assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'a_file'}: a file; expected")
  (tmp_path / "lbf" / "seed_0").mkdir(parents=True)
  assert report.main([str(tmp_path / "lbf")]) == 2
  assert "its runs are seed_0 (pass one of them)" in capsys.readouterr().err
  # A metric one method does not report (clu_retrain's gap to itself) is null, not NaN.
  row = {"ua": compare._summary([1.0, 3.0]), "avg_gap": compare._summary([float("nan")]),
         "num_trainable": 10, "seconds": compare._summary([2.0]), "seconds_resumed": False}
  assert row["avg_gap"] == {"mean": None, "std": None, "n": 0}
  board = {"family": "unlearning", "config_method": "sfr_on", "seeds": [0, 1],
           "headline": ["ua", "avg_gap"], "methods": {"clu_retrain": row}}
  (tmp_path / "leaderboard.json").write_text(json.dumps(board, allow_nan=False))
  assert report.main([str(tmp_path)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[2] == "| clu_retrain | 2.00 ± 1.41 | – | 10 | 2.00 |", out
  assert os.path.getsize(tmp_path / "leaderboard.png") > 0
  # The LaTeX table is written again too (a board of before it existed gets one).
  assert (r"clu\_retrain & 2.00 $\pm$ 1.41 & -- & 10 & 2.00 \\"
          in (tmp_path / "leaderboard.tex").read_text())
  (tmp_path / "leaderboard.tex").unlink()
  (tmp_path / "leaderboard.tex").mkdir()  # cannot be written: the table, then one line
  assert report.main([str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith(
      f"error: {tmp_path}: cannot write the leaderboard's tables and plots there (")


def test_the_latex_leaderboard_bolds_the_best_mean_by_each_metric_s_direction():
  s = compare._summary
  def row(acc_r, acc_f, gap, method):
    return {"acc_r": s(acc_r), "acc_f": s(acc_f), "ua": s([50.0]), "avg_gap": s(gap),
            "num_trainable": 1234567, "seconds": s([3.0]), "method": method,
            "values": {"ks.beta": 0.1}}
  board = {"family": "knowledge_swap", "seeds": [0, 1], "headline": ["acc_r", "acc_f", "ua",
                                                                     "avg_gap"],
           "sweep": {"ks.beta": [0.1]}, "methods": {
               "a": row([90.0, 92.0], [5.0, 3.0], [float("nan")], "cf_der_pp"),
               "b": row([91.0, 91.0], [1.0, 1.0], [2.0], "x&y")}}
  lines = compare.latex(board).splitlines()
  assert lines[0] == r"\begin{tabular}{llrrrrrr}" and lines[1] == r"\toprule"
  assert lines[2] == (r"Method & ks.beta & Acc\_r $\uparrow$ & Acc\_f $\downarrow$ & UA & "
                      r"Avg.Gap $\downarrow$ & Trainable & Seconds \\")
  # Acc_r: a tie at two decimals, both bold; Acc_f: the lower; UA has no direction; a
  # metric a row does not report is "--".
  assert lines[4] == (r"cf\_der\_pp & 0.1 & \textbf{91.00 $\pm$ 1.41} & 4.00 $\pm$ 1.41 & "
                      r"50.00 & -- & 1{,}234{,}567 & 3.00 \\")
  assert lines[5] == (r"x\&y & 0.1 & \textbf{91.00 $\pm$ 0.00} & \textbf{1.00 $\pm$ 0.00} & "
                      r"50.00 & \textbf{2.00} & 1{,}234{,}567 & 3.00 \\")
  assert lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
  assert compare._tex("a\\b_{c} ~^") == (r"a\textbackslash{}b\_\{c\} \textasciitilde{}"
                                           r"\textasciicircum{}")


def test_a_refused_run_leaves_no_empty_method_folder(tmp_path, monkeypatch):
  """methods.run removes the empty folders a refused run made under its own workdir; compare
  removes the method's folder above it."""
  def refused(cfg, wd):
    os.makedirs(os.path.join(wd, "checkpoints"))
    shutil.rmtree(wd)  # what methods.run's clean-up leaves
    raise ConfigError("oracle.workdir x: holds the oracle of another stream")
  monkeypatch.setattr(methods, "run", refused)
  with pytest.raises(ConfigError, match="^oracle.workdir"):
    compare.run(load_config("demo", "runlocal"), str(tmp_path / "cmp"), ["lbf", "laf"])
  assert os.listdir(tmp_path / "cmp") == []


def test_an_attempt_killed_outright_marks_the_seconds_incomplete(tmp_path):
  """Attempts that end in Python add their time; one that never returns (a SIGKILL) leaves
  its "running" mark, so the next attempt records the seconds as incomplete. An attempt
  that resumes nothing (its run's folder was deleted) starts a new entry."""
  with pytest.raises(KeyboardInterrupt):
    with compare._attempt_timed(str(tmp_path), "lbf", 0, resumes=False):
      raise KeyboardInterrupt  # Ctrl-C: recorded
  entry = compare._timing(str(tmp_path), "lbf", 0)
  assert entry["attempts"] == 1 and entry["seconds"] >= 0 and not entry["incomplete"]
  killed = compare._attempt_timed(str(tmp_path), "lbf", 0, resumes=True)
  killed.__enter__()  # and the process dies inside the block
  assert compare._timing(str(tmp_path), "lbf", 0)["incomplete"]
  with compare._attempt_timed(str(tmp_path), "lbf", 0, resumes=True):
    pass
  entry = compare._timing(str(tmp_path), "lbf", 0)
  assert entry["attempts"] == 3 and entry["incomplete"]
  row = {"ua": compare._summary([1.0]), "num_trainable": 10,
         "seconds": compare._summary([entry["seconds"]]), "attempts": 3,
         "seconds_incomplete": True}
  table = compare.markdown({"family": "unlearning", "seeds": [0], "headline": ["ua"],
                            "methods": {"lbf": row}})
  assert "| 1.00 | 10 | " in table and table.splitlines()[2].endswith("* |")
  assert "killed outright" in table
  with compare._attempt_timed(str(tmp_path), "lbf", 0, resumes=False):  # a new run
    pass
  assert compare._timing(str(tmp_path), "lbf", 0)["attempts"] == 1
  assert not compare._timing(str(tmp_path), "lbf", 0)["incomplete"]


def test_a_resumed_attempt_refused_before_it_checkpoints_leaves_the_entry_as_it_was(tmp_path):
  """An attempt that resumes a run's checkpoint and is refused at once (e.g. its config
  changed) adds no attempt and no seconds; one refused after a checkpoint of its own does."""
  ckpts = tmp_path / "lbf" / "seed_0" / "checkpoints"
  (ckpts / "4").mkdir(parents=True)  # an earlier attempt's checkpoint
  with compare._attempt_timed(str(tmp_path), "lbf", 0, resumes=True):
    pass
  before = json.loads((tmp_path / "compare_seconds.json").read_text())
  with pytest.raises(ConfigError):
    with compare._attempt_timed(str(tmp_path), "lbf", 0, resumes=True):
      raise ConfigError("--workdir: holds a run with a different config")
  assert json.loads((tmp_path / "compare_seconds.json").read_text()) == before
  with pytest.raises(ConfigError):
    with compare._attempt_timed(str(tmp_path), "lbf", 0, resumes=True):
      (ckpts / "8").mkdir()  # it trained on and saved, then was refused
      raise ConfigError("oracle.workdir: holds the oracle of another stream")
  after = json.loads((tmp_path / "compare_seconds.json").read_text())["lbf/seed_0"]
  assert after["attempts"] == before["lbf/seed_0"]["attempts"] + 1


def test_the_stage_board_keeps_each_sweep_point_s_oracle_and_request():
  """Two rows of a sweep whose points trained their own oracles, one row sharing the first
  point's: one oracle row per oracle, named by the rows it serves; a stage is keyed by its
  request too; mean ± sample std over seeds; a stage that is not a dict is skipped."""
  def results(ua, oracle_ua, folder, request="forget:class:1"):
    return {"oracle_workdir": folder, "stages": [
        "not a stage",
        {"name": "1_learn", "request": "learn:1", "ra": 99.0, "ta": 98.0},
        {"name": "2_forget", "request": request, "ua": ua, "ra": 97.0,
         "oracle": {"ua": oracle_ua, "ra": 100.0}}]}
  headline = ("ua", "ra", "ta")
  by_stage = {}
  compare._collect_stages(by_stage, "ug_clu, x=1", [0, 1],
                          [results(10.0, 50.0, "o/x=1/seed_0"),
                           results(20.0, 60.0, "o/x=1/seed_1")], headline)
  compare._collect_stages(by_stage, "clu_ft", [0, 1],
                          [results(1.0, 50.0, "o/x=1/seed_0"), results(3.0, 60.0, "o/x=1/seed_1")],
                          headline)
  compare._collect_stages(by_stage, "ug_clu, x=2", [0, 1],
                          [results(5.0, 70.0, "o/x=2/seed_0", "forget:class:2"),
                           results(7.0, 90.0, "o/x=2/seed_1", "forget:class:2")], headline)
  stages = compare._stages(by_stage)
  assert [(s["name"], s.get("request")) for s in stages] == [
      ("1_learn", "learn:1"), ("2_forget", "forget:class:1"), ("2_forget", "forget:class:2")]
  first = stages[1]
  assert first["methods"]["ug_clu, x=1"]["ua"] == {"mean": 15.0, "std": 50 ** 0.5, "n": 2}
  assert [o["rows"] for o in first["oracles"]] == [["ug_clu, x=1", "clu_ft"]]
  assert first["oracles"][0]["metrics"]["ua"]["mean"] == 55.0
  assert stages[2]["oracles"][0]["metrics"]["ua"]["mean"] == 80.0
  board = {"family": "unlearning", "seeds": [0, 1], "headline": list(headline),
           "stages": stages}
  text = compare.stages_markdown(board)
  assert "## 2_forget: forget:class:1" in text and "## 2_forget: forget:class:2" in text
  assert "| Retrain oracle | 55.00 ± 7.07 | 100.00 ± 0.00 |" in text
  # Two oracles at one stage: a row each, named by the rows they serve.
  stage = dict(first, oracles=first["oracles"] + stages[2]["oracles"])
  stage["oracles"][1] = dict(stage["oracles"][1], rows=["ug_clu, x=2"])
  text = compare.stages_markdown(dict(board, stages=[stage]))
  assert "| Retrain oracle (ug_clu, x=1, clu_ft) | 55.00 ± 7.07 |" in text
  assert "| Retrain oracle (ug_clu, x=2) | 80.00 ± 14.14 |" in text


def test_the_markdown_board_names_its_spread_and_report_orders_the_columns(tmp_path):
  """With several seeds the board says its ± is the sample standard deviation; `report`
  with several runs puts the seed first, then the fields every run has."""
  from kswap_jax import report  # pylint: disable=import-outside-toplevel
  board = {"family": "unlearning", "seeds": [0, 1], "headline": ["ua"],
           "methods": {"a": {"ua": compare._summary([1.0, 3.0]), "num_trainable": 1,
                             "seconds": compare._summary([1.0, 1.0])}}}
  assert "mean ± sample standard deviation over the seeds (n − 1)" in compare.markdown(board)
  assert "sample standard" not in compare.markdown(dict(board, seeds=[0]))
  runs = [(str(tmp_path / name), {"method": method, "final": {"ua": 1.0}, "config": config})
          for name, method, config in (
              ("r0", "clu_ft", {"method": "clu_ft", "seed": 0, "learn": {"lr": 0.1},
                                "ft": {"lr": 0.1}}),
              ("r1", "clu_ga", {"method": "clu_ga", "seed": 1, "learn": {"lr": 0.2},
                                "ga": {"lr": 0.2}}))]
  header = report.runs_table(runs).splitlines()[0]
  assert header.split(" | ")[2:5] == ["seed", "learn.lr", "ft.lr"], header
