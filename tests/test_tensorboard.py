"""The TensorBoard event files: decoded with protobuf's own parser against descriptors of
TensorFlow's `Event`/`Summary` messages and a bitwise CRC-32C (not the module's table), so
a mistake in the hand-written encoder cannot cancel out; read by TensorBoard itself where
it is installed."""

import glob
import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from kswap_jax import tensorboard, train


def _bitwise_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _event_class():
  """TensorFlow's Event, Summary and Summary.Value with their field numbers (event.proto,
  summary.proto), the fields an event file of scalars uses."""
  f = descriptor_pb2.FileDescriptorProto(name="kswap_test_event.proto", package="kswaptest",
                                         syntax="proto3")
  tensor = f.message_type.add(name="TensorProto")
  tensor.field.add(name="dtype", number=1, type=5, label=1)          # enum as int32
  tensor.field.add(name="string_val", number=8, type=12, label=3)    # repeated bytes
  plugin = f.message_type.add(name="PluginData")
  plugin.field.add(name="plugin_name", number=1, type=9, label=1)
  meta = f.message_type.add(name="SummaryMetadata")
  meta.field.add(name="plugin_data", number=1, type=11, label=1,
                 type_name=".kswaptest.PluginData")
  value = f.message_type.add(name="Value")
  value.field.add(name="tag", number=1, type=9, label=1)             # string
  value.field.add(name="simple_value", number=2, type=2, label=1)    # float
  value.field.add(name="tensor", number=8, type=11, label=1, type_name=".kswaptest.TensorProto")
  value.field.add(name="metadata", number=9, type=11, label=1,
                  type_name=".kswaptest.SummaryMetadata")
  summary = f.message_type.add(name="Summary")
  summary.field.add(name="value", number=1, type=11, label=3, type_name=".kswaptest.Value")
  session_log = f.message_type.add(name="SessionLog")
  session_log.field.add(name="status", number=1, type=5, label=1)   # enum as int32: START 1
  event = f.message_type.add(name="Event")
  event.field.add(name="wall_time", number=1, type=1, label=1)       # double
  event.field.add(name="step", number=2, type=3, label=1)            # int64
  event.field.add(name="file_version", number=3, type=9, label=1)
  event.field.add(name="summary", number=5, type=11, label=1, type_name=".kswaptest.Summary")
  event.field.add(name="session_log", number=7, type=11, label=1,
                  type_name=".kswaptest.SessionLog")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("kswaptest.Event"))


