"""The train step and stage loop: hparams routing, checkpoint cadence, NaN stops a run (the
multi-device checks are in test_devices.py)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kswap_jax import checkpoint, methods, train
from kswap_jax.errors import NonFiniteLossError, StopRequested



class _Stream:
  """A minimal stream: constant batches, 3 steps per epoch."""
  steps_per_epoch = 3
  batch_size = 2

  def __init__(self, value):
    self.value = value

  def iterate(self, start=0):
    while True:
      yield {"x": np.full((2,), self.value, np.float32)}


def _run(tmp_path, value, **train_cfg):
  config = ml_collections.ConfigDict(dict(
      train=dict(log_every_steps=1, checkpoint_every_steps=2, max_checkpoints_to_keep=2,
                 **train_cfg), debug=dict(interrupt_at_step=0)))
  mesh = train.make_mesh(jax.devices()[:1])
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)

  def loss_fn(params, frozen, batch, rng):
    return jnp.sum(params["w"] * jnp.mean(batch["d"]["x"])), {}
  stage = train.Stage(name="toy", step_fn=train.make_train_step(loss_fn, tx, mesh),
                      streams={"d": _Stream(value)}, epoch_stream="d", epochs=2,
                      hparams_fn=lambda e, _: {"learning_rate": 0.1 / (e + 1)})
  run = train.Run(str(tmp_path), config)
  state = run.restore(train.replicate(train.create_state({"w": jnp.ones(3)}, tx, 0), mesh))
  return run, stage, state, mesh


def test_stage_loop_logs_schedules_and_checkpoints(tmp_path):
  run, stage, state, mesh = _run(tmp_path, 1.0)
  state, _ = run.run_stage(0, stage, state, {}, mesh)
  run.close()
  # 6 steps: lr 0.1 for epoch 1, 0.05 for epoch 2; d loss / d w = 1.
  np.testing.assert_allclose(state.params["w"], 1 - 3 * 0.1 - 3 * 0.05, rtol=1e-6)
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
  assert [x["learning_rate"] for x in lines] == [0.1] * 3 + [0.05] * 3
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # every 2, not at 6
  assert json.load(open(tmp_path / "config.json"))["train"]["checkpoint_every_steps"] == 2


def test_non_finite_loss_stops_with_stage_and_step(tmp_path):
  run, stage, state, mesh = _run(tmp_path, float("nan"))
  with pytest.raises(NonFiniteLossError, match=r"stage 'toy', step 1 \(epoch 1"):
    run.run_stage(0, stage, state, {}, mesh)
  run.close()
  assert not os.path.exists(tmp_path / "checkpoints" / "1")


def test_step_carries_mutable_model_state_and_passes_update_kwargs():
  """The hooks GS-LoRA/UG-CLU need: BatchNorm-like state and a static optimizer phase."""
  mesh = train.make_mesh(jax.devices()[:1])
  seen = []

  def phased(scale_by):
    def init(params):
      return optax.EmptyState()

    def update(updates, state, params=None, *, phase):
      seen.append(phase)  # traced once per compiled phase
      return jax.tree_util.tree_map(lambda g: -scale_by[phase] * g, updates), state
    return optax.GradientTransformationExtraArgs(init, update)

  tx = phased({"fast": 1.0, "slow": 0.1})

  def loss_fn(params, frozen, batch, rng, model_state):
    x = batch["d"]["x"]
    new_state = {"count": model_state["count"] + 1, "mean": jnp.mean(x)}
    return jnp.sum(params["w"]) * jnp.mean(x), ({}, new_state)

  steps = {p: train.make_train_step(loss_fn, tx, mesh, mutable=True, update_kwargs={"phase": p})
           for p in ("fast", "slow")}
  state = train.replicate(train.create_state(
      {"w": jnp.ones(2)}, tx, 0, model_state={"count": jnp.zeros((), jnp.int32),
                                              "mean": jnp.zeros(())}), mesh)
  batch = train.to_global({"d": {"x": np.full((2,), 2.0, np.float32)}}, mesh)
  state, _ = steps["fast"](state, {}, batch, {})
  state, _ = steps["slow"](state, {}, batch, {})
  np.testing.assert_allclose(state.params["w"], 1 - 2.0 - 0.2, rtol=1e-6)
  assert int(state.model_state["count"]) == 2 and float(state.model_state["mean"]) == 2.0
  assert sorted(set(seen)) == ["fast", "slow"]


class _Counter:
  """A cycled stream whose batch i holds the value i (to see which batches were consumed)."""
  steps_per_epoch = 1
  batch_size = 2

  def iterate(self, start=0):
    i = start
    while True:
      yield {"x": np.full((2,), float(i), np.float32)}
      i += 1


def test_plan_runs_fast_every_n_iterations_and_resumes_each_stream(tmp_path):
  """UG-CLU's shape: FAST (forget batch) every 3rd iteration, SLOW (remain batch) always."""
  mesh = train.make_mesh(jax.devices()[:1])
  tx = optax.sgd(1.0)

  def loss_fn(params, frozen, batch, rng):
    (key,) = batch
    return jnp.sum(params[key] * jnp.mean(batch[key]["x"])), {}
  step = train.make_train_step(loss_fn, tx, mesh)

  def make(interrupt):
    config = ml_collections.ConfigDict(dict(
        train=dict(log_every_steps=1, checkpoint_every_steps=1, max_checkpoints_to_keep=2),
        debug=dict(interrupt_at_step=interrupt)))
    run = train.Run(str(tmp_path), config)
    stage = train.Stage(
        name="clu", step_fn=None, streams={"forget": _Counter(), "remain": _Counter()},
        iterations=7, plan=lambda t: ([("fast", step, ("forget",))] if t % 3 == 0 else [])
        + [("slow", step, ("remain",))])
    state = run.restore(train.replicate(train.create_state(
        {"forget": jnp.zeros(()), "remain": jnp.zeros(())}, tx, 0), mesh))
    return run, stage, state

  run, stage, state = make(interrupt=5)  # killed after iteration 3 (steps: F S S S F S)
  with pytest.raises(SystemExit):
    run.run_stage(0, stage, state, {}, mesh)
  run.close()
  run, stage, state = make(interrupt=0)
  state, _ = run.run_stage(0, stage, state, {}, mesh)
  run.close()
  # FAST at t = 0, 3, 6 took forget batches 0, 1, 2; SLOW took remain batches 0..6.
  assert float(state.params["forget"]) == -(0 + 1 + 2)
  assert float(state.params["remain"]) == -sum(range(7))
  assert int(state.step) == 10
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert [x["step"] for x in lines] == [2, 3, 4, 6, 7, 8, 10]
  assert "fast/loss" in lines[0] and "fast/loss" not in lines[1] and "slow/loss" in lines[1]


