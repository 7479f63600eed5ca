"""Data-parallel training and evaluation: `train_and_evaluate(config, workdir)`.

The step runs on a 1-D mesh `('data',)` over all devices of all processes:

* `parallelism='gspmd'`: `jax.jit` with the batch sharded and the train state
  replicated; batch-norm statistics are global because the compiler turns the
  batch reductions into all-reduces.
* `parallelism='shard_map'`: the step inside `jax.shard_map`; batch norm pools
  statistics with `axis_name='data'` (optionally over groups of
  `bn_group_size` devices) and gradients are averaged with `lax.pmean`.

A step whose loss, gradient or new parameters are not finite is skipped as a
whole (parameters, optimizer state and BN statistics unchanged) and counted.
Checkpoints (orbax, atomic) hold the train state and the data position, so a
killed run resumes where it stopped and ends with the same metrics.

Preemption: on SIGTERM (what SLURM and TPU maintenance send before killing a
job) the processes agree, at the next step that is a multiple of
`preemption_check_every_steps` (or at the end of the epoch), to save a
checkpoint at that same step; `train_and_evaluate` then raises `Preempted`
and `train.py` exits with `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: rerun the
same command to resume; the resumed run ends with the same metrics as an
uninterrupted one).

Gradient accumulation (`grad_accum_steps = k > 1`): each
device's rows run as `k` microbatches in a `lax.scan`, each normalized with
its own statistics; the gradient is their mean, applied once, and the BN
running statistics are updated once with the moments of all the rows
(`accumulate_microbatches`, docs/microbatch.md).

PreciseBN (`precise_bn_batches > 0`): before each evaluation and each
checkpoint the BN running statistics are recomputed with the current weights
over that many training batches (`jaxbn.linen.recompute_stats`), replacing the
exponential moving average, which lags behind the weights (most visibly at a
high learning rate). The preemption checkpoint is saved without it, so that
resuming is exact.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

from etils import epath
from flax import linen as nn
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

import jaxbn

from training import datasets
from training import files
from training import input_pipeline
from training import models
from training import prepare
from training import resnet

AXIS = "data"
OPTIMIZERS = ("sgd", "momentum", "adam")
LR_SCHEDULES = ("constant", "cosine", "onecycle")
PARALLELISMS = ("gspmd", "shard_map")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "curves.png"
# curves.png is redrawn after an epoch only if this long has passed since the
# last drawing (epochs of a long run), and always when train_and_evaluate ends.
PLOT_EVERY_SECONDS = 300.0
# sysexits.h EX_TEMPFAIL ("try again later"): the run was preempted after
# saving a checkpoint; rerunning the same command resumes it.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """SIGTERM was received; every process saved a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"Preempted (SIGTERM): checkpoint saved at step {step}; rerun "
                     "the same command to resume.")
    self.step = step


class EpochSums(NamedTuple):
  """Training metrics of the current epoch, accumulated on device.

  Skipped (non-finite) steps add only to `nonfinite_steps`.
  """
  loss: jax.Array  # float32: sum of the batch-mean losses of finite steps
  correct: jax.Array  # int32: correct predictions in finite steps
  examples: jax.Array  # int32: examples in finite steps
  steps: jax.Array  # int32: finite steps
  nonfinite_steps: jax.Array  # int32: skipped steps


def zero_epoch_sums() -> EpochSums:
  # Distinct arrays: donation rejects one buffer passed as two arguments.
  return EpochSums(jnp.zeros((), jnp.float32),
                   *(jnp.zeros((), jnp.int32) for _ in range(4)))