def _read_events(path):
  """The events of one file, each TFRecord's two masked CRCs checked."""
  mask = lambda crc: (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  event_class, events = _event_class(), []
  data = open(path, "rb").read()
  i = 0
  while i < len(data):
    header = data[i:i + 8]
    (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[i + 8:i + 12])
    assert length_crc == mask(_bitwise_crc32c(header))
    body = data[i + 12:i + 12 + length]
    assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == \
        mask(_bitwise_crc32c(body))
    event = event_class()
    event.ParseFromString(body)
    events.append(event)
    i += 16 + length
  return events


def _scalars_by_step(path):
  events = _read_events(path)
  assert events[0].file_version == "brain.Event:2"
  assert events[1].session_log.status == 1 and events[1].step == 0  # START: drop what was read
  rest = events[2:]
  if rest and [v.tag for v in rest[0].summary.value] == ["config"]:  # a run's config text
    rest = rest[1:]
  return [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in rest]


def _event_file(workdir):
  files = glob.glob(os.path.join(str(workdir), "events.out.tfevents.*"))
  assert len(files) == 1, files
  return files[0]


def test_crc32c_matches_the_standard_check_value_and_a_bitwise_implementation():
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  data = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
  assert tensorboard.crc32c(data) == _bitwise_crc32c(data)


def test_events_are_byte_for_byte_tensorflow_s_serialisation():
  """The bytes TensorBoard's own protobuf classes (tensorboard.compat.proto.event_pb2,
  2.21.0) serialise for the same events: Event(wall_time=1.5, step=7, summary=Summary(value=
  [Value(tag="train/loss", simple_value=0.25), Value(tag="eval/x", simple_value=-3.0)])),
  Event(wall_time=1.5, file_version="brain.Event:2"), Event(wall_time=2.0,
  session_log=SessionLog(status=START)) and Event(wall_time=2.0, step=-1)."""
  summary = tensorboard._summary({"train/loss": 0.25, "eval/x": -3.0})
  assert tensorboard._event(1.5, 7, summary=summary).hex() == (
      "09000000000000f83f10072a220a110a0a747261696e2f6c6f7373150000803e0a0d0a066576616c2f78"
      "15000040c0")
  assert tensorboard._event(1.5, file_version="brain.Event:2").hex() == \
      "09000000000000f83f1a0d627261696e2e4576656e743a32"
  assert tensorboard._event(2.0, start=True).hex() == "0900000000000000403a020801"
  # Event(wall_time=1.5, summary=Summary(value=[Value(tag="config", tensor=TensorProto(
  # dtype=DT_STRING, tensor_shape=TensorShapeProto(), string_val=[b"    a = 1"]),
  # metadata=tensorboard.plugins.text.metadata.create_summary_metadata("", ""))])).
  assert tensorboard._event(1.5, summary=tensorboard._text_summary("config", "    a = 1")
                            ).hex() == (
      "09000000000000f83f2a250a230a06636f6e666967420f0807120042092020202061203d20314a080a06"
      "0a0474657874")
  assert tensorboard._event(2.0, -1).hex() == "09000000000000004010ffffffffffffffffff01"


def test_scalars_of_training_and_evaluation_records():
  record = {"step": 7, "stage": "forget", "epoch": 2, "loss": 1.5, "fast/loss": 0.25,
            "block_n": [0.5] * 12, "learning_rate": 1e-3, "flag": True, "note": "x"}
  got = tensorboard.scalars(record)
  assert got["train/loss"] == 1.5 and got["train/fast/loss"] == 0.25
  assert got["train/block_n/00"] == 0.5 and "train/block_n/11" in got
  assert not {"train/step", "train/stage", "train/epoch", "train/flag", "train/note"} & set(got)
  assert tensorboard.scalars({"step": 9, "stage": "t", "epoch": 1,
                              "eval": {"acc_r": 90.0, "h_mean": 80.0}}) == \
      {"eval/acc_r": 90.0, "eval/h_mean": 80.0}


def test_a_value_beyond_float32_is_written_as_infinity(tmp_path):
  """A diverging loss (1e39) is logged, not an OverflowError in the run's log step."""
  writer = tensorboard.EventWriter(str(tmp_path))
  writer.write({"step": 3, "stage": "s", "epoch": 1, "loss": 1e39, "grad_norm": -1e40})
  [(step, values)] = _scalars_by_step(_event_file(tmp_path))
  assert step == 3 and values == {"train/loss": np.inf, "train/grad_norm": -np.inf}


class _Stream:
  steps_per_epoch = 3
  batch_size = 2

  def iterate(self, start=0):
    while True:
      yield {"x": np.full((2,), 1.0, np.float32)}


def _stage_run(tmp_path, interrupt, **train_cfg):
  config = ml_collections.ConfigDict(dict(
      train=dict(dict(log_every_steps=1, checkpoint_every_steps=2, max_checkpoints_to_keep=2),
                 **train_cfg), debug=dict(interrupt_at_step=interrupt)))
  mesh = train.make_mesh(jax.devices()[:1])
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)

  def loss_fn(params, frozen, batch, rng):
    return jnp.sum(params["w"] * jnp.mean(batch["d"]["x"])), {}
  stage = train.Stage(name="toy", step_fn=train.make_train_step(loss_fn, tx, mesh),
                      streams={"d": _Stream()}, epoch_stream="d", epochs=2,
                      hparams_fn=lambda e, _: {"learning_rate": 0.1 / (e + 1)})
  run = train.Run(str(tmp_path), config)
  state = run.restore(train.replicate(train.create_state({"w": jnp.ones(3)}, tx, 0), mesh))
  evaluate = lambda state, frozen: {"w_sum": float(jnp.sum(state.params["w"]))}
  try:
    run.run_stage(0, stage, state, {}, mesh, eval_fn=evaluate, eval_every=3)
  finally:
    run.close()


def test_the_event_file_holds_metrics_jsonl_once_after_a_resume(tmp_path):
  """Killed at step 5 (its checkpoint is step 4): the resumed run drops step 5 from
  metrics.jsonl and the event file alike, so TensorBoard shows each step once, with the
  values of metrics.jsonl (float32)."""
  with pytest.raises(SystemExit):
    _stage_run(tmp_path, interrupt=5)
  assert [s for s, _ in _scalars_by_step(_event_file(tmp_path))] == [1, 2, 3, 3, 4, 5]
  _stage_run(tmp_path, interrupt=0)
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  events = _scalars_by_step(_event_file(tmp_path))
  assert [s for s, _ in events] == [x["step"] for x in lines] == [1, 2, 3, 3, 4, 5, 6, 6]
  for (step, values), line in zip(events, lines):
    if "eval" in line:
      assert values == {"eval/w_sum": np.float32(line["eval"]["w_sum"])}
    else:
      assert values == {f"train/{k}": np.float32(v) for k, v in line.items()
                        if k not in ("step", "stage", "epoch")}
      assert {"train/loss", "train/learning_rate", "train/grad_norm"} <= set(values)


