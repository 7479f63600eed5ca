"""One batch-norm layer: jaxbn vs flax, haiku, equinox and PyTorch (CPU).

    python -m benchmarks.bn_op            # every shape, f32 and bf16 (~10 min)
    python -m benchmarks.bn_op --quick    # fewer repetitions
    python -m benchmarks.bn_op --tiny     # smoke test: tiny shapes, seconds
    python -m benchmarks.bn_op --impls jaxbn,flax.linen --shapes 128x28x28x32,4096x512 \
        --dtypes f32                      # the jaxbn-vs-flax table

Prints, from one run (implementations interleaved round-robin within each
shape and dtype, so machine drift hits all of them):

* train-mode forward + backward time of one layer (the VJP of `y` w.r.t. the
  input and the parameters, cotangent passed in), and inference forward time:
  median ms (min-max), ratio to jaxbn, GB/s and multiple of the memory floor;
* beside each speed figure, the output standard-deviation error of the same
  implementation on inputs with mean/std = 3000 (float32) or mean 50 (bf16);
* compiled temporary memory (`memory_analysis().temp_size_in_bytes`);
* the speed and memory targets (BENCHMARKS.md) with the measured ratios.

The floor: train mode must read x for the statistics, read x and write y,
read x and dy for the two backward sums, and read x and dy and write dx: 8
passes over an array of x's size (per-feature vectors ignored); inference
reads x and writes y: 2 passes. The floor time is those bytes over the
bandwidth of a jitted `x * 2` (1 read + 1 write of x) timed in the same run;
"x floor" is given for the medians and for the fastest repetitions.

glibc's malloc is first told to keep freed memory (`--malloc reuse`, the
default here): with its stock thresholds every output above ~32 MB is mmapped
afresh and page-faulted on each call, a cost equal for all implementations
that buried the kernels at the two large NHWC shapes. `--malloc default`
measures with the stock allocator.
"""

from __future__ import annotations

import argparse
import math
import os

if __name__ == "__main__":  # a CPU benchmark; importing it must not hide accelerators
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _harness  # noqa: E402
from benchmarks import _impls  # noqa: E402
from training import hlo  # noqa: E402

FULL_SHAPES = ((128, 28, 28, 32), (64, 56, 56, 64), (256, 14, 14, 256), (4096, 512),
               (1024, 4096))
TINY_SHAPES = ((4, 3, 3, 8), (16, 8))
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
TRAIN_PASSES = 8
INFERENCE_PASSES = 2
# Accuracy inputs: mean/std 3000 in float32; mean 50 (std 1) in bf16.
ACCURACY_MEAN = {"f32": 3000.0, "bf16": 50.0}


def parse_shape(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.lower().split("x"))


def shape_text(shape) -> str:
  return "(" + ",".join(str(d) for d in shape) + ")"


def _input(shape, dtype_name, mean, key):
  x = mean + jax.random.normal(jax.random.key(key), shape, jnp.float32)
  return x.astype(DTYPES[dtype_name])


def run_group(shape, dtype_name, impl_names, torch_layouts, repeats, budget):
  """Times every implementation on one shape and dtype (one interleaved run)."""
  dtype = DTYPES[dtype_name]
  x = _input(shape, dtype_name, 1.0, 0) * 2.0 - 1.0
  ct = _input(shape, dtype_name, 0.0, 1)
  x_accuracy = _input(shape, dtype_name, ACCURACY_MEAN[dtype_name], 2)
  cases, results = {}, {}
  for impl in _impls.jax_implementations(impl_names):
    xl, ctl, accl = impl.to_layout(x), impl.to_layout(ct), impl.to_layout(x_accuracy)
    params, fresh_state = impl.init(xl)
    state = _impls.warm_state(impl, params, fresh_state, xl)
    train = jax.jit(_impls.train_step(impl))
    infer = jax.jit(_impls.inference_step(impl))
    train_compiled = train.lower(params, state, xl, ctl).compile()
    infer_compiled = infer.lower(params, state, xl).compile()
    # Accuracy on the first training step (fresh state), as a model would see it.
    y_accuracy = impl.from_layout(train_compiled(params, fresh_state, accl, ctl)[0])
    reads, writes = hlo.array_passes(train_compiled.as_text(), math.prod(shape))
    results[impl.name] = {
        "passes": f"{reads} + {writes}",
        "temp_train": _harness.temp_bytes(train_compiled),
        "temp_infer": _harness.temp_bytes(infer_compiled),
        "std_error": _impls.std_error(y_accuracy, x_accuracy),
    }
    cases[(impl.name, "train")] = (
        lambda c=train_compiled, a=(params, state, xl, ctl): jax.block_until_ready(c(*a)))
    cases[(impl.name, "infer")] = (
        lambda c=infer_compiled, a=(params, state, xl): jax.block_until_ready(c(*a)))
  layouts = torch_layouts if len(shape) == 4 else torch_layouts[:1]
  for layout in layouts:
    try:
      case = _impls.torch_case(x, ct, layout)
      accuracy_case = _impls.torch_case(x_accuracy, ct, layout)
    except (RuntimeError, TypeError) as error:  # e.g. a dtype torch lacks on CPU
      print(f"(torch {layout} {dtype_name} skipped: {error})")
      continue
    results[case.name] = {
        "std_error": _impls.std_error(accuracy_case.forward_nhwc(), x_accuracy)}
    cases[(case.name, "train")] = case.train
    cases[(case.name, "infer")] = case.infer
  copy = jax.jit(lambda v: v * 2).lower(x).compile()
  cases[("copy", "copy")] = lambda: jax.block_until_ready(copy(x))

  timings = _harness.time_interleaved(cases, repeats=repeats, budget_seconds=budget,
                                      cpu_time=True)
  for (name, mode), timing in timings.items():
    results.setdefault(name, {})[mode] = timing
  nbytes = math.prod(shape) * jnp.dtype(dtype).itemsize
  copy_bandwidth = 2 * nbytes / results["copy"]["copy"].median
  return results, nbytes, copy_bandwidth