class TrainState(NamedTuple):
  """Everything a step changes; replicated over the mesh and checkpointed.

  Attributes:
    step: int32, number of batches consumed (skipped ones included), i.e. the
      global data position.
    params: model parameters (float32).
    opt_state: optax state.
    bn_state: BN running statistics: the model's flax `batch_stats` collection
      (`{'mean', 'var'}` per BN layer; `{}` without BN).
    consecutive_nonfinite: int32, skipped steps in a row up to now.
    epoch_sums: this epoch's training metrics so far.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  bn_state: Any
  consecutive_nonfinite: jax.Array
  epoch_sums: EpochSums


class EvalSums(NamedTuple):
  loss: jax.Array  # float32: sum of per-example losses
  correct: jax.Array  # int32
  examples: jax.Array  # int32


# --- setup --------------------------------------------------------------------

# What jax's SLURM detection (jax._src.clusters.SlurmCluster) reads: the
# variables `srun` sets for a job step, not only the allocation's SLURM_JOB_ID.
SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                        "SLURM_PROCID", "SLURM_LOCALID")
# Hosts of a multi-host TPU slice as GKE (and the TPU VM runtime) lists them.
TPU_WORKER_VARIABLES = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def multi_process_launch(environ, *, coordinator_address: str | None = None,
                         distributed: bool | None = None) -> tuple[bool, str]:
  """Whether to call `jax.distributed.initialize()`, and why, in one line.

  Args:
    environ: the environment (`os.environ`).
    coordinator_address: train.py's --coordinator_address (explicit launch).
    distributed: train.py's --distributed: True/False force the answer; None
      detects a SLURM job step of several tasks or a multi-host TPU slice.

  Returns:
    `(initialize, reason)`.
  """
  if distributed is not None:
    return distributed, f"--distributed={distributed}"
  if coordinator_address:
    return True, f"--coordinator_address={coordinator_address}"
  if all(name in environ for name in SLURM_STEP_VARIABLES):
    tasks = environ["SLURM_NTASKS"]
    if tasks.isdigit() and int(tasks) > 1:
      return True, f"SLURM job step of {tasks} tasks (srun)"
  for name in TPU_WORKER_VARIABLES:
    hosts = [host for host in environ.get(name, "").split(",") if host]
    if len(hosts) > 1:
      return True, f"TPU slice of {len(hosts)} hosts ({name})"
  if "SLURM_JOB_ID" in environ:
    return False, ("single process: a SLURM allocation without a job step of several "
                   "tasks (start one process per task with srun; see docs/train.md)")
  return False, ("single process (no --coordinator_address, SLURM job step of several "
                 "tasks or multi-host TPU slice found)")


def create_mesh(num_devices: int = 0, devices=None) -> jax.sharding.Mesh:
  """A 1-D `('data',)` mesh (`jax.make_mesh`: TPU devices in slice order).

  Args:
    num_devices: use the first `num_devices` devices (single process only);
      0 = all devices of all processes.
    devices: the devices to choose from; default `jax.devices()` (others:
      e.g. a compile-only TPU topology's).
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  if num_devices:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"num_devices must be in [0, {len(devices)}] (0 = all), "
                       f"got {num_devices}.")
    if num_devices != len(devices) and jax.process_count() > 1:
      raise ValueError("num_devices must be 0 (all devices) with several processes.")
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails at start, with a message naming the field, on a config that cannot run.

  Args:
    config: the run's config.
    num_devices: devices in the mesh.

  Raises:
    ValueError: the first problem found.
  """
  def check(ok, message):
    if not ok:
      raise ValueError(f"Bad config: {message}")

  check(config.model in models.MODELS,
        f"unknown model {config.model!r}; expected one of {sorted(models.MODELS)}.")
  check(config.optimizer in OPTIMIZERS,
        f"unknown optimizer {config.optimizer!r}; expected one of {list(OPTIMIZERS)}.")
  check(config.lr_schedule in LR_SCHEDULES,
        f"unknown lr_schedule {config.lr_schedule!r}; expected one of "
        f"{list(LR_SCHEDULES)}.")
  check(config.parallelism in PARALLELISMS,
        f"unknown parallelism {config.parallelism!r}; expected one of "
        f"{list(PARALLELISMS)}.")
  check(isinstance(config.dataset, str) and config.dataset,
        f"dataset must be a tfds dataset name, got {config.dataset!r}.")
  check(config.num_epochs >= 1, f"num_epochs must be >= 1, got {config.num_epochs}.")
  check(config.learning_rate > 0,
        f"learning_rate must be > 0, got {config.learning_rate}.")
  check(config.seed >= 0, f"seed must be >= 0, got {config.seed}.")
  check(config.num_train_examples >= 0 and config.num_eval_examples >= 0,
        "num_train_examples and num_eval_examples must be >= 0 (0 = all).")
  check(config.batch_size > 0 and config.batch_size % num_devices == 0,
        f"batch_size={config.batch_size} must be a positive multiple of the number of "
        f"devices ({num_devices}) so that every device trains on the same number of "
        "examples (eval_batch_size may be any size: its batches are padded).")
  accum = config.grad_accum_steps
  per_device = config.batch_size // num_devices
  check(accum >= 1 and per_device % accum == 0,
        f"grad_accum_steps={accum} must be >= 1 and divide the per-device batch "
        f"(batch_size={config.batch_size} over {num_devices} devices: {per_device} "
        "examples) into equal microbatches.")
  check(config.eval_batch_size > 0,
        f"eval_batch_size must be > 0, got {config.eval_batch_size}.")
  group = config.bn_group_size
  check(group >= 0 and (group == 0 or num_devices % group == 0),
        f"bn_group_size={group} must be 0 (all devices) or divide the number of "
        f"devices ({num_devices}).")
  if group not in (0, num_devices):
    check(config.parallelism == "shard_map",
          "bn_group_size needs parallelism='shard_map' (under 'gspmd' the compiler "
          "computes BN statistics over the whole batch).")
  check(config.checkpoint_every_steps >= 0 and config.log_every_steps >= 1,
        "checkpoint_every_steps must be >= 0 and log_every_steps >= 1.")
  check(config.max_consecutive_nonfinite >= 1,
        f"max_consecutive_nonfinite must be >= 1, got {config.max_consecutive_nonfinite}.")
  if config.model in resnet.RESNETS:
    check(config.use_bn and not config.bias_before_bn,
          f"model {config.model!r} has batch norm after every convolution and no "
          "bias before it: set use_bn=True and bias_before_bn=False.")
  check(0.0 <= config.label_smoothing < 1.0,
        f"label_smoothing must be in [0, 1), got {config.label_smoothing}.")
  check(not config.nesterov or config.optimizer == "momentum",
        f"nesterov=True needs optimizer='momentum', got {config.optimizer!r}.")
  check(config.precise_bn_batches >= 0 and (config.precise_bn_batches == 0
                                            or config.use_bn),
        f"precise_bn_batches must be >= 0 (0 = off) and needs use_bn=True, got "
        f"{config.precise_bn_batches}.")
  check(config.stall_timeout_seconds >= 0 and config.sigterm_grace_seconds > 0,
        f"stall_timeout_seconds must be >= 0 (0 = off) and sigterm_grace_seconds > 0, "
        f"got {config.stall_timeout_seconds} and {config.sigterm_grace_seconds}.")
  check(config.preemption_check_every_steps >= 1,
        f"preemption_check_every_steps must be >= 1, got "
        f"{config.preemption_check_every_steps}.")
  check(config.data_workers >= 0,
        f"data_workers must be >= 0 (0 = all host cores), got {config.data_workers}.")


def create_model(config: ml_collections.ConfigDict,
                 info: datasets.DatasetInfo) -> nn.Module:
  return models.create_model(
      config.model, num_classes=info.num_classes,
      use_bn=config.use_bn, bias_before_bn=config.bias_before_bn,
      bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon,
      zero_init_last_bn=config.zero_init_last_bn)


def create_learning_rate_schedule(config: ml_collections.ConfigDict,
                                  steps_per_epoch: int) -> optax.Schedule:
  total_steps = max(config.num_epochs * steps_per_epoch, 1)
  warmup_steps = min(int(config.warmup_epochs * steps_per_epoch), total_steps - 1)
  if config.lr_schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup_steps, total_steps)
  return optax.cosine_onecycle_schedule(
      total_steps, config.learning_rate,
      pct_start=max(warmup_steps, 1) / total_steps)


def decay_mask(params):
  """True for the leaves weight decay applies to: kernels (ndim > 1), not the
  biases and BN scales and offsets, as flax's ImageNet example."""
  return jax.tree.map(lambda leaf: jnp.ndim(leaf) > 1, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> optax.GradientTransformation:
  schedule = create_learning_rate_schedule(config, steps_per_epoch)
  if config.optimizer == "adam":
    if config.weight_decay:
      return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
    return optax.adam(schedule)
  # SGD: L2 regularization of the kernels (the gradient of weight_decay / 2 *
  # |w|^2 added before momentum), as in the ResNet papers and flax's ImageNet
  # example, which penalizes only leaves with ndim > 1.
  momentum = config.momentum if config.optimizer == "momentum" else None
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=momentum, nesterov=config.nesterov))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       key: jax.Array, *, input_shape: tuple[int, ...]) -> TrainState:
  """The initial state of `model` for images of shape `(batch,) + input_shape`."""
  variables = model.init(key, jnp.zeros((1,) + tuple(input_shape), jnp.float32),
                         train=False)
  params, bn_state = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), bn_state=bn_state,
                    consecutive_nonfinite=jnp.zeros((), jnp.int32),
                    epoch_sums=zero_epoch_sums())