@pytest.mark.parametrize("log_first, logged", [(False, [2, 5, 6]), (True, [0, 3, 6])])
def test_log_first_puts_the_fast_step_in_every_logged_row(tmp_path, log_first, logged):
  """Logging every 3rd iteration with FAST on iterations 0 mod 3: iterations 2, 5 hold no
  FAST step; with `log_first` (UG-CLU's unlearning stages) iterations 0, 3 do."""
  mesh = train.make_mesh(jax.devices()[:1])
  tx = optax.sgd(1.0)
  step = train.make_train_step(
      lambda params, frozen, batch, rng: (jnp.sum(params * jnp.mean(
          next(iter(batch.values()))["x"])), {}), tx, mesh)
  run = _toy_run(tmp_path, log_every_steps=3)
  stage = train.Stage(
      name="clu", step_fn=None, streams={"forget": _Counter(), "remain": _Counter()},
      iterations=7, log_first=log_first,
      plan=lambda t: ([("fast", step, ("forget",))] if t % 3 == 0 else [])
      + [("slow", step, ("remain",))])
  run.run_stage(0, stage, train.replicate(train.create_state(jnp.zeros(()), tx, 0), mesh),
                {}, mesh)
  run.close()
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  # Steps: iteration t ends at step t + 1 + (FAST steps in 0..t).
  assert [x["step"] for x in lines] == [t + 1 + t // 3 + 1 for t in logged]
  assert ["fast/loss" in x for x in lines] == [t % 3 == 0 for t in logged]


def _evaluating_run(workdir, stop_in_step=0, stop_in_eval=0, calls=None):
  """The toy stage (6 steps, evaluated every 2) with a stop request set during its
  `stop_in_step`-th training step or its `stop_in_eval`-th evaluation; returns the
  stage's evaluations and the number of evaluations made (also counted in `calls`)."""
  run, stage, state, mesh = _run(workdir, 1.0)
  calls = {"step": 0, "eval": 0} if calls is None else calls

  def step_fn(*args):
    calls["step"] += 1
    if calls["step"] == stop_in_step:
      checkpoint.STOP.set()
    return inner(*args)

  def eval_fn(state, frozen):
    calls["eval"] += 1
    if calls["eval"] == stop_in_eval:
      checkpoint.STOP.set()
    return {"w": float(state.params["w"][0])}
  inner, stage.step_fn = stage.step_fn, step_fn
  try:
    run.run_stage(0, stage, state, {}, mesh, eval_fn=eval_fn, eval_every=2)
  finally:
    run.close()
    checkpoint.STOP.clear()
  return run.meta["evals"]["toy"], calls["eval"]


@pytest.mark.parametrize("where", ["step", "eval"])
def test_a_stop_request_is_honoured_before_or_right_after_an_evaluation(tmp_path, where):
  """Stopped during the step an evaluation is due after, the run saves without evaluating
  and the resumed run evaluates the restored state first; stopped during an evaluation, it
  saves right after it. Either way the records equal an uninterrupted run's."""
  whole, n_whole = _evaluating_run(tmp_path / "whole")
  assert [e["step"] for e in whole] == [2, 4, 6] and n_whole == 3
  stop = {"stop_in_step": 4} if where == "step" else {"stop_in_eval": 1}
  calls = {"step": 0, "eval": 0}
  with pytest.raises(StopRequested, match="runs when it resumes" if where == "step" else
                     r"step 2 .*written$"):
    _evaluating_run(tmp_path / "cut", calls=calls, **stop)
  assert calls == ({"step": 4, "eval": 1} if where == "step" else {"step": 2, "eval": 1})
  resumed, n_resumed = _evaluating_run(tmp_path / "cut")
  assert resumed == whole
  # Evaluations in the resumed run: the pending one at step 4 and the one at 6 / 4 and 6.
  assert n_resumed == 2
  lines = lambda w: [json.loads(x) for x in open(tmp_path / w / "metrics.jsonl")]
  assert lines("cut") == lines("whole")


def test_a_stop_request_during_a_stage_end_evaluation_is_honoured_at_its_checkpoint(tmp_path):
  """A request that arrives after a stage's last step (while the method evaluates the
  stage) stops the run once the stage's checkpoint is written, not after the next stage's
  set-up; the rerun finds the stage finished."""
  run, stage, state, mesh = _run(tmp_path, 1.0)
  state, _ = run.run_stage(0, stage, state, {}, mesh)
  checkpoint.STOP.set()  # as during the stage-end evaluation
  try:
    with pytest.raises(StopRequested, match=r"^\[toy\] stopped after the stage on a stop "
                       r"request; its checkpoint is written"):
      run.finish_stage(state, "toy", {"acc": 1.0})
    assert not checkpoint.STOP.is_set()  # honoured: a later run in this process goes on
  finally:
    run.close()
    checkpoint.STOP.clear()
  again, _, restored, _ = _run(tmp_path, 1.0)
  again.close()
  assert again.meta["stage_index"] == 1 and again.meta["results"] == {"toy": {"acc": 1.0}}
  np.testing.assert_array_equal(restored.params["w"], state.params["w"])


def _toy_run(tmp_path, **train_cfg):
  config = ml_collections.ConfigDict(dict(
      train=dict(dict(log_every_steps=1, checkpoint_every_steps=0, max_checkpoints_to_keep=2),
                 **train_cfg), debug=dict(interrupt_at_step=0)))
  return train.Run(str(tmp_path), config)


def test_checkpoint_records_the_meta_of_its_save_not_later_updates(tmp_path):
  """orbax serialises JSON in the background: meta must be snapshotted at `save`."""
  mesh = train.make_mesh(jax.devices()[:1])
  tx = optax.sgd(0.1)
  state = train.replicate(train.create_state({"w": jnp.ones(3)}, tx, 0), mesh)
  run = _toy_run(tmp_path)
  for i in range(1, 9):
    run.meta.update(stage_step=i, streams={"retain": i})
    run.save(state, step=i)
    for j in range(2000):  # the loop keeps advancing while orbax writes
      run.meta["stage_step"] += 1
      run.meta["streams"]["retain"] = j
    run.checkpointer.wait()
    _, meta = run.checkpointer.restore_latest(jax.eval_shape(lambda: state))
    assert (meta["stage_step"], meta["streams"]) == (i, {"retain": i})
  run.close()


def test_carry_is_checkpointed_and_passed_through_the_step(tmp_path):
  mesh = train.make_mesh(jax.devices()[:1])
  tx = optax.sgd(0.1)

  def loss_fn(params, frozen, batch, rng):
    return jnp.sum(params["w"]) * jnp.mean(batch["d"]["x"]), {}
  carry = {"tasks": jnp.arange(6.0).reshape(2, 3)}
  state = train.replicate(train.create_state({"w": jnp.ones(3)}, tx, 0, carry=carry), mesh)
  step = train.make_train_step(loss_fn, tx, mesh)
  state, _ = step(state, {}, train.to_global({"d": {"x": np.ones((2,), np.float32)}}, mesh), {})
  np.testing.assert_array_equal(state.carry["tasks"], carry["tasks"])
  run = _toy_run(tmp_path)
  run.save(state)
  run.close()
  fresh = train.replicate(train.create_state({"w": jnp.ones(3)}, tx, 0,
                                             carry={"tasks": jnp.zeros((2, 3))}), mesh)
  restored = _toy_run(tmp_path).restore(fresh)
  np.testing.assert_array_equal(restored.carry["tasks"], carry["tasks"])
  np.testing.assert_allclose(restored.params["w"], 0.9)


def test_injected_learning_rate_is_found_inside_a_wrapping_transform():
  """A transform around `inject_hyperparams` (UG-CLU's fast-slow) still gets the host LR."""
  mesh = train.make_mesh(jax.devices()[:1])
  tx = optax.chain(optax.identity(), optax.inject_hyperparams(optax.sgd)(learning_rate=1.0))

  def loss_fn(params, frozen, batch, rng, hparams):
    return hparams["weight"] * jnp.sum(params["w"]), {}
  state = train.replicate(train.create_state({"w": jnp.zeros(2)}, tx, 0), mesh)
  step = train.make_train_step(loss_fn, tx, mesh)
  batch = train.to_global({"d": {"x": np.ones((2,), np.float32)}}, mesh)
  state, m = step(state, {}, batch, {"learning_rate": 0.25, "weight": 2.0})
  np.testing.assert_allclose(state.params["w"], -0.5)  # lr 0.25 x gradient 2 (the loss weight)
  assert float(m["loss"]) == 0.0


@pytest.mark.parametrize("bound", [0.5, 50.0])  # the bounded term active, then inactive
def test_in_passes_gives_the_loss_and_gradients_of_the_whole_loss(bound):
  """Pass by pass, ∇L = Σ ∂combine/∂v_i ∇f_i: the loss and gradients of autodiff of L."""
  from kswap_jax import losses  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (2, 6, 5))
  params = {"w": jax.random.normal(jax.random.key(1), (5, 3)), "v": jnp.arange(3.0)}

  def ce(i):
    def f(p, frozen, batch, rng):
      logits = jnp.tanh(batch[i] @ p["w"]) * frozen + p["v"]
      noise = jax.random.normal(jax.random.split(rng)[i], logits.shape)  # its own key
      return jnp.mean(jax.nn.logsumexp(logits + 0.1 * noise, -1) - logits[..., 0])
    return f

  penalty = lambda p, frozen, batch, rng: jnp.sum(p["w"] ** 2)

  def combine(ce_f, ce_r, omega):
    return ce_r + 2.0 * losses.bounded_forgetting(ce_f, bound) + 0.3 * omega, {"ce_f": ce_f}

  loss_fn = train.in_passes([ce(0), ce(1), penalty], combine)
  args = (params, 1.5, {0: x[0], 1: x[1]}, jax.random.key(2))
  (loss, aux), grads = jax.jit(loss_fn.value_and_grad)(*args)
  (want, want_aux), want_grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(*args)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(aux["ce_f"], want_aux["ce_f"], rtol=1e-6)
  for k in params:
    np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-5, atol=1e-7)
  active = float(aux["ce_f"]) < bound
  assert active == (bound == 50.0)  # both branches of the bound are exercised


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_to_one_process_sets_a_stop_request_and_the_handlers_come_back(name):
  """`train.stop_on_signals` in a single process: SIGTERM or Ctrl-C sets `checkpoint.STOP`
  (the loop then saves and stops) instead of killing; a second Ctrl-C raises at once;
  `restore_signals` puts the previous handlers back and clears the request, so later runs
  in this process are not stopped by it."""
  import signal  # pylint: disable=import-outside-toplevel
  from kswap_jax import checkpoint  # pylint: disable=import-outside-toplevel
  signum = getattr(signal, name)
  before = signal.getsignal(signum)
  try:
    assert train.stop_on_signals() == "process"
    assert signal.getsignal(signum) is not before  # else the kill below ends pytest
    assert not checkpoint.Checkpointer.stop_requested()
    signal.raise_signal(signum)  # to this thread: handled before the next line
    assert checkpoint.Checkpointer.stop_requested()
    if name == "SIGINT":
      with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signum)  # to this thread: handled before the next line
        for _ in range(1000):  # the Python handler runs between bytecodes
          pass
  finally:
    train.restore_signals()
  assert signal.getsignal(signum) is before
  assert not checkpoint.Checkpointer.stop_requested()
  train.request_stop()  # the functional route to the same request
  assert checkpoint.Checkpointer.stop_requested()
  checkpoint.STOP.clear()


