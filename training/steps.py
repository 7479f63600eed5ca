"""The jitted training and evaluation steps.

The step runs on a 1-D mesh `('data',)` over all devices of all processes:

* `parallelism='gspmd'`: `jax.jit` with the batch sharded and the train state
  replicated; batch-norm statistics are global because the compiler turns the
  batch reductions into all-reduces.
* `parallelism='shard_map'`: the step inside `jax.shard_map`; batch norm pools
  statistics with `axis_name='data'` (optionally over groups of
  `bn_group_size` devices) and gradients are averaged with `lax.pmean`.

A step whose loss, gradient or new parameters are not finite is skipped as a
whole (parameters, optimizer state and BN statistics unchanged) and counted.

Gradient accumulation (`grad_accum_steps = k > 1`): each device's rows run as
`k` microbatches in a `lax.scan`, each normalized with its own statistics; the
gradient is their mean, applied once, and the BN running statistics are
updated once with the moments of all the rows (`accumulate_microbatches`,
docs/microbatch.md).
"""

from __future__ import annotations

import functools

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import optax

import jaxbn

from training import datasets
from training import input_pipeline
from training.distributed import AXIS
from training.train_state import EpochSums
from training.train_state import EvalSums
from training.train_state import TrainState


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train_step(state: TrainState, batch: input_pipeline.Batch, *,
               model: nn.Module, tx: optax.GradientTransformation,
               preprocessing: datasets.Preprocessing,
               compute_dtype=jnp.float32, axis_name: str | None = None,
               bn_axis_index_groups=None, label_smoothing: float = 0.0,
               grad_accum_steps: int = 1, batch_shards: int = 1) -> TrainState:
  """One optimization step on a batch (global under jit, local under shard_map).

  Args:
    state: the current train state.
    batch: images `(batch, H, W, C)` uint8, labels `(batch,)` int32.
    model: the model.
    tx: the optimizer.
    preprocessing: how the images become model inputs (`input_pipeline.normalize`).
    compute_dtype: activation dtype (bfloat16 for half precision).
    axis_name: the mapped batch axis under shard_map, else None.
    bn_axis_index_groups: groups of devices that pool BN statistics.
    label_smoothing: the training loss's targets are
      `optax.smooth_labels(one_hot, label_smoothing)` (0 = plain labels).
    grad_accum_steps: k > 1 runs the batch as k microbatches one after the
      other (`accumulate_microbatches`) and applies their
      mean gradient once.
    batch_shards: the batch's rows are this many equal per-device blocks
      (gspmd: the mesh's devices; shard_map: 1, the local block); each
      microbatch takes its rows from every block.

  Returns:
    The new state; on a non-finite loss, gradient or update it keeps the old
    params, optimizer state and BN statistics and counts the step as skipped.
  """
  batch = batch._replace(images=input_pipeline.normalize(batch.images, preprocessing))

  def loss_fn(params):
    logits, updates = model.clone(
        dtype=compute_dtype, axis_name=axis_name,
        axis_index_groups=bn_axis_index_groups).apply(
            {"params": params, "batch_stats": state.bn_state}, batch.images, train=True,
            mutable=["batch_stats"])
    new_bn_state = updates.get("batch_stats", {})
    return _training_loss(logits, batch.labels, label_smoothing), (logits, new_bn_state)

  if grad_accum_steps == 1:
    (loss, (logits, new_bn_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    correct = _correct_count(logits, batch.labels)
  else:
    loss, grads, correct, new_bn_state = accumulate_microbatches(
        state.params, state.bn_state, split_microbatches(batch, grad_accum_steps,
                                                         batch_shards),
        model=model, compute_dtype=compute_dtype, axis_name=axis_name,
        bn_axis_index_groups=bn_axis_index_groups, label_smoothing=label_smoothing)
  examples = batch.labels.shape[0]
  if axis_name is not None:
    # Equal per-device batches: the mean of local means is the global mean.
    grads, loss = lax.pmean((grads, loss), axis_name)
    correct = lax.psum(correct, axis_name)
    examples *= lax.axis_size(axis_name)
    if bn_axis_index_groups is not None:
      # Groups computed different statistics; keep one replicated running
      # average: the pooled mean and variance of the groups' (a plain pmean of
      # the variances would drop the variance of the means).
      new_bn_state = jaxbn.linen.sync_stats(new_bn_state, axis_name)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  finite = _all_finite((loss, grads, new_params))

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  sums = state.epoch_sums
  as_int = finite.astype(jnp.int32)
  new_sums = EpochSums(
      loss=sums.loss + jnp.where(finite, loss, 0.0).astype(jnp.float32),
      correct=sums.correct + as_int * correct,
      examples=sums.examples + as_int * examples,
      steps=sums.steps + as_int,
      nonfinite_steps=sums.nonfinite_steps + (1 - as_int))
  return TrainState(
      step=state.step + 1,
      params=keep_if_finite(new_params, state.params),
      opt_state=keep_if_finite(new_opt_state, state.opt_state),
      bn_state=keep_if_finite(new_bn_state, state.bn_state),
      consecutive_nonfinite=jnp.where(finite, 0, state.consecutive_nonfinite + 1),
      epoch_sums=new_sums)


def _training_loss(logits: jax.Array, labels: jax.Array,
                   label_smoothing: float) -> jax.Array:
  """Mean softmax cross-entropy of `(batch, classes)` logits and `(batch,)` labels."""
  if label_smoothing:
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _correct_count(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32)


def split_microbatches(batch: input_pipeline.Batch, num_microbatches: int,
                       batch_shards: int = 1) -> input_pipeline.Batch:
  """`batch` as `num_microbatches` microbatches stacked on a new leading axis.

  The rows are `batch_shards` equal blocks (one per device under gspmd);
  microbatch `j` is rows `[j * m, (j + 1) * m)` of every block, `m` being
  the block's rows over `num_microbatches`, so each device's microbatch is
  its own rows (no data moves) and shard_map's local split (one block) makes
  the same microbatches.

  Args:
    batch: arrays of `rows` leading rows, `rows` divisible by
      `batch_shards * num_microbatches`.
    num_microbatches: `k`.
    batch_shards: the equal blocks of rows.

  Returns:
    The same fields, each of shape `(k, rows // k) + field.shape[1:]`.
  """
  def split(field):
    shape = field.shape[1:]
    rows = field.shape[0] // (batch_shards * num_microbatches)
    blocks = field.reshape((batch_shards, num_microbatches, rows) + shape)
    return jnp.swapaxes(blocks, 0, 1).reshape(
        (num_microbatches, batch_shards * rows) + shape)
  return jax.tree.map(split, batch)


def _accumulating_forward(model: nn.Module, params, bn_state, batch_moments,
                          images: jax.Array, *, compute_dtype, axis_name,
                          bn_axis_index_groups):
  """The model's training forward pass, pooling BN moments.

  `jaxbn.linen.BatchNorm`'s `batch_moments` collection is mutable: each
  layer adds the microbatch's moments to `batch_moments` and sets its
  `batch_stats` to one running-average update from the step's starting
  statistics with the moments pooled so far.

  Returns:
    `(logits, batch_stats, batch_moments)`: float32 `(batch, classes)` logits
    and the two updated collections.
  """
  module = model.clone(dtype=compute_dtype, axis_name=axis_name,
                       axis_index_groups=bn_axis_index_groups)
  variables = {"params": params, "batch_stats": bn_state,
               jaxbn.linen.MOMENTS_COLLECTION: batch_moments}
  logits, updates = module.apply(
      variables, images, train=True,
      mutable=["batch_stats", jaxbn.linen.MOMENTS_COLLECTION])
  return (logits.astype(jnp.float32), updates.get("batch_stats", {}),
          updates.get(jaxbn.linen.MOMENTS_COLLECTION, {}))


def accumulate_microbatches(params, bn_state, microbatches: input_pipeline.Batch, *,
                            model: nn.Module, compute_dtype=jnp.float32,
                            axis_name: str | None = None, bn_axis_index_groups=None,
                            label_smoothing: float = 0.0):
  """Loss, gradient, correct count and BN statistics of a batch run in microbatches.

  A `lax.scan` over the `k` microbatches runs forward and backward on one at
  a time (activations of one microbatch in memory); each is normalized with
  its own batch statistics, and the BN moments of all `k` are pooled so that
  the running statistics get one update, with the moments of every row
  (docs/microbatch.md).

  Args:
    params: the model's parameters.
    bn_state: its `batch_stats` at the start of the step.
    microbatches: `split_microbatches`'s output, fields `(k, rows, ...)`.
    model: the linen model (`models.create_model`).
    compute_dtype, axis_name, bn_axis_index_groups, label_smoothing: as
      `train_step`'s.

  Returns:
    `(loss, grads, correct, bn_state)`: the mean of the microbatches' mean
    losses and of their gradients, the correct predictions summed, and the
    running statistics updated once with the pooled moments of all rows
    (local values: `train_step` averages them over `axis_name`).
  """
  forward = functools.partial(_accumulating_forward, model,
                              compute_dtype=compute_dtype, axis_name=axis_name,
                              bn_axis_index_groups=bn_axis_index_groups)
  num_microbatches = microbatches.labels.shape[0]

  def loss_fn(params, bn_state, batch_moments, microbatch):
    logits, bn_state, batch_moments = forward(params, bn_state, batch_moments,
                                              microbatch.images)
    loss = _training_loss(logits, microbatch.labels, label_smoothing)
    return loss, (_correct_count(logits, microbatch.labels), bn_state, batch_moments)

  def step(carry, microbatch):
    grads_sum, loss_sum, correct_sum, bn_state, batch_moments = carry
    (loss, (correct, bn_state, batch_moments)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, bn_state, batch_moments, microbatch)
    return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss,
            correct_sum + correct, bn_state, batch_moments), None

  # An all-zero accumulator is an empty one; its structure is the first call's.
  first_images = microbatches.images[0]
  empty_moments = jax.tree.map(
      lambda leaf: jnp.zeros(leaf.shape, leaf.dtype),
      jax.eval_shape(lambda: forward(params, bn_state, {}, first_images)[2]))
  start = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
           jnp.zeros((), jnp.int32), bn_state, empty_moments)
  (grads, loss, correct, bn_state, _), _ = lax.scan(step, start, microbatches)
  grads = jax.tree.map(lambda grad: grad / num_microbatches, grads)
  return loss / num_microbatches, grads, correct, bn_state


