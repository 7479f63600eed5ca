"""Several instances of one model trained in one program, one after the other.

The experiments need several seeds (and learning rates) per configuration and
evaluations every fraction of an epoch; `Trainer` trains a group of
*instances* -- one per (seed, learning rate) -- as one `lax.scan`-ned program
that steps the instances one after the other (`lax.map`). Each instance has
its own initialization (from its seed), its own data order
(`input_pipeline.epoch_permutation(seed, epoch)`, as `train_lib`) and its own
learning rate; the loss is `steps`'s mean softmax cross-entropy. The model
is a linen module called as `model(x, train=...)` (`training.models`); for the
MNIST CNN use `conv=models.LoopConv`, the convolution for models stepped
inside loops.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from training import datasets
from training import input_pipeline


def direction(optimizer: str) -> optax.GradientTransformation:
  """The learning-rate-free part of an optimizer (the step is `-lr * direction`).

  'sgd': the gradient; 'momentum': heavy-ball momentum 0.9 (Keras/optax
  SGD(momentum=0.9)); 'adam': Adam with optax / Keras defaults; 'rmsprop':
  Keras' RMSprop (rho 0.9, `g / (sqrt(v) + 1e-7)`), the optimizer of the
  Keras MNIST examples of the seed's time.
  """
  if optimizer == "sgd":
    return optax.identity()
  if optimizer == "momentum":
    return optax.trace(decay=0.9)
  if optimizer == "adam":
    return optax.scale_by_adam()
  if optimizer == "rmsprop":
    return optax.scale_by_rms(decay=0.9, eps=1e-7, eps_in_sqrt=False)
  raise ValueError("optimizer must be 'sgd', 'momentum', 'adam' or 'rmsprop', got "
                   f"{optimizer!r}.")


class Carry(NamedTuple):
  """Stacked training state of all instances (leading axis = instance)."""
  params: dict
  state: dict
  opt_state: optax.OptState
  loss: jax.Array  # last training loss of each instance
  finite: jax.Array  # False once an instance's loss was non-finite


PIXEL_SCALE = 1.0 / 255.0  # uint8 pixels -> [0, 1]


class Trainer:
  """Trains `len(seeds)` instances of `model` with `optimizer` at `learning_rates`.

  Args:
    model: a linen module called as `model(x, train=...)`; its `batch_stats`
      (if any) are each instance's BN state (`Carry.state`).
    optimizer: 'sgd', 'momentum' or 'adam'.
    train: the training split (kept on device as uint8).
    batch_size: examples per step and instance.
    pixel_scale: inputs are `uint8 pixels * pixel_scale`; 1.0 feeds the raw
      0-255 values (no input scaling).
  """

  def __init__(self, model: nn.Module, optimizer: str,
               train: datasets.Split, batch_size: int, *,
               pixel_scale: float = PIXEL_SCALE):
    self.model = model
    self.pixel_scale = pixel_scale
    self.tx = direction(optimizer)
    self.batch_size = batch_size
    self.train_images = jnp.asarray(train.images)
    self.train_labels = jnp.asarray(train.labels)
    self.steps_per_epoch = input_pipeline.steps_per_epoch(len(train.labels), batch_size)
    self._run_steps = jax.jit(self._run_steps_impl, donate_argnums=(0,))
    self._count_correct = {
        training: jax.jit(functools.partial(self._count_correct_impl, training=training))
        for training in (False, True)}

  def init(self, seeds) -> Carry:
    """Initial parameters from `jax.random.key(seed)` for each instance."""
    params, state = jax.vmap(self._init_instance)(
        jnp.stack([jax.random.key(int(s)) for s in seeds]))
    opt_state = jax.vmap(self.tx.init)(params)
    n = len(seeds)
    return Carry(params, state, opt_state, jnp.zeros(n), jnp.ones(n, bool))

  def _init_instance(self, key):
    variables = self.model.init(key, self._to_float(self.train_images[:1]), train=False)
    return variables["params"], variables.get("batch_stats", {})

  def _to_float(self, images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) * self.pixel_scale

  def apply(self, params, state, images, training: bool):
    """`(logits, new_state)` of one instance; `new_state` is `state` unless training."""
    variables = {"params": params, "batch_stats": state}
    if not training:
      return self.model.apply(variables, images, train=False), state
    logits, updates = self.model.apply(variables, images, train=True,
                                       mutable=["batch_stats"])
    return logits, updates.get("batch_stats", {})

  def _loss(self, params, state, images, labels):
    logits, new_state = self.apply(params, state, images, True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, new_state

  def _instance_step(self, params, state, opt_state, finite, learning_rate, indices):
    images = self._to_float(self.train_images[indices])
    labels = self.train_labels[indices]
    (loss, new_state), grads = jax.value_and_grad(self._loss, has_aux=True)(
        params, state, images, labels)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
    return params, new_state, opt_state, loss, finite & jnp.isfinite(loss)

  def _run_steps_impl(self, carry: Carry, learning_rates, indices, active) -> Carry:
    def step(instance):
      return self._instance_step(*instance)

    def train_step(carry, step_indices):
      # Instances one after the other (lax.map), not vmapped: on CPU the
      # unbatched convolutions and matmuls of one instance were measured
      # faster than their batched forms (the MNIST CNN, 3 and 9 instances).
      return Carry(*jax.lax.map(step, (carry.params, carry.state, carry.opt_state,
                                       carry.finite, learning_rates, step_indices)))

    def body(carry, step):
      step_indices, step_active = step
      return jax.lax.cond(step_active, train_step, lambda carry, _: carry, carry,
                          step_indices), None

    carry, _ = jax.lax.scan(body, carry, (indices, active))
    return carry

  def batch_indices(self, seeds, epoch: int, start: int, stop: int) -> np.ndarray:
    """Example indices `(stop - start, num_instances, batch)` of steps [start, stop)."""
    num_examples = len(self.train_labels)
    orders = {s: input_pipeline.epoch_permutation(num_examples, seed=int(s), epoch=epoch)
              for s in set(int(s) for s in seeds)}
    b = self.batch_size
    return np.stack([
        np.stack([orders[int(s)][step * b:(step + 1) * b] for s in seeds])
        for step in range(start, stop)]).astype(np.int32)

  def train(self, carry: Carry, seeds, learning_rates, *, epoch: int, start: int,
            stop: int, pad_to: int = 0) -> Carry:
    """Runs steps [start, stop) of `epoch` for every instance.

    `pad_to` pads the call to that many (skipped) steps, so that calls of
    different lengths share one compiled program.
    """
    if stop <= start:
      return carry
    indices = self.batch_indices(seeds, epoch, start, stop)
    num_steps = max(pad_to, len(indices))
    active = np.arange(num_steps) < len(indices)
    indices = np.concatenate(
        [indices, np.zeros((num_steps - len(indices),) + indices.shape[1:], np.int32)])
    return self._run_steps(carry, jnp.asarray(learning_rates, jnp.float32),
                           jnp.asarray(indices), jnp.asarray(active))

  def _predict_all(self, params, state, images, *, training):
    """Logits `(num_instances, batch, classes)`, one instance after the other."""
    def predict(instance):
      logits, _ = self.apply(*instance, self._to_float(images), training)
      return logits
    return jax.lax.map(predict, (params, state))

  def _count_correct_impl(self, params, state, images, labels, *, training):
    """Correct predictions `(num_instances,)` over `(num_batches, batch, ...)` inputs."""
    def batch_correct(batch):
      batch_images, batch_labels = batch
      logits = self._predict_all(params, state, batch_images, training=training)
      return jnp.sum(jnp.argmax(logits, -1) == batch_labels[None], axis=-1)
    return jax.lax.map(batch_correct, (images, labels)).sum(0)

  def accuracy(self, carry: Carry, split: datasets.Split, *,
               batch_size: int | None = None,
               training: bool = False, state=None) -> np.ndarray:
    """Accuracy `(num_instances,)` on `split`.

    Args:
      carry: trained instances.
      split: examples to classify; `len(split)` must be a multiple of
        `batch_size`.
      batch_size: examples per forward pass; by default the largest divisor
        of `len(split)` up to 100 (with running statistics it does not change
        the result).
      training: False uses the running statistics (inference); True normalizes
        each evaluation batch with its own statistics.
      state: BN state to use instead of `carry.state`.
    """
    state = carry.state if state is None else state
    n = len(split.labels)
    if batch_size is None:
      batch_size = max(d for d in range(1, min(n, 100) + 1) if n % d == 0)
    batch_size = min(batch_size, n)
    if n % batch_size:
      raise ValueError(f"batch_size={batch_size} must divide the {n} examples.")
    num_batches = n // batch_size
    correct = self._count_correct[training](
        carry.params, state,
        jnp.asarray(split.images).reshape(num_batches, batch_size, *split.images.shape[1:]),
        jnp.asarray(split.labels).reshape(num_batches, batch_size))
    accuracy = np.asarray(correct) / n
    # A diverged instance has NaN logits; argmax would still "classify".
    return np.where(np.asarray(carry.finite), accuracy, np.nan)