def test_a_record_written_before_a_field_was_added_still_matches_its_old_behaviour():
  config = methods.default_config("lbf")
  record = json.loads(config.to_json_best_effort())
  del record["data"]["resample"]  # a workdir recorded before data.resample existed
  assert train.config_difference(record, config) == ""
  config.data.resample = "bicubic"
  assert train.config_difference(record, config) == (
      "data.resample: was 'bilinear', now 'bicubic'")
  del record["ks"]["aux_batches"]  # a field whose addition changed the behaviour
  config.data.resample = "bilinear"
  assert train.config_difference(record, config) == (
      "field ks.aux_batches is only in the new config")
  # A UG-CLU record from before clu.buffer_kind: read as its former behaviour, the per-stage
  # draw, when it had a buffer; without one the kind changes nothing.
  config = methods.default_config("ug_clu")
  record = json.loads(config.to_json_best_effort())
  del record["clu"]["buffer_kind"]
  assert train.config_difference(record, config) == ""
  record["clu"]["buffer_size"] = config.clu.buffer_size = 500
  assert train.config_difference(record, config) == (
      "clu.buffer_kind: was 'resample', now 'persistent'")
  config.clu.buffer_kind = "resample"
  assert train.config_difference(record, config) == ""


def test_a_record_is_compared_on_the_sections_its_method_reads():
  """A config file sets up its whole family; a section added for a new method of it, or one
  another method reads, does not stop a run from resuming; its own sections still do."""
  config = methods.default_config("cf_scrub")
  for name in ("cf_lirf", "cf_ewc"):
    config[name] = methods.default_config(name)[name]
  record = json.loads(config.to_json_best_effort())
  del record["cf_lirf"]  # recorded before cf_lirf existed
  record["cf_ewc"]["weight"] = 99.0  # changed for another method
  assert train.config_difference(record, config) == ""
  record["cf_scrub"]["gamma"] = 2.0
  assert train.config_difference(record, config) == "cf_scrub.gamma: was 2.0, now 0.99"
  # A record whose file set up a section this config lacks (another method's, added to the
  # family's config file by a newer checkout) compares as well.
  record["cf_scrub"]["gamma"] = config.cf_scrub.gamma
  record["cf_newer"] = {"weight": 1.0}
  del config["cf_ewc"]
  assert train.config_difference(record, config) == ""


