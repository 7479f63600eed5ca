"""Compiles the training program for GPUs and TPUs without one: `train.py --compile_for`.

`compile_for_targets(config, workdir, specs)` compiles the steps that
`training.lowering` builds from abstract shapes for compile-only target
devices (`training.targets`) and reports, per device, the memory XLA plans,
the collectives its partitioner inserted, the FLOPs and the largest batch
that fits.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Iterable, NamedTuple

import jax
import ml_collections

from training import hlo
from training import lowering
from training import targets

COMPILED_DIR = "compiled"
ENTRY_BYTES_METHOD = ("operand + result bytes of the entry computation's kernels "
                      "(training.hlo.entry_bytes)")


class CompiledProgram(NamedTuple):
  """One step compiled for one target; memory and counts per device.

  Attributes:
    name: 'train_step' or 'eval_step'.
    target: e.g. 'h100:8'.
    num_devices: devices of the mesh.
    per_device_batch: examples per device per step.
    argument_bytes, output_bytes, alias_bytes, temp_bytes: the compiler's
      `memory_analysis()` (outputs aliased to donated arguments are counted once).
    peak_bytes: the compiler's peak, else arguments + outputs - aliased + temp.
    hbm_bytes: device memory of the target.
    flops: per device per step (TPU: the compiler's `cost_analysis()`; GPU,
      whose compiler reports none: `matmul_flops` of the traced step, divided
      by the devices under 'gspmd').
    nbytes: memory traffic per device per step, by `bytes_method`.
    bytes_method: 'compiler bytes accessed' (TPU) or `ENTRY_BYTES_METHOD` (GPU).
    hbm_traffic_bytes: device-memory traffic per device per step by where the
      program keeps each array (`hlo.hbm_traffic_bytes`): on TPUs less than the
      compiler's bytes accessed, which also counts on-chip VMEM; on GPUs `nbytes`.
    roofline: the estimated step time (`targets.roofline`).
    collectives: the collective ops the compiled program holds (inserted by
      the SPMD partitioner under 'gspmd').
    kernels: launched ops of the entry computation (`hlo.kernels`).
    convolutions: convolution ops (`hlo.convolutions`).
    hlo_text: the optimized HLO.
  """
  name: str
  target: str
  num_devices: int
  per_device_batch: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  peak_bytes: int
  hbm_bytes: int
  flops: float
  nbytes: float
  bytes_method: str
  hbm_traffic_bytes: float
  roofline: targets.Roofline
  collectives: tuple[hlo.Collective, ...]
  kernels: int
  convolutions: int
  hlo_text: str

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def images_per_s(self) -> float:
    """Estimated examples per second over all devices (from `roofline`)."""
    return self.per_device_batch * self.num_devices / self.roofline.step_s


def compile_step(name: str, step, args, spec: targets.TargetSpec, *, per_device_batch: int,
                 flops_are_global: bool, float32: bool) -> CompiledProgram:
  """Compiles a jitted step for `spec`'s devices and reads what the compiler reports.

  Args:
    name: the program's name.
    step: a jitted function whose shardings use a mesh of `targets.devices(spec)`.
    args: its abstract arguments (`jax.ShapeDtypeStruct`s with shardings).
    spec: the target.
    per_device_batch: examples per device.
    flops_are_global: the traced program is the global one (jit over sharded
      arrays), not a per-device one (shard_map).
    float32: float32 activations (the roofline's peak).
  """
  lowered = step.lower(*args)
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  num_devices = len(targets.devices(spec))
  args_b, out_b = memory.argument_size_in_bytes, memory.output_size_in_bytes
  alias_b, temp_b = memory.alias_size_in_bytes, memory.temp_size_in_bytes
  peak = getattr(memory, "peak_memory_in_bytes", 0) or (args_b + out_b - alias_b + temp_b)
  text = compiled.as_text()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  if "bytes accessed" in cost:
    nbytes, method = float(cost["bytes accessed"]), "compiler bytes accessed"
  else:
    nbytes, method = float(hlo.entry_bytes(text)), ENTRY_BYTES_METHOD
  flops = cost.get("flops")
  if flops is None:
    flops = matmul_flops(step.trace(*args).jaxpr)
    if flops_are_global:
      flops /= num_devices
  return CompiledProgram(
      name=name, target=spec.label, num_devices=num_devices,
      per_device_batch=per_device_batch, argument_bytes=args_b, output_bytes=out_b,
      alias_bytes=alias_b, temp_bytes=temp_b, peak_bytes=int(peak),
      hbm_bytes=spec.target.hbm_bytes, flops=float(flops), nbytes=nbytes,
      bytes_method=method, hbm_traffic_bytes=float(hlo.hbm_traffic_bytes(text)),
      roofline=targets.roofline(spec.target, nbytes, flops, float32=float32),
      collectives=hlo.collectives(text), kernels=len(hlo.kernels(text)),
      convolutions=hlo.convolutions(text), hlo_text=text)


def matmul_flops(jaxpr) -> float:
  """Flops of the convolutions and matrix products of a jaxpr (elementwise work ignored).

  A convolution costs 2 x output elements x (kernel window x input features
  per group); a `dot_general` 2 x output elements x contracted size. Nested
  jaxprs (jit, shard_map, custom_vjp, scans times their length) are counted;
  of a `cond`'s branches (`lax.platform_dependent` included) the dearest.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      lhs, rhs = (v.aval for v in eqn.invars[:2])
      out = eqn.outvars[0].aval
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      window = math.prod(rhs.shape[d] for d in spec[2:])
      total += 2.0 * math.prod(out.shape) * window * rhs.shape[spec[1]]
    elif name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs.shape[d] for d in lhs_contracting)
    elif name == "cond":
      total += max(matmul_flops(branch) for branch in eqn.params["branches"])
    else:
      repeat = eqn.params.get("length", 1) if name == "scan" else 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
            total += repeat * matmul_flops(sub)
  return total


