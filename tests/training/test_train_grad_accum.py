"""train.py's gradient accumulation (`config.grad_accum_steps`) on the 8 CPU devices.

The step-level tests use a two-stage ResNet (`training.resnet`) on 8x8 uint8
images (fast to compile), a global batch of 64 rows (8 per device) and k = 4
microbatches of 2 rows per device.
"""

import functools
from typing import Any, NamedTuple

import chex
from flax import linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from jaxbn import linen as jaxbn_linen
from tests.training import _train_utils as utils
from training import checkpoints
from training import datasets
from training import distributed
from training import input_pipeline
from training import resnet
from training import run_config
from training import steps
from training import train_lib
from training import train_state

NUM_DEVICES = 8
BATCH = 64
ACCUM = 4
IMAGE_SHAPE = (8, 8, 3)


# Pixels to model inputs: (pixel - 100) / 50 per channel.
PREPROCESSING = datasets.Preprocessing(mean=(100.0,), std=(50.0,))


@functools.cache
def _model() -> nn.Module:
  return resnet.ResNet(stage_sizes=(1, 1), block_cls=resnet.BasicBlock, num_classes=10,
                       num_filters=4, stem="cifar", shortcut="pad",
                       zero_init_last_bn=False, bn_momentum=0.9, bn_epsilon=1e-5)


class Recorded(NamedTuple):
  updates: jax.Array  # int32: optimizer updates so far
  grads: Any  # the last gradient