def _repeat_range(all_results) -> str:
  counts = [results["copy"]["copy"].count for results, _, _ in all_results.values()]
  return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _speed_rows(all_results, mode, passes):
  rows = []
  for (shape, dtype_name), (results, nbytes, bandwidth) in all_results.items():
    floor_bytes = passes * nbytes
    floor_time = floor_bytes / bandwidth
    # Best case against best case: the fastest repetition against the floor at
    # the fastest copy (less sensitive to a neighbour's burst than medians).
    best_floor_time = floor_bytes / (2 * nbytes / results["copy"]["copy"].min)
    reference = results.get("jaxbn", {}).get(mode)
    for name, result in results.items():
      if mode not in result:
        continue
      timing = result[mode]
      ratio = timing.median / reference.median if reference else float("nan")
      cpu = float(np.median(timing.cpu_seconds))
      cpu_ratio = (cpu / float(np.median(reference.cpu_seconds)) if reference
                   else float("nan"))
      rows.append([shape_text(shape), dtype_name, name, timing.ms(), _harness.fmt_ratio(ratio),
                   _harness.fmt_ms(cpu), _harness.fmt_ratio(cpu_ratio),
                   f"{floor_bytes / timing.median / 1e9:.1f}",
                   f"{timing.median / floor_time:.2f} / {timing.min / best_floor_time:.2f}",
                   f"{result['std_error']:.1e}"])
    copy = results["copy"]["copy"]
    rows.append([shape_text(shape), dtype_name, "copy x*2 (bandwidth probe)", copy.ms(), "-",
                 _harness.fmt_ms(float(np.median(copy.cpu_seconds))), "-",
                 f"{2 * nbytes / copy.median / 1e9:.1f}", "-", "-"])
  return rows


def _memory_rows(all_results):
  rows = []
  for (shape, dtype_name), (results, _, _) in all_results.items():
    flax_temp = results.get("flax.linen", {}).get("temp_train")
    for name, result in results.items():
      if "temp_train" not in result:
        continue
      ratio = (result["temp_train"] / flax_temp if flax_temp else float("nan"))
      rows.append([shape_text(shape), dtype_name, name,
                   hlo.fmt_bytes(result["temp_train"]), _harness.fmt_ratio(ratio),
                   hlo.fmt_bytes(result["temp_infer"]), result["passes"]])
  return rows


