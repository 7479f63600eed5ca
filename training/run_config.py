"""Checks of a training config, and the values derived from it that several modules need."""

from __future__ import annotations

import ml_collections

from training import datasets
from training import models
from training import optimizers
from training import resnet


PARALLELISMS = ("gspmd", "shard_map")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails at start, with a message naming the field, on a config that cannot run.

  Args:
    config: the run's config.
    num_devices: devices in the mesh.

  Raises:
    ValueError: the first problem found.
  """
  def check(ok, message):
    if not ok:
      raise ValueError(f"Bad config: {message}")

  check(config.model in models.MODELS,
        f"unknown model {config.model!r}; expected one of {sorted(models.MODELS)}.")
  check(config.optimizer in optimizers.OPTIMIZERS,
        f"unknown optimizer {config.optimizer!r}; expected one of {list(optimizers.OPTIMIZERS)}.")
  check(config.lr_schedule in optimizers.LR_SCHEDULES,
        f"unknown lr_schedule {config.lr_schedule!r}; expected one of "
        f"{list(optimizers.LR_SCHEDULES)}.")
  check(config.parallelism in PARALLELISMS,
        f"unknown parallelism {config.parallelism!r}; expected one of "
        f"{list(PARALLELISMS)}.")
  check(isinstance(config.dataset, str) and config.dataset,
        f"dataset must be a tfds dataset name, got {config.dataset!r}.")
  check(config.num_epochs >= 1, f"num_epochs must be >= 1, got {config.num_epochs}.")
  check(config.learning_rate > 0,
        f"learning_rate must be > 0, got {config.learning_rate}.")
  check(config.seed >= 0, f"seed must be >= 0, got {config.seed}.")
  check(config.num_train_examples >= 0 and config.num_eval_examples >= 0,
        "num_train_examples and num_eval_examples must be >= 0 (0 = all).")
  check(config.batch_size > 0 and config.batch_size % num_devices == 0,
        f"batch_size={config.batch_size} must be a positive multiple of the number of "
        f"devices ({num_devices}) so that every device trains on the same number of "
        "examples (eval_batch_size may be any size: its batches are padded).")
  accum = config.grad_accum_steps
  per_device = config.batch_size // num_devices
  check(accum >= 1 and per_device % accum == 0,
        f"grad_accum_steps={accum} must be >= 1 and divide the per-device batch "
        f"(batch_size={config.batch_size} over {num_devices} devices: {per_device} "
        "examples) into equal microbatches.")
  check(config.eval_batch_size > 0,
        f"eval_batch_size must be > 0, got {config.eval_batch_size}.")
  group = config.bn_group_size
  check(group >= 0 and (group == 0 or num_devices % group == 0),
        f"bn_group_size={group} must be 0 (all devices) or divide the number of "
        f"devices ({num_devices}).")
  if group not in (0, num_devices):
    check(config.parallelism == "shard_map",
          "bn_group_size needs parallelism='shard_map' (under 'gspmd' the compiler "
          "computes BN statistics over the whole batch).")
  check(config.checkpoint_every_steps >= 0 and config.log_every_steps >= 1,
        "checkpoint_every_steps must be >= 0 and log_every_steps >= 1.")
  check(config.max_consecutive_nonfinite >= 1,
        f"max_consecutive_nonfinite must be >= 1, got {config.max_consecutive_nonfinite}.")
  if config.model in resnet.RESNETS:
    check(config.use_bn and not config.bias_before_bn,
          f"model {config.model!r} has batch norm after every convolution and no "
          "bias before it: set use_bn=True and bias_before_bn=False.")
  check(0.0 <= config.label_smoothing < 1.0,
        f"label_smoothing must be in [0, 1), got {config.label_smoothing}.")
  check(not config.nesterov or config.optimizer == "momentum",
        f"nesterov=True needs optimizer='momentum', got {config.optimizer!r}.")
  check(config.precise_bn_batches >= 0 and (config.precise_bn_batches == 0
                                            or config.use_bn),
        f"precise_bn_batches must be >= 0 (0 = off) and needs use_bn=True, got "
        f"{config.precise_bn_batches}.")
  check(config.stall_timeout_seconds >= 0 and config.sigterm_grace_seconds > 0,
        f"stall_timeout_seconds must be >= 0 (0 = off) and sigterm_grace_seconds > 0, "
        f"got {config.stall_timeout_seconds} and {config.sigterm_grace_seconds}.")
  check(config.preemption_check_every_steps >= 1,
        f"preemption_check_every_steps must be >= 1, got "
        f"{config.preemption_check_every_steps}.")
  check(config.data_workers >= 0,
        f"data_workers must be >= 0 (0 = all host cores), got {config.data_workers}.")


def split_names(config: ml_collections.ConfigDict) -> tuple[str, str, str]:
  """The (train, validation, test) tfds split strings of `config`.

  A '' split field takes the dataset's default (`datasets.default_splits`).
  """
  names = (config.train_split, config.validation_split, config.test_split)
  if all(names):
    return names
  defaults = datasets.default_splits(config.dataset)
  return tuple(name or default for name, default in zip(names, defaults))
