"""Data-parallel training and evaluation: `train_and_evaluate(config, workdir)`.

The loop over epochs; its pieces live in modules of their own:
`distributed` (launch, mesh), `run_config` (config checks), `train_state` (train
state, model), `optimizers`, `steps` (the jitted train and eval steps, on a
1-D `('data',)` mesh), `evaluation`, `checkpoints`, `monitoring` (logs,
metrics, TensorBoard) and `stopping` (SIGTERM, watchdog).

Checkpoints (orbax, atomic) hold the train state and the data position, so a
killed run resumes where it stopped and ends with the same metrics.

Preemption: on SIGTERM (what SLURM and TPU maintenance send before killing a
job) the processes agree, at the next step that is a multiple of
`preemption_check_every_steps` (or at the end of the epoch), to save a
checkpoint at that same step; `train_and_evaluate` then raises
`stopping.Preempted` and `train.py` exits with `stopping.PREEMPTED_EXIT_CODE`
(75, EX_TEMPFAIL: rerun the same command to resume; the resumed run ends with
the same metrics as an uninterrupted one).

PreciseBN (`precise_bn_batches > 0`): before each evaluation and each
checkpoint the BN running statistics are recomputed with the current weights
over that many training batches (`jaxbn.linen.recompute_stats`), replacing the
exponential moving average, which lags behind the weights (most visibly at a
high learning rate). The preemption checkpoint is saved without it, so that
resuming is exact.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import os
import time

from flax import linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

import jaxbn

from training import checkpoints
from training import datasets
from training import distributed
from training import evaluation
from training import files
from training import input_pipeline
from training import models
from training import monitoring
from training import optimizers
from training import run_config
from training import steps
from training import stopping
from training import train_state
from training.distributed import AXIS
from training.train_state import TrainState


def recompute_bn_state(state: TrainState, model: nn.Module, train: datasets.Source, *,
                       config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       epoch: int, heartbeat: Callable[[], None] | None = None
                       ) -> TrainState:
  """PreciseBN: the state with BN statistics over `config.precise_bn_batches` batches.

  The batches are the first ones of `epoch`'s training order (global batches,
  sharded as in training, so the statistics are global).

  Args:
    state: the train state, replicated over `mesh`.
    model: the linen model.
    train: the training split.
    config: the run's config (batch size, seed, precision, `precise_bn_batches`).
    mesh: the `('data',)` mesh.
    epoch: whose training order gives the batches.
    heartbeat: called after each batch (the watchdog's `beat`).

  Returns:
    `state` with new, replicated `bn_state`.
  """
  batch_sharding = NamedSharding(mesh, P(AXIS))
  rows = input_pipeline.process_rows(batch_sharding, config.batch_size)
  images = (_normalize_on_device(input_pipeline.to_global(
      batch, batch_sharding, config.batch_size).images, train.preprocessing)
            for batch in input_pipeline.train_batches(
                train, global_batch_size=config.batch_size, seed=config.seed,
                epoch=epoch, rows=rows, num_workers=config.data_workers))
  if heartbeat is not None:
    images = stopping.with_heartbeat(images, heartbeat)
  if jax.process_count() > 1:
    images = distributed.one_at_a_time(images)
  module = model.clone(dtype=jnp.bfloat16 if config.half_precision else jnp.float32)
  bn_state = jaxbn.linen.recompute_stats(
      module, {"params": state.params, "batch_stats": state.bn_state}, images,
      num_batches=config.precise_bn_batches, train=True)["batch_stats"]
  # Back to the replicated layout the compiled step expects (a jit of one
  # module-level function, so it compiles once).
  replicate = jax.jit(_identity, out_shardings=NamedSharding(mesh, P()))
  return state._replace(bn_state=replicate(bn_state))


def _identity(tree):
  return tree


_normalize_on_device = jax.jit(input_pipeline.normalize, static_argnames="preprocessing")


def _check_nonfinite(state: TrainState, limit: int) -> None:
  consecutive = int(jax.device_get(state.consecutive_nonfinite))
  if consecutive >= limit:
    raise FloatingPointError(
        f"Stopping: {consecutive} training steps in a row (up to step "
        f"{int(jax.device_get(state.step))}) had a non-finite loss or gradient and were "
        f"skipped (max_consecutive_nonfinite={limit}). Lower the learning rate, or "
        "turn off half_precision.")


def train_epoch(step_fn, state: TrainState, epoch: int, *,
                config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                train: datasets.Source, steps_per_epoch: int,
                save: Callable[[TrainState, int], None],
                stop_agreed: Callable[[TrainState], bool],
                recompute_bn: Callable[[TrainState], TrainState] | None = None,
                heartbeat: Callable[[], None] = lambda: None,
                progress: monitoring.ProgressBar | None = None,
                summary: monitoring.SummaryWriter | None = None,
                log: Callable[[str], None] = print) -> tuple[TrainState, float]:
  """Runs the rest of `epoch` from `state.step`; returns the state and its examples/s.

  Saves a checkpoint every `checkpoint_every_steps` (not at the epoch's end,
  which `train_and_evaluate` saves after evaluating) and, when the processes
  agree that SIGTERM was received, one at that step before raising
  `stopping.Preempted`.

  Args:
    step_fn: the compiled `(state, global_batch) -> state` (`steps.make_train_step`).
    state: the train state, replicated over `mesh`.
    epoch: the 0-based epoch `state.step` is in.
    config: the run's config.
    mesh: the `('data',)` mesh.
    train: the training split.
    steps_per_epoch: global batches per epoch.
    save: `save(state, step)` writes a checkpoint of `state` at `step`.
    stop_agreed: `stop_agreed(state)`, a collective: whether any process got
      SIGTERM (`stopping.StopRequest.agreed`).
    recompute_bn: PreciseBN before each periodic checkpoint (None: off).
    heartbeat: called after each step and save (the watchdog's `beat`).
    progress: the progress bar; when none is shown, `log` gets a line per
      `log_every_steps` instead.
    summary: TensorBoard scalars (loss, learning rate, images/s) per log step.
    log: prints a line (process 0).

  Returns:
    `(state, examples_per_sec)`, the time spent saving left out.

  Raises:
    FloatingPointError: `max_consecutive_nonfinite` steps in a row were skipped.
    stopping.Preempted: SIGTERM was received; the checkpoint is saved.
  """
  progress = progress or monitoring.ProgressBar(enabled=False)
  batch_sharding = NamedSharding(mesh, P(AXIS))
  schedule = optimizers.create_learning_rate_schedule(config, steps_per_epoch)
  step = int(jax.device_get(state.step))
  first_batch = step - epoch * steps_per_epoch
  progress.start_epoch(epoch, config.num_epochs, steps_per_epoch, first_batch)
  host_batches = input_pipeline.train_batches(
      train, global_batch_size=config.batch_size, seed=config.seed, epoch=epoch,
      rows=input_pipeline.process_rows(batch_sharding, config.batch_size),
      start_step=first_batch, num_workers=config.data_workers)
  start_time, last_logged, saving_time = time.perf_counter(), step, 0.0
  total_steps = config.num_epochs * steps_per_epoch
  last_time, last_saving, last_sums = start_time, 0.0, jax.device_get(state.epoch_sums)
  for batch in input_pipeline.prefetch_to_device(host_batches, batch_sharding,
                                                 config.batch_size):
    state = step_fn(state, batch)
    heartbeat()
    step += 1
    end_of_epoch = step % steps_per_epoch == 0
    if step % config.log_every_steps == 0 or end_of_epoch:
      _check_nonfinite(state, config.max_consecutive_nonfinite)
      sums = jax.device_get(state.epoch_sums)
      elapsed = time.perf_counter() - start_time - saving_time
      examples = (step - epoch * steps_per_epoch - first_batch) * config.batch_size
      progress.update(step - last_logged, float(sums.loss) / max(int(sums.steps), 1),
                      examples / max(elapsed, 1e-9))
      now = time.perf_counter()
      window = max(now - last_time - (saving_time - last_saving), 1e-9)
      finite = int(sums.steps) - int(last_sums.steps)
      loss = (float(sums.loss) - float(last_sums.loss)) / max(finite, 1)
      learning_rate = float(schedule(step - 1))  # the rate the last step used
      images_per_sec = (step - last_logged) * config.batch_size / window
      if summary is not None:
        summary.scalars(step, {"train/loss": loss, "train/learning_rate": learning_rate,
                               "train/images_per_sec": images_per_sec})
      if not progress.shown:
        eta = (total_steps - step) * window / (step - last_logged)
        log(f"step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f}): "
            f"loss {loss:.4f} lr {learning_rate:.4g} {images_per_sec:,.0f} images/s "
            f"ETA {monitoring.format_duration(eta)} (training steps)")
      last_logged, last_time, last_saving, last_sums = step, now, saving_time, sums
    saved = False
    if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
        and not end_of_epoch):
      save_started = time.perf_counter()
      if recompute_bn is not None:
        state = recompute_bn(state)
      save(state, step)
      heartbeat()
      saving_time += time.perf_counter() - save_started
      saved = True
    if (not end_of_epoch and step % config.preemption_check_every_steps == 0
        and stop_agreed(state)):
      if not saved:
        save(state, step)
      progress.close()
      raise stopping.Preempted(step)
  jax.block_until_ready(state)
  progress.close()
  train_time = time.perf_counter() - start_time - saving_time
  examples = (steps_per_epoch - first_batch) * config.batch_size
  return state, examples / max(train_time, 1e-9)


def evaluate_epoch(eval_fn, state: TrainState, epoch: int, *,
                   validation: datasets.Source,
                   test: datasets.Source | None, mesh: jax.sharding.Mesh,
                   config: ml_collections.ConfigDict, examples_per_sec: float,
                   heartbeat: Callable[[], None] | None = None) -> dict:
  """The epoch's `metrics.jsonl` record: training sums, validation (and test).

  Args:
    eval_fn: the compiled eval step (`steps.make_eval_step`).
    state: the train state at the end of `epoch` (its `epoch_sums` not yet reset).
    epoch: the 0-based epoch.
    validation: the validation split.
    test: the test split, or None to leave the test metrics out.
    mesh: the `('data',)` mesh.
    config: the run's config (`eval_batch_size`, `data_workers`).
    examples_per_sec: the epoch's training throughput (`train_epoch`'s).
    heartbeat: called after each evaluation batch.

  Returns:
    `{'epoch', 'step', 'train_loss', 'train_accuracy', 'val_loss',
    'val_accuracy'[, 'test_loss', 'test_accuracy'], 'examples_per_sec',
    'nonfinite_steps'}`.
  """
  sums = jax.device_get(state.epoch_sums)
  batch_size = config.eval_batch_size
  val = evaluation.evaluate(eval_fn, state, validation, global_batch_size=batch_size,
                            mesh=mesh, heartbeat=heartbeat,
                            num_workers=config.data_workers)
  record = {
      "epoch": epoch + 1, "step": int(jax.device_get(state.step)),
      "train_loss": float(sums.loss) / max(int(sums.steps), 1),
      "train_accuracy": int(sums.correct) / max(int(sums.examples), 1),
      "val_loss": val["loss"], "val_accuracy": val["accuracy"],
  }
  if test is not None:
    test = evaluation.evaluate(eval_fn, state, test, global_batch_size=batch_size,
                               mesh=mesh, heartbeat=heartbeat,
                               num_workers=config.data_workers)
    record.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
  record.update(examples_per_sec=examples_per_sec,
                nonfinite_steps=int(sums.nonfinite_steps))
  return record


def _abstract_batch(example: input_pipeline.Batch, global_batch_size: int,
                    sharding: jax.sharding.Sharding) -> input_pipeline.Batch:
  """The shapes of a global batch of `global_batch_size` rows like `example`'s."""
  return input_pipeline.Batch(*(
      jax.ShapeDtypeStruct((global_batch_size,) + local.shape[1:], local.dtype,
                           sharding=sharding) for local in example))


def _microbatches_note(config: ml_collections.ConfigDict, num_devices: int) -> str:
  if config.grad_accum_steps == 1:
    return ""
  rows = config.batch_size // num_devices // config.grad_accum_steps
  return f" in {config.grad_accum_steps} microbatches of {rows} per device"


def _load_splits(config: ml_collections.ConfigDict):
  """(train, validation, test, info) of `config`'s dataset."""
  names = run_config.split_names(config)
  splits, info = datasets.load_dataset(
      config.dataset, names, data_dir=config.data_dir or None,
      manual_dir=config.manual_dir or None, augmentation=config.augmentation,
      image_size=config.image_size, num_classes=config.num_classes)
  train, validation, test = (splits[name] for name in names)
  return (train.take(config.num_train_examples),
          validation.take(config.num_eval_examples),
          test.take(config.num_eval_examples),
          info)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict:
  """Trains and evaluates per `config`, checkpointing into `workdir`.

  Resumes from the latest checkpoint in `workdir`. Process 0 prints a
  parameter table and one line per epoch and writes `metrics.jsonl`,
  `curves.png` and TensorBoard files. `workdir` may be a URI
  (`gs://bucket/run`); with several hosts it must be one directory that every
  host reaches (orbax writes each host's shards of a checkpoint there).

  Returns:
    The last epoch's metrics (the last line of `metrics.jsonl`).

  Raises:
    ValueError: a bad config, or a checkpoint from an incompatible run.
    FileNotFoundError: a dataset archive is missing.
    FloatingPointError: `max_consecutive_nonfinite` steps in a row were skipped.
    stopping.Preempted: SIGTERM was received; all processes saved a checkpoint
      at the same step (rerun to resume).
  """
  workdir = files.as_path(workdir)
  is_main = jax.process_index() == 0
  mesh = distributed.create_mesh(config.num_devices)
  run_config.validate_config(config, mesh.devices.size)
  train, validation, test, info = _load_splits(config)
  num_train = train.num_examples
  steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f"Bad config: batch_size={config.batch_size} is larger than the "
                     f"{num_train} training examples.")
  if config.precise_bn_batches > steps_per_epoch:
    raise ValueError(f"Bad config: precise_bn_batches={config.precise_bn_batches} is "
                     f"more than the {steps_per_epoch} training batches per epoch.")

  model = train_state.create_model(config, info)
  tx = optimizers.create_optimizer(config, steps_per_epoch)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(AXIS))
  init_fn = jax.jit(functools.partial(train_state.create_train_state, model, tx,
                                      input_shape=info.image_shape),
                    out_shardings=replicated)
  key = jax.random.key(config.seed)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    config_json = config.to_json_best_effort(indent=2).encode()
    files.atomic_write(workdir / "config.json", lambda f: f.write(config_json))
  watchdog = stopping.Watchdog(config.stall_timeout_seconds, config.sigterm_grace_seconds)
  stop = stopping.StopRequest(watchdog)
  manager = checkpoints.create_checkpoint_manager(workdir, config)
  signature = checkpoints.run_signature(config, steps_per_epoch)
  progress = monitoring.ProgressBar(is_main)
  summary = monitoring.SummaryWriter(workdir / monitoring.TENSORBOARD_DIR,
                                     enabled=is_main and config.tensorboard)
  history = []

  def log(message: str) -> None:
    if is_main:
      print(message, flush=True)

  def save(state: TrainState, step: int) -> None:
    checkpoints.save_checkpoint(manager, state, {
        "step": step, "epoch": step // steps_per_epoch,
        "batch_in_epoch": step % steps_per_epoch,
        "signature": signature, "history": history})

  def recompute_bn(state: TrainState, epoch: int) -> TrainState:
    return recompute_bn_state(state, model, train, config=config, mesh=mesh,
                              epoch=epoch, heartbeat=watchdog.beat)

  last_plot, plotted = time.monotonic(), 0
  try:
    stop.install()
    abstract_state = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        jax.eval_shape(init_fn, key))
    restored = checkpoints.restore_checkpoint(manager, abstract_state, signature)
    if restored is None:
      state = init_fn(key)
    else:
      state, progress_record = restored
      history.extend(progress_record["history"])
      log(f"Resuming from step {progress_record['step']} "
          f"(epoch {progress_record['epoch'] + 1}, "
          f"batch {progress_record['batch_in_epoch']}) in {workdir}.")
    log(models.format_parameter_table(models.parameter_table(model, info.image_shape)))
    log(f"{config.dataset}: {num_train} train / "
        f"{validation.num_examples} val / "
        f"{test.num_examples} test examples; "
        f"{jax.process_count()} process(es), "
        f"{mesh.devices.size} device(s), parallelism={config.parallelism}, global "
        f"batch {config.batch_size}{_microbatches_note(config, mesh.devices.size)}, "
        f"{steps_per_epoch} steps per epoch.")
    if is_main and history:
      monitoring.write_metrics(workdir, history)

    first_epoch = int(jax.device_get(state.step)) // steps_per_epoch
    if first_epoch < config.num_epochs:
      watchdog.pause()  # compiling is no stall
      # Compiling ahead keeps compilation out of the measured examples/s.
      example = next(input_pipeline.train_batches(
          train, global_batch_size=config.batch_size, seed=config.seed, epoch=0,
          rows=input_pipeline.process_rows(batch_sharding, config.batch_size),
          num_workers=config.data_workers))
      log("Compiling the train and eval steps...")
      compile_started = time.perf_counter()
      step_fn = steps.make_train_step(config, mesh, model, tx,
                                      preprocessing=train.preprocessing).lower(
          state, input_pipeline.to_global(example, batch_sharding, config.batch_size)
      ).compile()
      eval_fn = steps.make_eval_step(config, mesh, model,
                                     preprocessing=validation.preprocessing).lower(
          state.params, state.bn_state,
          jax.device_put(train_state.zero_eval_sums(), replicated),
          _abstract_batch(example, evaluation.eval_batch_rows(config.eval_batch_size,
                                                              mesh.devices.size),
                          batch_sharding)
      ).compile()
      log(f"Compiled in {time.perf_counter() - compile_started:.1f} s.")
      watchdog.beat()
    for epoch in range(first_epoch, config.num_epochs):
      state, examples_per_sec = train_epoch(
          step_fn, state, epoch, config=config, mesh=mesh, train=train,
          steps_per_epoch=steps_per_epoch, save=save, stop_agreed=stop.agreed,
          recompute_bn=(functools.partial(recompute_bn, epoch=epoch)
                        if config.precise_bn_batches else None),
          heartbeat=watchdog.beat, progress=progress, summary=summary, log=log)
      if config.precise_bn_batches:
        state = recompute_bn(state, epoch)
      with_test = config.evaluate_test_every_epoch or epoch + 1 == config.num_epochs
      record = evaluate_epoch(
          eval_fn, state, epoch, validation=validation, test=test if with_test else None,
          mesh=mesh, config=config, examples_per_sec=examples_per_sec,
          heartbeat=watchdog.beat)
      history.append(record)
      summary.scalars(record["step"], {
          f"epoch/{key}": value for key, value in record.items()
          if key not in ("epoch", "step")})
      state = state._replace(
          epoch_sums=jax.device_put(train_state.zero_epoch_sums(), replicated))
      save(state, record["step"])
      watchdog.beat()
      if is_main:
        monitoring.write_metrics(workdir, history)
        if time.monotonic() - last_plot >= monitoring.PLOT_EVERY_SECONDS:
          monitoring.plot_curves(workdir / monitoring.PLOT_FILE, history)
          last_plot, plotted = time.monotonic(), len(history)
      log(monitoring.format_record(record, config.num_epochs))
      if epoch + 1 < config.num_epochs and stop.agreed(state):
        raise stopping.Preempted(record["step"])
  finally:
    stop.uninstall()
    progress.close()
    manager.wait_until_finished()
    manager.close()
    watchdog.close()
    summary.close()
    if is_main and len(history) > plotted:  # also when preempted or failing
      monitoring.plot_curves(workdir / monitoring.PLOT_FILE, history)
  if history:
    best = max(history, key=lambda record: record["val_accuracy"])
    log(f"Finished in {workdir}: best val_acc {best['val_accuracy']:.4f} "
        f"(epoch {best['epoch']}); last: "
        + monitoring.format_record(history[-1], config.num_epochs))
  return dict(history[-1]) if history else {}
