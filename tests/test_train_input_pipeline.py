"""training.input_pipeline: tfds from shipped archives, exact deterministic batches."""

import pathlib
import shutil

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from training import input_pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLITS = ["train[:50000]", "train[50000:]", "test"]


@pytest.fixture(scope="module")
def mnist():
  """The real MNIST splits (prepared once into data/tfds, then cached)."""
  return input_pipeline.load_dataset("mnist", SPLITS)


def test_mnist_splits_as_in_the_seed(mnist):
  splits, info = mnist
  assert info == input_pipeline.DatasetInfo("mnist", (28, 28, 1), 10)
  assert [len(splits[s].labels) for s in SPLITS] == [50_000, 10_000, 10_000]
  train = splits["train[:50000]"]
  assert train.images.dtype == np.uint8 and train.images.shape[1:] == (28, 28, 1)
  assert train.labels.dtype == np.int32
  assert np.bincount(train.labels, minlength=10).min() > 4000  # all ten digits
  # Loading again (from the cache) gives identical arrays.
  again, _ = input_pipeline.load_dataset("mnist", ["test"])
  np.testing.assert_array_equal(again["test"].images, splits["test"].images)


def test_shipped_archives_and_license_note():
  files = sorted(p.name for p in (REPO / "data" / "mnist").glob("*.gz"))
  assert files == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                   "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
  note = (REPO / "data" / "mnist" / "README.md").read_text()
  assert "CC BY-SA 3.0" in note and "LeCun" in note and "same license" in note


def test_epoch_order_depends_only_on_seed_and_epoch():
  a = input_pipeline.epoch_permutation(1000, seed=3, epoch=1)
  np.testing.assert_array_equal(a, input_pipeline.epoch_permutation(1000, seed=3, epoch=1))
  assert not np.array_equal(a, input_pipeline.epoch_permutation(1000, seed=3, epoch=2))
  assert not np.array_equal(a, input_pipeline.epoch_permutation(1000, seed=4, epoch=1))
  np.testing.assert_array_equal(np.sort(a), np.arange(1000))


def _toy_split(n=100):
  images = (np.arange(n, dtype=np.uint8)[:, None, None, None]
            * np.ones((1, 28, 28, 1), np.uint8))
  return input_pipeline.Split(images, np.arange(n, dtype=np.int32))


@pytest.mark.parametrize("num_processes", [2, 4])
def test_process_rows_assemble_the_same_global_batches(num_processes):
  split = _toy_split()
  kwargs = dict(global_batch_size=24, seed=0, epoch=5)
  whole = list(input_pipeline.train_batches(split, rows=slice(0, 24), **kwargs))
  assert len(whole) == input_pipeline.steps_per_epoch(100, 24) == 4
  per_process = 24 // num_processes
  parts = [list(input_pipeline.train_batches(
      split, rows=slice(p * per_process, (p + 1) * per_process), **kwargs))
           for p in range(num_processes)]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(
        np.concatenate([part[step].labels for part in parts]), batch.labels)
  # Resuming mid-epoch continues the same sequence.
  resumed = list(input_pipeline.train_batches(split, rows=slice(0, 24), start_step=2,
                                              **kwargs))
  np.testing.assert_array_equal(resumed[0].labels, whole[2].labels)
  np.testing.assert_allclose(whole[0].images[:, 0, 0, 0], whole[0].labels / 255.0,
                             rtol=1e-6)


def test_process_rows_from_the_sharding(mesh8):
  sharding = NamedSharding(mesh8, P("data"))
  # One process holds all 8 devices here: every row is its own.
  assert input_pipeline.process_rows(sharding, 64) == slice(0, 64)


def test_eval_batches_cover_every_example_once():
  split = _toy_split(50)
  batches = list(input_pipeline.eval_batches(split, global_batch_size=16,
                                             rows=slice(0, 16)))
  assert len(batches) == 4
  labels = np.concatenate([b.labels[b.mask] for b in batches])
  np.testing.assert_array_equal(labels, np.arange(50))
  assert batches[-1].mask.sum() == 2


def test_to_global_shards_the_batch(mesh8):
  sharding = NamedSharding(mesh8, P("data"))
  batch = next(input_pipeline.train_batches(_toy_split(), global_batch_size=16, seed=0,
                                            epoch=0, rows=slice(0, 16)))
  global_batch = input_pipeline.to_global(batch, sharding, 16)
  assert global_batch.images.shape == (16, 28, 28, 1)
  assert len(global_batch.labels.addressable_shards) == 8
  np.testing.assert_array_equal(jax.device_get(global_batch.labels), batch.labels)


def test_missing_archive_names_file_and_folder(tmp_path):
  # fashion_mnist is not shipped: data/fashion_mnist does not exist.
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.load_dataset("fashion_mnist", ["test"], data_dir=tmp_path / "tfds")
  message = str(error.value)
  assert "idx" in message and "ubyte.gz" in message
  assert str(REPO / "data" / "fashion_mnist") in message
  assert "manual_dir" in message


def test_wrong_checksum_names_the_file(tmp_path):
  manual_dir = tmp_path / "mnist"
  shutil.copytree(REPO / "data" / "mnist", manual_dir)
  corrupt = manual_dir / "t10k-labels-idx1-ubyte.gz"
  corrupt.write_bytes(corrupt.read_bytes()[:-10])
  with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*checksum"):
    input_pipeline.load_dataset("mnist", ["test"], data_dir=tmp_path / "tfds",
                                manual_dir=manual_dir)
  corrupt.unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
    input_pipeline.load_dataset("mnist", ["test"], data_dir=tmp_path / "tfds",
                                manual_dir=manual_dir)


def test_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'mnits'"):
    input_pipeline.load_dataset("mnits", ["test"], data_dir=tmp_path)


def test_take():
  split = _toy_split(10)
  assert len(input_pipeline.take(split, 0).labels) == 10
  assert list(input_pipeline.take(split, 3).labels) == [0, 1, 2]
  with pytest.raises(ValueError, match="asked for 11 examples"):
    input_pipeline.take(split, 11)


def test_bad_split_names_the_available_ones(mnist):
  del mnist  # prepared
  with pytest.raises(ValueError, match=r"split 'validation' of 'mnist'.*'train': 60000"):
    input_pipeline.load_dataset("mnist", ["validation"])