def eval_step(params, bn_state, sums: EvalSums, batch: input_pipeline.Batch, *,
              model: nn.Module, preprocessing: datasets.Preprocessing,
              compute_dtype=jnp.float32) -> EvalSums:
  """`sums` plus the loss and correct predictions over the batch's valid (mask) examples.

  The uint8 images become model inputs with `input_pipeline.normalize`.
  Taking the previous batch's sums makes the evaluation one chain of programs:
  each waits for the one before, so every process runs them (and their
  cross-process reductions) in the same order.
  """
  images = input_pipeline.normalize(batch.images, preprocessing)
  logits = model.clone(dtype=compute_dtype).apply(
      {"params": params, "batch_stats": bn_state}, images, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
  correct = (jnp.argmax(logits, -1) == batch.labels) & batch.mask
  return EvalSums(loss=sums.loss + jnp.sum(jnp.where(batch.mask, losses, 0.0)),
                  correct=sums.correct + jnp.sum(correct, dtype=jnp.int32),
                  examples=sums.examples + jnp.sum(batch.mask, dtype=jnp.int32))


def dataset_preprocessing(config: ml_collections.ConfigDict) -> datasets.Preprocessing:
  """The normalization of `config.dataset`'s images (what `load_dataset` gives its splits)."""
  mean, std = datasets.pixel_statistics(config.dataset)
  return datasets.Preprocessing(mean=mean, std=std)


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    model: nn.Module, tx: optax.GradientTransformation, *,
                    preprocessing: datasets.Preprocessing | None = None):
  """The jitted, state-donating `(state, global_batch) -> state` for `config.parallelism`.

  `preprocessing` normalizes the uint8 batches on the device; default
  `dataset_preprocessing(config)`.
  """
  preprocessing = preprocessing or dataset_preprocessing(config)
  compute_dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(AXIS))
  if config.parallelism == "gspmd":
    step = functools.partial(train_step, model=model, tx=tx, preprocessing=preprocessing,
                             compute_dtype=compute_dtype,
                             label_smoothing=config.label_smoothing,
                             grad_accum_steps=config.grad_accum_steps,
                             batch_shards=mesh.devices.size)
    return jax.jit(step, in_shardings=(replicated, batch_sharding),
                   out_shardings=replicated, donate_argnums=0)
  num_devices = mesh.devices.size
  group_size = config.bn_group_size or num_devices
  groups = None
  if group_size != num_devices:
    groups = [list(range(start, start + group_size))
              for start in range(0, num_devices, group_size)]
  step = functools.partial(train_step, model=model, tx=tx, preprocessing=preprocessing,
                           compute_dtype=compute_dtype,
                           axis_name=AXIS, bn_axis_index_groups=groups,
                           label_smoothing=config.label_smoothing,
                           grad_accum_steps=config.grad_accum_steps)
  # check_vma=False: the pmap-style contract (per-device gradients, averaged
  # explicitly with pmean), which is what axis_index_groups supports.
  sharded_step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)),
                               out_specs=P(), check_vma=False)
  return jax.jit(sharded_step, in_shardings=(replicated, batch_sharding),
                 out_shardings=replicated, donate_argnums=0)


def make_eval_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   model: nn.Module, *,
                   preprocessing: datasets.Preprocessing | None = None):
  """The jitted `(params, bn_state, sums, global_batch) -> sums` (`eval_step`).

  `preprocessing`: as `make_train_step`'s.
  """
  preprocessing = preprocessing or dataset_preprocessing(config)
  compute_dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  replicated = NamedSharding(mesh, P())
  step = functools.partial(eval_step, model=model, preprocessing=preprocessing,
                           compute_dtype=compute_dtype)
  return jax.jit(step, in_shardings=(replicated, replicated, replicated,
                                     NamedSharding(mesh, P(AXIS))),
                 out_shardings=replicated)
