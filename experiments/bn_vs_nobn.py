"""Seed 003's claim: BN vs no BN on the MNIST CNN, three optimizers.

The seed trains its Keras CNN with BN on 50,000 MNIST images and reports
96.4 / 98.2 / 98.3 % validation accuracy after epochs 1-3, and says that
without BN "it takes 10x more epochs to converge". This trains the same CNN
(`training.models.MnistCNN`, Keras' BN momentum 0.99 and epsilon 1e-3) with
and without BN, with Keras' default batch size 32 and learning rates (SGD 0.01,
SGD + momentum 0.9 at 0.01, Adam 1e-3, RMSprop 1e-3 -- the seed does not say
which optimizer it used; RMSprop is the one of Keras' MNIST examples of its
time), for several seeds, and evaluates on the 10,000 held-out validation
images every `--evals_per_epoch`-th of an epoch. It reports validation
accuracy per epoch and the steps / epochs each run needs to reach 97%, 98% and
99%. `--raw_pixels` feeds the unscaled 0-255 pixels instead of [0, 1] (a
network without BN depends on its input scale; one with BN after the first
convolution much less).

  python -m experiments.bn_vs_nobn --workdir runs/experiments
  python -m experiments.bn_vs_nobn --workdir runs/experiments --raw_pixels --tag raw_pixels
"""

from __future__ import annotations

import time

import numpy as np

from experiments import _common
from experiments import _mnist
from training import instances
from training import models

NAME = "bn_vs_nobn"
# Keras' default learning rates.
OPTIMIZERS = {"sgd": 0.01, "momentum": 0.01, "adam": 1e-3, "rmsprop": 1e-3}
THRESHOLDS = (0.97, 0.98, 0.99)
SEED_CLAIM = {"bn_validation_accuracy_after_epoch": {1: 0.9644, 2: 0.9822, 3: 0.9832},
              "nobn": "10x more epochs to converge"}


def _flags(parser):
  parser.add_argument("--epochs", type=float, default=10,
                      help="training epochs of 50,000 examples (may be fractional)")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--evals_per_epoch", type=int, default=4)
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument("--raw_pixels", action="store_true",
                      help="feed the 0-255 pixel values instead of scaling them to [0, 1]")


def run(args) -> dict:
  data = _mnist.load_mnist(quick=args.quick)
  if args.quick:
    args.epochs, args.batch_size, args.evals_per_epoch = 1, 64, 2
    args.optimizers = ["adam"]
  pixel_scale = 1.0 if args.raw_pixels else instances.PIXEL_SCALE
  runs = {}
  results = {"epochs": args.epochs, "batch_size": args.batch_size,
             "evals_per_epoch": args.evals_per_epoch, "pixel_scale": pixel_scale,
             "train_examples": len(data.train.labels),
             "validation_examples": len(data.validation.labels),
             "thresholds": THRESHOLDS, "seed_claim": SEED_CLAIM, "runs": runs}
  for optimizer in args.optimizers:
    for use_bn in (True, False):
      label = f"{optimizer}_{'bn' if use_bn else 'nobn'}"
      model = models.create_model("cnn", num_classes=10, use_bn=use_bn,
                                  conv=models.LoopConv)
      trainer = instances.Trainer(model, optimizer, data.train, args.batch_size,
                                  pixel_scale=pixel_scale)
      eval_steps = _mnist.evaluation_steps(trainer.steps_per_epoch, args.epochs,
                                           args.evals_per_epoch)
      learning_rates = [OPTIMIZERS[optimizer]] * len(args.seeds)
      start = time.time()
      _, history = _mnist.train_with_evaluations(
          trainer, args.seeds, learning_rates, eval_steps=eval_steps,
          evaluate=lambda c, t=trainer: {"validation_accuracy":
                                         t.accuracy(c, data.validation)},
          log=lambda msg, label=label: print(label, msg, flush=True))
      reach = {str(t): _common.first_reaching(history, "validation_accuracy", t)
               for t in THRESHOLDS}
      runs[label] = {
          "optimizer": optimizer, "learning_rate": OPTIMIZERS[optimizer],
          "use_bn": use_bn, "steps_per_epoch": trainer.steps_per_epoch,
          "num_steps": eval_steps[-1], "wall_time_s": time.time() - start,
          "history": history, "reach": reach,
          "final_validation_accuracy": _common.mean_std(
              history[-1]["validation_accuracy"]),
          "best_validation_accuracy": _common.mean_std(
              np.nanmax([h["validation_accuracy"] for h in history], 0)),
      }
      _common.write_json(args, results)  # partial results survive an interruption
  return results


def plot(args, results) -> None:
  optimizers = sorted({r["optimizer"] for r in results["runs"].values()},
                      key=list(OPTIMIZERS).index)
  ncols = min(2, len(optimizers))
  nrows = -(-len(optimizers) // ncols)
  fig, axes = _common.figure(nrows, ncols, width=5.0)
  axes = axes.ravel()
  for ax in axes[len(optimizers):]:
    ax.set_visible(False)
  for ax, optimizer in zip(axes, optimizers):
    lowest = 90.0
    for use_bn, color in ((True, "tab:blue"), (False, "tab:red")):
      run = results["runs"][f"{optimizer}_{'bn' if use_bn else 'nobn'}"]
      epochs = np.array([h["epoch"] for h in run["history"]])
      acc = 100 * np.array([h["validation_accuracy"] for h in run["history"]], float)
      mean, std = np.nanmean(acc, 1), np.nanstd(acc, 1)
      after_first_epoch = mean[epochs >= 1]
      if after_first_epoch.size and np.isfinite(after_first_epoch).any():
        lowest = min(lowest, float(np.nanmin(after_first_epoch)))
      ax.plot(epochs, mean, color=color, label="BN" if use_bn else "no BN")
      ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.25)
    claim = results["seed_claim"]["bn_validation_accuracy_after_epoch"]
    ax.plot(list(map(int, claim)), [100 * v for v in claim.values()], "k*",
            label="seed 003 (Keras, BN)")
    for threshold in results["thresholds"]:
      ax.axhline(100 * threshold, color="gray", lw=0.5, ls=":")
    ax.set_ylim(max(0.0, np.floor(lowest) - 1), 100)
    ax.set_xlabel("epoch (50,000 examples)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{optimizer}, lr={OPTIMIZERS[optimizer]:g}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
  inputs = "raw 0-255 pixels" if results["pixel_scale"] == 1.0 else "pixels in [0, 1]"
  fig.suptitle(f"MNIST CNN, batch {results['batch_size']}, {inputs}, "
               f"mean +- std over {len(args.seeds)} seeds")
  _common.save_figure(args, fig)


def main(argv=None):
  _common.run_experiment(NAME, __doc__, run, plot, argv, extra=_flags)


if __name__ == "__main__":
  main()