def test_a_finished_stage_s_results_follow_its_last_step_and_survive_a_rewrite(tmp_path):
  """`Run.finish_stage` adds the stage's results (`stage/<key>`) at its last step; a rerun
  of the finished run rewrites the file and takes them from the checkpoint, once."""
  results = {"acc": 50.0, "task_acc": [1.0, None], "note": "x"}

  def finished_run():
    config = ml_collections.ConfigDict(dict(
        train=dict(log_every_steps=1, checkpoint_every_steps=2, max_checkpoints_to_keep=2),
        debug=dict(interrupt_at_step=0)))
    mesh = train.make_mesh(jax.devices()[:1])
    tx = optax.sgd(0.1)
    loss_fn = lambda params, frozen, batch, rng: (jnp.sum(params["w"]), {})
    stage = train.Stage(name="toy", step_fn=train.make_train_step(loss_fn, tx, mesh),
                        streams={"d": _Stream()}, epoch_stream="d", epochs=1)
    run = train.Run(str(tmp_path), config)
    state = run.restore(train.replicate(train.create_state({"w": jnp.ones(3)}, tx, 0), mesh))
    state, _ = run.run_stage(0, stage, state, {}, mesh)
    if "toy" not in run.meta["results"]:
      run.finish_stage(state, "toy", results)
    run.close()

  for attempt in range(2):  # the run, then a rerun of the finished run
    finished_run()
    events = _scalars_by_step(_event_file(tmp_path))
    assert [s for s, _ in events] == [1, 2, 3, 3], attempt
    assert events[-1][1] == {"stage/acc": 50.0, "stage/task_acc/0": 1.0}, attempt


def test_the_run_s_config_opens_the_event_file_as_text(tmp_path):
  """The Text tab's `config`: the run's config as JSON, an indented (code) block."""
  _stage_run(tmp_path, interrupt=0)
  config = _read_events(_event_file(tmp_path))[2]
  [value] = config.summary.value
  assert value.tag == "config" and value.metadata.plugin_data.plugin_name == "text"
  assert value.tensor.dtype == 7  # DT_STRING
  text = value.tensor.string_val[0].decode()
  assert all(line.startswith("    ") for line in text.splitlines())
  assert json.loads(text)["train"]["checkpoint_every_steps"] == 2


def test_tensorboard_off_writes_no_event_file_and_removes_an_earlier_attempt_s(tmp_path):
  """Off: no file; one of an earlier attempt (which showed steps to be redone) goes; an
  event file another program wrote stays."""
  with pytest.raises(SystemExit):
    _stage_run(tmp_path, interrupt=5)
  (tmp_path / "events.out.tfevents.1.host.theirs").write_bytes(b"")
  _stage_run(tmp_path, interrupt=0, tensorboard=False)
  assert os.path.exists(tmp_path / "metrics.jsonl")
  assert glob.glob(str(tmp_path / "events.out.tfevents.*")) == [
      str(tmp_path / "events.out.tfevents.1.host.theirs")]


def test_a_run_that_logs_without_restoring_writes_metrics_jsonl_s_lines(tmp_path):
  """`Run.log_metrics` before any `restore` (a method of the user's own): the event file
  starts from `metrics.jsonl` as it is, the new line included."""
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
  run = train.Run(str(tmp_path), ml_collections.ConfigDict(dict(
      train=dict(log_every_steps=1, checkpoint_every_steps=0, max_checkpoints_to_keep=1),
      debug=dict(interrupt_at_step=0))))
  run.log_metrics({"step": 2, "stage": "s", "epoch": 1, "loss": 1.0})
  run.log_metrics({"step": 3, "stage": "s", "epoch": 1, "loss": 0.5})
  run.close()
  assert _scalars_by_step(_event_file(tmp_path)) == [
      (1, {"train/loss": 2.0}), (2, {"train/loss": 1.0}), (3, {"train/loss": 0.5})]


def test_tensorboard_reads_the_event_file(tmp_path):
  """The event file through TensorBoard's own loader (skipped where it is not installed)."""
  accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  _stage_run(tmp_path, interrupt=0)
  acc = accumulator.EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"train/loss", "train/learning_rate", "train/grad_norm",
                                        "eval/w_sum"}
  assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if '"eval"' not in x]
  np.testing.assert_allclose([e.value for e in acc.Scalars("train/loss")],
                             [x["loss"] for x in lines], rtol=1e-6)
