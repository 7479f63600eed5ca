"""The train state, the on-device metric sums, and the model and state a config makes."""

from __future__ import annotations

from typing import Any, NamedTuple

from flax import linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from training import datasets
from training import models


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


def zero_eval_sums() -> EvalSums:
  return EvalSums(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                  jnp.zeros((), jnp.int32))


def create_model(config: ml_collections.ConfigDict,
                 info: datasets.DatasetInfo) -> nn.Module:
  return models.create_model(
      config.model, num_classes=info.num_classes,
      use_bn=config.use_bn, bias_before_bn=config.bias_before_bn,
      bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon,
      zero_init_last_bn=config.zero_init_last_bn)


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