# --- steps --------------------------------------------------------------------

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


def zero_eval_sums() -> EvalSums:
  return EvalSums(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                  jnp.zeros((), jnp.int32))


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


def eval_batch_rows(eval_batch_size: int, num_devices: int) -> int:
  """Rows of a global evaluation batch: `eval_batch_size` rounded up to a
  multiple of `num_devices` (the extra rows are masked padding)."""
  return -(-eval_batch_size // num_devices) * num_devices


def evaluate(eval_fn, state: TrainState, split: datasets.Source, *,
             global_batch_size: int, mesh: jax.sharding.Mesh,
             chained: bool | None = None, heartbeat=None,
             num_workers: int = 0) -> dict[str, float]:
  """Loss and accuracy of the running-statistics model over a whole split.

  With several processes each batch's program starts only when the one before
  has finished (each adds to the sums of the one before, `eval_step`, and is
  waited for), so every process runs them, and their cross-process
  reductions, in the same order. Dispatched all at once, two processes of 4
  CPU devices hung in 3 of 3 runs of 50 batches per split (gloo); chained but
  not waited for, in 3 of 3 as well. One process has no peer to disagree
  with: each batch's program starts from zero sums and several run at once.

  Args:
    eval_fn: `make_eval_step`'s function.
    state: the train state (its params and BN running statistics are used).
    split: the examples, each counted once (`input_pipeline.eval_batches`).
    global_batch_size: examples per evaluation step over all processes (any
      size: each batch is padded to `eval_batch_rows`, so the batches hold
      the same examples on any number of devices).
    mesh: the `('data',)` mesh.
    chained: one chain of programs, each waited for; default (None): when
      there are several processes. False with several processes raises a
      ValueError.
    heartbeat: called after each batch is dispatched (the watchdog's `beat`).
    num_workers: tf.data threads decoding streamed images (0 = all host cores).

  Returns:
    `{'loss': mean loss, 'accuracy': fraction correct}` over the split.
  """
  multi_process = jax.process_count() > 1
  if chained is None:
    chained = multi_process
  if multi_process and not chained:
    raise ValueError("chained must be True (or None) with several processes.")
  sharding = NamedSharding(mesh, P(AXIS))
  padded = eval_batch_rows(global_batch_size, mesh.devices.size)
  rows = input_pipeline.process_rows(sharding, padded)
  zeros = jax.device_put(zero_eval_sums(), NamedSharding(mesh, P()))
  batches = input_pipeline.prefetch_to_device(
      input_pipeline.eval_batches(split, global_batch_size=padded, rows=rows,
                                  examples_per_batch=global_batch_size,
                                  num_workers=num_workers),
      sharding, padded)
  if heartbeat is not None:
    batches = _beating(batches, heartbeat)
  if chained:
    total = zeros
    for batch in batches:
      total = jax.block_until_ready(eval_fn(state.params, state.bn_state, total, batch))
    sums = [total]
  else:
    sums = [eval_fn(state.params, state.bn_state, zeros, batch) for batch in batches]
  sums = jax.device_get(sums)
  examples = sum(int(s.examples) for s in sums)
  loss = math.fsum(float(s.loss) for s in sums)
  correct = sum(int(s.correct) for s in sums)
  return {"loss": loss / max(examples, 1), "accuracy": correct / max(examples, 1)}


def one_at_a_time(items):
  """Yields each item once all the work dispatched before it has finished.

  For loops that dispatch programs with cross-process collectives but do not
  hand out their results (`jaxbn.linen.recompute_stats`): with several
  processes the programs then run in the same order on every process.
  """
  for item in items:
    jax.block_until_ready(jax.live_arrays())
    yield item


def _beating(items, heartbeat):
  for item in items:
    yield item
    heartbeat()


# --- checkpoints and outputs ----------------------------------------------------

def create_checkpoint_manager(workdir: epath.Path,
                              config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Orbax manager of `workdir/checkpoints`, asynchronous and multi-host aware.

  `save` returns once the arrays are copied to host memory (so the next step
  may overwrite the donated state) and orbax writes the files in a background
  thread while training goes on; the next save, or `wait_until_finished`,
  waits for it. Orbax writes each checkpoint into a temporary directory and
  renames it when complete, so a run killed mid-save leaves nothing that is
  ever restored.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_checkpoints_to_keep, create=True,
      enable_async_checkpointing=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      workdir / "checkpoints", options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "progress": ocp.JsonCheckpointHandler()})


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState,
                    progress: dict) -> None:
  """Saves the state and the JSON `progress` (data position, history)."""
  manager.save(int(progress["step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state: TrainState,
                       signature: dict | None = None) -> tuple[TrainState, dict] | None:
  """The latest complete checkpoint as `(state, progress)`, or None.

  With `signature` (see `_run_signature`), the checkpoint's own signature is
  read first, from its small JSON item, and any difference raises a ValueError
  naming the fields, before orbax compares the state trees.
  """
  step = manager.latest_step()
  if step is None:
    return None
  progress = manager.restore(step, args=ocp.args.Composite(
      progress=ocp.args.JsonRestore())).progress
  if signature is not None:
    differ = [f"{key}={progress['signature'].get(key)!r} there, {signature.get(key)!r} here"
              for key in sorted(signature.keys() | progress["signature"].keys())
              if progress["signature"].get(key) != signature.get(key)]
    if differ:
      raise ValueError(
          f"workdir {manager.directory.parent} holds a checkpoint of a different run than "
          f"this config ({'; '.join(differ)}). To resume it, rerun with those settings; "
          f"to start fresh, use a new --workdir (or delete {manager.directory}).")
  saved_layout = _with_bn_counters(manager, step, abstract_state)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(saved_layout))).state
  if saved_layout is not abstract_state:
    state = state._replace(bn_state={name: {"mean": layer["mean"], "var": layer["var"]}
                                     for name, layer in state.bn_state.items()})
  return state, progress


