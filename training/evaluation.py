"""Evaluation over a whole split: loss and accuracy of the running-statistics model."""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from training import datasets
from training import input_pipeline
from training import stopping
from training.distributed import AXIS
from training.train_state import TrainState
from training.train_state import zero_eval_sums


def eval_batch_rows(eval_batch_size: int, num_devices: int) -> int:
  """Rows of a global evaluation batch: `eval_batch_size` rounded up to a
  multiple of `num_devices` (the extra rows are masked padding)."""
  return -(-eval_batch_size // num_devices) * num_devices


def evaluate(eval_fn, state: TrainState, split: datasets.Source, *,
             global_batch_size: int, mesh: jax.sharding.Mesh,
             chained: bool | None = None, heartbeat=None,
             num_workers: int = 0) -> dict[str, float]:
  """Loss and accuracy of the running-statistics model over a whole split.

  With several processes each batch's program starts only when the one before
  has finished (each adds to the sums of the one before, `eval_step`, and is
  waited for), so every process runs them, and their cross-process
  reductions, in the same order. Dispatched all at once, two processes of 4
  CPU devices hung in 3 of 3 runs of 50 batches per split (gloo); chained but
  not waited for, in 3 of 3 as well. One process has no peer to disagree
  with: each batch's program starts from zero sums and several run at once.

  Args:
    eval_fn: `make_eval_step`'s function.
    state: the train state (its params and BN running statistics are used).
    split: the examples, each counted once (`input_pipeline.eval_batches`).
    global_batch_size: examples per evaluation step over all processes (any
      size: each batch is padded to `eval_batch_rows`, so the batches hold
      the same examples on any number of devices).
    mesh: the `('data',)` mesh.
    chained: one chain of programs, each waited for; default (None): when
      there are several processes. False with several processes raises a
      ValueError.
    heartbeat: called after each batch is dispatched (the watchdog's `beat`).
    num_workers: tf.data threads decoding streamed images (0 = all host cores).

  Returns:
    `{'loss': mean loss, 'accuracy': fraction correct}` over the split.
  """
  multi_process = jax.process_count() > 1
  if chained is None:
    chained = multi_process
  if multi_process and not chained:
    raise ValueError("chained must be True (or None) with several processes.")
  sharding = NamedSharding(mesh, P(AXIS))
  padded = eval_batch_rows(global_batch_size, mesh.devices.size)
  rows = input_pipeline.process_rows(sharding, padded)
  zeros = jax.device_put(zero_eval_sums(), NamedSharding(mesh, P()))
  batches = input_pipeline.prefetch_to_device(
      input_pipeline.eval_batches(split, global_batch_size=padded, rows=rows,
                                  examples_per_batch=global_batch_size,
                                  num_workers=num_workers),
      sharding, padded)
  if heartbeat is not None:
    batches = stopping.with_heartbeat(batches, heartbeat)
  if chained:
    total = zeros
    for batch in batches:
      total = jax.block_until_ready(eval_fn(state.params, state.bn_state, total, batch))
    sums = [total]
  else:
    sums = [eval_fn(state.params, state.bn_state, zeros, batch) for batch in batches]
  sums = jax.device_get(sums)
  examples = sum(int(s.examples) for s in sums)
  loss = math.fsum(float(s.loss) for s in sums)
  correct = sum(int(s.correct) for s in sums)
  return {"loss": loss / max(examples, 1), "accuracy": correct / max(examples, 1)}
