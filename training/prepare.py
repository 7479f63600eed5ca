"""Preparing tfds datasets once: data folders, builders, archives, locks, processes.

A dataset is prepared (tfds' download_and_prepare, then `training.datasets`'
numpy cache) once per data_dir. In a multi-process job (`once_per_job`)
process 0 prepares while the others wait at a barrier and then only read, so
the hosts of a pod sharing one data_dir (a bucket or a network file system)
do not prepare it at once; processes of separate jobs on one host take turns
through a file lock (`file_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import itertools
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Callable, TypeVar

import jax

from training import files

T = TypeVar("T")
PREPARE_TIMEOUT_S = 48 * 3600  # how long the other processes wait for process 0's preparation
_BARRIERS = itertools.count()  # barrier names are used once; processes count alike
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Datasets that tfds cannot download: the files the user puts in manual_dir.
MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}


def default_data_dir() -> pathlib.Path:
  """Where datasets are prepared: `$TFDS_DATA_DIR` if set, else `<repo>/data/tfds`."""
  if os.environ.get("TFDS_DATA_DIR"):
    return pathlib.Path(os.environ["TFDS_DATA_DIR"])
  return REPO_ROOT / "data" / "tfds"


def default_manual_dir(dataset: str) -> pathlib.Path:
  """Where a dataset's original archives live: `<repo>/data/<dataset>`."""
  return REPO_ROOT / "data" / dataset


@contextlib.contextmanager
def file_lock(path: pathlib.Path):
  """Serializes dataset preparation between processes on this host.

  A data_dir in a bucket (a URI) has no lock: the processes of one job take
  turns through `once_per_job`; separate jobs should not prepare the same
  bucket at once (prepare it before, e.g. with `tfds build`, docs/train.md).
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


def import_tensorflow():
  """TensorFlow, with every accelerator left to JAX."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  return tf


def import_tf():
  """TensorFlow and tfds, with every accelerator left to JAX.

  Import them on the main thread before other threads run: tfds imports its
  modules under `etils.epy.lazy_imports`, which replaces `builtins.__import__`
  for every thread while it runs, so an `import` on another thread at that
  moment gets a placeholder module (an orbax checkpoint thread failed so).
  """
  tf = import_tensorflow()
  import tensorflow_datasets as tfds
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


def unknown_dataset(dataset: str) -> ValueError:
  return ValueError(
      f"unknown dataset {dataset!r}: expected 'mnist', 'fashion_mnist', 'cifar10', "
      f"'cifar100', 'imagenet2012', 'synthetic' or another tensorflow-datasets "
      "image classification dataset.")


def tfds_builder(dataset: str, data_dir=None, *, tensorflow: bool = True):
  """The tfds builder of an image classification dataset.

  Args:
    dataset: a tensorflow-datasets name.
    data_dir: where tfds prepares datasets; default `default_data_dir()`.
    tensorflow: False reads only the builder's metadata (shapes, classes,
      split sizes) without importing TensorFlow; True readies TensorFlow with
      every accelerator left to JAX, to prepare and read the data.

  Raises:
    ValueError: unknown dataset, or not an image classification dataset.
  """
  data_dir = files.as_path(data_dir or default_data_dir())
  if tensorflow:
    _, tfds = import_tf()
  else:
    import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(dataset, data_dir=str(data_dir))
  except tfds.core.registered.DatasetNotFoundError:
    raise unknown_dataset(dataset) from None
  features = builder.info.features
  keys = builder.info.supervised_keys
  if (not keys or len(keys) != 2 or keys[0] not in features or keys[1] not in features
      or not hasattr(features[keys[1]], "num_classes")):
    raise ValueError(f"dataset {dataset!r} is not an image classification dataset "
                     f"(supervised keys {keys}).")
  return builder


def ensure_prepared(builder, dataset: str, data_dir: pathlib.Path,
                    manual_dir: pathlib.Path | None):
  """The prepared builder: runs tfds' download_and_prepare once if needed.

  Archives come from `manual_dir` when given, else from `data/<dataset>` if it
  exists; otherwise tfds downloads them (except ImageNet's, which it cannot).
  Processes on one host prepare one at a time (a file lock).
  """
  if builder.is_prepared():
    return builder
  _, tfds = import_tf()
  with file_lock(data_dir / f".{dataset}.lock"):
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


def _barrier(name: str) -> None:
  """Waits at the coordination service's barrier `name` until every process reached it.

  Not a device collective (`multihost_utils.sync_global_devices`): gloo's and
  NCCL's connection timeouts end a wait far shorter than a preparation.
  """
  import orbax.checkpoint as ocp
  ocp.multihost.get_barrier_sync_fn()(key=f"{name} #{next(_BARRIERS)}",
                                      timeout_ms=PREPARE_TIMEOUT_S * 1000)


def once_per_job(load: Callable[[], T], name: str, *, process_index: int | None = None,
                 process_count: int | None = None,
                 barrier: Callable[[str], None] | None = None) -> T:
  """`load()` on process 0 first, then on the others: a dataset prepared once per job.

  Process 0 prepares what `load` needs (tfds' download_and_prepare, the numpy
  cache) in the data_dir while the other processes wait at the barrier `name`;
  on a data_dir that all hosts share they then find it prepared and only
  read it (on a host-local data_dir each host prepares its own, one process
  at a time through the file lock). A single process just calls `load()`.

  Args:
    load: prepares if needed and reads; called once by every process.
    name: the barrier's name, the same in every process.
    process_index: default `jax.process_index()`.
    process_count: default `jax.process_count()`.
    barrier: waits until every process reached it; default the distributed
      runtime's barrier (at most `PREPARE_TIMEOUT_S`).

  Returns:
    What `load()` returned in this process.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if process_count == 1:
    return load()
  result = load() if process_index == 0 else None
  (barrier or _barrier)(name)
  return result if process_index == 0 else load()