def _with_bn_counters(manager: ocp.CheckpointManager, step: int,
                      abstract_state: TrainState) -> TrainState:
  """`abstract_state` in the layout of `step`'s checkpoint when that one's BN
  layers also hold an int32 `count`, else `abstract_state` itself.

  Checkpoints of the MNIST CNN and MLP written before they were linen modules
  keep a `jaxbn.BatchNormState` (mean, var, count) per BN layer; their params
  and optimizer state have today's layout. `restore_checkpoint` restores the
  counters too and drops them.
  """
  saved = manager.item_metadata(step)["state"].tree["bn_state"]
  if not saved or any(not isinstance(layer, dict) or set(layer) != {"mean", "var", "count"}
                      for layer in saved.values()):
    return abstract_state
  count = jax.ShapeDtypeStruct((), jnp.int32, sharding=abstract_state.step.sharding)
  return abstract_state._replace(bn_state={name: {**layer, "count": count}
                                           for name, layer in abstract_state.bn_state.items()})


def write_metrics(workdir: epath.Path, history: list[dict]) -> None:
  """Rewrites `metrics.jsonl` (one JSON object per epoch) from the history."""
  text = "".join(json.dumps(record) + "\n" for record in history)
  files.atomic_write(workdir / METRICS_FILE, lambda f: f.write(text.encode()))


def plot_curves(path: epath.Path, history: list[dict]) -> None:
  """Loss and accuracy per epoch (train / validation / test) as a PNG."""
  from matplotlib import ticker
  from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
  figure = Figure(figsize=(10, 4))
  axes = figure.subplots(1, 2)
  for ax, metric in zip(axes, ("loss", "accuracy")):
    for split in ("train", "val", "test"):
      points = [(record["epoch"], record[f"{split}_{metric}"]) for record in history
                if f"{split}_{metric}" in record]  # test: the last epoch (or on request)
      if points:
        ax.plot(*zip(*points), "o-", label=split)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend()
  figure.tight_layout()
  files.atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))


# Fields that may differ between a checkpoint and the run resuming it: where
# files are, how the run is spread over devices (the metrics agree to float
# rounding), how often it logs, saves and checks, and what it evaluates.
RESUMABLE_FIELDS = frozenset({
    "data_dir", "manual_dir", "num_devices", "parallelism", "eval_batch_size",
    "num_eval_examples", "validation_split", "test_split", "evaluate_test_every_epoch",
    "checkpoint_every_steps", "max_checkpoints_to_keep", "log_every_steps",
    "max_consecutive_nonfinite", "preemption_check_every_steps", "sigterm_grace_seconds",
    "stall_timeout_seconds", "tensorboard", "data_workers"})


