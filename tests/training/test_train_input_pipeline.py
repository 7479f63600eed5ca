"""training.input_pipeline: tfds datasets, augmentation, exact deterministic batches."""

import pathlib
import shutil

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.training import _train_utils
from training import datasets
from training import distributed
from training import fake_imagenet
from training import input_pipeline
from training import prepare
from training import targets
from training import train_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
SPLITS = ["train[:50000]", "train[50000:]", "test"]


@pytest.fixture(scope="module")
def mnist():
  """The real MNIST splits (prepared once into data/tfds, then cached)."""
  return datasets.load_dataset("mnist", SPLITS)


def test_mnist_splits_as_in_the_keras_notes(mnist):
  splits, info = mnist
  assert info == datasets.DatasetInfo("mnist", (28, 28, 1), 10)
  assert [len(splits[s].labels) for s in SPLITS] == [50_000, 10_000, 10_000]
  train = splits["train[:50000]"]
  assert train.images.dtype == np.uint8 and train.images.shape[1:] == (28, 28, 1)
  assert train.labels.dtype == np.int32
  assert np.bincount(train.labels, minlength=10).min() > 4000  # all ten digits
  # Loading again (from the cache) gives identical arrays.
  again, _ = datasets.load_dataset("mnist", ["test"])
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
  return datasets.Split(images, np.arange(n, dtype=np.int32))


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
  assert whole[0].images.dtype == np.uint8  # the steps normalize on the device
  np.testing.assert_array_equal(whole[0].images[:, 0, 0, 0], whole[0].labels)


def test_process_rows_from_the_sharding(mesh8):
  sharding = NamedSharding(mesh8, P("data"))
  # One process holds all 8 devices here: every row is its own.
  assert input_pipeline.process_rows(sharding, 64) == slice(0, 64)


@pytest.mark.parametrize("target", ["tpu-v5e:4x4", "tpu-v5p:2x2x4", "tpu-v5p:4x4x4",
                                    "tpu-v4:2x2x4"])
def test_every_process_of_a_tpu_pod_gets_its_devices_rows(target):
  pytest.importorskip("libtpu")
  devices = targets.devices(target)  # compile-only: libtpu, no TPU needed
  mesh = distributed.create_mesh(devices=devices)
  num_processes = len({d.process_index for d in devices})
  assert num_processes > 1
  order = [d.process_index for d in mesh.devices.flat]
  assert order != sorted(order)  # the slice order interleaves the hosts
  sharding = NamedSharding(mesh, P("data"))
  batch_size = 8 * len(devices)
  split = _toy_split(4 * batch_size)
  kwargs = dict(global_batch_size=batch_size, seed=0, epoch=1)
  whole = list(input_pipeline.train_batches(split, rows=slice(None), **kwargs))
  index_map = sharding.devices_indices_map((batch_size,))
  seen = np.zeros(batch_size, int)
  for process in range(num_processes):
    rows = input_pipeline.process_rows(sharding, batch_size, process)
    local = list(input_pipeline.train_batches(split, rows=rows, **kwargs))
    # As jax.make_array_from_process_local_data places it: the process's rows
    # in increasing order, each device's shard from its place among them.
    positions = np.arange(batch_size)[rows]
    for device, index in index_map.items():
      if device.process_index != process:
        continue
      shard_rows = np.arange(batch_size)[index[0]]
      seen[shard_rows] += 1
      at = np.searchsorted(positions, shard_rows)
      for step, batch in enumerate(whole):
        np.testing.assert_array_equal(local[step].labels[at], batch.labels[shard_rows])
        np.testing.assert_array_equal(local[step].images[at], batch.images[shard_rows])
  assert (seen == 1).all()  # every row of the global batch on exactly one device


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
  # fashion_mnist is not shipped; a manual_dir without its archives is an
  # error (without one, tfds would download them).
  manual_dir = tmp_path / "fashion_mnist"
  manual_dir.mkdir()
  with pytest.raises(FileNotFoundError) as error:
    datasets.load_dataset("fashion_mnist", ["test"], data_dir=tmp_path / "tfds",
                          manual_dir=manual_dir)
  message = str(error.value)
  assert "idx" in message and "ubyte.gz" in message
  assert str(manual_dir) in message and "manual_dir" in message