def test_a_record_is_compared_without_the_fields_its_method_s_results_never_read():
  """`fields_unread`: SCRUB trains with its own learning rate, so a finished or resumed
  cf_scrub run is the same run whatever cf.min_lr says; a field it reads still differs,
  and a method that reads the field (cf_ft) still sees the difference."""
  for name, differs in (("cf_scrub", False), ("cf_ft", True)):
    config = methods.default_config(name)
    record = json.loads(config.to_json_best_effort())
    record["cf"]["min_lr"] = 0.5
    assert train.config_difference(record, config) == (
        f"cf.min_lr: was 0.5, now {config.cf.min_lr!r}" if differs else "")
    assert "min_lr" in record["cf"]  # the record is compared, not changed
  record["cf"]["min_lr"], record["cf"]["b1"] = config.cf.min_lr, 0.5
  assert train.config_difference(record, config) == f"cf.b1: was 0.5, now {config.cf.b1!r}"
  # Only between records of one method, and not for chosen fields (a shared pretraining's
  # record is whichever method's pretrained first).
  scrub = methods.default_config("cf_scrub")
  record = json.loads(scrub.to_json_best_effort())
  record["cf"]["min_lr"] = 0.5
  assert train.config_difference(record, scrub, fields=("cf",)) == (
      f"cf.min_lr: was 0.5, now {scrub.cf.min_lr!r}")
  record["method"] = "cf_ft"  # cf_ft reads cf.min_lr: the records of two methods differ there
  assert train.config_difference(record, scrub).startswith("cf.min_lr: was 0.5")