def _run_signature(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict:
  """What must not change between a checkpoint and a resumed run.

  Every config field except `RESUMABLE_FIELDS`; `num_epochs` and
  `warmup_epochs` only when the learning-rate schedule depends on them (a
  constant rate may train for more epochs), `momentum` / `nesterov` only
  for the momentum optimizer, and `grad_accum_steps` only when above 1 (the
  microbatches are normalized on their own, so k changes the run).
  """
  signature = {key: value for key, value in config.to_dict().items()
               if key not in RESUMABLE_FIELDS}
  if config.lr_schedule == "constant":
    del signature["num_epochs"], signature["warmup_epochs"]
  if config.optimizer != "momentum":
    del signature["momentum"], signature["nesterov"]
  if config.grad_accum_steps == 1:
    # The signature of a config without the field: its checkpoints resume.
    del signature["grad_accum_steps"]
  signature["steps_per_epoch"] = steps_per_epoch
  # As JSON stores it (tuples become lists), so that equal settings compare equal.
  return json.loads(json.dumps(signature))


# --- preemption and PreciseBN --------------------------------------------------

class _Watchdog:
  """Ends a process whose run stopped progressing, or that outlives SIGTERM's grace.

  Both deadlines are `faulthandler.dump_traceback_later` timers: a C thread that
  needs neither the GIL nor the main thread (which may be stuck inside a
  collective whose peer is gone), prints every thread's Python stack to stderr
  (headed "Timeout (H:MM:SS)!") and exits with status 1. `beat` re-arms the
  stall timer; after SIGTERM the grace timer replaces it and beats no longer
  move it.
  """

  def __init__(self, stall_seconds: float, grace_seconds: float):
    self._stall = stall_seconds
    self._grace = grace_seconds
    self._lock = threading.Lock()
    self._armed = False
    self._terminating = False
    self._last_arm = -math.inf

  def beat(self) -> None:
    """Progress: the stall deadline moves to `stall_seconds` from now."""
    if not self._stall or self._terminating:
      return
    now = time.monotonic()
    if now - self._last_arm < min(1.0, self._stall / 10):
      return  # re-arming starts a C thread; once a second is plenty
    with self._lock:
      if not self._terminating:
        faulthandler.dump_traceback_later(self._stall, exit=True, file=_stderr())
        self._armed, self._last_arm = True, now

  def pause(self) -> None:
    """No stall deadline until the next `beat` (e.g. while compiling)."""
    with self._lock:
      if self._armed and not self._terminating:
        faulthandler.cancel_dump_traceback_later()
        self._armed, self._last_arm = False, -math.inf

  def terminate(self) -> None:
    """SIGTERM: the process exits within `grace_seconds` whatever happens."""
    with self._lock:
      if self._terminating:
        return
      self._terminating = True
      print(f"SIGTERM: saving a checkpoint at the next step the processes agree on; "
            f"exiting with an error if that takes more than {self._grace:g} s.",
            file=sys.stderr, flush=True)
      faulthandler.dump_traceback_later(self._grace, exit=True, file=_stderr())
      self._armed = True

  def close(self) -> None:
    with self._lock:
      if self._armed:
        faulthandler.cancel_dump_traceback_later()
        self._armed = False


def _stderr():
  """A stderr with a file descriptor (pytest's captured sys.stderr has none)."""
  try:
    sys.stderr.fileno()
    return sys.stderr
  except (AttributeError, OSError, ValueError):
    return sys.__stderr__


class _StopRequest:
  """SIGTERM sets a flag; processes agree on it at the same steps.

  Python runs signal handlers in the main thread only, and only between
  bytecodes: a main thread stuck in a collective never would. So the signal
  also wakes a helper thread (through `signal.set_wakeup_fd`), which starts
  the watchdog's grace period. Installed only when `train_and_evaluate` runs
  in the main thread; elsewhere SIGTERM keeps its previous meaning.
  """

  def __init__(self, watchdog: _Watchdog | None = None):
    self.requested = False
    self._watchdog = watchdog
    self._previous = None
    self._previous_wakeup_fd = -1
    self._pipe = None
    self._thread = None

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    self._pipe = (read_fd, write_fd)
    self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                                    name="sigterm-watch")
    self._thread.start()

  def uninstall(self) -> None:
    if self._pipe is None:
      return
    signal.set_wakeup_fd(self._previous_wakeup_fd)
    signal.signal(signal.SIGTERM, self._previous)
    read_fd, write_fd = self._pipe
    os.write(write_fd, b"\0")  # wakes the thread, which then returns
    self._thread.join()
    os.close(read_fd)
    os.close(write_fd)
    self._pipe = self._thread = None

  def _watch(self, read_fd: int) -> None:
    while True:
      received = os.read(read_fd, 64)
      if not received or 0 in received:
        return
      if signal.SIGTERM in received:
        self.requested = True
        if self._watchdog is not None:
          self._watchdog.terminate()

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self, state=None) -> bool:
    """True on every process if any process got SIGTERM (a collective).

    Every process must call this at the same steps. With several processes
    `state` (the last step's output) is waited for first, so that the
    agreement's program does not run next to a step's.
    """
    if jax.process_count() == 1:
      return self.requested
    jax.block_until_ready(state)
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))


def recompute_bn_state(run: _Run, state: TrainState, epoch: int) -> TrainState:
  """PreciseBN: the state with BN statistics over `precise_bn_batches` batches.

  The batches are the first ones of `epoch`'s training order (global batches,
  sharded as in training, so the statistics are global).
  """
  config = run.config
  batch_sharding = NamedSharding(run.mesh, P(AXIS))
  images = _beating((_normalize_on_device(input_pipeline.to_global(
      batch, batch_sharding, config.batch_size).images, run.train.preprocessing)
                     for batch in input_pipeline.train_batches(
                         run.train, global_batch_size=config.batch_size,
                         seed=config.seed, epoch=epoch, rows=run.rows,
                         num_workers=config.data_workers)),
                    run.watchdog.beat)
  if jax.process_count() > 1:
    images = one_at_a_time(images)
  module = run.model.clone(dtype=jnp.bfloat16 if config.half_precision else jnp.float32)
  bn_state = jaxbn.linen.recompute_stats(
      module, {"params": state.params, "batch_stats": state.bn_state}, images,
      num_batches=config.precise_bn_batches, train=True)["batch_stats"]
  # Back to the replicated layout the compiled step expects (a jit of one
  # module-level function, so it compiles once).
  replicate = jax.jit(_identity, out_shardings=NamedSharding(run.mesh, P()))
  return state._replace(bn_state=replicate(bn_state))


def _identity(tree):
  return tree


_normalize_on_device = jax.jit(input_pipeline.normalize, static_argnames="preprocessing")


# --- the loop -------------------------------------------------------------------