def _gradient_recorder() -> optax.GradientTransformation:
  """An optimizer that keeps the last gradient and counts its updates; parameters stay."""
  def init(params):
    return Recorded(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    del params
    return jax.tree.map(jnp.zeros_like, grads), Recorded(state.updates + 1, grads)

  return optax.GradientTransformation(init, update)


def _batch(seed: int = 0) -> input_pipeline.Batch:
  rng = np.random.default_rng(seed)
  # Other ranges per channel, so that the running statistics move.
  low, high = np.array([0, 120, 10]), np.array([256, 250, 60])
  images = low + rng.random((BATCH,) + IMAGE_SHAPE) * (high - low)
  return input_pipeline.Batch(images.astype(np.uint8),
                              rng.integers(0, 10, BATCH).astype(np.int32),
                              np.ones(BATCH, bool))


def _microbatch_rows(j: int) -> np.ndarray:
  """The rows of microbatch j: the j-th 2 of each device's 8 rows."""
  per_device, rows = BATCH // NUM_DEVICES, BATCH // NUM_DEVICES // ACCUM
  return np.concatenate([np.arange(d * per_device + j * rows, d * per_device + (j + 1) * rows)
                         for d in range(NUM_DEVICES)])


def _build(parallelism: str, grad_accum_steps: int):
  """`(init, step)` of the gradient recorder: a fresh state (a new one each call:
  the step donates it) and the jitted train step (traced at its first call)."""
  config = utils.tiny_config(model="resnet20", batch_size=BATCH, parallelism=parallelism,
                             grad_accum_steps=grad_accum_steps)
  run_config.validate_config(config, NUM_DEVICES)
  mesh = distributed.create_mesh(NUM_DEVICES)
  model, tx = _model(), _gradient_recorder()
  init = jax.jit(functools.partial(train_state.create_train_state, model, tx,
                                   input_shape=IMAGE_SHAPE),
                 out_shardings=NamedSharding(mesh, P()))
  step = steps.make_train_step(config, mesh, model, tx, preprocessing=PREPROCESSING)
  sharding = NamedSharding(mesh, P("data"))
  return init, lambda state, batch: step(state, input_pipeline.to_global(batch, sharding,
                                                                          BATCH))


_compiled = functools.cache(_build)  # each compiled once per test module


def _one_step(batch, *, parallelism: str, grad_accum_steps: int = 1, build=_compiled):
  """The state after one train step from the initial state, and the initial state."""
  init, step = build(parallelism, grad_accum_steps)
  start = init(jax.random.key(0))
  start_host = jax.device_get(start)
  return jax.device_get(step(start, batch)), start_host


@pytest.fixture(scope="module")
def full_batch_step():
  """k = 1 on the whole batch (gspmd): the running statistics to match."""
  return _one_step(_batch(), parallelism="gspmd")


def _inputs(images) -> jax.Array:
  return input_pipeline.normalize(images, PREPROCESSING)


@jax.jit
def _loss_and_grad(params, bn_state, images, labels):
  def loss_fn(params):
    logits, updates = _model().apply({"params": params, "batch_stats": bn_state},
                                     _inputs(images), train=True, mutable=["batch_stats"])
    new_state = updates["batch_stats"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(loss), (logits, new_state)
  (loss, (logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, jnp.sum(jnp.argmax(logits, -1) == labels), new_state


def _microbatch_loss_and_grad(params, bn_state, rows, batch):
  """One k = 1 forward and backward pass on `rows` alone (on one device): the
  loss, gradient, correct count and running statistics."""
  return jax.device_get(_loss_and_grad(params, bn_state, batch.images[rows],
                                       batch.labels[rows]))


@jax.jit
def _bn_inputs(params, bn_state, images) -> dict[str, jax.Array]:
  """The input of every BN layer (by module path, '/'-joined) in a training forward pass."""
  inputs = {}

  def record(next_fun, args, kwargs, context):
    if (isinstance(context.module, jaxbn_linen.BatchNorm)
        and context.method_name == "__call__"):
      inputs["/".join(context.module.path)] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _model().apply({"params": params, "batch_stats": bn_state}, _inputs(images),
                   train=True, mutable=["batch_stats"])
  return inputs


def _one_update(start_bn_state, inputs: dict, momentum: float = 0.9):
  """The running statistics after one update with the moments of `inputs`' rows."""
  expected = jax.tree.map(np.asarray, start_bn_state)
  for path, x in inputs.items():
    layer = functools.reduce(lambda tree, name: tree[name], path.split("/"), expected)
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    layer["mean"] = momentum * layer["mean"] + (1 - momentum) * x.mean(axes)
    layer["var"] = momentum * layer["var"] + (1 - momentum) * x.var(axes)
  return expected


@pytest.mark.parametrize("parallelism", ["gspmd", "shard_map"])
def test_accumulated_step_updates_the_running_statistics_once_with_all_rows(
    parallelism, full_batch_step):
  batch = _batch()
  full, start = full_batch_step
  accumulated, _ = _one_step(batch, parallelism=parallelism,
                             grad_accum_steps=ACCUM)
  chex.assert_trees_all_equal_structs(accumulated.bn_state, full.bn_state)
  # The first BN layer sees the same rows either way: its running statistics
  # are the full batch's, to 1e-6.
  chex.assert_trees_all_close(accumulated.bn_state["bn_init"], full.bn_state["bn_init"],
                              rtol=1e-6, atol=1e-6)
  # Every layer: one update from the step's starting statistics with the
  # moments of all the rows it saw in the k microbatches (the later layers'
  # inputs depend on the earlier layers' per-microbatch normalization).
  microbatch_inputs = [_bn_inputs(start.params, start.bn_state,
                                  batch.images[_microbatch_rows(j)]) for j in range(ACCUM)]
  pooled_inputs = {path: np.concatenate([inputs[path] for inputs in microbatch_inputs])
                   for path in microbatch_inputs[0]}
  assert len(pooled_inputs) == len(jax.tree.leaves(full.bn_state)) // 2
  chex.assert_trees_all_close(accumulated.bn_state,
                              _one_update(start.bn_state, pooled_inputs),
                              rtol=1e-6, atol=1e-6)
  # The same reference reproduces the k = 1 step on the whole batch.
  chex.assert_trees_all_close(
      full.bn_state, _one_update(start.bn_state, _bn_inputs(start.params, start.bn_state,
                                                            batch.images)),
      rtol=1e-6, atol=1e-6)
  # Updating them once per microbatch (k small-batch updates) is far off: the
  # comparisons above fail on a trainer that does that.
  per_microbatch = start.bn_state
  for j in range(ACCUM):
    *_, per_microbatch = _microbatch_loss_and_grad(start.params, per_microbatch,
                                                   _microbatch_rows(j), batch)
  assert np.max(np.abs(per_microbatch["bn_init"]["var"]
                       - full.bn_state["bn_init"]["var"])) > 1e-2

  # Each microbatch is normalized with its own statistics: the loss, the
  # gradient and the correct count are the means (sum) of k separate k = 1
  # passes over the microbatches, not the full batch's.
  results = [_microbatch_loss_and_grad(start.params, start.bn_state, _microbatch_rows(j),
                                       batch) for j in range(ACCUM)]
  np.testing.assert_allclose(accumulated.epoch_sums.loss, np.mean([r[0] for r in results]),
                             rtol=1e-6)
  mean_grads = jax.tree.map(lambda *grads: np.mean(grads, axis=0), *(r[1] for r in results))
  chex.assert_trees_all_close(accumulated.opt_state.grads, mean_grads, rtol=1e-4, atol=1e-6)
  assert int(accumulated.opt_state.updates) == 1  # one optimizer step per batch
  assert int(accumulated.epoch_sums.correct) == sum(r[2] for r in results)
  assert int(accumulated.epoch_sums.examples) == BATCH
  assert int(accumulated.epoch_sums.steps) == int(accumulated.step) == 1
  # ...and they differ from the full batch's (so the check above can fail).
  assert abs(float(accumulated.epoch_sums.loss) - float(full.epoch_sums.loss)) > 1e-4


def test_gspmd_and_shard_map_accumulate_the_same_microbatches():
  batch = _batch(1)
  gspmd, _ = _one_step(batch, parallelism="gspmd",
                       grad_accum_steps=ACCUM)
  shard_map, _ = _one_step(batch, parallelism="shard_map",
                           grad_accum_steps=ACCUM)
  chex.assert_trees_all_close(gspmd.bn_state, shard_map.bn_state, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(gspmd.opt_state.grads, shard_map.opt_state.grads, rtol=1e-4,
                              atol=1e-6)
  np.testing.assert_allclose(gspmd.epoch_sums.loss, shard_map.epoch_sums.loss, rtol=1e-6)


def test_split_microbatches_takes_each_microbatch_from_every_device_block():
  batch = _batch()
  split = jax.device_get(steps.split_microbatches(batch, ACCUM, NUM_DEVICES))
  for j in range(ACCUM):
    np.testing.assert_array_equal(split.images[j], batch.images[_microbatch_rows(j)])
    np.testing.assert_array_equal(split.labels[j], batch.labels[_microbatch_rows(j)])
  # One block (shard_map's local view): consecutive rows.
  local = jax.device_get(steps.split_microbatches(batch, ACCUM))
  np.testing.assert_array_equal(local.labels.reshape(-1), batch.labels)


def test_nonfinite_microbatch_skips_the_whole_step(monkeypatch):
  # A NaN model input in one microbatch (the last one of device 5), where a
  # corrupt input would enter: the step is skipped; only the counters change.
  normalize = input_pipeline.normalize

  def poisoned_normalize(images, preprocessing):
    return normalize(images, preprocessing).at[5 * 8 + 7, 3, 3, 1].set(jnp.nan)

  monkeypatch.setattr(input_pipeline, "normalize", poisoned_normalize)
  skipped, start = _one_step(_batch(), parallelism="gspmd", grad_accum_steps=ACCUM,
                             build=_build)
  for name in ("params", "opt_state", "bn_state"):
    chex.assert_trees_all_equal(getattr(skipped, name), getattr(start, name))
  assert int(skipped.step) == 1 and int(skipped.consecutive_nonfinite) == 1
  assert int(skipped.epoch_sums.nonfinite_steps) == 1
  assert int(skipped.epoch_sums.steps) == 0 and float(skipped.epoch_sums.loss) == 0.0


@pytest.mark.parametrize("overrides, message", [
    (dict(grad_accum_steps=0), r"grad_accum_steps=0 must be >= 1"),
    (dict(grad_accum_steps=3), r"grad_accum_steps=3 must be >= 1 and divide the "
                               r"per-device batch \(batch_size=64 over 8 devices: 8 "
                               r"examples\)"),
    (dict(grad_accum_steps=16), r"grad_accum_steps=16 must"),
])
def test_bad_grad_accum_configs_fail(overrides, message):
  config = utils.tiny_config(**{"model": "resnet20", **overrides})
  with pytest.raises(ValueError, match=message):
    run_config.validate_config(config, NUM_DEVICES)


def test_grad_accum_steps_is_part_of_the_run_signature_only_above_one():
  assert "grad_accum_steps" not in checkpoints.run_signature(utils.tiny_config(), 8)
  signature = checkpoints.run_signature(utils.tiny_config(grad_accum_steps=2), 8)
  assert signature["grad_accum_steps"] == 2


def test_train_and_evaluate_with_grad_accum_runs_and_resumes(tmp_path):
  config = utils.tiny_config(num_devices=2, num_epochs=1, batch_size=16,
                             num_train_examples=48, num_eval_examples=64,
                             grad_accum_steps=2, checkpoint_every_steps=0)
  first = train_lib.train_and_evaluate(config, tmp_path)
  assert first["step"] == 3 and np.isfinite(first["train_loss"])
  assert round(first["train_accuracy"] * 48, 6) == round(first["train_accuracy"] * 48)
  # Another epoch resumes from the checkpoint (constant rate: num_epochs may grow).
  config.num_epochs = 2
  second = train_lib.train_and_evaluate(config, tmp_path)
  assert second["epoch"] == 2 and second["step"] == 6 and np.isfinite(second["train_loss"])
  assert utils.read_metrics(tmp_path)[0] == first
  # Resuming with another number of microbatches is another run.
  config.grad_accum_steps = 4
  config.num_epochs = 3
  with pytest.raises(ValueError, match=r"grad_accum_steps=2 there, 4 here"):
    train_lib.train_and_evaluate(config, tmp_path)