def test_wrong_checksum_names_the_file(tmp_path):
  manual_dir = tmp_path / "mnist"
  shutil.copytree(REPO / "data" / "mnist", manual_dir)
  corrupt = manual_dir / "t10k-labels-idx1-ubyte.gz"
  corrupt.write_bytes(corrupt.read_bytes()[:-10])
  with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*checksum"):
    datasets.load_dataset("mnist", ["test"], data_dir=tmp_path / "tfds",
                          manual_dir=manual_dir)
  corrupt.unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
    datasets.load_dataset("mnist", ["test"], data_dir=tmp_path / "tfds",
                          manual_dir=manual_dir)


def test_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'mnits'"):
    datasets.load_dataset("mnits", ["test"], data_dir=tmp_path)


def test_take():
  split = _toy_split(10)
  assert len(split.take(0).labels) == 10
  assert list(split.take(3).labels) == [0, 1, 2]
  with pytest.raises(ValueError, match="asked for 11 examples"):
    split.take(11)


def test_bad_split_names_the_available_ones(mnist):
  del mnist  # prepared
  with pytest.raises(ValueError, match=r"split 'validation' of 'mnist'.*'train': 60000"):
    datasets.load_dataset("mnist", ["validation"])


# --- datasets beyond MNIST: cifar (tfds mock), imagenet2012 (fake archives), synthetic ---

TRAIN, TEST = "train[:45000]", "test"


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
  """cifar10 through its tfds builder with tfds' mock examples (offline)."""
  with tfds.testing.mock_data(num_examples=24):
    return datasets.load_dataset(
        "cifar10", [TRAIN, TEST], data_dir=tmp_path_factory.mktemp("tfds"))


def test_cifar_splits_in_memory_with_cifar_augmentation(cifar10):
  splits, info = cifar10
  assert info == datasets.DatasetInfo("cifar10", (32, 32, 3), 10)
  train = splits[TRAIN]
  assert train.images.shape == (24, 32, 32, 3) and train.images.dtype == np.uint8
  assert train.labels.dtype == np.int32 and train.labels.max() < 10
  assert train.preprocessing.augmentation == "cifar"
  np.testing.assert_allclose(train.preprocessing.mean[0], 0.4914 * 255)


