"""Trains a jaxbn model on MNIST: `python train.py [--config=...] [--workdir=...]`.

Examples:
  python train.py                                   # configs/mnist_bn.py, ./runs/mnist_bn
  python train.py --config=configs/mnist_nobn.py --workdir=runs/nobn
  python train.py --config.parallelism=shard_map --config.num_epochs=1
  # Export the train and eval steps for GPUs and TPUs without training
  # (files in <workdir>/lowered/; training.lowering):
  python train.py --lower_for=cuda,tpu --workdir=/tmp/lowered_cnn
  # Compile them for GPUs and TPUs without one and say whether the run fits
  # (memory, estimated step time; training.compiling, needs the compile extra):
  python train.py --config=configs/resnet_imagenet.py --compile_for=h100:8,tpu-v5e:2x4
  # Two processes (e.g. two hosts), JAX's multi-process runtime:
  python train.py --coordinator_address=HOST:1234 --num_processes=2 --process_id=0
  python train.py --coordinator_address=HOST:1234 --num_processes=2 --process_id=1

All the work happens in `training.train_lib.train_and_evaluate`.

On SIGTERM (SLURM or TPU preemption) every process saves a checkpoint at the
same step and exits with status 75 (EX_TEMPFAIL); rerunning the same command
resumes exactly where it stopped.
"""

import logging as python_logging
import os
import pathlib
import sys

# Before anything imports TensorFlow (tfds, on the run that prepares the dataset):
# TensorFlow only decodes files here, so its oneDNN kernels are off, and with them
# the start-up notices that also set off absl's "log messages before InitializeLog".
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parent
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_REPO / "configs" / "mnist_bn.py"),
    "Training config file (a Python file with get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for checkpoints, metrics.jsonl and curves.png; rerunning with the "
    "same workdir resumes. Default: runs/<config name> under the current directory.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0, to start JAX's multi-process runtime.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id (0-based).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Call jax.distributed.initialize() and let it detect the cluster (SLURM, "
    "TPU pods, ...). Default: only when --coordinator_address is given, in a SLURM "
    "job step of several tasks (srun; the SLURM_STEP_* variables) or on a TPU slice "
    "of several hosts (TPU_WORKER_HOSTNAMES); pass --distributed on a Cloud TPU VM "
    "pod slice, whose hosts jax finds from the metadata server.")
_LOWER_FOR = flags.DEFINE_list(
    "lower_for", None,
    "Platforms (any of cpu, cuda, rocm, tpu): build the train and eval steps as for "
    "training over the visible devices, export them with jax.export for each "
    "platform into <workdir>/lowered/<platform>/, print a summary and exit without "
    "training. More devices than this host has: XLA_FLAGS="
    "--xla_force_host_platform_device_count=N on a CPU.")
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for", None,
    "Targets such as h100:8,a100:8,tpu-v5e:2x4,tpu-v5p:4x4x4 (GPU: device count; TPU: "
    "chip grid): compile the train and eval steps of the configured run for each "
    "without a device, print per-device memory against the target's (fits / does not "
    "fit), flops, bytes, an estimated step time and images/s, collectives and kernels, "
    "write the optimized HLO under <workdir>/compiled/ and exit (non-zero when a "
    "program does not fit). Needs pip install -e '.[compile]'.")
_COMPILE_FIT_BATCH = flags.DEFINE_bool(
    "compile_fit_batch", False,
    "With --compile_for: also find the largest per-device train batch that fits each "
    "target (bisection; one compilation per probe).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.path.join("~", ".cache", "jaxbn", "jax_compilation_cache"),
    "JAX's persistent compilation cache: a rerun with the same config loads the compiled "
    "steps instead of compiling them again (measured: 10-25 s of a 3-epoch run on a "
    "2-core CPU). '' turns it off; the JAX_COMPILATION_CACHE_DIR environment variable, "
    "when set, takes precedence.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100,
    "With several processes: exit with an error when a peer has been silent this long.")


def _initialize_distributed() -> None:
  import jax
  from training import distributed
  initialize, reason = distributed.multi_process_launch(
      os.environ, coordinator_address=_COORDINATOR.value, distributed=_DISTRIBUTED.value)
  if not initialize:
    print(f"Running as a {reason}.", flush=True)
    return
  # Collectives between CPU processes (the setting only affects CPU devices).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  if jax.process_index() == 0:
    print(f"Multi-process: {jax.process_count()} processes ({reason}).", flush=True)


def _hide_tfds_warnings(record: python_logging.LogRecord) -> bool:
  """tfds warns about its own cache layout when it prepares a dataset; keep its errors."""
  return record.levelno >= python_logging.ERROR or "tensorflow_datasets" not in record.pathname


def _compile_for() -> int:
  """`--compile_for`: compile for the targets on this machine's CPU; 0 when all fit."""
  from training import targets
  targets.prepare_environment()
  import jax
  jax.config.update("jax_platforms", "cpu")  # no local accelerator is looked for
  from training import compiling
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or os.path.join("runs", pathlib.Path(config_path).stem)
  result = compiling.compile_for_targets(_CONFIG.value, workdir, _COMPILE_FOR.value,
                                         fit_batch=_COMPILE_FIT_BATCH.value)
  print(result.summary, flush=True)
  return 0 if result.fits else 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    python_logging.getLogger("absl").addFilter(_hide_tfds_warnings)  # tfds logs via absl
  if _COMPILE_FOR.value:
    sys.exit(_compile_for())
  _initialize_distributed()
  if _COMPILATION_CACHE.value and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import jax
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(_COMPILATION_CACHE.value))
  from training import stopping
  from training import train_lib
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or os.path.join("runs", pathlib.Path(config_path).stem)
  if _LOWER_FOR.value:
    import jax
    from training import lowering
    result = lowering.lower_for_platforms(_CONFIG.value, workdir, _LOWER_FOR.value)
    if jax.process_index() == 0:
      print(result.summary, flush=True)
    return
  try:
    train_lib.train_and_evaluate(_CONFIG.value, workdir)
  except stopping.Preempted as preempted:
    print(preempted, flush=True)
    sys.exit(stopping.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
