"""Learning-rate schedules and optimizers of a training config (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


OPTIMIZERS = ("sgd", "momentum", "adam")
LR_SCHEDULES = ("constant", "cosine", "onecycle")


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