def _target_rows(all_results):
  """The targets BENCHMARKS.md states, as ratios measured in this run."""
  rows = []
  for (shape, dtype_name), (results, nbytes, bandwidth) in all_results.items():
    if "jaxbn" not in results:
      continue
    jaxbn_train = results["jaxbn"]["train"].median
    where = f"{shape_text(shape)} {dtype_name}"
    conv = len(shape) == 4
    if "flax.linen" in results:
      limit = 0.4 if conv else 0.9
      ratio = jaxbn_train / results["flax.linen"]["train"].median
      cpu_ratio = (float(np.median(results["jaxbn"]["train"].cpu_seconds))
                   / float(np.median(results["flax.linen"]["train"].cpu_seconds)))
      rows.append([where, "train fwd+bwd time vs flax.linen (wall; CPU)", f"<= {limit}x",
                   f"{_harness.fmt_ratio(ratio)}; {_harness.fmt_ratio(cpu_ratio)}",
                   "met" if ratio <= limit else "MISSED"])
      flax_temp = results["flax.linen"]["temp_train"]
      temp = results["jaxbn"]["temp_train"]
      ratio = temp / flax_temp if flax_temp else float("inf")
      rows.append([where, "train temp memory vs flax.linen", "<= 0.7x",
                   f"{_harness.fmt_ratio(ratio)} ({hlo.fmt_bytes(temp)} vs "
                   f"{hlo.fmt_bytes(flax_temp)})", "met" if ratio <= 0.7 else "MISSED"])
    torch_times = [r["train"].median for n, r in results.items()
                   if n.startswith("torch") and "train" in r]
    if torch_times:
      ratio = jaxbn_train / min(torch_times)
      rows.append([where, "train fwd+bwd time vs fastest torch layout", "<= 0.7x",
                   _harness.fmt_ratio(ratio), "met" if ratio <= 0.7 else "MISSED"])
    floor_time = TRAIN_PASSES * nbytes / bandwidth
    ratio = jaxbn_train / floor_time
    best_ratio = (results["jaxbn"]["train"].min
                  / (TRAIN_PASSES * nbytes / (2 * nbytes / results["copy"]["copy"].min)))
    rows.append([where, "train fwd+bwd time vs memory floor (median; min)", "<= 1.2x",
                 f"{_harness.fmt_ratio(ratio)}; {_harness.fmt_ratio(best_ratio)}",
                 "met" if ratio <= 1.2 else "MISSED"])
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="5 repetitions")
  size.add_argument("--tiny", action="store_true", help="tiny shapes, 2 repetitions")
  parser.add_argument("--shapes", help="comma-separated, e.g. 128x28x28x32,4096x512")
  parser.add_argument("--dtypes", default="f32,bf16", help="f32,bf16")
  parser.add_argument("--impls", help="comma-separated JAX implementation names "
                      "(default all); torch is controlled by --torch-layouts")
  parser.add_argument("--torch-layouts", default=",".join(_impls.TORCH_LAYOUTS),
                      help="NCHW,channels_last, or empty for no torch")
  parser.add_argument("--repeats", type=int, help="minimum timed repetitions per case")
  parser.add_argument("--budget", type=float,
                      help="seconds of timed rounds per shape and dtype: fast cases get "
                      "more repetitions, up to 100 (default 20; 0 with --tiny)")
  _harness.add_malloc_flag(parser)
  args = parser.parse_args(argv)
  _harness.configure_malloc(args.malloc)

  shapes = (TINY_SHAPES if args.tiny else
            tuple(parse_shape(s) for s in args.shapes.split(",")) if args.shapes
            else FULL_SHAPES)
  repeats = args.repeats or (2 if args.tiny else 5 if args.quick else 15)
  budget = args.budget if args.budget is not None else (
      0.0 if args.tiny else 5.0 if args.quick else 20.0)
  impl_names = tuple(args.impls.split(",")) if args.impls else None
  torch_layouts = tuple(t for t in args.torch_layouts.split(",") if t)
  dtype_names = tuple(args.dtypes.split(","))

  _harness.print_header("Batch norm, one layer")
  all_results = {}
  for dtype_name in dtype_names:
    for shape in shapes:
      all_results[(shape, dtype_name)] = run_group(shape, dtype_name, impl_names,
                                                   torch_layouts, repeats, budget)

  headers = ["shape", "dtype", "implementation", "median ms (min-max)", "vs jaxbn",
             "CPU ms", "CPU vs jaxbn", "GB/s", "x floor (median / min)",
             "std err (acc. input)"]
  accuracy_note = ("CPU ms: median process CPU time per call (all threads; XLA and "
                   "PyTorch both use 2), steadier than wall time when neighbours take the "
                   "cores. std err: largest per-channel |std(y) - exact| of a first-step "
                   "train-mode output with scale 1, bias 0, on inputs with mean 3000 and "
                   "std 1 (f32) or mean 50 and std 1 (bf16); bf16 outputs alone round at "
                   "~1e-3.")
  _harness.print_table(
      f"Train mode, forward + backward (interleaved, {_repeat_range(all_results)} "
      f"repetitions per case; floor = {TRAIN_PASSES} passes over x at the copy bandwidth)",
      headers, _speed_rows(all_results, "train", TRAIN_PASSES), accuracy_note)
  _harness.print_table(
      f"Inference forward (interleaved with the above; floor = "
      f"{INFERENCE_PASSES} passes)",
      headers, _speed_rows(all_results, "infer", INFERENCE_PASSES), accuracy_note)
  _harness.print_table(
      "Compiled temporary memory (XLA:CPU memory_analysis) and passes over memory",
      ["shape", "dtype", "implementation", "temp, train fwd+bwd", "vs flax.linen",
       "temp, inference", "full-size reads + writes, train HLO"], _memory_rows(all_results),
      "Reads + writes: operands and results of x's size of the top-level ops of the "
      "compiled train fwd+bwd program (the floor is 6 + 2; jaxbn's first-step lax.cond, "
      "which reads x on step 1 only, is not counted).")
  _harness.print_table("Targets (ratios from this run)",
                       ["where", "what", "target", "measured", "verdict"],
                       _target_rows(all_results))


if __name__ == "__main__":
  main()
