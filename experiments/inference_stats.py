"""Inference with running statistics vs batch statistics (seeds 000/002).

The seeds say that at test time, where there may be a single example, BN uses
the exponential moving averages of the training batches' means and variances,
and that this is robust. This trains the MNIST CNN with BN (Adam 1e-3, batch 32)
while tracking, in the same run, the running statistics for several momenta
(weight of the old value: 0.9, 0.99 = Keras/flax, 0.999) with the biased
(Keras/flax) and the unbiased n/(n-1) (PyTorch, BN paper) running variance --
training itself always normalizes with batch statistics, so all variants share
one training trajectory. It then reports test accuracy

* with running statistics, for inference batch sizes 1..1000 (they must not
  matter: each example is normalized independently);
* with the statistics of each test batch itself, for batch sizes 2..N (batch
  size 1 is undefined: the dense layer's BN would have one value per feature).

It also evaluates every running-statistics variant at several points of
training (`--checkpoints`), which shows how long each momentum takes to forget
the initial state (mean 0, variance 1): its weight after t steps is momentum^t.

  python -m experiments.inference_stats --workdir runs/experiments
"""

from __future__ import annotations

import time
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp

import jaxbn
from experiments import _common
from experiments import _mnist
from training import instances
from training import models

NAME = "inference_stats"
MOMENTA = (0.9, 0.99, 0.999)
VARIANTS = tuple((m, unbiased) for m in MOMENTA for unbiased in (False, True))
RUNNING_BATCH_SIZES = (1, 10, 100, 1000)
BATCH_STAT_SIZES = (1, 2, 4, 8, 10, 20, 50, 100, 1000)


def _variant_name(momentum, unbiased) -> str:
  return f"momentum={momentum}, {'unbiased' if unbiased else 'biased'} var"


class MultiStatBatchNorm(nn.Module):
  """A BN layer that keeps one set of running statistics per variant of `VARIANTS`.

  In training it normalizes with the batch statistics (the same for every
  variant) and updates every variant's running statistics, stacked along a
  leading axis of its `batch_stats` (`mean`, `var`: `(variants, features)`;
  `count`: `(variants,)`). Given one variant's statistics (`variant_stats`:
  `(features,)`) it is one `jaxbn.batch_norm` layer, so a trained model is
  evaluated with one variant by passing that variant's slice. The attributes
  are those `models.MnistCNN` passes to its `norm`; each variant has its own
  momentum (`momentum` updates one variant's statistics in training).
  """
  use_running_average: bool | None = None
  momentum: float = models.KERAS_BN_MOMENTUM
  epsilon: float = models.KERAS_BN_EPSILON
  dtype: Any = None
  axis_name: Any = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features, num_variants = x.shape[-1], len(VARIANTS)
    params = jaxbn.BatchNormParams(
        self.param("scale", nn.initializers.ones, (features,), jnp.float32),
        self.param("bias", nn.initializers.zeros, (features,), jnp.float32))
    stats = [self.variable("batch_stats", name, init, shape, dtype) for name, init, shape, dtype
             in (("mean", jnp.zeros, (num_variants, features), jnp.float32),
                 ("var", jnp.ones, (num_variants, features), jnp.float32),
                 ("count", jnp.zeros, (num_variants,), jnp.int32))]
    stacked = stats[0].value.ndim == 2
    states = ([jaxbn.BatchNormState(*(v.value[k] for v in stats)) for k in range(num_variants)]
              if stacked else [jaxbn.BatchNormState(*(v.value for v in stats))])
    if self.use_running_average:
      if stacked and not self.is_initializing():
        raise ValueError("inference needs one variant's statistics (variant_stats), got "
                         f"statistics of shape {stats[0].value.shape}.")
      return jaxbn.batch_norm(params, states[0], x, training=False, epsilon=self.epsilon)[0]
    y, new_states = None, []
    settings = VARIANTS if stacked else [(self.momentum, False)]
    for state, (momentum, unbiased) in zip(states, settings):
      out, new_state = jaxbn.batch_norm(params, state, x, training=True, momentum=momentum,
                                        epsilon=self.epsilon, unbiased_running_var=unbiased)
      y = out if y is None else y  # identical outputs; the rest is dead code
      new_states.append(new_state)
    if not self.is_initializing():
      for field, variable in enumerate(stats):  # mean, var, count
        values = [state[field] for state in new_states]
        variable.value = jnp.stack(values) if stacked else values[0]
    return y


def variant_stats(batch_stats, k: int):
  """Variant `k`'s statistics of stacked instances' `batch_stats` (instance axis first)."""
  return jax.tree.map(lambda leaf: leaf[:, k], batch_stats)


def _flags(parser):
  parser.add_argument("--steps", type=int, default=3124,
                      help="training steps (1562 = one epoch of 50,000 at batch 32)")
  parser.add_argument("--checkpoints", type=int, nargs="+",
                      default=[100, 300, 1000, 1562],
                      help="earlier steps at which the variants are also evaluated")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--test_examples", type=int, default=10000,
                      help="first N test images used for every evaluation")


