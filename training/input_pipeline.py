"""Input pipeline: tfds-prepared image datasets as numpy arrays, exact batches.

Datasets are built by tensorflow-datasets' own builders from the original
archives in a `manual_dir` (offline, checked against tfds' registered sizes
and sha256). Each requested split is read once into numpy (uint8 images,
int32 labels) and cached next to the prepared dataset, so later runs start
without TensorFlow.

Batching is plain numpy: the example order of an epoch is a permutation drawn
from `(seed, epoch)`, so the global batch at every step holds the same
examples in the same order whatever the number of devices or processes; each
process materializes only the rows of the global batch that its devices hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterator, NamedTuple

import jax
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SUPPORTED_IMAGE_SIZES = ((28, 28), (32, 32))


class Split(NamedTuple):
  """One split in memory.

  Attributes:
    images: uint8 array `(num_examples, height, width, channels)`.
    labels: int32 array `(num_examples,)`.
  """
  images: np.ndarray
  labels: np.ndarray


class DatasetInfo(NamedTuple):
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int


class Batch(NamedTuple):
  """This process's rows of one global batch.

  Attributes:
    images: float32 `(rows, height, width, channels)` in [0, 1].
    labels: int32 `(rows,)`.
    mask: bool `(rows,)`; False marks padding (evaluation only).
  """
  images: np.ndarray
  labels: np.ndarray
  mask: np.ndarray


def default_data_dir() -> pathlib.Path:
  """Where prepared datasets are cached: `<repo>/data/tfds` (git-ignored)."""
  return REPO_ROOT / "data" / "tfds"


def default_manual_dir(dataset: str) -> pathlib.Path:
  """Where a dataset's original archives live: `<repo>/data/<dataset>`."""
  return REPO_ROOT / "data" / dataset


# --- loading ------------------------------------------------------------------

def _cache_path(data_dir: pathlib.Path, dataset: str, split: str) -> pathlib.Path:
  readable = re.sub(r"[^A-Za-z0-9_-]+", "_", split).strip("_")
  digest = hashlib.sha1(split.encode()).hexdigest()[:8]
  return data_dir / "numpy" / dataset / f"{readable}-{digest}.npz"


def _info_path(data_dir: pathlib.Path, dataset: str) -> pathlib.Path:
  return data_dir / "numpy" / dataset / "info.json"


def _atomic_write(path: pathlib.Path, write) -> None:
  """Writes through `write(file)` to a temporary file, then renames it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """Serializes dataset preparation between processes on this host."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _import_tfds():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # TensorFlow only decodes files here: leave every accelerator to JAX.
  tf.config.set_visible_devices([], "GPU")
  return tfds


def _check_archives(builder, dataset: str, manual_dir: pathlib.Path) -> None:
  """Fails early, naming the file, when an archive is missing or corrupt.

  tfds would otherwise try to download a missing file from the network.
  """
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