class _Progress:
  """A tqdm bar on a terminal (process 0 only); nothing otherwise."""

  def __init__(self, enabled: bool):
    self._enabled = enabled and sys.stderr.isatty()
    self._bar = None

  @property
  def shown(self) -> bool:
    """Whether a bar is drawn (else `train_epoch` prints a line per log step)."""
    return self._enabled

  def start_epoch(self, epoch: int, num_epochs: int, total: int, initial: int):
    if self._enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, unit="step", leave=False,
                       desc=f"epoch {epoch + 1}/{num_epochs}", dynamic_ncols=True)

  def update(self, steps: int, loss: float, examples_per_sec: float):
    if self._bar is not None:
      self._bar.update(steps)
      self._bar.set_postfix({"loss": f"{loss:.4f}",
                             "examples/s": f"{examples_per_sec:,.0f}"})

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class SummaryWriter:
  """TensorBoard scalars in `logdir` (process 0), written by a background thread.

  TensorFlow's own summary writer (`tf.summary.write` with the scalars
  plugin's metadata: what `tf.summary.scalar` writes), since TensorFlow is
  already a dependency of the input pipeline; `clu.metric_writers`, as flax's
  examples use, needs the separate `tensorboard` package as well. The thread
  imports TensorFlow (seconds), so training does not wait for it. Failures
  are reported once on stderr and do not stop the run.
  """

  def __init__(self, logdir, enabled: bool = True):
    self._queue = queue.Queue()
    self._thread = None
    if enabled:
      self._thread = threading.Thread(target=self._write, args=(str(logdir),),
                                      daemon=True, name="tensorboard")
      self._thread.start()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._thread is not None:
      self._queue.put((int(step), {k: float(v) for k, v in values.items()}))

  def close(self) -> None:
    """Writes what is queued and closes the file."""
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join()
      self._thread = None

  def _write(self, logdir: str) -> None:
    try:
      tf, _ = prepare.import_tf()
      from tensorflow.core.framework import summary_pb2
      writer = tf.summary.create_file_writer(logdir)
      metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    except Exception as error:  # noqa: BLE001 - the run goes on without TensorBoard
      print(f"TensorBoard summaries are off: {error!r}", file=sys.stderr, flush=True)
      while self._queue.get() is not None:
        pass
      return
    while (item := self._queue.get()) is not None:
      step, values = item
      with writer.as_default():
        for tag, value in values.items():
          tf.summary.write(tag, tf.constant(value, tf.float32), step=step,
                           metadata=metadata)
      if self._queue.empty():
        writer.flush()
    writer.close()


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Run(NamedTuple):
  """What the epoch functions share within one `train_and_evaluate` call."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  train: datasets.Source
  validation: datasets.Source
  test: datasets.Source
  steps_per_epoch: int
  rows: input_pipeline.Rows  # this process's rows of every global training batch
  manager: ocp.CheckpointManager
  signature: dict
  history: list[dict]
  progress: _Progress
  is_main: bool
  model: nn.Module
  stop: _StopRequest
  watchdog: _Watchdog
  schedule: optax.Schedule
  summary: SummaryWriter

  def progress_record(self, step: int) -> dict:
    return {"step": step, "epoch": step // self.steps_per_epoch,
            "batch_in_epoch": step % self.steps_per_epoch,
            "signature": self.signature, "history": self.history}

  def log(self, message: str) -> None:
    if self.is_main:
      print(message, flush=True)


def _check_nonfinite(run: _Run, state: TrainState) -> None:
  consecutive = int(jax.device_get(state.consecutive_nonfinite))
  limit = run.config.max_consecutive_nonfinite
  if consecutive >= limit:
    raise FloatingPointError(
        f"Stopping: {consecutive} training steps in a row (up to step "
        f"{int(jax.device_get(state.step))}) had a non-finite loss or gradient and were "
        f"skipped (max_consecutive_nonfinite={limit}). Lower the learning rate, or "
        "turn off half_precision.")


def train_epoch(run: _Run, step_fn, state: TrainState, epoch: int
                ) -> tuple[TrainState, float]:
  """Runs the rest of `epoch` from `state.step`; returns the state and its examples/s.

  Saves a checkpoint every `checkpoint_every_steps` (not at the epoch's end,
  which `train_and_evaluate` saves after evaluating).
  """
  config = run.config
  batch_sharding = NamedSharding(run.mesh, P(AXIS))
  step = int(jax.device_get(state.step))
  first_batch = step - epoch * run.steps_per_epoch
  run.progress.start_epoch(epoch, config.num_epochs, run.steps_per_epoch, first_batch)
  host_batches = input_pipeline.train_batches(
      run.train, global_batch_size=config.batch_size, seed=config.seed, epoch=epoch,
      rows=run.rows, start_step=first_batch, num_workers=config.data_workers)
  start_time, last_logged, saving_time = time.perf_counter(), step, 0.0
  total_steps = config.num_epochs * run.steps_per_epoch
  last_time, last_saving, last_sums = start_time, 0.0, jax.device_get(state.epoch_sums)
  for batch in input_pipeline.prefetch_to_device(host_batches, batch_sharding,
                                                 config.batch_size):
    state = step_fn(state, batch)
    run.watchdog.beat()
    step += 1
    end_of_epoch = step % run.steps_per_epoch == 0
    if step % config.log_every_steps == 0 or end_of_epoch:
      _check_nonfinite(run, state)
      sums = jax.device_get(state.epoch_sums)
      elapsed = time.perf_counter() - start_time - saving_time
      examples = (step - epoch * run.steps_per_epoch - first_batch) * config.batch_size
      run.progress.update(step - last_logged, float(sums.loss) / max(int(sums.steps), 1),
                          examples / max(elapsed, 1e-9))
      now = time.perf_counter()
      window = max(now - last_time - (saving_time - last_saving), 1e-9)
      finite = int(sums.steps) - int(last_sums.steps)
      loss = (float(sums.loss) - float(last_sums.loss)) / max(finite, 1)
      learning_rate = float(run.schedule(step - 1))  # the rate the last step used
      images_per_sec = (step - last_logged) * config.batch_size / window
      run.summary.scalars(step, {"train/loss": loss, "train/learning_rate": learning_rate,
                                 "train/images_per_sec": images_per_sec})
      if not run.progress.shown:
        eta = (total_steps - step) * window / (step - last_logged)
        run.log(f"step {step}/{total_steps} (epoch {step / run.steps_per_epoch:.2f}): "
                f"loss {loss:.4f} lr {learning_rate:.4g} {images_per_sec:,.0f} images/s "
                f"ETA {_format_duration(eta)} (training steps)")
      last_logged, last_time, last_saving, last_sums = step, now, saving_time, sums
    saved = False
    if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
        and not end_of_epoch):
      save_started = time.perf_counter()
      if config.precise_bn_batches:
        state = recompute_bn_state(run, state, epoch)
      save_checkpoint(run.manager, state, run.progress_record(step))
      run.watchdog.beat()
      saving_time += time.perf_counter() - save_started
      saved = True
    if (not end_of_epoch and step % config.preemption_check_every_steps == 0
        and run.stop.agreed(state)):
      if not saved:
        save_checkpoint(run.manager, state, run.progress_record(step))
      run.progress.close()
      raise Preempted(step)
  jax.block_until_ready(state)
  run.progress.close()
  train_time = time.perf_counter() - start_time - saving_time
  examples = (run.steps_per_epoch - first_batch) * config.batch_size
  return state, examples / max(train_time, 1e-9)


def evaluate_epoch(run: _Run, eval_fn, state: TrainState, epoch: int,
                   examples_per_sec: float, *, with_test: bool) -> dict:
  """The epoch's `metrics.jsonl` record: training sums, validation (and test)."""
  sums = jax.device_get(state.epoch_sums)
  batch_size = run.config.eval_batch_size
  val = evaluate(eval_fn, state, run.validation, global_batch_size=batch_size,
                 mesh=run.mesh, heartbeat=run.watchdog.beat,
                 num_workers=run.config.data_workers)
  record = {
      "epoch": epoch + 1, "step": int(jax.device_get(state.step)),
      "train_loss": float(sums.loss) / max(int(sums.steps), 1),
      "train_accuracy": int(sums.correct) / max(int(sums.examples), 1),
      "val_loss": val["loss"], "val_accuracy": val["accuracy"],
  }
  if with_test:
    test = evaluate(eval_fn, state, run.test, global_batch_size=batch_size,
                    mesh=run.mesh, heartbeat=run.watchdog.beat,
                    num_workers=run.config.data_workers)
    record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
  record.update(examples_per_sec=examples_per_sec,
                nonfinite_steps=int(sums.nonfinite_steps))
  return record


