"""`python -m kswap_jax.report RUN1 RUN2 ...`: finished runs side by side, with the config
fields that differ (a run's own tables are tested with its method)."""

import json
import os
import subprocess
import sys

import pytest

from kswap_jax import report


def _finished(folder, beta, seed, acc_r, method="lbf"):
  """A finished run's results envelope (as written by `train.Run.write_results`)."""
  folder.mkdir()
  config = {"method": method, "seed": seed, "ks": {"beta": beta, "bound": 105.0},
            "init": {"pretrain_workdir": str(folder / "pretrain")}}  # each run's own
  results = {"method": method, "config": config, "stages": [{"name": "forget"}],
             "final": {"acc_r": acc_r, "acc_f": 0.0, "h_mean": 90.0}, "wall_seconds": 12.5}
  (folder / "results.json").write_text(json.dumps(results))
  return str(folder)


def test_several_runs_are_one_table_with_the_fields_that_differ(tmp_path, capsys):
  a = _finished(tmp_path / "beta_0.2", 0.2, 0, 95.5)
  b = _finished(tmp_path / "beta_0.3", 0.3, 0, 91.25)
  assert report.main([a, b]) == 0
  lines = capsys.readouterr().out.splitlines()
  # ks.beta differs; seed, ks.bound and the runs' own pretraining folders do not.
  assert lines[0] == "| run | method | ks.beta | Acc_r ↑ | Acc_f ↓ | H-Mean ↑ | seconds |"
  assert lines[2] == f"| {a} | lbf | 0.2 | 95.50 | 0.00 | 90.00 | 12.50 |"
  assert lines[3] == f"| {b} | lbf | 0.3 | 91.25 | 0.00 | 90.00 | 12.50 |"
  assert len(lines) == 4
  assert report.main([a, a]) == 0
  assert capsys.readouterr().out.endswith("the runs' configs are the same\n")
  # A section lbf does not read (another family member's, which a config file built on
  # methods.family_config records) is no difference between two lbf runs.
  record = json.loads((tmp_path / "beta_0.3" / "results.json").read_text())
  record["config"]["gs_lora"] = {"beta": 0.5}
  (tmp_path / "beta_0.3" / "results.json").write_text(json.dumps(record))
  assert report.main([a, b]) == 0
  assert "gs_lora" not in capsys.readouterr().out
  c = _finished(tmp_path / "laf", 0.2, 0, 90.0, method="laf")  # the method: one column
  assert report.main([a, c]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[0] == "| run | method | Acc_r ↑ | Acc_f ↓ | H-Mean ↑ | seconds |"
  assert f"| {c} | laf | 90.00 |" in out
  assert out.endswith("the runs' configs differ in their method only\n")
  png = tmp_path / "runs.png"
  assert report.main([a, b, "--plot", str(png)]) == 0
  assert png.stat().st_size > 0 and capsys.readouterr().out.endswith(f"plot written to {png}\n")
  with pytest.raises(SystemExit) as stop:  # a single run's plots are in its workdir
    report.main([a, "--plot", str(png)])
  assert stop.value.code == 2 and "--plot: needs two or more workdirs" in capsys.readouterr().err


def test_many_differing_fields_are_listed_below_the_table():
  runs = [(f"r{i}", {"method": "lbf", "final": {"acc_r": 1.0},
                     "config": {f"f{j}": i * j for j in range(9)}}) for i in range(2)]
  text = report.runs_table(runs)
  assert text.splitlines()[0].count("| f") == report.MAX_FIELD_COLUMNS
  assert text.endswith("also differ: f7, f8")  # f0 is 0 in both runs


def test_an_unfinished_run_among_several_is_one_line_and_exit_2(tmp_path, capsys):
  a = _finished(tmp_path / "a", 0.2, 0, 95.5)
  (tmp_path / "running").mkdir()
  assert report.main([a, str(tmp_path / "running")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {tmp_path / 'running'}: no results.json") and err.count("\n") == 1
  (tmp_path / "a.log").write_text("")  # what a glob over run folders may also match
  assert report.main([a, str(tmp_path / "a.log")]) == 2
  assert capsys.readouterr().err == (f"error: {tmp_path / 'a.log'}: a file; expected a run's "
                                     f"workdir (it holds results.json)\n")
  (tmp_path / "board").mkdir()  # a compare workdir: a leaderboard, no results
  (tmp_path / "board" / "leaderboard.json").write_text("{}")
  assert report.main([a, str(tmp_path / "board")]) == 2
  assert "a `python -m kswap_jax.compare` workdir" in capsys.readouterr().err
  (tmp_path / "running" / "results.json").write_text("[1, 2]")
  assert report.main([a, str(tmp_path / "running")]) == 2
  assert "not a finished run's results envelope" in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
  """`python -m kswap_jax.report RUN1 RUN2 | head`: no BrokenPipeError traceback."""
  runs = [_finished(tmp_path / f"r{i}", 0.1 * i, 0, 90.0) for i in range(2)]
  for args in (["kswap_jax.report", *runs], ["kswap_jax.config", "lbf"]):
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    proc.stdout.close()  # the reader is gone before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_runs_in_a_plot_are_named_by_the_shortest_path_ends_that_tell_them_apart():
  assert report._short_names(["w/beta_0.2", "w/beta_0.3"]) == ["beta_0.2", "beta_0.3"]
  assert report._short_names(["a/x/run", "b/x/run/"]) == ["a/x/run", "b/x/run"]
  assert report._short_names(["run", "run"]) == ["run", "run"]  # the same path twice


def test_a_negative_h_mean_is_explained_below_the_stage_table():
  results = {"method": "lbf", "stages": [{"name": "forget", "acc_f": 30.0, "h_mean": -9.0}],
             "final": {"acc_f": 30.0, "h_mean": -9.0}}
  lines = report.stage_table(results).splitlines()
  assert lines[-1].startswith("H-Mean < 0: the forget accuracy rose")
  results["final"]["h_mean"] = results["stages"][0]["h_mean"] = 9.0
  assert "H-Mean < 0" not in report.stage_table(results)