def run(args) -> dict:
  data = _mnist.load_mnist(quick=args.quick)
  running_batch_sizes, batch_stat_sizes = RUNNING_BATCH_SIZES, BATCH_STAT_SIZES
  if args.quick:  # fewer sizes: each one is a compilation
    args.steps, args.test_examples, args.checkpoints = 10, 400, [5]
    running_batch_sizes, batch_stat_sizes = (1, 100), (1, 2, 100)
  test = data.test.take(args.test_examples)
  model = models.create_model("cnn", num_classes=10, norm=MultiStatBatchNorm,
                              conv=models.LoopConv)
  trainer = instances.Trainer(model, "adam", data.train, args.batch_size)

  def variant_state(k, carry):
    return variant_stats(carry.state, k)

  def evaluate_variants(carry):
    return {_variant_name(*variant): trainer.accuracy(carry, test,
                                                      state=variant_state(k, carry))
            for k, variant in enumerate(VARIANTS)}

  start = time.time()
  carry, history = _mnist.train_with_evaluations(
      trainer, args.seeds, [1e-3] * len(args.seeds),
      eval_steps=[s for s in args.checkpoints if s < args.steps] + [args.steps],
      evaluate=evaluate_variants)
  train_time = time.time() - start
  over_training = {
      name: {"steps": [h["step"] for h in history],
             "test_accuracy": [_common.mean_std(h[name]) for h in history],
             "weight_of_initial_state": [momentum ** h["step"] for h in history]}
      for name, momentum in zip(map(lambda v: _variant_name(*v), VARIANTS),
                                (m for m, _ in VARIANTS))}

  variants = {}
  for momentum, unbiased in VARIANTS:
    accuracy = history[-1][_variant_name(momentum, unbiased)]
    variants[_variant_name(momentum, unbiased)] = {
        "momentum": momentum, "unbiased_running_var": unbiased,
        "test_accuracy": accuracy, "summary": _common.mean_std(accuracy),
        "weight_of_initial_state": momentum ** args.steps,
    }
    print(_variant_name(momentum, unbiased), accuracy, flush=True)

  # Running statistics: the inference batch size must not matter (default variant).
  default = variant_state(VARIANTS.index((0.99, False)), carry)
  small = test.take(min(len(test.labels), 1000))
  running_by_batch = {}
  for size in running_batch_sizes:
    accuracy = trainer.accuracy(carry, small, state=default, batch_size=size)
    running_by_batch[str(size)] = _common.mean_std(accuracy)
    print("running stats, batch", size, accuracy, flush=True)

  batch_stats = {}
  for size in batch_stat_sizes:
    eval_set = small if size < 50 else test
    try:
      accuracy = trainer.accuracy(carry, eval_set, state=default, batch_size=size,
                                  training=True)
      batch_stats[str(size)] = {**_common.mean_std(accuracy),
                                "examples": len(eval_set.labels)}
    except ValueError as error:  # batch size 1: one value per feature in bn3
      batch_stats[str(size)] = {"error": str(error).split(". ")[0]}
    print("batch stats, batch", size, batch_stats[str(size)], flush=True)

  return {"steps": args.steps, "batch_size": args.batch_size, "optimizer": "adam 1e-3",
          "train_time_s": train_time, "test_examples": len(test.labels),
          "small_test_examples": len(small.labels), "variants": variants,
          "variants_over_training": over_training,
          "running_stats_by_batch_size": running_by_batch,
          "batch_stats_by_batch_size": batch_stats}


def plot(args, results) -> None:
  fig, axes = _common.figure(1, 2, width=5.4)
  ax = axes[0, 0]
  sizes = [int(s) for s, v in results["batch_stats_by_batch_size"].items() if "mean" in v]
  means = [100 * results["batch_stats_by_batch_size"][str(s)]["mean"] for s in sizes]
  stds = [100 * results["batch_stats_by_batch_size"][str(s)]["std"] for s in sizes]
  ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label="batch statistics")
  run_sizes = [int(s) for s in results["running_stats_by_batch_size"]]
  ax.errorbar(run_sizes,
              [100 * v["mean"] for v in results["running_stats_by_batch_size"].values()],
              yerr=[100 * v["std"] for v in results["running_stats_by_batch_size"].values()],
              marker="s", capsize=3, label="running statistics (momentum 0.99)")
  ax.set_xscale("log")
  ax.set_xlabel("inference batch size")
  ax.set_ylabel("test accuracy (%)")
  ax.legend(fontsize=7)
  ax.set_title("running vs batch statistics", fontsize=9)
  ax = axes[0, 1]
  colors = dict(zip(MOMENTA, ("tab:green", "tab:blue", "tab:red")))
  for name, variant in results["variants"].items():
    curve = results["variants_over_training"][name]
    ax.errorbar(curve["steps"], [100 * v["mean"] for v in curve["test_accuracy"]],
                yerr=[100 * v["std"] for v in curve["test_accuracy"]], capsize=2,
                color=colors[variant["momentum"]], marker="o", ms=3,
                ls="--" if variant["unbiased_running_var"] else "-", label=name)
  ax.set_xscale("log")
  ax.set_xlabel("training step")
  ax.set_ylabel("test accuracy (%), running statistics")
  ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  ax.set_title("running-statistics variants over training", fontsize=9)
  fig.suptitle(f"MNIST CNN with BN, Adam 1e-3, batch {results['batch_size']}, "
               f"mean +- std over {len(args.seeds)} seeds")
  _common.save_figure(args, fig)


def main(argv=None):
  _common.run_experiment(NAME, __doc__, run, plot, argv, extra=_flags)


if __name__ == "__main__":
  main()
