"""Processes and devices: the multi-process launch decision and the `('data',)` mesh."""

from __future__ import annotations

import jax


AXIS = "data"  # the mesh's one axis, over which the batch rows are split


# What jax's SLURM detection (jax._src.clusters.SlurmCluster) reads: the
# variables `srun` sets for a job step, not only the allocation's SLURM_JOB_ID.
SLURM_STEP_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                        "SLURM_PROCID", "SLURM_LOCALID")
# Hosts of a multi-host TPU slice as GKE (and the TPU VM runtime) lists them.
TPU_WORKER_VARIABLES = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def multi_process_launch(environ, *, coordinator_address: str | None = None,
                         distributed: bool | None = None) -> tuple[bool, str]:
  """Whether to call `jax.distributed.initialize()`, and why, in one line.

  Args:
    environ: the environment (`os.environ`).
    coordinator_address: train.py's --coordinator_address (explicit launch).
    distributed: train.py's --distributed: True/False force the answer; None
      detects a SLURM job step of several tasks or a multi-host TPU slice.

  Returns:
    `(initialize, reason)`.
  """
  if distributed is not None:
    return distributed, f"--distributed={distributed}"
  if coordinator_address:
    return True, f"--coordinator_address={coordinator_address}"
  if all(name in environ for name in SLURM_STEP_VARIABLES):
    tasks = environ["SLURM_NTASKS"]
    if tasks.isdigit() and int(tasks) > 1:
      return True, f"SLURM job step of {tasks} tasks (srun)"
  for name in TPU_WORKER_VARIABLES:
    hosts = [host for host in environ.get(name, "").split(",") if host]
    if len(hosts) > 1:
      return True, f"TPU slice of {len(hosts)} hosts ({name})"
  if "SLURM_JOB_ID" in environ:
    return False, ("single process: a SLURM allocation without a job step of several "
                   "tasks (start one process per task with srun; see docs/train.md)")
  return False, ("single process (no --coordinator_address, SLURM job step of several "
                 "tasks or multi-host TPU slice found)")


def create_mesh(num_devices: int = 0, devices=None) -> jax.sharding.Mesh:
  """A 1-D `('data',)` mesh (`jax.make_mesh`: TPU devices in slice order).

  Args:
    num_devices: use the first `num_devices` devices (single process only);
      0 = all devices of all processes.
    devices: the devices to choose from; default `jax.devices()` (others:
      e.g. a compile-only TPU topology's).
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  if num_devices:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"num_devices must be in [0, {len(devices)}] (0 = all), "
                       f"got {num_devices}.")
    if num_devices != len(devices) and jax.process_count() > 1:
      raise ValueError("num_devices must be 0 (all devices) with several processes.")
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def one_at_a_time(items):
  """Yields each item once all the work dispatched before it has finished.

  For loops that dispatch programs with cross-process collectives but do not
  hand out their results (`jaxbn.linen.recompute_stats`): with several
  processes the programs then run in the same order on every process.
  """
  for item in items:
    jax.block_until_ready(jax.live_arrays())
    yield item