def compile_config(config: ml_collections.ConfigDict, spec: targets.TargetSpec, *,
                   norm: Any = None, programs: Iterable[str] = lowering.PROGRAMS
                   ) -> tuple[CompiledProgram, ...]:
  """Compiles `config`'s train and eval steps for one target (shapes only)."""
  devices = targets.devices(spec)
  built = lowering.build_programs(config, devices=devices, norm=norm)
  float32 = not config.half_precision
  found = []
  for name in programs:
    step, args = built.steps[name]
    batch = config.batch_size if name == "train_step" else config.eval_batch_size
    program = compile_step(
        name, step, args, spec, per_device_batch=batch // built.num_devices,
        flops_are_global=config.parallelism == "gspmd", float32=float32)
    if name == "train_step" and config.grad_accum_steps > 1:
      program = _with_microbatch_costs(program, config, spec, norm=norm)
    found.append(program)
  return tuple(found)


def _with_microbatch_costs(program: CompiledProgram, config: ml_collections.ConfigDict,
                           spec: targets.TargetSpec, *, norm: Any) -> CompiledProgram:
  """`program` (a step of k = `grad_accum_steps` microbatches) with k times the flops
  and bytes of a one-microbatch step.

  The compilers' cost analyses count the body of the microbatch loop once; the
  memory figures stay the k-microbatch program's own. The optimizer update,
  which runs once per step, is counted k times: an overestimate by that much.
  """
  k = config.grad_accum_steps
  micro = config.copy_and_resolve_references()
  micro.batch_size, micro.grad_accum_steps = config.batch_size // k, 1
  (one,) = compile_config(micro, spec, norm=norm, programs=("train_step",))
  flops, nbytes = k * one.flops, k * one.nbytes
  return program._replace(
      flops=flops, nbytes=nbytes, bytes_method=f"{one.bytes_method}, {k} x one microbatch",
      hbm_traffic_bytes=k * one.hbm_traffic_bytes,
      roofline=targets.roofline(spec.target, nbytes, flops,
                                float32=not config.half_precision))


FIT_BATCH_LIMIT = 4096