def test_cifar100_goes_through_its_builder(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    splits, info = datasets.load_dataset("cifar100", [TEST], data_dir=tmp_path)
  assert info == datasets.DatasetInfo("cifar100", (32, 32, 3), 100)
  assert splits[TEST].images.shape == (4, 32, 32, 3)


def _is_crop_of_padded(augmented: np.ndarray, original: np.ndarray) -> bool:
  """Whether `augmented` is a 32x32 window of `original` zero-padded by 4, maybe flipped."""
  padded = np.pad(original, ((4, 4), (4, 4), (0, 0)))
  for candidate in (augmented, augmented[:, ::-1]):
    for dy in range(9):
      for dx in range(9):
        if np.array_equal(padded[dy:dy + 32, dx:dx + 32], candidate):
          return True
  return False


def test_cifar_augmentation_crops_and_flips_deterministically(cifar10):
  splits, _ = cifar10
  train = splits[TRAIN]
  kwargs = dict(global_batch_size=8, seed=1, epoch=0)
  whole = list(input_pipeline.train_batches(train, rows=slice(0, 8), **kwargs))
  assert len(whole) == 3
  assert whole[0].images.shape == (8, 32, 32, 3) and whole[0].images.dtype == np.uint8
  again = list(input_pipeline.train_batches(train, rows=slice(0, 8), **kwargs))
  for a, b in zip(whole, again):
    np.testing.assert_array_equal(a.images, b.images)
  # Each image is a pad-4 crop (maybe flipped) of its example.
  order = input_pipeline.epoch_permutation(24, seed=1, epoch=0)
  shifted = flipped = 0
  for step, batch in enumerate(whole):
    pixels = batch.images
    for row, index in enumerate(order[step * 8:(step + 1) * 8]):
      original = train.images[index]
      assert batch.labels[row] == train.labels[index]
      assert _is_crop_of_padded(pixels[row], original)
      shifted += not (np.array_equal(pixels[row], original)
                      or np.array_equal(pixels[row], original[:, ::-1]))
      flipped += _is_crop_of_padded(pixels[row][:, ::-1], original) and not any(
          np.array_equal(pixels[row], np.pad(original, ((4, 4), (4, 4), (0, 0)))[
              dy:dy + 32, dx:dx + 32]) for dy in range(9) for dx in range(9))
  assert shifted >= 12 and flipped >= 4  # of 24: crops and flips really happen
  # Two processes of 4 rows get the same global batches; resuming continues them.
  halves = [list(input_pipeline.train_batches(train, rows=rows, **kwargs))
            for rows in (slice(0, 4), slice(4, 8))]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(
        np.concatenate([half[step].images for half in halves]), batch.images)
  resumed = next(input_pipeline.train_batches(train, rows=slice(0, 8), start_step=2,
                                              **kwargs))
  np.testing.assert_array_equal(resumed.images, whole[2].images)
  other_epoch = next(input_pipeline.train_batches(
      train, rows=slice(0, 8), global_batch_size=8, seed=1, epoch=1))
  assert not np.array_equal(other_epoch.images, whole[0].images)


def test_cifar_evaluation_is_not_augmented(cifar10):
  splits, _ = cifar10
  test = splits[TEST]
  batches = list(input_pipeline.eval_batches(test, global_batch_size=16, rows=slice(0, 16)))
  np.testing.assert_array_equal(np.concatenate([b.images for b in batches])[:24],
                                test.images)
  assert [b.mask.sum() for b in batches] == [16, 8]


def _numpy_normalize(images, preprocessing):
  """The host-side float32 normalization the batches carried before: the reference."""
  mean = np.asarray(preprocessing.mean, np.float32)
  scale = np.float32(1.0) / np.asarray(preprocessing.std, np.float32)
  images = images.astype(np.float32)
  return (images - mean) * scale if mean.any() else images * scale


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "imagenet2012"])
def test_normalize_on_the_device_gives_the_numpy_numbers(dataset):
  mean, std = datasets.pixel_statistics(dataset)
  preprocessing = datasets.Preprocessing(mean=mean, std=std)
  channels = 1 if dataset == "mnist" else 3
  images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, channels), dtype=np.uint8)
  images[0, 0, 0] = 0
  images[0, 0, 1] = 255
  expected = _numpy_normalize(images, preprocessing)
  normalize = jax.jit(input_pipeline.normalize, static_argnames="preprocessing")
  got = normalize(images, preprocessing)
  assert got.dtype == np.float32 and got.shape == images.shape
  np.testing.assert_allclose(got, expected, rtol=2**-23, atol=0)
  np.testing.assert_array_equal(input_pipeline.normalize(images, preprocessing), expected)
  with pytest.raises(TypeError, match=r"images must be uint8 pixels .* got float32"):
    input_pipeline.normalize(expected, preprocessing)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  """imagenet2012 prepared by its tfds builder from fake ILSVRC tar files."""
  root = tmp_path_factory.mktemp("imagenet")
  fake_imagenet.write_fake_imagenet(root / "manual")

  def load(splits, **kwargs):
    return datasets.load_dataset("imagenet2012", splits, data_dir=root / "tfds",
                                 manual_dir=root / "manual", image_size=16,
                                 **kwargs)
  return load