def _format_record(record: dict, num_epochs: int) -> str:
  line = (f"epoch {record['epoch']}/{num_epochs} step {record['step']}: "
          f"train_loss {record['train_loss']:.4f} "
          f"train_acc {record['train_accuracy']:.4f} "
          f"val_loss {record['val_loss']:.4f} val_acc {record['val_accuracy']:.4f} ")
  if "test_loss" in record:
    line += (f"test_loss {record['test_loss']:.4f} "
             f"test_acc {record['test_accuracy']:.4f} ")
  line += f"{record['examples_per_sec']:,.0f} examples/s"
  if record["nonfinite_steps"]:
    line += f" ({record['nonfinite_steps']} non-finite steps skipped)"
  return line


def split_names(config: ml_collections.ConfigDict) -> tuple[str, str, str]:
  """The (train, validation, test) tfds split strings of `config`.

  A '' split field takes the dataset's default (`datasets.default_splits`).
  """
  names = (config.train_split, config.validation_split, config.test_split)
  if all(names):
    return names
  defaults = datasets.default_splits(config.dataset)
  return tuple(name or default for name, default in zip(names, defaults))


def _abstract_batch(example: input_pipeline.Batch, global_batch_size: int,
                    sharding: jax.sharding.Sharding) -> input_pipeline.Batch:
  """The shapes of a global batch of `global_batch_size` rows like `example`'s."""
  return input_pipeline.Batch(*(
      jax.ShapeDtypeStruct((global_batch_size,) + local.shape[1:], local.dtype,
                           sharding=sharding) for local in example))


def _microbatches_note(config: ml_collections.ConfigDict, num_devices: int) -> str:
  if config.grad_accum_steps == 1:
    return ""
  rows = config.batch_size // num_devices // config.grad_accum_steps
  return f" in {config.grad_accum_steps} microbatches of {rows} per device"


