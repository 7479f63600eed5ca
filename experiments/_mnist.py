"""MNIST training for the experiments: many runs at once, evaluated mid-training.

Built from the public pieces of `training` (the models, the tfds input
pipeline and `training.instances.Trainer`, which trains a group of instances
-- one per (seed, learning rate) -- as one program).
`training.train_lib.train_and_evaluate` trains one run and evaluates once per
epoch; the experiments need several seeds (and learning rates) per
configuration and evaluations every fraction of an epoch.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from training import datasets
from training import instances

TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT = datasets.default_splits("mnist")


class Data(NamedTuple):
  """Splits in memory: uint8 images `(n, 28, 28, 1)`, int32 labels `(n,)`."""
  train: datasets.Split
  validation: datasets.Split
  test: datasets.Split


def load_mnist(*, quick: bool = False, train_examples: int = 0) -> Data:
  """The seed's split: 50,000 training and 10,000 validation examples, plus test.

  Args:
    quick: keep 2,048 / 512 / 512 examples (smoke tests).
    train_examples: if > 0, use only the first `train_examples` training
      examples.
  """
  arrays, _ = datasets.load_dataset("mnist", [TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT])
  train, validation, test = (arrays[s] for s in (TRAIN_SPLIT, VALIDATION_SPLIT,
                                                 TEST_SPLIT))
  if quick:
    train, validation, test = train.take(2048), validation.take(512), test.take(512)
  if train_examples:
    train = train.take(train_examples)
  return Data(train, validation, test)


def evaluation_steps(steps_per_epoch: int, epochs: float,
                     evals_per_epoch: int) -> list[int]:
  """Steps at every `1/evals_per_epoch` of an epoch up to `epochs`, rounded.

  Epoch ends are always included exactly (step `k * steps_per_epoch`), and so
  is the last step of a fractional run.
  """
  num_steps = int(round(epochs * steps_per_epoch))
  steps = {int(round(k * steps_per_epoch / evals_per_epoch))
           for k in range(1, int(np.ceil(epochs * evals_per_epoch)) + 1)}
  return sorted({s for s in steps if 0 < s <= num_steps} | {num_steps})


def train_with_evaluations(trainer: instances.Trainer, seeds, learning_rates, *, eval_steps,
                           evaluate: Callable[[instances.Carry], dict],
                           log: Callable[[str], None] = print):
  """Trains up to `max(eval_steps)` steps, calling `evaluate(carry)` at `eval_steps`.

  Args:
    trainer: what to train.
    seeds: one seed per instance.
    learning_rates: one learning rate per instance.
    eval_steps: steps after which to evaluate; 0 evaluates the initialization.
    evaluate: `carry -> {name: per-instance values}`.
    log: where progress lines go.

  Returns:
    `(carry, history)`: history is a list of `{"step", "epoch", "train_loss",
    **evaluate(carry)}`, one per evaluation step, in order.
  """
  eval_steps = sorted({int(s) for s in eval_steps})
  if not eval_steps or eval_steps[0] < 0:
    raise ValueError(f"eval_steps must be non-negative steps, got {eval_steps}.")
  history = []

  def record(carry, step):
    entry = {"step": step, "epoch": step / trainer.steps_per_epoch,
             "train_loss": np.asarray(carry.loss), **evaluate(carry)}
    history.append(entry)
    log(f"step {step} epoch {entry['epoch']:.2f} " + " ".join(
        f"{k}={np.round(np.asarray(v, float), 4).tolist()}" for k, v in entry.items()
        if k not in ("step", "epoch")))

  # The calls between evaluations, none across an epoch boundary (each epoch
  # has its own order); all padded to the longest so one program serves all.
  calls, step = [], 0
  for target in eval_steps:
    while step < target:
      epoch, in_epoch = divmod(step, trainer.steps_per_epoch)
      stop = min(target, (epoch + 1) * trainer.steps_per_epoch)
      calls.append((epoch, in_epoch, in_epoch + stop - step))
      step = stop
    calls.append(None)  # evaluate here
  longest = max((stop - start for _, start, stop in filter(None, calls)), default=0)

  carry = trainer.init(seeds)
  step = 0
  for call in calls:
    if call is None:
      record(carry, step)
      continue
    epoch, start, stop = call
    carry = trainer.train(carry, seeds, learning_rates, epoch=epoch, start=start,
                          stop=stop, pad_to=longest)
    step += stop - start
  return carry, history

