"""Datasets: tfds image datasets prepared once and held in memory or streamed.

Two kinds of sources, both built by tensorflow-datasets' own builders:

* In memory (`Split`): datasets whose images have a fixed shape (mnist,
  fashion_mnist, cifar10, cifar100, other small tfds image classification
  datasets) and `synthetic`. Each split is read once into numpy (uint8 images,
  int32 labels) and cached next to the prepared dataset, so later runs start
  without TensorFlow.
* Streamed (`Stream`): datasets of variable-size JPEG images (imagenet2012),
  read from the prepared tfds records by each process for its own share.

Preparation happens once per data_dir: in a multi-process job process 0
prepares (tfds' download_and_prepare, the numpy cache) while the others wait
at a barrier and then only read; processes of separate jobs on one host take
turns through a file lock. How the sources become batches is
`training/input_pipeline.py`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import types
from typing import Any, NamedTuple

import jax
import numpy as np

from training import files, prepare
from training.prepare import import_tf

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

  @property
  def num_examples(self) -> int:
    """Examples in the split."""
    return len(self.labels)

  def take(self, count: int) -> Split:
    """The first `count` examples (0 = all)."""
    _check_take(count, self.num_examples)
    if count <= 0:
      return self
    return self._replace(images=self.images[:count], labels=self.labels[:count])


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

  def take(self, count: int) -> Stream:
    """The first `count` examples of the split over all processes (0 = all)."""
    _check_take(count, self.num_examples)
    if count <= 0:
      return self
    sizes = {name: s.num_examples for name, s in self.builder.info.splits.items()}
    ranges = _absolute_ranges(self.split, sizes)
    if len(ranges) != 1:
      raise ValueError(f"the first {count} examples of a split made of several parts "
                       f"({self.split!r}) are ambiguous; name a single range instead.")
    name, start, _ = ranges[0]
    return self._replace(split=f"{name}[{start}:{start + count}]", num_examples=count)


Source = Split | Stream  # both have `num_examples` and `take(count)`


def _check_take(count: int, num_examples: int) -> None:
  if count > num_examples:
    raise ValueError(f"asked for {count} examples but the split has {num_examples}.")


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


def default_splits(dataset: str) -> tuple[str, str, str]:
  """The (train, validation, test) tfds split strings used for `dataset`.

  Raises:
    ValueError: `dataset` has no default; the config must name its splits.
  """
  if dataset not in _DEFAULT_SPLITS:
    _, tfds = import_tf()
    try:
      tfds.builder_cls(dataset)
    except tfds.core.registered.DatasetNotFoundError:
      raise prepare.unknown_dataset(dataset) from None
    raise ValueError(
        f"dataset {dataset!r} has no default splits (known: {sorted(_DEFAULT_SPLITS)}); "
        "set --config.train_split, --config.validation_split and --config.test_split "
        "to tfds split strings.")
  return _DEFAULT_SPLITS[dataset]


# --- reading prepared datasets ------------------------------------------------

def _cache_path(data_dir: pathlib.Path, dataset: str, split: str) -> pathlib.Path:
  readable = re.sub(r"[^A-Za-z0-9_-]+", "_", split).strip("_")
  digest = hashlib.sha1(split.encode()).hexdigest()[:8]
  return data_dir / "numpy" / dataset / f"{readable}-{digest}.npz"


def _info_path(data_dir: pathlib.Path, dataset: str) -> pathlib.Path:
  return data_dir / "numpy" / dataset / "info.json"


def _builder_info(builder, dataset: str, image_size: int = 0) -> DatasetInfo:
  """The model input of a tfds dataset: stored shape, or the square crop of streamed JPEGs."""
  image_key, label_key = builder.info.supervised_keys
  features = builder.info.features
  shape = tuple(features[image_key].shape)
  if None in shape[:2]:  # streamed and cropped to a square
    side = image_size or DEFAULT_STREAMED_IMAGE_SIZE
    shape = (side, side, shape[-1] or 3)
  return DatasetInfo(dataset, shape, int(features[label_key].num_classes))


def _synthetic_info(image_size: int, num_classes: int) -> DatasetInfo:
  side = image_size or SYNTHETIC_DEFAULT_IMAGE_SIZE
  return DatasetInfo(SYNTHETIC, (side, side, 3), num_classes or SYNTHETIC_DEFAULT_NUM_CLASSES)


def dataset_info(dataset: str, *, data_dir=None, image_size: int = 0,
                 num_classes: int = 0) -> DatasetInfo:
  """What `load_dataset` gives the model, from tfds' metadata only (no data, no TensorFlow).

  Args:
    dataset: as for `load_dataset`.
    data_dir: where tfds prepares datasets; default `prepare.default_data_dir()`.
    image_size: as for `load_dataset` (0 = the dataset's own, 224 for
      streamed datasets, 32 for synthetic ones).
    num_classes: as for `load_dataset` (0 = the dataset's own, 10 for
      synthetic data).

  Returns:
    `DatasetInfo` with `(height, width, channels)` of the model input.
  """
  if dataset == SYNTHETIC:
    return _synthetic_info(image_size, num_classes)
  builder = prepare.tfds_builder(dataset, data_dir, tensorflow=False)
  info = _builder_info(builder, dataset, image_size)
  return info._replace(num_classes=num_classes or info.num_classes)


def _split_error(builder, dataset: str, split: str, error: Exception) -> ValueError:
  available = {name: s.num_examples for name, s in builder.info.splits.items()}
  return ValueError(f"split {split!r} of {dataset!r} cannot be read ({error}); its "
                    f"splits and sizes are {available}.")


def _read_in_memory(builder, dataset: str, splits: list[str]
                    ) -> tuple[dict[str, Split], DatasetInfo]:
  _, tfds = import_tf()
  info = _builder_info(builder, dataset)
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
  builder = prepare.ensure_prepared(builder or prepare.tfds_builder(dataset, data_dir),
                                    dataset, data_dir, manual_dir)
  with prepare.file_lock(data_dir / f".{dataset}.numpy.lock"):
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
  _, tfds = import_tf()
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
  info = _synthetic_info(image_size, num_classes)
  rng = np.random.default_rng(0)
  shape = info.image_shape
  images = rng.integers(0, 256, (SYNTHETIC_DISTINCT_IMAGES,) + shape, dtype=np.uint8)
  image_labels = rng.integers(0, info.num_classes, SYNTHETIC_DISTINCT_IMAGES).astype(np.int32)
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
  return arrays, info


def _load_streamed(builder, dataset: str, splits: list[str], image_size: int,
                   process_index: int, process_count: int
                   ) -> tuple[dict[str, Stream], DatasetInfo]:
  image_feature = builder.info.features[builder.info.supervised_keys[0]]
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
  return streams, _builder_info(builder, dataset, image_size)


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
    data_dir: where tfds prepares datasets; default `prepare.default_data_dir()`.
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
  data_dir = files.as_path(data_dir or prepare.default_data_dir())
  if manual_dir:
    manual_dir = pathlib.Path(manual_dir).expanduser()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
  if image_size < 0 or num_classes < 0:
    raise ValueError(f"image_size and num_classes must be >= 0 (0 = the dataset's own), "
                     f"got {image_size} and {num_classes}.")

  def load():
    builder = None
    if not _info_path(data_dir, dataset).exists():  # not cached in memory yet
      builder = prepare.tfds_builder(dataset, data_dir)
      image_key = builder.info.supervised_keys[0]
      if None in builder.info.features[image_key].shape:
        builder = prepare.ensure_prepared(builder, dataset, data_dir, manual_dir)
        return (*_load_streamed(builder, dataset, splits,
                                image_size or DEFAULT_STREAMED_IMAGE_SIZE,
                                process_index, process_count), True)
    return (*_load_in_memory(dataset, splits, data_dir, manual_dir, builder), False)

  streamed = False
  if dataset == SYNTHETIC:
    sources, info = _load_synthetic(splits, image_size, num_classes)
  else:
    sources, info, streamed = prepare.once_per_job(load, f"training.datasets: {dataset} prepared")
    if not streamed:
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



def pixel_statistics(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """`(mean, std)` per channel in pixel units that `dataset`'s images are normalized with."""
  return _NORMALIZATION.get(dataset, UNIT_SCALING)

