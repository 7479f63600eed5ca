"""Seeds 000/002: BN makes training less sensitive to the learning rate.

Sweeps the learning rate over 9 values from 1e-4 to 1 (4 orders of magnitude)
for SGD and Adam, with and without BN, and reports validation accuracy after a
fixed budget of `--epochs` epochs (default one pass over the 50,000 training
images) of batch `--batch_size`, for several seeds.
All learning rates and seeds of one (optimizer, BN) pair train as one vmapped
program (same data order per seed across learning rates).

Writes `lr_sweep_{cnn,mlp}.json` / `.png`.

  python -m experiments.lr_sweep --workdir runs/experiments --model cnn
  python -m experiments.lr_sweep --workdir runs/experiments --model mlp --batch_size 60
"""

from __future__ import annotations

import time

import numpy as np

from experiments import _common
from experiments import _mnist
from training import instances
from training import models

NAME = "lr_sweep"
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
OPTIMIZERS = ("sgd", "adam")
GOOD_ACCURACY = 0.95  # "works" threshold for counting usable learning rates


def _flags(parser):
  parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn",
                      help="the MNIST CNN or the BN paper's sigmoid MLP")
  parser.add_argument("--epochs", type=float, default=1.0,
                      help="training budget per run, in epochs of 50,000 examples")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--learning_rates", type=float, nargs="+",
                      default=list(LEARNING_RATES))
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument("--validation_examples", type=int, default=10000,
                      help="first N validation images used for the final accuracy")


def run(args) -> dict:
  data = _mnist.load_mnist(quick=args.quick)
  if args.quick:
    args.epochs, args.learning_rates, args.validation_examples = 0.25, [1e-3, 1.0], 256
  validation = data.validation.take(args.validation_examples)
  learning_rates = list(args.learning_rates)
  lr_seeds = [(lr, seed) for lr in learning_rates for seed in args.seeds]
  cells = {}
  results = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
             "learning_rates": learning_rates, "good_accuracy": GOOD_ACCURACY,
             "validation_examples": len(validation.labels), "cells": cells}
  for optimizer in args.optimizers:
    for use_bn in (True, False):
      label = f"{optimizer}_{'bn' if use_bn else 'nobn'}"
      model = models.create_model(
          args.model, num_classes=10, use_bn=use_bn,
          conv=models.LoopConv if args.model == "cnn" else None)
      trainer = instances.Trainer(model, optimizer, data.train, args.batch_size)
      num_steps = int(round(args.epochs * trainer.steps_per_epoch))
      results["steps"] = num_steps
      start = time.time()
      _, history = _mnist.train_with_evaluations(
          trainer, [s for _, s in lr_seeds], [lr for lr, _ in lr_seeds],
          eval_steps=[num_steps],
          evaluate=lambda c, t=trainer: {"validation_accuracy":
                                         t.accuracy(c, validation)},
          log=lambda msg, label=label: print(label, msg, flush=True))
      final = np.asarray(history[-1]["validation_accuracy"], float).reshape(
          len(learning_rates), len(args.seeds))
      # A diverged run (non-finite loss) counts as chance level for the summary.
      final_or_chance = np.where(np.isfinite(final), final, 0.1)
      mean_acc = final_or_chance.mean(1)
      cells[label] = {
          "optimizer": optimizer, "use_bn": use_bn,
          "wall_time_s": time.time() - start,
          "final_validation_accuracy": final,
          "diverged_seeds": (~np.isfinite(final)).sum(1),
          "mean": mean_acc, "std": final_or_chance.std(1, ddof=1)
          if len(args.seeds) > 1 else np.zeros(len(learning_rates)),
          "best_learning_rate": learning_rates[int(np.argmax(mean_acc))],
          "best_accuracy": float(mean_acc.max()),
          "learning_rates_reaching_good_accuracy": [
              lr for lr, acc in zip(learning_rates, mean_acc) if acc >= GOOD_ACCURACY],
      }
      # Partial results survive an interruption.
      _common.write_json(args, results, suffix=f"_{args.model}")
  return results


def plot(args, results) -> None:
  optimizers = [o for o in OPTIMIZERS if f"{o}_bn" in results["cells"]]
  fig, axes = _common.figure(1, len(optimizers), width=4.6)
  lrs = results["learning_rates"]
  for ax, optimizer in zip(axes[0], optimizers):
    for use_bn, color in ((True, "tab:blue"), (False, "tab:red")):
      cell = results["cells"][f"{optimizer}_{'bn' if use_bn else 'nobn'}"]
      mean, std = 100 * np.asarray(cell["mean"]), 100 * np.asarray(cell["std"])
      ax.errorbar(lrs, mean, yerr=std, color=color, marker="o", capsize=3,
                  label="BN" if use_bn else "no BN")
    ax.axhline(100 * results["good_accuracy"], color="gray", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation accuracy (%) after {results['steps']} steps")
    ax.set_title(optimizer, fontsize=9)
    ax.legend(fontsize=7)
  fig.suptitle(f"Learning-rate sweep, {results['model']}, batch {results['batch_size']}, "
               f"mean +- std over {len(args.seeds)} seeds (diverged = 10%)")
  _common.save_figure(args, fig, suffix=f"_{results['model']}")


def main(argv=None):
  _common.run_experiment(NAME, __doc__, run, plot, argv, extra=_flags,
                         suffix=lambda args: f"_{args.model}")


if __name__ == "__main__":
  main()