def test_first_preparation_says_one_line_on_stderr_and_nothing_on_stdout(tmp_path, capfd):
  fake_imagenet.write_fake_imagenet(tmp_path / "manual")
  datasets.load_dataset("imagenet2012", ("validation",), data_dir=tmp_path / "tfds",
                        manual_dir=tmp_path / "manual", image_size=16)
  out, err = capfd.readouterr()
  assert out == ""  # tfds' "Downloading and preparing dataset ..." and its bars
  assert f"Preparing 'imagenet2012' once with tfds into {tmp_path / 'tfds'}" in err


def test_missing_imagenet_archives_name_the_files_and_folder(tmp_path):
  (tmp_path / "manual").mkdir()
  with pytest.raises(FileNotFoundError) as error:
    datasets.load_dataset("imagenet2012", ["validation"], data_dir=tmp_path / "tfds",
                          manual_dir=tmp_path / "manual")
  message = str(error.value)
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert str(tmp_path / "manual") in message and "manual_dir" in message


def _fingerprints(batches) -> list[float]:
  return sorted(round(float(image.mean()), 4) for batch in batches
                for image, valid in zip(batch.images, batch.mask) if valid)


def test_imagenet_streams_each_process_share(imagenet):
  splits, info = imagenet(["train", "validation"])
  assert info == datasets.DatasetInfo("imagenet2012", (16, 16, 3), 1000)
  train = splits["train"]
  assert isinstance(train, datasets.Stream) and train.num_examples == 12
  assert train.preprocessing.augmentation == "imagenet"
  # Evaluation: every example once; two processes split the examples between them.
  one = list(input_pipeline.eval_batches(train, global_batch_size=4, rows=slice(0, 4)))
  assert one[0].images.shape == (4, 16, 16, 3) and one[0].images.dtype == np.uint8
  assert sum(b.mask.sum() for b in one) == 12
  shares = []
  for process in range(2):
    split, _ = imagenet(["train"], process_index=process, process_count=2)
    batches = list(input_pipeline.eval_batches(split["train"], global_batch_size=8,
                                               rows=slice(4 * process, 4 * process + 4)))
    assert len(batches) == 2 and [b.mask.sum() for b in batches] == [4, 2]
    shares.append(_fingerprints(batches))
  assert not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == _fingerprints(one)
  # Training without augmentation reads the same share, shuffled, in full batches.
  split, _ = imagenet(["train"], process_index=1, process_count=2, augmentation="none")
  batches = list(input_pipeline.train_batches(split["train"], global_batch_size=4, seed=0,
                                              epoch=0, rows=slice(2, 4)))
  assert len(batches) == 3 and set(_fingerprints(batches)) == set(shares[1])
  # The first N examples (num_eval_examples) of a streamed split.
  first5 = train.take(5)
  assert (first5.split, first5.num_examples) == ("train[0:5]", 5)
  assert sum(b.mask.sum() for b in input_pipeline.eval_batches(
      first5, global_batch_size=4, rows=slice(0, 4))) == 5
  # Validation has ImageNet's validation labels.
  labels = np.concatenate([b.labels[b.mask] for b in input_pipeline.eval_batches(
      splits["validation"], global_batch_size=4, rows=slice(0, 4))])
  assert len(labels) == 6 and labels.max() < 1000 and len(set(labels)) > 1


def test_imagenet_augmentation_is_random_resized_crops_keyed_by_seed_and_epoch(imagenet):
  splits, _ = imagenet(["train"])
  train = splits["train"]
  kwargs = dict(global_batch_size=4, rows=slice(0, 4), seed=3)
  first = list(input_pipeline.train_batches(train, epoch=0, **kwargs))
  assert len(first) == 3 and first[0].images.shape == (4, 16, 16, 3)
  again = list(input_pipeline.train_batches(train, epoch=0, **kwargs))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
  resumed = list(input_pipeline.train_batches(train, epoch=0, start_step=1, **kwargs))
  np.testing.assert_array_equal(resumed[0].images, first[1].images)
  # Augmented images differ from the evaluation center crops of the same examples.
  center = np.concatenate([b.images for b in input_pipeline.eval_batches(
      train, global_batch_size=12, rows=slice(0, 12))])
  augmented = np.concatenate([b.images for b in first])
  for image in augmented:
    assert not any(np.allclose(image, c, atol=1e-3) for c in center)
  epoch1 = next(input_pipeline.train_batches(train, epoch=1, **kwargs))
  assert not np.array_equal(epoch1.images, first[0].images)
  # Normalized with ImageNet's per-channel statistics: roughly centered.
  assert train.preprocessing.mean == datasets.IMAGENET_MEAN
  assert abs(float(input_pipeline.normalize(augmented, train.preprocessing).mean())) < 1.0


