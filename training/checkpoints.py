"""Checkpoints (orbax): the manager, save and restore, and the run signature.

A checkpoint holds the train state and the JSON progress (data position,
metrics history, run signature), so a killed run resumes where it stopped
and ends with the same metrics.
"""

from __future__ import annotations

import json

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from training.train_state import TrainState


def create_checkpoint_manager(workdir: epath.Path,
                              config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Orbax manager of `workdir/checkpoints`, asynchronous and multi-host aware.

  `save` returns once the arrays are copied to host memory (so the next step
  may overwrite the donated state) and orbax writes the files in a background
  thread while training goes on; the next save, or `wait_until_finished`,
  waits for it. Orbax writes each checkpoint into a temporary directory and
  renames it when complete, so a run killed mid-save leaves nothing that is
  ever restored.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_checkpoints_to_keep, create=True,
      enable_async_checkpointing=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      workdir / "checkpoints", options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "progress": ocp.JsonCheckpointHandler()})


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState,
                    progress: dict) -> None:
  """Saves the state and the JSON `progress` (data position, history)."""
  manager.save(int(progress["step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state: TrainState,
                       signature: dict | None = None) -> tuple[TrainState, dict] | None:
  """The latest complete checkpoint as `(state, progress)`, or None.

  With `signature` (see `run_signature`), the checkpoint's own signature is
  read first, from its small JSON item, and any difference raises a ValueError
  naming the fields, before orbax compares the state trees.
  """
  step = manager.latest_step()
  if step is None:
    return None
  progress = manager.restore(step, args=ocp.args.Composite(
      progress=ocp.args.JsonRestore())).progress
  if signature is not None:
    differ = [f"{key}={progress['signature'].get(key)!r} there, {signature.get(key)!r} here"
              for key in sorted(signature.keys() | progress["signature"].keys())
              if progress["signature"].get(key) != signature.get(key)]
    if differ:
      raise ValueError(
          f"workdir {manager.directory.parent} holds a checkpoint of a different run than "
          f"this config ({'; '.join(differ)}). To resume it, rerun with those settings; "
          f"to start fresh, use a new --workdir (or delete {manager.directory}).")
  saved_layout = _with_bn_counters(manager, step, abstract_state)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(saved_layout))).state
  if saved_layout is not abstract_state:
    state = state._replace(bn_state={name: {"mean": layer["mean"], "var": layer["var"]}
                                     for name, layer in state.bn_state.items()})
  return state, progress


def _with_bn_counters(manager: ocp.CheckpointManager, step: int,
                      abstract_state: TrainState) -> TrainState:
  """`abstract_state` in the layout of `step`'s checkpoint when that one's BN
  layers also hold an int32 `count`, else `abstract_state` itself.

  Checkpoints of the MNIST CNN and MLP written before they were linen modules
  keep a `jaxbn.BatchNormState` (mean, var, count) per BN layer; their params
  and optimizer state have today's layout. `restore_checkpoint` restores the
  counters too and drops them.
  """
  saved = manager.item_metadata(step)["state"].tree["bn_state"]
  if not saved or any(not isinstance(layer, dict) or set(layer) != {"mean", "var", "count"}
                      for layer in saved.values()):
    return abstract_state
  count = jax.ShapeDtypeStruct((), jnp.int32, sharding=abstract_state.step.sharding)
  return abstract_state._replace(bn_state={name: {**layer, "count": count}
                                           for name, layer in abstract_state.bn_state.items()})


# Fields that may differ between a checkpoint and the run resuming it: where
# files are, how the run is spread over devices (the metrics agree to float
# rounding), how often it logs, saves and checks, and what it evaluates.
RESUMABLE_FIELDS = frozenset({
    "data_dir", "manual_dir", "num_devices", "parallelism", "eval_batch_size",
    "num_eval_examples", "validation_split", "test_split", "evaluate_test_every_epoch",
    "checkpoint_every_steps", "max_checkpoints_to_keep", "log_every_steps",
    "max_consecutive_nonfinite", "preemption_check_every_steps", "sigterm_grace_seconds",
    "stall_timeout_seconds", "tensorboard", "data_workers"})


def run_signature(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict:
  """What must not change between a checkpoint and a resumed run.

  Every config field except `RESUMABLE_FIELDS`; `num_epochs` and
  `warmup_epochs` only when the learning-rate schedule depends on them (a
  constant rate may train for more epochs), `momentum` / `nesterov` only
  for the momentum optimizer, and `grad_accum_steps` only when above 1 (the
  microbatches are normalized on their own, so k changes the run).
  """
  signature = {key: value for key, value in config.to_dict().items()
               if key not in RESUMABLE_FIELDS}
  if config.lr_schedule == "constant":
    del signature["num_epochs"], signature["warmup_epochs"]
  if config.optimizer != "momentum":
    del signature["momentum"], signature["nesterov"]
  if config.grad_accum_steps == 1:
    # The signature of a config without the field: its checkpoints resume.
    del signature["grad_accum_steps"]
  signature["steps_per_epoch"] = steps_per_epoch
  # As JSON stores it (tuples become lists), so that equal settings compare equal.
  return json.loads(json.dumps(signature))
