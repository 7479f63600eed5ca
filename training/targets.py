"""GPUs and TPUs to compile for without one: devices, memory, a roofline.

`devices('h100:8')` gives compile-only devices of 8 H100s (XLA:GPU from a
device description in `training/gpu_targets/<name>.textproto`), and
`devices('tpu-v5e:2x4')` those of a TPU v5e 2x4 slice (libtpu's compiler);
`jax.jit(...).lower(<ShapeDtypeStructs sharded over a mesh of them>).compile()`
then runs the real compiler of that target on this machine. It needs the
`compile` extra (`pip install -e ".[compile]"`: `jax[tpu]` and `jax[cuda12]`).

Each `Target` carries the public peak numbers of one chip (HBM capacity and
bandwidth, dense bfloat16 matrix throughput) that `roofline` turns into an
estimated step time: max(bytes / bandwidth, flops / peak). That is a bound
from the compiler's counts, not a measurement.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import NamedTuple

import jax

GPU_TARGETS_DIR = pathlib.Path(__file__).with_name("gpu_targets")


class Target(NamedTuple):
  """One accelerator kind.

  Attributes:
    name: as written in `--compile_for`, e.g. 'h100', 'tpu-v5e'.
    platform: 'cuda' or 'tpu'.
    hbm_bytes: device memory of one device.
    hbm_bandwidth: bytes per second of one device.
    peak_flops: dense bfloat16 matrix flops per second of one device. float32
      convolutions and matmuls run at this rate too on TPUs (JAX's default
      precision is one bfloat16 pass there), at the TF32 rate on GPUs.
    peak_flops_f32: the float32 (GPU: TF32 tensor core) rate.
    tpu_name: libtpu's topology prefix ('v5e'); '' for GPUs.
    megacore: a TPU whose two TensorCores per chip JAX drives as one device
      (v4, v5p); libtpu's compile-only topology then needs
      `chip_config_name='megacore'` and the chips per host.
  """
  name: str
  platform: str
  hbm_bytes: int
  hbm_bandwidth: float
  peak_flops: float
  peak_flops_f32: float
  tpu_name: str = ""
  megacore: bool = False


# Public datasheet numbers (NVIDIA H100 SXM5 and A100 SXM4 80GB; Google Cloud TPU
# system architecture pages for v4, v5e and v5p), per device as JAX sees it.
TARGETS = {
    "h100": Target("h100", "cuda", 84942979072, 3.35e12, 989e12, 494e12),
    "a100": Target("a100", "cuda", 85198045184, 2.039e12, 312e12, 156e12),
    "tpu-v5e": Target("tpu-v5e", "tpu", 16 * 2**30, 819e9, 197e12, 197e12, "v5e"),
    "tpu-v4": Target("tpu-v4", "tpu", 32 * 2**30, 1228e9, 275e12, 275e12, "v4", megacore=True),
    "tpu-v5p": Target("tpu-v5p", "tpu", 95 * 2**30, 2765e9, 459e12, 459e12, "v5p",
                      megacore=True),
}


class TargetSpec(NamedTuple):
  """A parsed `name:topology` (e.g. `h100:8`, `tpu-v5p:4x4x4`)."""
  target: Target
  topology: str

  @property
  def label(self) -> str:
    return f"{self.target.name}:{self.topology}"


def parse(text: str) -> tuple[TargetSpec, ...]:
  """`'h100:8,tpu-v5e:2x4'` -> the `TargetSpec`s.

  GPUs take a device count (`h100:8`: one host of 8; `h100:16` is two hosts
  of 8), TPUs a libtpu topology (`tpu-v5e:2x4`, `tpu-v4:2x2x1`).

  Raises:
    ValueError: an unknown target, a missing or malformed topology.
  """
  specs = []
  for item in (part.strip() for part in text.split(",")):
    if not item:
      continue
    name, _, topology = item.partition(":")
    name = name.strip().lower()
    if name not in TARGETS:
      raise ValueError(f"compile_for: unknown target {name!r} in {text!r}; expected "
                       f"one of {sorted(TARGETS)} followed by ':<topology>'.")
    target = TARGETS[name]
    pattern = r"[1-9]\d*" if target.platform == "cuda" else r"[1-9]\d*(x[1-9]\d*){1,2}"
    if not re.fullmatch(pattern, topology):
      raise ValueError(
          f"compile_for: {item!r} needs a topology: a device count for GPUs "
          "('h100:8') or a chip grid for TPUs ('tpu-v5e:2x4', 'tpu-v5p:4x4x4').")
    specs.append(TargetSpec(target, topology))
  if not specs:
    raise ValueError(f"compile_for: no target in {text!r}.")
  return tuple(specs)


def gpu_target_config(name: str) -> str:
  """The GpuTargetConfigProto text of a GPU target (`training/gpu_targets/`)."""
  return (GPU_TARGETS_DIR / f"{name}.textproto").read_text()


def prepare_environment() -> None:
  """Settings of compile-only use; effective when set before JAX starts its backends.

  No TPU metadata server, no check of a CUDA installation (there is no GPU),
  several processes may load libtpu at once, and libtpu logs errors only.
  Programs that only compile (`train.py --compile_for`, benchmarks.compiled)
  also set `JAX_PLATFORMS=cpu` so that JAX does not look for local GPUs or
  TPUs.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
  os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")