def test_ctrl_c_raised_in_a_command_ends_it_with_one_line_and_status_130(capsys):
  """A second Ctrl-C (or one outside a run's stage loop) raises KeyboardInterrupt: the
  command waits for pending checkpoint saves, prints one line and returns 130."""
  from kswap_jax import cli  # pylint: disable=import-outside-toplevel

  def command():
    raise KeyboardInterrupt
  try:
    assert cli.guarded(command) == cli.INTERRUPTED
  finally:
    cli._CUT_SHORT[0] = False  # pylint: disable=protected-access
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
      "interrupted: every finished checkpoint is kept; rerun the same command")


def test_wall_time_and_stage_clocks_continue_across_attempts(tmp_path, monkeypatch):
  """A resumed run's `wall_seconds` and `stage_seconds` add the time up to the checkpoint it
  resumes from; the killed attempt's time after that checkpoint is not counted."""
  now = [100.0]
  monkeypatch.setattr(train, "time", type("Clock", (), {"time": staticmethod(lambda: now[0])}))
  mesh = train.make_mesh(jax.devices()[:1])
  state = train.replicate(train.create_state({"w": jnp.ones(3)}, optax.sgd(0.1), 0), mesh)
  run = _toy_run(tmp_path)
  now[0] = 105.0
  assert run.stage_seconds("task") == 0.0  # started at 5 s into the run
  now[0] = 112.0
  run.save(state, step=1)  # 12 s recorded
  run.close()
  now[0] = 130.0  # the attempt goes on and is killed: these 18 s are lost
  now[0] = 1000.0
  again = _toy_run(tmp_path)
  again.restore(state)
  now[0] = 1003.0
  assert again.wall_seconds() == pytest.approx(15.0)
  assert again.stage_seconds("task") == pytest.approx(10.0)  # 15 - 5
  assert again.stage_seconds("other") == 0.0
  again.close()


