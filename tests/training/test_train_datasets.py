"""Datasets prepared once per job, and what the model learns of a dataset without reading it."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.training import _train_utils as utils
from training import datasets
from training import input_pipeline
from training import prepare


def _recording(events, process_index, process_count):
  def load():
    events.append(("load", process_index))
    return process_index

  def barrier(name):
    events.append(("barrier", name))

  return prepare.once_per_job(load, "ready", process_index=process_index,
                              process_count=process_count, barrier=barrier)


def test_process_0_prepares_before_the_barrier_and_the_others_read_after_it():
  events = []
  assert _recording(events, 0, 2) == 0
  assert events == [("load", 0), ("barrier", "ready")]
  events = []
  assert _recording(events, 1, 2) == 1
  assert events == [("barrier", "ready"), ("load", 1)]


def test_a_single_process_loads_without_a_barrier():
  events = []
  assert _recording(events, 0, 1) == 0
  assert events == [("load", 0)]


_TWO_PROCESS_LOAD = textwrap.dedent("""
    import json, sys, time
    import jax
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from training import datasets
    time.sleep(float(sys.argv[4]))
    splits, info = datasets.load_dataset("mnist", ["test[:100]"], data_dir=sys.argv[3])
    split = splits["test[:100]"]
    print(json.dumps({"labels": split.labels.tolist(), "pixels": int(split.images.sum()),
                      "shape": list(info.image_shape)}))
""")


def test_two_processes_prepare_a_shared_data_dir_once(tmp_path):
  # Process 0 starts loading 3 s after process 1: process 1 must wait for it
  # (with only the file lock, process 1 would prepare the dataset itself).
  address = f"127.0.0.1:{utils.free_port()}"
  processes = [subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESS_LOAD, address, str(i), str(tmp_path / "tfds"),
       str(3 - 3 * i)],
      cwd=utils.REPO, env=utils.subprocess_env(1), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [process.communicate(timeout=240) for process in processes]
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  (out0, err0), (out1, err1) = outputs
  assert "Preparing 'mnist' once with tfds" in err0
  assert "Preparing" not in err1
  assert json.loads(out0.splitlines()[-1]) == json.loads(out1.splitlines()[-1])
  assert json.loads(out0.splitlines()[-1])["shape"] == [28, 28, 1]


@pytest.mark.parametrize("dataset, image_size, num_classes, expected", [
    ("synthetic", 0, 0, (32, 32, 3, 10)),
    ("synthetic", 12, 7, (12, 12, 3, 7)),
    ("mnist", 0, 0, (28, 28, 1, 10)),
    ("imagenet2012", 0, 0, (224, 224, 3, 1000)),
    ("imagenet2012", 160, 0, (160, 160, 3, 1000)),
])
def test_dataset_info_is_what_load_dataset_gives_the_model(tmp_path, dataset, image_size,
                                                           num_classes, expected):
  info = datasets.dataset_info(dataset, data_dir=tmp_path, image_size=image_size,
                               num_classes=num_classes)
  assert (*info.image_shape, info.num_classes) == expected
  if dataset == "synthetic":
    _, loaded = datasets.load_dataset(dataset, ["train[:10]"], image_size=image_size,
                                      num_classes=num_classes)
    assert loaded == info


def test_mnist_default_splits_have_one_home():
  from experiments import _mnist
  assert (_mnist.TRAIN_SPLIT, _mnist.VALIDATION_SPLIT, _mnist.TEST_SPLIT) == (
      datasets.default_splits("mnist"))


def test_sources_carry_their_size_and_prefix():
  rng = np.random.default_rng(0)
  split = datasets.Split(rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8),
                         np.arange(10, dtype=np.int32))
  assert split.num_examples == 10 and split.take(0) is split
  assert split.take(4).num_examples == 4
  with pytest.raises(ValueError, match="asked for 11 examples but the split has 10"):
    split.take(11)


def test_batching_an_unknown_source_names_the_expected_types():
  with pytest.raises(TypeError, match="datasets.Split or datasets.Stream, got list"):
    next(input_pipeline.eval_batches([1, 2], global_batch_size=2, rows=slice(0, 2),
                                     num_workers=1))