def largest_fitting_batch(config: ml_collections.ConfigDict, spec: targets.TargetSpec, *,
                          limit: int = FIT_BATCH_LIMIT) -> int:
  """The largest per-device train batch whose compiled step fits the target's memory.

  Doubles from the configured per-device batch until a step does not fit (or
  `limit`, which is then returned), then bisects; every probe is one
  compilation. Batches are multiples of `grad_accum_steps` (equal
  microbatches). 0: not even one microbatch of one example fits.
  """
  num_devices = len(targets.devices(spec))
  k = config.grad_accum_steps

  def fits(units: int) -> bool:
    probe = config.copy_and_resolve_references()
    probe.batch_size = units * k * num_devices
    (program,) = compile_config(probe, spec, programs=("train_step",))
    return program.fits

  # Search in units of k examples per device (one example per microbatch).
  limit_units = max(limit // k, 1)
  low, high = 0, max(config.batch_size // num_devices // k, 1)
  while high <= limit_units and fits(high):
    low, high = high, 2 * high
  if low == high // 2 and high > limit_units:
    return low * k
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low * k


class Compilation(NamedTuple):
  """What `compile_for_targets` compiled.

  Attributes:
    programs: every (target, program).
    fitting_batches: target label -> largest per-device train batch that fits
      (only when asked for).
    summary: the text printed by `train.py --compile_for`.
  """
  programs: tuple[CompiledProgram, ...]
  fitting_batches: dict[str, int]
  summary: str

  @property
  def fits(self) -> bool:
    return all(program.fits for program in self.programs)


def compile_for_targets(config: ml_collections.ConfigDict,
                        workdir: str | pathlib.Path | None, text: str, *,
                        fit_batch: bool = False) -> Compilation:
  """Compiles the train and eval steps of `config` for each target, without devices.

  Args:
    config: a training config; `batch_size` and `eval_batch_size` are global
      and must divide over each target's devices.
    workdir: the optimized HLO goes to
      `<workdir>/compiled/<target>/<program>.hlo.txt`; None writes nothing.
    text: targets, e.g. `'h100:8,tpu-v5e:2x4'` (`targets.parse`).
    fit_batch: also bisect for the largest per-device train batch that fits.

  Returns:
    The compiled programs and the summary; `.fits` is False when a program
    needs more memory than its target has.
  """
  specs = targets.parse(text)
  programs, fitting = [], {}
  for spec in specs:
    for program in compile_config(config, spec):
      programs.append(program)
      if workdir is not None:
        directory = pathlib.Path(workdir).expanduser() / COMPILED_DIR / spec.label.replace(
            ":", "_")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{program.name}.hlo.txt").write_text(program.hlo_text)
    if fit_batch:
      fitting[spec.label] = largest_fitting_batch(config, spec)
  result = Compilation(tuple(programs), fitting, "")
  return result._replace(summary=_compiled_summary(config, result, workdir))


def collective_summary(found: Iterable[hlo.Collective]) -> str:
  """`'57 all-reduce (1.20 MB)'` per kind; branch-only ones apart."""
  groups: dict[str, list[int]] = {}
  for c in found:
    key = c.op + (" in a conditional branch" if c.in_conditional else "")
    groups.setdefault(key, []).append(c.nbytes)
  if not groups:
    return "none"
  return ", ".join(f"{len(sizes)} {op} ({hlo.fmt_bytes(sum(sizes))})"
                   for op, sizes in groups.items())


def _compiled_summary(config, result: Compilation, workdir) -> str:
  dtype = "bfloat16" if config.half_precision else "float32"
  lines = [f"Compiled {config.model} ({dtype}, parallelism={config.parallelism}, global "
           f"batch {config.batch_size}, eval batch {config.eval_batch_size}) without a "
           "device. Memory, flops and bytes per device per step; step time and images/s "
           "are roofline ESTIMATES (max of bytes / HBM bandwidth, flops / peak), not "
           "timings."]
  for p in result.programs:
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines += [
        f"{p.target} {p.name} ({p.num_devices} devices, {p.per_device_batch} per device): "
        f"{verdict}: peak {hlo.fmt_bytes(p.peak_bytes)} of {hlo.fmt_bytes(p.hbm_bytes)} "
        f"HBM (arguments {hlo.fmt_bytes(p.argument_bytes)}, outputs "
        f"{hlo.fmt_bytes(p.output_bytes)}, aliased {hlo.fmt_bytes(p.alias_bytes)}, temp "
        f"{hlo.fmt_bytes(p.temp_bytes)}).",
        f"  {p.flops / 1e9:,.4g} GFLOP, {hlo.fmt_bytes(p.nbytes)} ({p.bytes_method}"
        + (f"; HBM traffic by memory space {hlo.fmt_bytes(p.hbm_traffic_bytes)}"
           if p.hbm_traffic_bytes != p.nbytes else "") + "); "
        f"estimated {p.roofline.step_s * 1e3:.3g} ms per step ({p.roofline.bound}-bound), "
        f"{p.images_per_s:,.0f} images/s; {p.kernels} kernels, {p.convolutions} "
        f"convolutions; collectives: {collective_summary(p.collectives)}."]
  for label, batch in result.fitting_batches.items():
    found = (f"{batch} or more (the search stops at {FIT_BATCH_LIMIT})"
             if batch >= FIT_BATCH_LIMIT else str(batch))
    lines.append(f"{label}: largest per-device train batch that fits: {found}.")
  if workdir is not None and result.programs:
    lines.append(f"Optimized HLO: {pathlib.Path(workdir) / COMPILED_DIR}/<target>/"
                 "<program>.hlo.txt.")
  return "\n".join(lines)