def test_progress_lines_estimate_the_stage_s_time_left(tmp_path, caplog):
  assert [train._duration(x) for x in (0.4, 45, 725, 11220)] == ["0s", "45s", "12m05s",
                                                                 "3h07m"]
  run, stage, state, mesh = _run(tmp_path, 1.0)
  with caplog.at_level("INFO", logger="kswap_jax"):
    run.run_stage(0, stage, state, {}, mesh)
  run.close()
  lines = [r.getMessage() for r in caplog.records if "it/s" in r.getMessage()]
  assert len(lines) == 6, lines
  # Not from the first interval (compilation), and not on the stage's last line.
  assert [("stage done in ~" in x) for x in lines] == [False] + [True] * 4 + [False]


def test_hparams_are_optional_and_a_key_nothing_reads_is_refused(caplog):
  mesh = train.make_mesh(jax.devices()[:1])
  batch = train.to_global({"d": {"x": np.ones((2,), np.float32)}}, mesh)

  def loss_fn(params, frozen, batch, rng):
    return jnp.sum(params["w"]) * jnp.mean(batch["d"]["x"]), {}
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
  fresh = lambda t: train.replicate(train.create_state({"w": jnp.ones(3)}, t, 0), mesh)
  step = train.make_train_step(loss_fn, tx, mesh, donate=False)
  state, _ = step(fresh(tx), {}, batch)  # no hparams: the optimizer's own 0.5
  np.testing.assert_allclose(state.params["w"], 0.5)
  state, _ = step(fresh(tx), {}, batch, {"learning_rate": 0.25})
  np.testing.assert_allclose(state.params["w"], 0.75)
  with pytest.raises(ValueError, match=r"hparams \['lr'\]: no optax.inject_hyperparams"):
    step(fresh(tx), {}, batch, {"lr": 0.0})  # was a TypeError about an `hparams` argument

  def loss_with_hparams(params, frozen, batch, rng, hparams):
    return jnp.sum(params["w"]) * jnp.mean(batch["d"]["x"]), {}
  plain = optax.sgd(0.5)
  step = train.make_train_step(loss_with_hparams, plain, mesh, donate=False)
  with caplog.at_level("WARNING", logger="kswap_jax"):
    step(fresh(plain), {}, batch, {"learning_rate": 0.0})
  assert "no injected learning rate" in caplog.text


