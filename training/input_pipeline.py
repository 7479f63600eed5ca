"""Input pipeline: the sources of `training.datasets` as exact, deterministic batches.

Each kind of source (`datasets.Split`, `datasets.Stream`) has its own batching,
chosen by its type (`functools.singledispatch`):

* In memory (`Split`): the example order of an epoch is a permutation drawn
  from `(seed, epoch)`, so the global batch at every step holds the same
  examples in the same order whatever the number of devices or processes;
  each process materializes only the rows of the global batch that its
  devices hold.
* Streamed (`Stream`): each process reads only its share of the tfds records
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
import functools
import math
import os
from typing import Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from training.datasets import CROP_PADDING, Preprocessing, Source, Split, Stream
from training.prepare import import_tf


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


@functools.singledispatch
def _source_train_batches(source: Source, *, global_batch_size: int, seed: int, epoch: int,
                          rows: Rows, first_step: int, num_steps: int, num_workers: int
                          ) -> Iterator[Batch]:
  """Steps `[first_step, num_steps)` of `train_batches`, per kind of source."""
  raise TypeError(f"source must be a datasets.Split or datasets.Stream, got "
                  f"{type(source).__name__}.")


@functools.singledispatch
def _source_eval_batches(source: Source, *, global_batch_size: int, rows: Rows,
                         examples_per_batch: int, num_workers: int) -> Iterator[Batch]:
  """`eval_batches`, per kind of source."""
  raise TypeError(f"source must be a datasets.Split or datasets.Stream, got "
                  f"{type(source).__name__}.")


@_source_train_batches.register(Split)
def _in_memory_train_batches(split: Split, *, global_batch_size: int, seed: int, epoch: int,
                             rows: Rows, first_step: int, num_steps: int, num_workers: int
                             ) -> Iterator[Batch]:
  order = epoch_permutation(split.num_examples, seed=seed, epoch=epoch)
  num_images = len(split.images)
  if split.preprocessing.augmentation == "none":
    for step in range(first_step, num_steps):
      indices = order[step * global_batch_size:(step + 1) * global_batch_size][rows]
      yield Batch(split.images[indices % num_images], split.labels[indices],
                  np.ones(len(indices), bool))
    return
  tf, _ = import_tf()

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
  _, tfds = import_tf()
  return tfds.split_for_jax_process(stream.split, process_index=stream.process_index,
                                    process_count=stream.process_count)


def _share_sizes(stream: Stream) -> list[int]:
  """Examples of each process's share of the stream's split."""
  _, tfds = import_tf()
  return [stream.builder.info.splits[share].num_examples
          for share in tfds.even_splits(stream.split, n=stream.process_count)]


@_source_train_batches.register(Stream)
def _streamed_train_batches(stream: Stream, *, global_batch_size: int, seed: int,
                            epoch: int, rows: Rows, first_step: int, num_steps: int,
                            num_workers: int) -> Iterator[Batch]:
  tf, tfds = import_tf()
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
  num_steps = steps_per_epoch(source.num_examples, global_batch_size)
  yield from _source_train_batches(
      source, global_batch_size=global_batch_size, seed=seed, epoch=epoch, rows=rows,
      first_step=start_step, num_steps=num_steps, num_workers=num_workers)


@_source_eval_batches.register(Stream)
def _streamed_eval_batches(stream: Stream, *, global_batch_size: int, rows: Rows,
                           examples_per_batch: int, num_workers: int) -> Iterator[Batch]:
  del examples_per_batch  # each process pads its own share
  tf, tfds = import_tf()
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
  yield from _source_eval_batches(source, global_batch_size=global_batch_size, rows=rows,
                                  examples_per_batch=examples_per_batch,
                                  num_workers=num_workers)


@_source_eval_batches.register(Split)
def _in_memory_eval_batches(split: Split, *, global_batch_size: int, rows: Rows,
                            examples_per_batch: int, num_workers: int) -> Iterator[Batch]:
  del num_workers  # gathering rows needs no tf.data
  count = split.num_examples
  for start in range(0, count, examples_per_batch):
    indices = np.arange(start, start + global_batch_size)[rows]
    valid = indices < min(start + examples_per_batch, count)
    indices = np.where(valid, indices, 0)
    yield Batch(split.images[indices % len(split.images)], split.labels[indices], valid)


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