def _prepare_with_tfds(dataset: str, splits: list[str], data_dir: pathlib.Path,
                       manual_dir: pathlib.Path) -> tuple[dict[str, Split], DatasetInfo]:
  tfds = _import_tfds()
  try:
    builder = tfds.builder(dataset, data_dir=str(data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"unknown dataset {dataset!r}: expected 'mnist', 'fashion_mnist' or another "
        "tensorflow-datasets image classification dataset.") from None
  features = builder.info.features
  keys = builder.info.supervised_keys
  if (not keys or len(keys) != 2 or keys[0] not in features or keys[1] not in features
      or not hasattr(features[keys[1]], "num_classes")):
    raise ValueError(f"dataset {dataset!r} is not an image classification dataset "
                     f"(supervised keys {keys}).")
  image_shape = tuple(features[keys[0]].shape)
  if len(image_shape) != 3 or image_shape[:2] not in SUPPORTED_IMAGE_SIZES:
    raise ValueError(f"dataset {dataset!r} has images of shape {image_shape}; "
                     "expected 28x28 or 32x32 images.")
  info = DatasetInfo(dataset, image_shape, int(features[keys[1]].num_classes))
  if not builder.is_prepared():
    _check_archives(builder, dataset, manual_dir)
    download_dir = tempfile.mkdtemp(prefix=f"{dataset}-extract-", dir=data_dir)
    try:
      builder.download_and_prepare(
          download_dir=download_dir,
          download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    except tfds.download.download_manager.NonMatchingChecksumError as error:
      raise ValueError(f"{error}\nPut the original archives of '{dataset}' in "
                       f"{manual_dir} (--config.manual_dir=DIR).") from None
    finally:
      shutil.rmtree(download_dir, ignore_errors=True)
  arrays = {}
  for split in splits:
    try:
      images, labels = tfds.as_numpy(builder.as_dataset(
          split=split, batch_size=-1, as_supervised=True, shuffle_files=False))
    except (ValueError, KeyError) as error:
      available = {name: s.num_examples for name, s in builder.info.splits.items()}
      raise ValueError(f"split {split!r} of {dataset!r} cannot be read ({error}); its "
                       f"splits and sizes are {available}.") from None
    arrays[split] = Split(np.asarray(images, np.uint8), np.asarray(labels, np.int32))
  return arrays, info


def load_dataset(dataset: str, splits: list[str], *, data_dir=None,
                 manual_dir=None) -> tuple[dict[str, Split], DatasetInfo]:
  """Loads tfds splits (e.g. 'train[:50000]') into memory.

  The first call prepares the dataset with tfds from the archives in
  `manual_dir` and caches each split as `.npz` under `data_dir`; later calls
  read the cache. Safe to call from several processes at once.

  Args:
    dataset: tfds name, e.g. 'mnist' or 'fashion_mnist'.
    splits: tfds split strings.
    data_dir: where tfds prepares the dataset; default `default_data_dir()`.
    manual_dir: folder with the original archives; default
      `default_manual_dir(dataset)`.

  Returns:
    `({split: Split}, DatasetInfo)`.

  Raises:
    FileNotFoundError: an archive is missing (names the file and folder).
    ValueError: unknown dataset, wrong checksum, unsupported image size.
  """
  data_dir = pathlib.Path(data_dir or default_data_dir()).expanduser().resolve()
  manual_dir = pathlib.Path(manual_dir or default_manual_dir(dataset)).expanduser()
  info_path = _info_path(data_dir, dataset)
  cached = [_cache_path(data_dir, dataset, split) for split in splits]

  def read_cache():
    info = json.loads(info_path.read_text())
    arrays = {}
    for split, path in zip(splits, cached):
      with np.load(path) as npz:
        arrays[split] = Split(npz["images"], npz["labels"])
    return arrays, DatasetInfo(dataset, tuple(info["image_shape"]), info["num_classes"])

  if info_path.exists() and all(path.exists() for path in cached):
    return read_cache()
  with _file_lock(data_dir / f".{dataset}.lock"):
    if info_path.exists() and all(path.exists() for path in cached):
      return read_cache()  # another process prepared it meanwhile
    arrays, info = _prepare_with_tfds(dataset, splits, data_dir, manual_dir)
    for split, path in zip(splits, cached):
      _atomic_write(path, lambda f, s=arrays[split]: np.savez(
          f, images=s.images, labels=s.labels))
    _atomic_write(info_path, lambda f: f.write(json.dumps(
        {"image_shape": list(info.image_shape), "num_classes": info.num_classes}).encode()))
  return arrays, info


def take(split: Split, num_examples: int) -> Split:
  """The first `num_examples` examples (0 = all)."""
  if num_examples <= 0:
    return split
  if num_examples > len(split.labels):
    raise ValueError(f"asked for {num_examples} examples but the split has "
                     f"{len(split.labels)}.")
  return Split(split.images[:num_examples], split.labels[:num_examples])


# --- batching -----------------------------------------------------------------

def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped, like flax examples)."""
  return num_examples // global_batch_size


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  """The example order of `epoch`: a function of `(seed, epoch)` only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> slice:
  """Rows of a global batch held by this process's devices under `sharding`.

  Raises:
    ValueError: the rows are not contiguous (the mesh must list each
      process's devices together).
  """
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  bounds = sorted({index[0].indices(global_batch_size)[:2] for index in index_map.values()})
  for (_, stop), (start, _) in zip(bounds, bounds[1:]):
    if stop != start:
      raise ValueError(f"this process's rows {bounds} of the global batch are not "
                       "contiguous; order mesh devices by process.")
  return slice(bounds[0][0], bounds[-1][1])


def _to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) * np.float32(1.0 / 255.0)


def train_batches(split: Split, *, global_batch_size: int, seed: int, epoch: int,
                  rows: slice, start_step: int = 0) -> Iterator[Batch]:
  """This process's rows of each global training batch of `epoch`.

  Args:
    split: the training examples.
    global_batch_size: examples per step over all processes.
    seed: data seed.
    epoch: 0-based epoch; with `seed`, fixes the order.
    rows: this process's rows of each global batch (`process_rows`).
    start_step: first batch within the epoch (resuming mid-epoch).
  """
  order = epoch_permutation(len(split.labels), seed=seed, epoch=epoch)
  for step in range(start_step, steps_per_epoch(len(split.labels), global_batch_size)):
    indices = order[step * global_batch_size:(step + 1) * global_batch_size][rows]
    yield Batch(_to_float(split.images[indices]), split.labels[indices],
                np.ones(len(indices), bool))


def eval_batches(split: Split, *, global_batch_size: int, rows: slice) -> Iterator[Batch]:
  """Every example once, in order; the last global batch is padded (mask False)."""
  num_examples = len(split.labels)
  for start in range(0, num_examples, global_batch_size):
    indices = np.arange(start, start + global_batch_size)[rows]
    valid = indices < num_examples
    indices = np.where(valid, indices, 0)
    yield Batch(_to_float(split.images[indices]), split.labels[indices], valid)


def to_global(batch: Batch, sharding: jax.sharding.Sharding,
              global_batch_size: int) -> Batch:
  """Assembles the processes' rows into global arrays sharded by `sharding`."""
  return Batch(*(jax.make_array_from_process_local_data(
      sharding, local, (global_batch_size,) + local.shape[1:]) for local in batch))