def test_a_rerun_of_a_finished_run_keeps_its_wall_time(tmp_path, monkeypatch, caplog):
  caplog.set_level("INFO", logger="kswap_jax")
  now = [100.0]
  monkeypatch.setattr(train, "time", type("Clock", (), {"time": staticmethod(lambda: now[0])}))
  envelope = lambda: {"method": "toy", "config": {}, "stages": [{"name": "toy"}], "final": {}}
  run, stage, state, mesh = _run(tmp_path, 1.0)
  state, _ = run.run_stage(0, stage, state, {}, mesh)
  now[0] = 120.0
  run.finish_stage(state, "toy", {})  # the final checkpoint records 20 s
  now[0] = 140.0
  run.write_results(envelope())
  run.close()
  assert json.load(open(tmp_path / "results.json"))["wall_seconds"] == 40.0
  now[0] = 500.0  # the same command again: it trains nothing and rewrites the results
  again, stage, state, mesh = _run(tmp_path, 1.0)
  assert "the run had finished; its results are presented again" in caplog.text
  (tmp_path / "toy.png").write_bytes(b"")
  again.announce("table", str(tmp_path / "results.json"))
  assert caplog.records[-1].getMessage().endswith("results.json; plots: toy.png")
  again.run_stage(0, stage, state, {}, mesh)
  now[0] = 530.0
  assert again.wall_seconds() == 50.0  # 20 s recorded + this attempt's 30 s
  again.write_results(envelope())
  again.close()
  assert json.load(open(tmp_path / "results.json"))["wall_seconds"] == 40.0
