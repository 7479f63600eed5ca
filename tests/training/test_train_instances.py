"""training.instances: several instances of a linen model trained in one program."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from training import datasets
from training import instances
from training import models


def _split(num_examples=64):
  rng = np.random.default_rng(0)
  return datasets.Split(
      rng.integers(0, 256, (num_examples, 8, 8, 1)).astype(np.uint8),
      rng.integers(0, 10, num_examples).astype(np.int32))


def _trainer(split):
  model = models.BNPaperMLP(hidden_features=8, num_hidden_layers=2)
  return instances.Trainer(model, "sgd", split, batch_size=16)


def _instance(tree, k):
  return jax.tree.map(lambda leaf: leaf[k], tree)


def test_each_instance_trains_as_if_alone():
  trainer = _trainer(_split())
  both = trainer.train(trainer.init([0, 1]), [0, 1], [0.1, 0.5], epoch=0, start=0, stop=3)
  alone = trainer.train(trainer.init([1]), [1], [0.5], epoch=0, start=0, stop=3)
  chex.assert_trees_all_close(_instance(both.params, 1), _instance(alone.params, 0),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(_instance(both.state, 1), _instance(alone.state, 0),
                              rtol=1e-5, atol=1e-6)
  assert not np.allclose(both.params["dense1"]["kernel"][0],
                         both.params["dense1"]["kernel"][1])


def test_one_sgd_step_is_a_gradient_step_of_the_mean_cross_entropy():
  split = _split()
  trainer = _trainer(split)
  learning_rate = 0.3
  carry = trainer.init([3])
  params, state = _instance(carry.params, 0), _instance(carry.state, 0)
  indices = trainer.batch_indices([3], epoch=0, start=0, stop=1)[0, 0]
  images = jnp.asarray(split.images[indices], jnp.float32) * instances.PIXEL_SCALE
  labels = split.labels[indices]

  def loss(params):
    logits, updates = trainer.model.apply({"params": params, "batch_stats": state}, images,
                                          train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

  (expected_loss, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
  new = trainer.train(carry, [3], [learning_rate], epoch=0, start=0, stop=1)
  chex.assert_trees_all_close(
      _instance(new.params, 0),
      jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(_instance(new.state, 0), updates["batch_stats"], rtol=1e-5,
                              atol=1e-6)
  np.testing.assert_allclose(new.loss[0], expected_loss, rtol=1e-5)
  # Evaluation uses the running statistics.
  logits = trainer.model.apply(
      {"params": _instance(new.params, 0), "batch_stats": _instance(new.state, 0)},
      jnp.asarray(split.images, jnp.float32) * instances.PIXEL_SCALE, train=False)
  expected_accuracy = np.mean(np.argmax(logits, -1) == split.labels)
  np.testing.assert_allclose(trainer.accuracy(new, split), [expected_accuracy])