def _load_splits(config: ml_collections.ConfigDict):
  """(train, validation, test, info) of `config`'s dataset."""
  names = split_names(config)
  splits, info = datasets.load_dataset(
      config.dataset, names, data_dir=config.data_dir or None,
      manual_dir=config.manual_dir or None, augmentation=config.augmentation,
      image_size=config.image_size, num_classes=config.num_classes)
  train, validation, test = (splits[name] for name in names)
  return (train.take(config.num_train_examples),
          validation.take(config.num_eval_examples),
          test.take(config.num_eval_examples),
          info)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict:
  """Trains and evaluates per `config`, checkpointing into `workdir`.

  Resumes from the latest checkpoint in `workdir`. Process 0 prints a
  parameter table and one line per epoch and writes `metrics.jsonl`,
  `curves.png` and TensorBoard files. `workdir` may be a URI
  (`gs://bucket/run`); with several hosts it must be one directory that every
  host reaches (orbax writes each host's shards of a checkpoint there).

  Returns:
    The last epoch's metrics (the last line of `metrics.jsonl`).

  Raises:
    ValueError: a bad config, or a checkpoint from an incompatible run.
    FileNotFoundError: a dataset archive is missing.
    FloatingPointError: `max_consecutive_nonfinite` steps in a row were skipped.
    Preempted: SIGTERM was received; all processes saved a checkpoint at the
      same step (rerun to resume).
  """
  workdir = files.as_path(workdir)
  is_main = jax.process_index() == 0
  mesh = create_mesh(config.num_devices)
  validate_config(config, mesh.devices.size)
  train, validation, test, info = _load_splits(config)
  num_train = train.num_examples
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f"Bad config: batch_size={config.batch_size} is larger than the "
                     f"{num_train} training examples.")
  if config.precise_bn_batches > steps_per_epoch:
    raise ValueError(f"Bad config: precise_bn_batches={config.precise_bn_batches} is "
                     f"more than the {steps_per_epoch} training batches per epoch.")

  model = create_model(config, info)
  tx = create_optimizer(config, steps_per_epoch)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(AXIS))
  init_fn = jax.jit(functools.partial(create_train_state, model, tx,
                                      input_shape=info.image_shape),
                    out_shardings=replicated)
  key = jax.random.key(config.seed)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    config_json = config.to_json_best_effort(indent=2).encode()
    files.atomic_write(workdir / "config.json", lambda f: f.write(config_json))
  watchdog = _Watchdog(config.stall_timeout_seconds, config.sigterm_grace_seconds)
  run = _Run(config=config, workdir=workdir, mesh=mesh, train=train,
             validation=validation, test=test, steps_per_epoch=steps_per_epoch,
             rows=input_pipeline.process_rows(batch_sharding, config.batch_size),
             manager=create_checkpoint_manager(workdir, config),
             signature=_run_signature(config, steps_per_epoch), history=[],
             progress=_Progress(is_main), is_main=is_main, model=model,
             stop=_StopRequest(watchdog), watchdog=watchdog,
             schedule=create_learning_rate_schedule(config, steps_per_epoch),
             summary=SummaryWriter(workdir / TENSORBOARD_DIR,
                                   enabled=is_main and config.tensorboard))
  last_plot, plotted = time.monotonic(), 0
  try:
    run.stop.install()
    abstract_state = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        jax.eval_shape(init_fn, key))
    restored = restore_checkpoint(run.manager, abstract_state, run.signature)
    if restored is None:
      state = init_fn(key)
    else:
      state, progress = restored
      run.history.extend(progress["history"])
      run.log(f"Resuming from step {progress['step']} (epoch {progress['epoch'] + 1}, "
              f"batch {progress['batch_in_epoch']}) in {workdir}.")
    run.log(models.format_parameter_table(models.parameter_table(model, info.image_shape)))
    run.log(f"{config.dataset}: {num_train} train / "
            f"{validation.num_examples} val / "
            f"{test.num_examples} test examples; "
            f"{jax.process_count()} process(es), "
            f"{mesh.devices.size} device(s), parallelism={config.parallelism}, global "
            f"batch {config.batch_size}{_microbatches_note(config, mesh.devices.size)}, "
            f"{steps_per_epoch} steps per epoch.")
    if is_main and run.history:
      write_metrics(workdir, run.history)

    first_epoch = int(jax.device_get(state.step)) // steps_per_epoch
    if first_epoch < config.num_epochs:
      run.watchdog.pause()  # compiling is no stall
      # Compiling ahead keeps compilation out of the measured examples/s.
      example = next(input_pipeline.train_batches(
          train, global_batch_size=config.batch_size, seed=config.seed, epoch=0,
          rows=run.rows, num_workers=config.data_workers))
      run.log("Compiling the train and eval steps...")
      compile_started = time.perf_counter()
      step_fn = make_train_step(config, mesh, model, tx,
                                preprocessing=train.preprocessing).lower(
          state, input_pipeline.to_global(example, batch_sharding, config.batch_size)
      ).compile()
      eval_fn = make_eval_step(config, mesh, model,
                               preprocessing=validation.preprocessing).lower(
          state.params, state.bn_state, jax.device_put(zero_eval_sums(), replicated),
          _abstract_batch(example, eval_batch_rows(config.eval_batch_size,
                                                   mesh.devices.size), batch_sharding)
      ).compile()
      run.log(f"Compiled in {time.perf_counter() - compile_started:.1f} s.")
      run.watchdog.beat()
    for epoch in range(first_epoch, config.num_epochs):
      state, examples_per_sec = train_epoch(run, step_fn, state, epoch)
      if config.precise_bn_batches:
        state = recompute_bn_state(run, state, epoch)
      record = evaluate_epoch(
          run, eval_fn, state, epoch, examples_per_sec,
          with_test=config.evaluate_test_every_epoch or epoch + 1 == config.num_epochs)
      run.history.append(record)
      run.summary.scalars(record["step"], {
          f"epoch/{key}": value for key, value in record.items()
          if key not in ("epoch", "step")})
      state = state._replace(epoch_sums=jax.device_put(zero_epoch_sums(), replicated))
      save_checkpoint(run.manager, state, run.progress_record(record["step"]))
      run.watchdog.beat()
      if is_main:
        write_metrics(workdir, run.history)
        if time.monotonic() - last_plot >= PLOT_EVERY_SECONDS:
          plot_curves(workdir / PLOT_FILE, run.history)
          last_plot, plotted = time.monotonic(), len(run.history)
      run.log(_format_record(record, config.num_epochs))
      if epoch + 1 < config.num_epochs and run.stop.agreed(state):
        raise Preempted(record["step"])
  finally:
    run.stop.uninstall()
    run.progress.close()
    run.manager.wait_until_finished()
    run.manager.close()
    run.watchdog.close()
    run.summary.close()
    if is_main and len(run.history) > plotted:  # also when preempted or failing
      plot_curves(workdir / PLOT_FILE, run.history)
  if run.history:
    best = max(run.history, key=lambda record: record["val_accuracy"])
    run.log(f"Finished in {workdir}: best val_acc {best['val_accuracy']:.4f} "
            f"(epoch {best['epoch']}); last: "
            + _format_record(run.history[-1], config.num_epochs))
  return dict(run.history[-1]) if run.history else {}