def test_imagenet_eval_is_the_resized_center_crop(imagenet):
  import tensorflow as tf
  splits, _ = imagenet(["validation[:1]"])
  batch = next(input_pipeline.eval_batches(splits["validation[:1]"], global_batch_size=1,
                                           rows=slice(0, 1)))
  # Validation images are 50x45: the crop is int(16 / 48 * 45) = 15 pixels, centered.
  builder = splits["validation[:1]"].builder
  image = next(iter(builder.as_dataset(split="validation[:1]")))["image"].numpy()
  assert image.shape == (50, 45, 3)
  crop = image[18:33, 15:30]
  resized = tf.image.resize(crop, [16, 16], method="bicubic").numpy()
  assert resized.min() < 0 or resized.max() > 255  # bicubic overshoots: clipped
  expected = np.clip(np.round(resized), 0, 255)
  # Rounded to uint8; a decode of the crop alone may differ by float rounding.
  assert batch.images.dtype == np.uint8
  difference = np.abs(batch.images[0].astype(np.float32) - expected)
  assert difference.max() <= 1 and np.mean(difference == 0) > 0.99


def test_synthetic_needs_no_files_and_is_deterministic():
  splits, info = datasets.load_dataset(
      "synthetic", ["train[:100]", "validation", "test[:5]"], image_size=12,
      num_classes=7, data_dir="/nonexistent")
  assert info == datasets.DatasetInfo("synthetic", (12, 12, 3), 7)
  train = splits["train[:100]"]
  assert train.images.shape == (100, 12, 12, 3) and train.images.dtype == np.uint8
  assert splits["validation"].num_examples == 10_000
  assert splits["test[:5]"].num_examples == 5
  assert train.labels.max() < 7 and len(set(train.labels)) > 1
  again, _ = datasets.load_dataset("synthetic", ["train[:100]"], image_size=12,
                                   num_classes=7)
  np.testing.assert_array_equal(again["train[:100]"].images, train.images)
  # The validation split cycles through the distinct images, consistently labelled.
  validation = splits["validation"]
  batches = list(input_pipeline.eval_batches(validation, global_batch_size=2048,
                                             rows=slice(0, 2048)))
  assert sum(b.mask.sum() for b in batches) == 10_000
  first, second = batches[0], batches[1]
  np.testing.assert_array_equal(first.images[:1024], first.images[1024:])
  np.testing.assert_array_equal(first.labels[:1024], second.labels[:1024])
  assert datasets.default_splits("synthetic") == ("train", "validation", "test")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dataset="mnist", augmentation="random"), ValueError,
     r"unknown augmentation 'random'"),
    (dict(dataset="mnist", augmentation="imagenet"), ValueError,
     r"augmentation='imagenet' needs a streamed dataset"),
    (dict(dataset="mnist", image_size=32), ValueError,
     r"'mnist' has 28x28 images.*image_size must be 0 or 28, got 32"),
    (dict(dataset="mnist", num_classes=100), ValueError,
     r"'mnist' has 10 classes; num_classes must be 0 or 10, got 100"),
    (dict(dataset="synthetic", image_size=4), ValueError,
     r"images of shape \(4, 4, 3\)"),
])
def test_bad_arguments_name_what_was_expected(mnist, kwargs, error, message):
  del mnist  # prepared
  dataset = kwargs.pop("dataset")
  with pytest.raises(error, match=message):
    datasets.load_dataset(dataset, ["test"], **kwargs)


