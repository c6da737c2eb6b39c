"""Knowledge Swapping's streams: which retain stream each stage gets, and the auxiliary
stream restarted at every retain epoch as the reference's loader."""

import numpy as np
import pytest

from conftest import load_config
from kswap_jax import train
from kswap_jax.data import splits
from kswap_jax.errors import ConfigError
from kswap_jax.methods import common, knowledge_swap


def _setup(method, **ks):
  config = load_config("demo", f"runlocal,method={method}")
  config.ks.update(ks)
  src = common.load_sources(config.data)
  subsets = splits.knowledge_swap_splits(src["old_train"], src["old_test"], src["new_train"],
                                         src["new_test"], config.swap)
  return config, subsets, knowledge_swap.make_streams(config, subsets,
                                                      train.mesh_for(config))


def _labels(stream, i):
  b = stream.batch(i)
  return b["label"][b["mask"] == 1]


@pytest.mark.parametrize("method", ["lbf", "laf"])
def test_the_auxiliary_stream_restarts_every_retain_epoch_in_whole_passes(method):
  config, subsets, streams = _setup(method)
  for stage, aux in (("learn", "learn"), ("forget", "forget")):
    retain, stream = streams[stage]["retain"], streams[stage][aux]
    assert retain.steps_per_epoch > stream.steps_per_epoch > 1  # several passes per epoch
    assert stream.restart_every == retain.steps_per_epoch
    n, per_pass = len(subsets[f"{aux}_train"]), stream.steps_per_epoch
    for epoch in range(2):
      start = epoch * retain.steps_per_epoch
      # Each pass holds every record once: the labels of a pass are the subset's.
      for p in range(retain.steps_per_epoch // per_pass):
        labels = np.concatenate([_labels(stream, start + p * per_pass + q)
                                 for q in range(per_pass)])
        assert labels.size == n
        np.testing.assert_array_equal(np.sort(labels), np.sort(subsets[f"{aux}_train"].labels))
      last = stream.batch(start + per_pass - 1)["mask"]
      assert last.sum() == n - (per_pass - 1) * stream.batch_size < stream.batch_size
  # LBF adds D_n^train to the second stage's retain stream; LAF keeps D_r^sub alone.
  second = streams[knowledge_swap.STAGE_ORDER[method][1]]["retain"]
  expected = len(subsets["retain_train"]) + (len(subsets["learn_train"])
                                             if method == "lbf" else 0)
  assert second.num_examples == expected


def test_continuous_auxiliary_batches_and_a_bad_mode():
  _, _, streams = _setup("lbf", aux_batches="continuous")
  stream = streams["forget"]["forget"]
  assert stream.restart_every == 0
  assert all(stream.batch(i)["mask"].all() for i in range(2 * stream.steps_per_epoch))
  with pytest.raises(ConfigError, match=r"^ks\.aux_batches: 'epoch' \(expected one of "
                                        r"per_epoch, continuous\)$"):
    _setup("lbf", aux_batches="epoch")
