"""Two CPU choices of train.py and the experiments, timed: eval batch size, harness conv.

* Evaluation: images/s of train.py's eval step (`evaluation.evaluate`, the MNIST
  CNN with running statistics) over 10,000 images at several eval batch
  sizes; `configs/mnist_bn.py` uses the fastest (250 here).
* The experiments' harness (`training.instances.Trainer`, instances stepped
  one after the other inside a `lax.scan`): seconds for 40 steps of 3
  instances at batch 32 with `models.ValidConv` (on CPU `ops.conv_matmuls`:
  im2col with a hand-written gradient for the first layer, the fastest in a
  plain jitted step) against `models.LoopConv` (`ops.conv_im2col`: im2col with
  the automatic gradient), which the experiments use.

Variants alternate within every repeat; the tables report medians.

  python -m benchmarks.cpu_paths            # ~2 minutes on 2 cores
  python -m benchmarks.cpu_paths --tiny     # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import mnist_bn  # noqa: E402
from training import datasets  # noqa: E402
from training import distributed  # noqa: E402
from training import evaluation  # noqa: E402
from training import instances  # noqa: E402
from training import models  # noqa: E402
from training import optimizers  # noqa: E402
from training import steps  # noqa: E402
from training import train_state  # noqa: E402


def _random_split(num_examples: int) -> datasets.Split:
  rng = np.random.default_rng(0)
  return datasets.Split(
      rng.integers(0, 256, (num_examples, 28, 28, 1)).astype(np.uint8),
      rng.integers(0, 10, num_examples).astype(np.int32))


def eval_images_per_sec(batch_sizes, num_examples: int, repeats: int
                        ) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
  """Median images/s of train.py's evaluation at each eval batch size, and its metrics.

  Returns:
    `(images_per_sec, metrics)`, both keyed by eval batch size; `metrics` is
    `evaluation.evaluate`'s loss and accuracy, which must not depend on it.
  """
  config = mnist_bn.get_config()
  mesh = distributed.create_mesh(1)  # one device, as train.py on a CPU host
  model = models.MnistCNN()
  tx = optimizers.create_optimizer(config, 100)
  state = jax.jit(lambda key: train_state.create_train_state(
      model, tx, key, input_shape=(28, 28, 1)))(jax.random.key(0))
  eval_fn = steps.make_eval_step(config, mesh, model)
  split = _random_split(num_examples)
  times, metrics = {b: [] for b in batch_sizes}, {}
  for repeat in range(repeats + 1):  # the first round compiles
    for batch_size in batch_sizes:
      start = time.perf_counter()
      metrics[batch_size] = evaluation.evaluate(eval_fn, state, split,
                                                global_batch_size=batch_size, mesh=mesh)
      if repeat:
        times[batch_size].append(time.perf_counter() - start)
  return {b: num_examples / statistics.median(t) for b, t in times.items()}, metrics


def harness_seconds(num_steps: int, repeats: int) -> tuple[dict[str, float], float]:
  """Median seconds for `num_steps` harness steps of 3 MNIST-CNN instances, batch 32.

  Returns:
    `(seconds, difference)`: seconds per convolution variant, and the largest
    absolute difference between the two variants' parameters after the same
    steps (the convolutions compute the same function: rounding only).
  """
  split = _random_split(4096)
  seeds, learning_rates = [0, 1, 2], [0.01] * 3
  variants = {"models.ValidConv": models.ValidConv, "models.LoopConv": models.LoopConv}
  trainers, carries, times = {}, {}, {name: [] for name in variants}
  for name, conv in variants.items():
    trainers[name] = instances.Trainer(
        models.create_model("cnn", num_classes=10, conv=conv), "sgd", split, 32)
    carries[name] = trainers[name].init(seeds)
  for repeat in range(repeats + 1):  # the first round compiles
    for name, trainer in trainers.items():
      start = time.perf_counter()
      carries[name] = jax.block_until_ready(trainer.train(
          carries[name], seeds, learning_rates, epoch=0, start=0, stop=num_steps))
      if repeat:
        times[name].append(time.perf_counter() - start)
  params = [carry.params for carry in carries.values()]
  difference = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(*(jax.tree.leaves(p) for p in params)))
  return {name: statistics.median(t) for name, t in times.items()}, difference


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tiny", action="store_true", help="checks that it runs")
  args = parser.parse_args(argv)
  if args.tiny:
    evals, metrics = eval_images_per_sec((50, 100), num_examples=200, repeats=1)
    harness, difference = harness_seconds(num_steps=2, repeats=1)
  else:
    evals, metrics = eval_images_per_sec((100, 250, 500, 1000, 2000), num_examples=10_000,
                                         repeats=args.repeats)
    harness, difference = harness_seconds(num_steps=40, repeats=args.repeats)
  command = "python -m benchmarks.cpu_paths" + (" --tiny" if args.tiny else "")
  lines = [f"`{command}`", "", "| eval batch | images/s |", "|---:|---:|"]
  lines += [f"| {b} | {v:,.0f} |" for b, v in evals.items()]
  lines += ["", "| harness conv | seconds (3 instances, batch 32) |", "|---|---:|"]
  lines += [f"| `{name}` | {seconds:.3f} |" for name, seconds in harness.items()]
  print("\n".join(lines))
  return {"eval_images_per_sec": evals, "eval_metrics": metrics, "harness_seconds": harness,
          "harness_params_difference": difference}


if __name__ == "__main__":
  main()
