"""Input pipeline: tfds image datasets as exact, deterministic, prefetched batches.

Two kinds of sources, both built by tensorflow-datasets' own builders:

* In memory (`Split`): datasets whose images have a fixed shape (mnist,
  fashion_mnist, cifar10, cifar100, other small tfds image classification
  datasets) and `synthetic`. Each split is read once into numpy (uint8 images,
  int32 labels) and cached next to the prepared dataset, so later runs start
  without TensorFlow. The example order of an epoch is a permutation drawn from
  `(seed, epoch)`, so the global batch at every step holds the same examples in
  the same order whatever the number of devices or processes; each process
  materializes only the rows of the global batch that its devices hold.
* Streamed (`Stream`): datasets of variable-size JPEG images (imagenet2012).
  Each process reads only its share of the tfds records
  (`tfds.split_for_jax_process`), shuffles it with a seed of
  `(seed, epoch, process)`, decodes and augments in tf.data and batches its
  rows of the global batch.

Augmentation runs in tf.data with stateless randomness keyed by
`(seed, epoch, example)`: the example's index in the dataset for in-memory
sources (so topology does not change the batches), its position in the
process's stream for streamed ones. Resuming at step `k` of an epoch therefore
gives exactly the batches an uninterrupted run sees.

Batches carry uint8 pixels, a quarter of the bytes of float32 from host to
device; the jitted train and eval steps turn them into the model's float32
`(pixel - mean) / std` per channel with `normalize` (`[0, 1]` scaling for
digits and synthetic data, the datasets' own per-channel statistics for CIFAR
and ImageNet). The host gathers uint8 rows (in-memory sources) or pulls
tf.data's output (decoding and augmentation run on tf.data's own threads,
`num_workers` of them; the batches do not depend on their number).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import types
from typing import Any, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from training import files

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
AUGMENTATIONS = ("auto", "none", "cifar", "imagenet")
SYNTHETIC = "synthetic"

# Per-channel mean and standard deviation of the training images, in pixel
# units (0..255). ImageNet: the constants of the flax ImageNet example. CIFAR:
# the training sets' statistics (std of all training pixels per channel).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_NORMALIZATION = {
    "cifar10": ((0.4914 * 255, 0.4822 * 255, 0.4465 * 255),
                (0.2470 * 255, 0.2435 * 255, 0.2616 * 255)),
    "cifar100": ((0.5071 * 255, 0.4865 * 255, 0.4409 * 255),
                 (0.2673 * 255, 0.2564 * 255, 0.2762 * 255)),
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
}
UNIT_SCALING = ((0.0,), (255.0,))  # [0, 1]: digits, synthetic, other datasets

# 'auto' augmentation per dataset (others: 'none').
_AUTO_AUGMENTATION = {"cifar10": "cifar", "cifar100": "cifar", "imagenet2012": "imagenet"}

# tfds split strings (train, validation, test) when the config leaves them ''.
_DEFAULT_SPLITS = {
    "mnist": ("train[:50000]", "train[50000:]", "test"),  # 50k/10k/10k, as the notes' Keras run
    "fashion_mnist": ("train[:50000]", "train[50000:]", "test"),
    "cifar10": ("train[:45000]", "train[45000:]", "test"),  # He et al. 2016's 45k/5k
    "cifar100": ("train[:45000]", "train[45000:]", "test"),
    # A 1% "minival" of train for validation; the official validation set is
    # the test set (ImageNet's own test split has no labels).
    "imagenet2012": ("train[:99%]", "train[99%:]", "validation"),
    SYNTHETIC: ("train", "validation", "test"),
}

# Datasets that tfds cannot download: the files the user puts in manual_dir.
MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}

# ImageNet preprocessing (the flax ImageNet example): evaluation resizes the
# center crop of side image_size / (image_size + CROP_PADDING) * short side.
CROP_PADDING = 32
DEFAULT_STREAMED_IMAGE_SIZE = 224

# `synthetic`: split sizes and the number of distinct random images they cycle
# through (generated once from a fixed seed).
SYNTHETIC_SPLIT_SIZES = {"train": 60_000, "validation": 10_000, "test": 10_000}
SYNTHETIC_DISTINCT_IMAGES = 1024
SYNTHETIC_DEFAULT_IMAGE_SIZE = 32
SYNTHETIC_DEFAULT_NUM_CLASSES = 10


class Preprocessing(NamedTuple):
  """How a source's stored images become model inputs.

  Attributes:
    augmentation: 'none', 'cifar' (pad 4 + random crop + horizontal flip) or
      'imagenet' (Inception-style random resized crop + horizontal flip);
      applied to training batches only ('none' on a streamed source trains on
      the evaluation's center crops).
    image_size: side of the square model input of streamed sources (random
      resized crop in training, resize + center crop in evaluation); 0 for
      in-memory sources, whose images keep their stored shape.
    mean: per-channel mean in pixel units (one value = all channels).
    std: per-channel standard deviation in pixel units.
  """
  augmentation: str = "none"
  image_size: int = 0
  mean: tuple[float, ...] = UNIT_SCALING[0]
  std: tuple[float, ...] = UNIT_SCALING[1]


class Split(NamedTuple):
  """One split in memory.

  Attributes:
    images: uint8 array `(num_images, height, width, channels)`. Example `i`
      shows `images[i % num_images]`; `num_images` equals the number of
      examples except for synthetic data, which cycles through a few images.
    labels: int32 array `(num_examples,)`.
    preprocessing: augmentation and normalization of its batches.
  """
  images: np.ndarray
  labels: np.ndarray
  preprocessing: Preprocessing = Preprocessing()


class Stream(NamedTuple):
  """One split streamed from tfds records; each process reads only its share.

  Attributes:
    builder: the prepared tfds builder.
    split: tfds split string over all processes, e.g. 'train[:99%]'.
    num_examples: examples in `split`.
    process_index: this process's index: its share of `split`.
    process_count: number of processes sharing `split`.
    preprocessing: decoding, augmentation and normalization of its batches.
  """
  builder: Any
  split: str
  num_examples: int
  process_index: int
  process_count: int
  preprocessing: Preprocessing


Source = Split | Stream


class DatasetInfo(NamedTuple):
  """What the model needs to know.

  Attributes:
    name: the dataset.
    image_shape: `(height, width, channels)` of the model input.
    num_classes: number of labels.
  """
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int


class Batch(NamedTuple):
  """This process's rows of one global batch.

  Attributes:
    images: uint8 pixels `(rows, height, width, channels)`; the steps
      normalize them (`normalize`).
    labels: int32 `(rows,)`.
    mask: bool `(rows,)`; False marks padding (evaluation only).
  """
  images: np.ndarray
  labels: np.ndarray
  mask: np.ndarray


def default_data_dir() -> pathlib.Path:
  """Where datasets are prepared: `$TFDS_DATA_DIR` if set, else `<repo>/data/tfds`."""
  if os.environ.get("TFDS_DATA_DIR"):
    return pathlib.Path(os.environ["TFDS_DATA_DIR"])
  return REPO_ROOT / "data" / "tfds"


def default_manual_dir(dataset: str) -> pathlib.Path:
  """Where a dataset's original archives live: `<repo>/data/<dataset>`."""
  return REPO_ROOT / "data" / dataset


def default_splits(dataset: str) -> tuple[str, str, str]:
  """The (train, validation, test) tfds split strings used for `dataset`.

  Raises:
    ValueError: `dataset` has no default; the config must name its splits.
  """
  if dataset not in _DEFAULT_SPLITS:
    _, tfds = _import_tf()
    try:
      tfds.builder_cls(dataset)
    except tfds.core.registered.DatasetNotFoundError:
      raise _unknown_dataset(dataset) from None
    raise ValueError(
        f"dataset {dataset!r} has no default splits (known: {sorted(_DEFAULT_SPLITS)}); "
        "set --config.train_split, --config.validation_split and --config.test_split "
        "to tfds split strings.")
  return _DEFAULT_SPLITS[dataset]


# --- preparing datasets with tfds ----------------------------------------------

def _cache_path(data_dir: pathlib.Path, dataset: str, split: str) -> pathlib.Path:
  readable = re.sub(r"[^A-Za-z0-9_-]+", "_", split).strip("_")
  digest = hashlib.sha1(split.encode()).hexdigest()[:8]
  return data_dir / "numpy" / dataset / f"{readable}-{digest}.npz"


def _info_path(data_dir: pathlib.Path, dataset: str) -> pathlib.Path:
  return data_dir / "numpy" / dataset / "info.json"


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """Serializes dataset preparation between processes on this host.

  A data_dir in a bucket (a URI) has no lock: prepare it once before the job
  (`tfds build`, docs/train.md), so that every host finds it prepared.
  """
  if files.is_uri(path):
    yield
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _import_tf():
  """TensorFlow and tfds, with every accelerator left to JAX."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")
  return tf, tfds


def _check_archives(builder, dataset: str, manual_dir: pathlib.Path) -> None:
  """Fails early, naming the file, when a registered archive is missing or corrupt."""
  url_infos = builder.url_infos or {}
  where = (f"Put the original archives of '{dataset}' (the files its tfds builder "
           f"downloads) in {manual_dir}, or pass --config.manual_dir=DIR.")
  for url, info in sorted(url_infos.items()):
    filename = info.filename or url.rsplit("/", 1)[-1]
    path = manual_dir / filename
    if not path.is_file():
      raise FileNotFoundError(
          f"Dataset archive {filename} is missing: expected {path} "
          f"({info.size} bytes, sha256 {info.checksum}). {where}")
    size = path.stat().st_size
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    if size != info.size or sha256 != info.checksum:
      raise ValueError(
          f"Dataset archive {path} does not match tfds' registered checksum: "
          f"got {size} bytes, sha256 {sha256}; expected {info.size} bytes, "
          f"sha256 {info.checksum}. Replace it with the original file. {where}")


def _check_manual_files(dataset: str, manual_dir: pathlib.Path) -> None:
  missing = [name for name in MANUAL_FILES[dataset] if not (manual_dir / name).is_file()]
  if missing:
    raise FileNotFoundError(
        f"'{dataset}' is prepared by tfds from files you download yourself: "
        f"{', '.join(MANUAL_FILES[dataset])} must be in manual_dir {manual_dir} "
        f"(missing: {', '.join(missing)}). Download them from image-net.org and "
        "put them there, or pass --config.manual_dir=DIR.")


def _unknown_dataset(dataset: str) -> ValueError:
  return ValueError(
      f"unknown dataset {dataset!r}: expected 'mnist', 'fashion_mnist', 'cifar10', "
      f"'cifar100', 'imagenet2012', {SYNTHETIC!r} or another tensorflow-datasets "
      "image classification dataset.")


def _builder(dataset: str, data_dir: pathlib.Path):
  """The tfds builder of an image classification dataset."""
  _, tfds = _import_tf()
  try:
    builder = tfds.builder(dataset, data_dir=str(data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_dataset(dataset) from None
  features = builder.info.features
  keys = builder.info.supervised_keys
  if (not keys or len(keys) != 2 or keys[0] not in features or keys[1] not in features
      or not hasattr(features[keys[1]], "num_classes")):
    raise ValueError(f"dataset {dataset!r} is not an image classification dataset "
                     f"(supervised keys {keys}).")
  return builder


def _prepare(builder, dataset: str, data_dir: pathlib.Path,
             manual_dir: pathlib.Path | None):
  """The prepared builder: runs tfds' download_and_prepare once if needed.

  Archives come from `manual_dir` when given, else from `data/<dataset>` if it
  exists; otherwise tfds downloads them (except ImageNet's, which it cannot).
  Processes on one host prepare one at a time (a file lock).
  """
  if builder.is_prepared():
    return builder
  _, tfds = _import_tf()
  with _file_lock(data_dir / f".{dataset}.lock"):
    builder = tfds.builder(dataset, data_dir=str(data_dir))  # maybe prepared meanwhile
    if builder.is_prepared():
      return builder
    if manual_dir is None and (dataset in MANUAL_FILES
                               or default_manual_dir(dataset).is_dir()):
      manual_dir = default_manual_dir(dataset)
    if dataset in MANUAL_FILES:
      _check_manual_files(dataset, manual_dir)
    elif manual_dir is not None:
      _check_archives(builder, dataset, manual_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    download_dir = tempfile.mkdtemp(prefix=f"{dataset}-extract-",
                                    dir=None if files.is_uri(data_dir) else data_dir)
    config = tfds.download.DownloadConfig(
        manual_dir=str(manual_dir) if manual_dir is not None else None)
    # tfds prints its own banner and progress bars to stdout; one line of ours
    # on stderr says what happens instead (stdout stays the run's output).
    print(f"Preparing {dataset!r} once with tfds into {data_dir}"
          + (f" from {manual_dir}" if manual_dir is not None else "") + "...",
          file=sys.stderr, flush=True)
    try:
      tfds.disable_progress_bar()  # tfds' bars are one global switch
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(download_dir=download_dir, download_config=config)
    except tfds.download.download_manager.NonMatchingChecksumError as error:
      raise ValueError(f"{error}\nPut the original archives of '{dataset}' in "
                       f"{manual_dir} (--config.manual_dir=DIR).") from None
    except (OSError, RuntimeError) as error:
      if manual_dir is not None:
        raise
      raise RuntimeError(
          f"tfds could not download and prepare {dataset!r} ({error}). Without "
          f"network access, put its archives in {default_manual_dir(dataset)} or "
          "pass --config.manual_dir=DIR.") from error
    finally:
      shutil.rmtree(download_dir, ignore_errors=True)
  return builder


def _split_error(builder, dataset: str, split: str, error: Exception) -> ValueError:
  available = {name: s.num_examples for name, s in builder.info.splits.items()}
  return ValueError(f"split {split!r} of {dataset!r} cannot be read ({error}); its "
                    f"splits and sizes are {available}.")


def _read_in_memory(builder, dataset: str, splits: list[str]
                    ) -> tuple[dict[str, Split], DatasetInfo]:
  _, tfds = _import_tf()
  image_key, label_key = builder.info.supervised_keys
  features = builder.info.features
  info = DatasetInfo(dataset, tuple(features[image_key].shape),
                     int(features[label_key].num_classes))
  arrays = {}
  for split in splits:
    try:
      chunks = list(tfds.as_numpy(builder.as_dataset(
          split=split, as_supervised=True, shuffle_files=False).batch(4096)))
    except (ValueError, KeyError) as error:
      raise _split_error(builder, dataset, split, error) from None
    if not chunks:
      raise ValueError(f"split {split!r} of {dataset!r} is empty.")
    arrays[split] = Split(np.concatenate([images for images, _ in chunks]).astype(np.uint8),
                          np.concatenate([labels for _, labels in chunks]).astype(np.int32))
  return arrays, info


def _load_in_memory(dataset: str, splits: list[str], data_dir: pathlib.Path,
                    manual_dir: pathlib.Path | None, builder=None
                    ) -> tuple[dict[str, Split], DatasetInfo]:
  """The splits as numpy arrays, cached as `.npz` under `data_dir` after the first read."""
  info_path = _info_path(data_dir, dataset)
  cached = [_cache_path(data_dir, dataset, split) for split in splits]

  def read_cache():
    info = json.loads(info_path.read_text())
    arrays = {}
    for split, path in zip(splits, cached):
      with path.open("rb") as file, np.load(file) as npz:
        arrays[split] = Split(npz["images"], npz["labels"])
    return arrays, DatasetInfo(dataset, tuple(info["image_shape"]), info["num_classes"])

  if info_path.exists() and all(path.exists() for path in cached):
    return read_cache()
  builder = _prepare(builder or _builder(dataset, data_dir), dataset, data_dir, manual_dir)
  with _file_lock(data_dir / f".{dataset}.numpy.lock"):
    if info_path.exists() and all(path.exists() for path in cached):
      return read_cache()  # another process wrote it meanwhile
    arrays, info = _read_in_memory(builder, dataset, splits)
    for split, path in zip(splits, cached):
      files.atomic_write(path, lambda f, s=arrays[split]: np.savez(
          f, images=s.images, labels=s.labels))
    files.atomic_write(info_path, lambda f: f.write(json.dumps(
        {"image_shape": list(info.image_shape), "num_classes": info.num_classes}).encode()))
  return arrays, info


def _absolute_ranges(split: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
  """`(split name, start, stop)` of each part of a tfds split string."""
  _, tfds = _import_tf()
  infos = {name: types.SimpleNamespace(num_examples=n) for name, n in sizes.items()}
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
  except (ValueError, KeyError, AssertionError) as error:
    raise ValueError(f"split {split!r} cannot be read ({error}); the splits and sizes "
                     f"are {sizes}.") from None
  return [(i.splitname, i.from_ or 0, sizes[i.splitname] if i.to is None else i.to)
          for i in instructions]


def _load_synthetic(splits: list[str], image_size: int, num_classes: int
                    ) -> tuple[dict[str, Split], DatasetInfo]:
  """Random uint8 images and labels, generated once from a fixed seed (no files)."""
  image_size = image_size or SYNTHETIC_DEFAULT_IMAGE_SIZE
  num_classes = num_classes or SYNTHETIC_DEFAULT_NUM_CLASSES
  rng = np.random.default_rng(0)
  shape = (image_size, image_size, 3)
  images = rng.integers(0, 256, (SYNTHETIC_DISTINCT_IMAGES,) + shape, dtype=np.uint8)
  image_labels = rng.integers(0, num_classes, SYNTHETIC_DISTINCT_IMAGES).astype(np.int32)
  offsets = dict(zip(SYNTHETIC_SPLIT_SIZES, np.cumsum([0, *SYNTHETIC_SPLIT_SIZES.values()])))
  arrays = {}
  for split in splits:
    ids = np.concatenate([np.arange(offsets[name] + start, offsets[name] + stop)
                          for name, start, stop in _absolute_ranges(
                              split, SYNTHETIC_SPLIT_SIZES)])
    ids %= SYNTHETIC_DISTINCT_IMAGES
    # Example i shows images[ids[i]]. A single range cycles through the images,
    # so storing its first SYNTHETIC_DISTINCT_IMAGES is enough (see `Split`).
    cycles = len(ids) > 0 and np.array_equal(
        ids, (ids[0] + np.arange(len(ids))) % SYNTHETIC_DISTINCT_IMAGES)
    stored = ids[:SYNTHETIC_DISTINCT_IMAGES] if cycles else ids
    arrays[split] = Split(images[stored], image_labels[ids])
  return arrays, DatasetInfo(SYNTHETIC, shape, num_classes)


def _load_streamed(builder, dataset: str, splits: list[str], image_size: int,
                   process_index: int, process_count: int
                   ) -> tuple[dict[str, Stream], DatasetInfo]:
  image_key, label_key = builder.info.supervised_keys
  image_feature = builder.info.features[image_key]
  if getattr(image_feature, "encoding_format", "jpeg") not in (None, "jpeg"):
    raise ValueError(f"dataset {dataset!r} stores {image_feature.encoding_format} "
                     "images; streaming decodes JPEG only.")
  sizes = {name: s.num_examples for name, s in builder.info.splits.items()}
  streams = {}
  for split in splits:
    ranges = _absolute_ranges(split, sizes)
    if dataset == "imagenet2012" and any(name == "test" for name, _, _ in ranges):
      raise ValueError("the 'test' split of 'imagenet2012' has no labels; evaluate on "
                       "'validation' (the default test_split).")
    streams[split] = Stream(builder, split, sum(stop - start for _, start, stop in ranges),
                            process_index, process_count, Preprocessing())
  channels = image_feature.shape[-1] or 3
  return streams, DatasetInfo(dataset, (image_size, image_size, channels),
                              int(builder.info.features[label_key].num_classes))


def _resolve_augmentation(dataset: str, augmentation: str, streamed: bool) -> str:
  if augmentation not in AUGMENTATIONS:
    raise ValueError(f"unknown augmentation {augmentation!r}; expected one of "
                     f"{list(AUGMENTATIONS)}.")
  if augmentation == "auto":
    return _AUTO_AUGMENTATION.get(dataset, "imagenet" if streamed else "none")
  if augmentation == "imagenet" and not streamed:
    raise ValueError(f"augmentation='imagenet' needs a streamed dataset of JPEG images "
                     f"(e.g. 'imagenet2012'); {dataset!r} is held in memory: use 'none' "
                     "or 'cifar'.")
  if augmentation == "cifar" and streamed:
    raise ValueError(f"augmentation='cifar' needs fixed-size images in memory; {dataset!r} "
                     "is streamed: use 'imagenet' or 'none'.")
  return augmentation


def _check_image_shape(dataset: str, shape: tuple[int, ...]) -> None:
  if len(shape) != 3 or shape[-1] not in (1, 3) or min(shape[:2]) < 8:
    raise ValueError(f"dataset {dataset!r} has images of shape {shape}; the models "
                     "take (height, width, channels) images with 1 or 3 channels and "
                     "sides >= 8.")


def load_dataset(dataset: str, splits: list[str], *, data_dir=None, manual_dir=None,
                 augmentation: str = "auto", image_size: int = 0, num_classes: int = 0,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> tuple[dict[str, Source], DatasetInfo]:
  """The requested splits of `dataset`, ready to batch, and what the model needs.

  Fixed-shape datasets are prepared with tfds on first use (from the archives
  in `manual_dir` or `data/<dataset>` if present, else downloaded by tfds) and
  held in memory as `Split`s, cached as `.npz` under `data_dir`. Datasets of
  variable-size JPEGs (imagenet2012) are prepared from the user's archives in
  `manual_dir` and streamed as `Stream`s. `synthetic` needs no files. Safe to
  call from several processes at once.

  Args:
    dataset: 'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012',
      'synthetic', or another tfds image classification dataset.
    splits: tfds split strings, e.g. 'train[:45000]'.
    data_dir: where tfds prepares datasets; default `default_data_dir()`.
    manual_dir: folder with the original archives; default `data/<dataset>`
      if it exists (required for imagenet2012), else tfds downloads.
    augmentation: one of `AUGMENTATIONS`; 'auto' = 'cifar' for CIFAR,
      'imagenet' for streamed datasets, 'none' otherwise.
    image_size: side of the model input: the crop size of streamed datasets
      (0 = 224), the side of synthetic images (0 = 32); for in-memory
      datasets 0 or their own side.
    num_classes: classes of synthetic data (0 = 10); for other datasets 0 or
      their own number.
    process_index: this process's share of streamed splits; default
      `jax.process_index()`.
    process_count: default `jax.process_count()`.

  Returns:
    `({split: Split | Stream}, DatasetInfo)`.

  Raises:
    FileNotFoundError: an archive is missing (names the files and folder).
    ValueError: unknown dataset or augmentation, wrong checksum, bad split,
      image size or number of classes that the dataset does not have.
  """
  data_dir = files.as_path(data_dir or default_data_dir())
  if manual_dir:
    manual_dir = pathlib.Path(manual_dir).expanduser()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
  if image_size < 0 or num_classes < 0:
    raise ValueError(f"image_size and num_classes must be >= 0 (0 = the dataset's own), "
                     f"got {image_size} and {num_classes}.")
  streamed = False
  if dataset == SYNTHETIC:
    sources, info = _load_synthetic(splits, image_size, num_classes)
  else:
    builder = None
    if not _info_path(data_dir, dataset).exists():  # not cached in memory yet
      builder = _builder(dataset, data_dir)
      image_key = builder.info.supervised_keys[0]
      streamed = None in builder.info.features[image_key].shape
    if streamed:
      builder = _prepare(builder, dataset, data_dir, manual_dir)
      sources, info = _load_streamed(builder, dataset, splits,
                                     image_size or DEFAULT_STREAMED_IMAGE_SIZE,
                                     process_index, process_count)
    else:
      sources, info = _load_in_memory(dataset, splits, data_dir, manual_dir, builder)
      height, width = info.image_shape[:2]
      if image_size and (image_size, image_size) != (height, width):
        raise ValueError(f"dataset {dataset!r} has {height}x{width} images, held in "
                         f"memory without resizing: image_size must be 0 or "
                         f"{height if height == width else '0'}, got {image_size}.")
    if num_classes not in (0, info.num_classes):
      raise ValueError(f"dataset {dataset!r} has {info.num_classes} classes; num_classes "
                       f"must be 0 or {info.num_classes}, got {num_classes}.")
  _check_image_shape(dataset, info.image_shape)
  mean, std = pixel_statistics(dataset)
  preprocessing = Preprocessing(_resolve_augmentation(dataset, augmentation, streamed),
                                info.image_shape[0] if streamed else 0, mean, std)
  return {split: source._replace(preprocessing=preprocessing)
          for split, source in sources.items()}, info


def count_examples(source: Source) -> int:
  """Examples in a split (over all processes)."""
  return len(source.labels) if isinstance(source, Split) else source.num_examples


def take(source: Source, count: int) -> Source:
  """The first `count` examples (0 = all)."""
  if count <= 0:
    return source
  if count > count_examples(source):
    raise ValueError(f"asked for {count} examples but the split has "
                     f"{count_examples(source)}.")
  if isinstance(source, Split):
    return source._replace(images=source.images[:count], labels=source.labels[:count])
  sizes = {name: s.num_examples for name, s in source.builder.info.splits.items()}
  ranges = _absolute_ranges(source.split, sizes)
  if len(ranges) != 1:
    raise ValueError(f"the first {count} examples of a split made of several parts "
                     f"({source.split!r}) are ambiguous; name a single range instead.")
  name, start, _ = ranges[0]
  return source._replace(split=f"{name}[{start}:{start + count}]", num_examples=count)


# --- batching -----------------------------------------------------------------

def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped, like flax examples)."""
  return num_examples // global_batch_size


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The example order of `epoch`: a function of `(seed, epoch)` only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


Rows = slice | np.ndarray  # this process's rows of a global batch


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int,
                 process_index: int | None = None) -> Rows:
  """Rows of a global batch held by a process's devices under `sharding`.

  Any device order works: `jax.make_mesh` orders TPU devices by their place
  in the slice, so a process's devices need not be adjacent in the mesh (a
  v5e 4x4 slice: processes [0,0,1,1,1,1,0,2,3,3,3,3,2,2,2,0] along the data
  axis). A process's batch is its rows in increasing order, which is how
  `jax.make_array_from_process_local_data` (`to_global`) maps it onto the
  process's devices.

  Args:
    sharding: the batch sharding (over the first axis).
    global_batch_size: rows of a global batch.
    process_index: whose rows; default this process.

  Returns:
    A slice when the rows are contiguous, else their sorted indices.
  """
  process_index = jax.process_index() if process_index is None else process_index
  index_map = sharding.devices_indices_map((global_batch_size,))
  rows = sorted({row for device, index in index_map.items()
                 if device.process_index == process_index
                 for row in range(*index[0].indices(global_batch_size))})
  if not rows:
    raise ValueError(f"process {process_index} holds no device of the sharding.")
  if rows == list(range(rows[0], rows[-1] + 1)):
    return slice(rows[0], rows[-1] + 1)
  return np.asarray(rows)


def pixel_statistics(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """`(mean, std)` per channel in pixel units that `dataset`'s images are normalized with."""
  return _NORMALIZATION.get(dataset, UNIT_SCALING)


def normalize(images: jax.typing.ArrayLike, preprocessing: Preprocessing) -> jax.Array:
  """The model input: float32 `(pixel - mean) / std` per channel, in jnp.

  The train and eval steps call it on the uint8 batches inside their jitted
  programs. It computes `(pixel - mean) * (1 / std)`, with `1 / std` rounded
  to float32 first (`pixel * (1 / std)` when every mean is 0).

  Args:
    images: uint8 pixels `(..., channels)`.
    preprocessing: its `mean` and `std` (one value or one per channel).

  Returns:
    float32 array of `images`' shape.

  Raises:
    TypeError: `images` is not uint8.
  """
  if jnp.dtype(images.dtype) != jnp.uint8:
    raise TypeError(f"normalize: images must be uint8 pixels (0..255), got "
                    f"{jnp.dtype(images.dtype)}.")
  images = jnp.asarray(images).astype(jnp.float32)
  per_channel = (1,) * (images.ndim - 1) + (-1,)
  mean = np.asarray(preprocessing.mean, np.float32).reshape(per_channel)
  scale = (np.float32(1.0) / np.asarray(preprocessing.std, np.float32)).reshape(per_channel)
  return (images - mean) * scale if mean.any() else images * scale


def _rows_count(rows: Rows, global_batch_size: int) -> int:
  return len(np.arange(global_batch_size)[rows])


# Augmentations: TensorFlow functions of one image and a stateless seed.

def _example_seed(tf, seed: int, epoch, *data):
  """A stateless-RNG seed `(2,)` int32 from `(seed, epoch, *data)`."""
  key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
  for value in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
  return key


def _cifar_augment(tf, image, key):
  """Zero-pad 4 pixels per side, random crop back to the image size, random flip."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
  image = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_key)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def _center_crop_window(tf, shape, image_size: int):
  """`[y, x, height, width]` of the center crop that evaluation resizes to image_size."""
  height, width = shape[0], shape[1]
  side = tf.cast(image_size / (image_size + CROP_PADDING)
                 * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _random_resized_crop_window(tf, shape, key, image_size: int):
  """`[y, x, height, width]` of an Inception-style crop (8%-100% of the area,
  aspect ratio 3/4-4/3; the center crop when 10 attempts fail)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=key, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
  failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
  return tf.cond(failed, lambda: _center_crop_window(tf, shape, image_size),
                 lambda: tf.stack([begin[0], begin[1], size[0], size[1]]))


def _resize_to_pixels(tf, image, image_size: int):
  """Bicubic resize to `image_size` square, rounded and clipped back to uint8."""
  image = tf.image.resize(image, [image_size, image_size], method="bicubic")
  return tf.saturate_cast(tf.round(image), tf.uint8)


def _imagenet_train(tf, image_bytes, key, image_size: int, channels: int):
  """Decodes only a random resized crop, resizes it (bicubic) and flips it: uint8."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  shape = tf.image.extract_jpeg_shape(image_bytes)
  window = _random_resized_crop_window(tf, shape, crop_key, image_size)
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=channels)
  image = _resize_to_pixels(tf, image, image_size)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def _imagenet_eval(tf, image_bytes, image_size: int, channels: int):
  """Decodes the center crop and resizes it (bicubic): resize 256 + crop 224, uint8."""
  window = _center_crop_window(tf, tf.image.extract_jpeg_shape(image_bytes), image_size)
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=channels)
  return _resize_to_pixels(tf, image, image_size)


def host_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _resolve_workers(num_workers: int) -> int:
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0 (0 = all {host_cores()} host cores), "
                     f"got {num_workers}.")
  return num_workers or host_cores()


def _tf_options(tf, num_workers: int):
  """Deterministic output order on a pool of `num_workers` threads, one core each.

  Per-example work runs `num_workers` elements at a time
  (`num_parallel_calls`), each on one thread (`max_intra_op_parallelism=1`),
  so the pool uses `num_workers` cores. `deterministic` keeps the elements in
  input order however many finish first.
  """
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = num_workers
  options.threading.max_intra_op_parallelism = 1
  return options


def _in_memory_train_batches(split: Split, order: np.ndarray, *, global_batch_size: int,
                             seed: int, epoch: int, rows: Rows, first_step: int,
                             num_steps: int, num_workers: int) -> Iterator[Batch]:
  num_images = len(split.images)
  if split.preprocessing.augmentation == "none":
    for step in range(first_step, num_steps):
      indices = order[step * global_batch_size:(step + 1) * global_batch_size][rows]
      yield Batch(split.images[indices % num_images], split.labels[indices],
                  np.ones(len(indices), bool))
    return
  tf, _ = _import_tf()

  def gathered():
    for step in range(first_step, num_steps):
      indices = order[step * global_batch_size:(step + 1) * global_batch_size][rows]
      yield split.images[indices % num_images], split.labels[indices], indices

  def augment(images, labels, indices):
    # map_fn over the batch: about 2x the examples/s of a per-example
    # tf.data map on this project's 2-core machine.
    images = tf.map_fn(
        lambda args: _cifar_augment(tf, args[0], _example_seed(tf, seed, epoch, args[1])),
        (images, indices), fn_output_signature=tf.uint8, parallel_iterations=64)
    return images, labels

  image_spec = tf.TensorSpec((None,) + split.images.shape[1:], tf.uint8)
  ds = tf.data.Dataset.from_generator(gathered, output_signature=(
      image_spec, tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None,), tf.int64)))
  ds = ds.map(augment, num_parallel_calls=num_workers).prefetch(2)
  for images, labels in ds.with_options(_tf_options(tf, num_workers)).as_numpy_iterator():
    yield Batch(images, labels, np.ones(len(labels), bool))


def _share(stream: Stream):
  _, tfds = _import_tf()
  return tfds.split_for_jax_process(stream.split, process_index=stream.process_index,
                                    process_count=stream.process_count)


def _share_sizes(stream: Stream) -> list[int]:
  """Examples of each process's share of the stream's split."""
  _, tfds = _import_tf()
  return [stream.builder.info.splits[share].num_examples
          for share in tfds.even_splits(stream.split, n=stream.process_count)]


def _streamed_train_batches(stream: Stream, *, global_batch_size: int, seed: int,
                            epoch: int, rows: Rows, first_step: int, num_steps: int,
                            num_workers: int) -> Iterator[Batch]:
  tf, tfds = _import_tf()
  local_rows = _rows_count(rows, global_batch_size)
  image_key, label_key = stream.builder.info.supervised_keys
  preprocessing = stream.preprocessing
  channels = stream.builder.info.features[image_key].shape[-1] or 3
  shuffle_seed = int(np.random.default_rng([seed, epoch, stream.process_index]
                                           ).integers(2**31))
  ds = stream.builder.as_dataset(
      split=_share(stream), shuffle_files=True,
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                  options=_tf_options(tf, num_workers)),
      decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.shuffle(16 * local_rows, seed=shuffle_seed, reshuffle_each_iteration=False)
  # Positions before skipping keep each example's augmentation when resuming.
  ds = ds.enumerate().skip(first_step * local_rows).take(
      (num_steps - first_step) * local_rows)

  def preprocess(position, example):
    image = example[image_key]
    if preprocessing.augmentation == "imagenet":
      key = _example_seed(tf, seed, epoch, stream.process_index, position)
      image = _imagenet_train(tf, image, key, preprocessing.image_size, channels)
    else:
      image = _imagenet_eval(tf, image, preprocessing.image_size, channels)
    return image, tf.cast(example[label_key], tf.int32)

  ds = ds.map(preprocess, num_parallel_calls=num_workers)
  ds = ds.batch(local_rows, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  for images, labels in ds.with_options(_tf_options(tf, num_workers)).as_numpy_iterator():
    yield Batch(images, labels, np.ones(len(labels), bool))


def train_batches(source: Source, *, global_batch_size: int, seed: int, epoch: int,
                  rows: Rows, start_step: int = 0, num_workers: int = 0
                  ) -> Iterator[Batch]:
  """This process's rows of each global training batch of `epoch`, augmented.

  In-memory sources give the same global batches whatever the topology;
  streamed sources give each process batches from its own share.

  Args:
    source: the training examples (`load_dataset`).
    global_batch_size: examples per step over all processes.
    seed: data seed: with `epoch`, fixes the order and the augmentation.
    epoch: 0-based epoch.
    rows: this process's rows of each global batch (`process_rows`).
    start_step: first batch within the epoch (resuming mid-epoch).
    num_workers: tf.data threads that decode and augment (0 = all
      `host_cores()`); the batches are the same for any number.

  Yields:
    `Batch`es of uint8 images.
  """
  num_workers = _resolve_workers(num_workers)
  num_steps = steps_per_epoch(count_examples(source), global_batch_size)
  if isinstance(source, Stream):
    yield from _streamed_train_batches(
        source, global_batch_size=global_batch_size, seed=seed, epoch=epoch, rows=rows,
        first_step=start_step, num_steps=num_steps, num_workers=num_workers)
    return
  order = epoch_permutation(len(source.labels), seed=seed, epoch=epoch)
  yield from _in_memory_train_batches(
      source, order, global_batch_size=global_batch_size, seed=seed, epoch=epoch,
      rows=rows, first_step=start_step, num_steps=num_steps, num_workers=num_workers)


def _streamed_eval_batches(stream: Stream, *, global_batch_size: int, rows: Rows,
                           num_workers: int) -> Iterator[Batch]:
  tf, tfds = _import_tf()
  local_rows = _rows_count(rows, global_batch_size)
  image_key, label_key = stream.builder.info.supervised_keys
  preprocessing = stream.preprocessing
  channels = stream.builder.info.features[image_key].shape[-1] or 3
  sizes = _share_sizes(stream)
  # Every process runs the same number of batches: pad each share to the largest.
  num_batches = math.ceil(max(sizes) / local_rows)
  options = _tf_options(tf, num_workers)
  ds = stream.builder.as_dataset(split=_share(stream), shuffle_files=False,
                                 read_config=tfds.ReadConfig(options=options),
                                 decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda example: (
      _imagenet_eval(tf, example[image_key], preprocessing.image_size, channels),
      tf.cast(example[label_key], tf.int32), True), num_parallel_calls=num_workers)
  size = preprocessing.image_size
  padding = tf.data.Dataset.from_tensors(
      (tf.zeros((size, size, channels), tf.uint8), tf.constant(0, tf.int32), False))
  ds = ds.concatenate(padding.repeat(num_batches * local_rows
                                     - sizes[stream.process_index]))
  ds = ds.batch(local_rows).prefetch(tf.data.AUTOTUNE)
  for images, labels, mask in ds.with_options(options).as_numpy_iterator():
    yield Batch(images, labels, mask)


def eval_batches(source: Source, *, global_batch_size: int, rows: Rows,
                 examples_per_batch: int | None = None, num_workers: int = 0
                 ) -> Iterator[Batch]:
  """Every example once, never augmented; padding rows have mask False.

  In-memory sources go in order: global batch `k` holds examples
  `[k * examples_per_batch, (k + 1) * examples_per_batch)` followed by
  padding up to `global_batch_size` rows (and the last one fewer examples),
  so the batches hold the same examples whatever the number of devices. Each
  process of a streamed source reads its share, padded so that all processes
  run the same number of batches.

  Args:
    source: the examples.
    global_batch_size: rows of a global batch (a multiple of the devices).
    rows: this process's rows of each global batch (`process_rows`).
    examples_per_batch: examples per global batch, at most
      `global_batch_size`; default `global_batch_size`.
    num_workers: tf.data threads that decode streamed images (0 = all
      `host_cores()`).

  Yields:
    `Batch`es of uint8 images.
  """
  num_workers = _resolve_workers(num_workers)
  examples_per_batch = examples_per_batch or global_batch_size
  if not 0 < examples_per_batch <= global_batch_size:
    raise ValueError(f"examples_per_batch must be in [1, {global_batch_size}], got "
                     f"{examples_per_batch}.")
  if isinstance(source, Stream):
    yield from _streamed_eval_batches(source, global_batch_size=global_batch_size,
                                      rows=rows, num_workers=num_workers)
    return
  count = len(source.labels)
  for start in range(0, count, examples_per_batch):
    indices = np.arange(start, start + global_batch_size)[rows]
    valid = indices < min(start + examples_per_batch, count)
    indices = np.where(valid, indices, 0)
    yield Batch(source.images[indices % len(source.images)], source.labels[indices],
                valid)


def to_global(batch: Batch, sharding: jax.sharding.Sharding,
              global_batch_size: int) -> Batch:
  """Assembles the processes' rows into global arrays sharded by `sharding`."""
  return Batch(*(jax.make_array_from_process_local_data(
      sharding, local, (global_batch_size,) + local.shape[1:]) for local in batch))


def prefetch_to_device(batches: Iterable[Batch], sharding: jax.sharding.Sharding,
                       global_batch_size: int, size: int = 2) -> Iterator[Batch]:
  """Global device batches (`to_global`), keeping the next `size` in flight.

  Like `flax.jax_utils.prefetch_to_device`, for global arrays sharded over
  the devices of all processes: while the device runs step `n`, the batches
  of steps `n + 1 .. n + size` are already transferring.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(to_global(batch, sharding, global_batch_size))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
