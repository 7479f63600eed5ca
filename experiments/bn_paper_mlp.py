"""The BN paper's MNIST experiment (Ioffe & Szegedy 2015, section 4.1, Figure 1).

A fully connected network with 3 hidden layers of 100 sigmoid units
(`training.models.bn_paper_mlp`), trained with and without BN before each
sigmoid, mini-batches of 60, plain SGD. Figure 1(a) of the paper: test
accuracy over training; Figure 1(b, c): the 15th, 50th and 85th percentiles of
the input to one sigmoid of the last hidden layer over training, which drift
without BN (internal covariate shift) and stay put with BN. Inputs are taken
over the test set, in inference mode, at every evaluation. Besides the plotted
unit, the drift is summarized over all 100 units: the mean absolute change of
each unit's median between consecutive evaluations, divided by the unit's
85-15 percentile width.

  python -m experiments.bn_paper_mlp --workdir runs/experiments
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _common
from experiments import _mnist
from training import instances
from training import models

NAME = "bn_paper_mlp"
PERCENTILES = (15, 50, 85)


def _flags(parser):
  parser.add_argument("--steps", type=int, default=50000,
                      help="training steps (the paper's 50,000 by default)")
  parser.add_argument("--batch_size", type=int, default=60)
  parser.add_argument("--learning_rate", type=float, default=0.5,
                      help="SGD learning rate (configs/mnist_mlp.py uses 0.5)")
  parser.add_argument("--eval_every", type=int, default=500)
  parser.add_argument("--unit", type=int, default=0,
                      help="last-hidden-layer unit whose input distribution is plotted")


def _sigmoid_inputs(model: models.BNPaperMLP, params, state, images):
  """Input of the last hidden layer's sigmoids, `(batch, 100)`, inference mode.

  The output of the last hidden BN layer (of the last hidden dense layer
  without BN), captured while the model runs.
  """
  last = model.num_hidden_layers
  layer = f"bn{last}" if model.use_bn else f"dense{last}"
  x = images.astype(jnp.float32) * instances.PIXEL_SCALE
  _, captured = model.apply({"params": params, "batch_stats": state}, x, train=False,
                            capture_intermediates=lambda module, _: module.name == layer,
                            mutable=["intermediates"])
  return captured["intermediates"][layer]["__call__"][0]


def run(args) -> dict:
  data = _mnist.load_mnist(quick=args.quick)
  if args.quick:
    args.steps, args.eval_every = 20, 10
  runs = {}
  results = {"steps": args.steps, "batch_size": args.batch_size,
             "learning_rate": args.learning_rate, "eval_every": args.eval_every,
             "unit": args.unit, "percentiles": PERCENTILES,
             "test_examples": len(data.test.labels), "runs": runs}
  for use_bn in (True, False):
    label = "bn" if use_bn else "nobn"
    model = models.create_model("mlp", num_classes=10, use_bn=use_bn)
    trainer = instances.Trainer(model, "sgd", data.train, args.batch_size)
    inputs_fn = jax.jit(jax.vmap(functools.partial(_sigmoid_inputs, model),
                                 in_axes=(0, 0, None)))
    test_images = jnp.asarray(data.test.images)

    def evaluate(carry, trainer=trainer, inputs_fn=inputs_fn):
      unit_inputs = np.asarray(inputs_fn(carry.params, carry.state, test_images))
      return {"test_accuracy": trainer.accuracy(carry, data.test),
              # (instances, 3 percentiles, 100 units)
              "percentiles": np.percentile(unit_inputs, PERCENTILES, axis=1
                                           ).transpose(1, 0, 2)}

    start = time.time()
    _, history = _mnist.train_with_evaluations(
        trainer, args.seeds, [args.learning_rate] * len(args.seeds),
        eval_steps=[*range(0, args.steps, args.eval_every), args.steps], evaluate=evaluate,
        log=lambda msg, label=label: print(label, msg.split(" percentiles")[0],
                                           flush=True))
    percentiles = np.stack([h["percentiles"] for h in history], 1)  # (I, evals, 3, U)
    median = percentiles[:, :, 1]
    width = np.maximum(percentiles[:, :, 2] - percentiles[:, :, 0], 1e-12)
    drift = np.abs(np.diff(median, axis=1)) / width[:, 1:]  # (I, evals-1, U)
    runs[label] = {
        "use_bn": use_bn, "wall_time_s": time.time() - start,
        "steps": [h["step"] for h in history],
        "test_accuracy": [h["test_accuracy"] for h in history],
        "unit_percentiles": percentiles[:, :, :, args.unit],  # (I, evals, 3)
        "final_test_accuracy": _common.mean_std(history[-1]["test_accuracy"]),
        # Median drift per evaluation interval, in units of the 15-85 width,
        # averaged over all units; over the whole run and after the first 10%.
        "median_drift_all": _common.mean_std(drift.mean((1, 2))),
        "median_drift_after_10pct": _common.mean_std(
            drift[:, max(1, drift.shape[1] // 10):].mean((1, 2))),
        "median_total_shift_after_10pct": _common.mean_std(
            (np.abs(median[:, -1] - median[:, max(1, median.shape[1] // 10)])
             / width[:, -1]).mean(-1)),
    }
    _common.write_json(args, results)
  return results


def plot(args, results) -> None:
  fig, axes = _common.figure(1, 3, width=4.2)
  for use_bn, color in ((True, "tab:blue"), (False, "tab:red")):
    run = results["runs"]["bn" if use_bn else "nobn"]
    steps = np.asarray(run["steps"])
    acc = 100 * np.asarray(run["test_accuracy"], float)
    mean, std = np.nanmean(acc, 1), np.nanstd(acc, 1)
    axes[0, 0].plot(steps, mean, color=color, label="BN" if use_bn else "no BN")
    axes[0, 0].fill_between(steps, mean - std, mean + std, color=color, alpha=0.25)
    ax = axes[0, 1] if not use_bn else axes[0, 2]
    percentiles = np.asarray(run["unit_percentiles"])[0]  # first seed
    for k, style in zip(range(3), (":", "-", ":")):
      ax.plot(steps, percentiles[:, k], color=color, ls=style)
    ax.set_title(f"{'with' if use_bn else 'without'} BN: input of sigmoid "
                 f"unit {results['unit']}\n(15/50/85th percentiles, seed "
                 f"{args.seeds[0]})", fontsize=8)
    ax.set_xlabel("training step")
  axes[0, 0].set_ylim(80, 100)
  axes[0, 0].set_xlabel("training step")
  axes[0, 0].set_ylabel("test accuracy (%)")
  axes[0, 0].legend(fontsize=7)
  axes[0, 0].set_title("(a) test accuracy, mean +- std", fontsize=8)
  fig.suptitle(f"BN paper Figure 1: 3x100 sigmoid MLP, batch {results['batch_size']}, "
               f"SGD lr {results['learning_rate']}")
  _common.save_figure(args, fig)


def main(argv=None):
  _common.run_experiment(NAME, __doc__, run, plot, argv, extra=_flags)


if __name__ == "__main__":
  main()