def test_data_dir_follows_tfds_data_dir(monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  assert prepare.default_data_dir() == REPO / "data" / "tfds"
  monkeypatch.setenv("TFDS_DATA_DIR", "/somewhere/tensorflow_datasets")
  assert prepare.default_data_dir() == pathlib.Path("/somewhere/tensorflow_datasets")


def test_default_splits():
  assert datasets.default_splits("mnist") == ("train[:50000]", "train[50000:]", "test")
  assert datasets.default_splits("cifar10")[0] == "train[:45000]"
  assert datasets.default_splits("imagenet2012")[2] == "validation"
  with pytest.raises(ValueError, match="'svhn_cropped' has no default splits"):
    datasets.default_splits("svhn_cropped")
  with pytest.raises(ValueError, match="unknown dataset 'mnits'"):
    datasets.default_splits("mnits")


def test_prefetch_to_device_yields_every_global_batch_in_order(mesh8):
  sharding = NamedSharding(mesh8, P("data"))
  host = list(input_pipeline.train_batches(_toy_split(), global_batch_size=16, seed=0,
                                           epoch=0, rows=slice(0, 16)))
  pulled = []

  def counting():
    for batch in host:
      pulled.append(batch)
      yield batch

  device = input_pipeline.prefetch_to_device(counting(), sharding, 16, size=2)
  first = next(device)
  assert len(pulled) == 3  # the next two batches are already on their way
  rest = list(device)
  assert len(rest) + 1 == len(host) == 6
  for got, want in zip([first] + rest, host):
    assert got.images.sharding == sharding
    np.testing.assert_array_equal(jax.device_get(got.labels), want.labels)


def test_train_and_evaluate_with_synthetic_data_and_augmentation(tmp_path):
  config = _train_utils.tiny_config(
      dataset="synthetic", image_size=16, num_classes=4, augmentation="cifar",
      model="mlp", num_train_examples=128, num_eval_examples=64, num_epochs=1,
      num_devices=2)
  final = train_lib.train_and_evaluate(config, tmp_path)
  assert final["step"] == 2 and np.isfinite(final["train_loss"])
  assert final["test_accuracy"] >= 0


def test_batches_are_the_same_for_any_number_of_workers(cifar10, imagenet):
  cifar_train = cifar10[0][TRAIN]
  imagenet_train = imagenet(["train"])[0]["train"]
  for source, batch_size in ((cifar_train, 8), (imagenet_train, 4)):
    kwargs = dict(global_batch_size=batch_size, rows=slice(0, batch_size), seed=2, epoch=1)
    one, two = (list(input_pipeline.train_batches(source, num_workers=workers, **kwargs))
                for workers in (1, 2))
    resumed = list(input_pipeline.train_batches(source, num_workers=2, start_step=1,
                                                **kwargs))
    assert len(one) == len(two) == len(resumed) + 1 == 3
    for a, b in zip(one, two):
      assert a.images.dtype == np.uint8
      np.testing.assert_array_equal(a.images, b.images)
      np.testing.assert_array_equal(a.labels, b.labels)
    for a, b in zip(one[1:], resumed):
      np.testing.assert_array_equal(a.images, b.images)
      np.testing.assert_array_equal(a.labels, b.labels)
    one, two = (list(input_pipeline.eval_batches(source, global_batch_size=batch_size,
                                                 rows=slice(0, batch_size),
                                                 num_workers=workers))
                for workers in (1, 2))
    for a, b in zip(one, two, strict=True):
      np.testing.assert_array_equal(a.images, b.images)
      np.testing.assert_array_equal(a.mask, b.mask)
  with pytest.raises(ValueError, match=r"num_workers must be >= 0 \(0 = all \d+ host cores"):
    next(input_pipeline.train_batches(cifar_train, num_workers=-1, **kwargs))