_DEVICES: dict[str, list] = {}


def devices(spec: TargetSpec | str) -> list:
  """Compile-only devices of a target, sorted by (process index, id).

  Raises:
    RuntimeError: the compiler plugin of the target is not installed.
  """
  if isinstance(spec, str):
    (spec,) = parse(spec)
  if spec.label in _DEVICES:
    return _DEVICES[spec.label]
  prepare_environment()
  from jax.experimental import topologies
  try:
    if spec.target.platform == "tpu":
      # v4 and v5p hosts hold 2x2x1 chips; JAX runs each chip as one device.
      options = (dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1))
                 if spec.target.megacore else {})
      topology = topologies.get_topology_desc(
          platform="tpu", topology_name=f"{spec.target.tpu_name}:{spec.topology}", **options)
    else:
      count = int(spec.topology)
      per_host = min(count, 8)
      if count % per_host:
        raise ValueError(f"compile_for: {spec.label}: more than 8 GPUs must be a "
                         "multiple of 8 (8 per host).")
      topology = topologies.get_topology_desc(
          platform="cuda", target_config=gpu_target_config(spec.target.name),
          topology=f"1x{count // per_host}x{per_host}")
  except (RuntimeError, ImportError, NotImplementedError,
          jax.errors.JaxRuntimeError) as error:
    extra = "jax[tpu]" if spec.target.platform == "tpu" else "jax[cuda12]"
    raise RuntimeError(
        f"cannot compile for {spec.label}: {error}. Compiling for GPUs and TPUs "
        f"without one needs {extra} (pip install -e '.[compile]').") from error
  found = sorted(topology.devices, key=lambda d: (d.process_index, d.id))
  _DEVICES[spec.label] = found
  return found


class Roofline(NamedTuple):
  """An estimated step time from compiler counts (not a measurement).

  Attributes:
    memory_s: bytes / HBM bandwidth.
    compute_s: flops / peak flops.
    step_s: max of the two (the step is bound by the slower one).
  """
  memory_s: float
  compute_s: float
  step_s: float

  @property
  def bound(self) -> str:
    return "memory" if self.memory_s >= self.compute_s else "compute"


def roofline(target: Target, nbytes: float, flops: float | None, *,
             float32: bool = False) -> Roofline:
  """Step time bound of one device from its bytes and flops per step."""
  memory_s = nbytes / target.hbm_bandwidth
  peak = target.peak_flops_f32 if float32 else target.peak_flops
  compute_s = (flops or 0.0) / peak
  return Roofline(memory_s, compute_s, max(memory_s, compute_s))
