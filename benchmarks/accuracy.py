"""Output accuracy of each batch-norm implementation on off-centre inputs.

    python -m benchmarks.accuracy          # (64,8,8,32) NHWC and (512,64)
    python -m benchmarks.accuracy --tiny   # smoke test: (64,8) only

Train mode, first step (fresh state), scale 1 and bias 0: the exact output of
channel c has standard deviation sqrt(var_c / (var_c + eps)), with var_c
computed in float64 from the input values themselves. Each cell is the
largest per-channel |std(y) - exact| over channels ("nan" when the output
holds NaN), for inputs of standard deviation 1 and growing mean: the mean /
std ratio is what breaks the one-pass E[x^2] - E[x]^2 variance. bf16 outputs
alone round at ~1e-3. `bn_op` prints the same error beside every speed figure.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import _harness  # noqa: E402
from benchmarks import _impls  # noqa: E402

MEANS = {"f32": (0.0, 100.0, 3000.0, 1e5), "bf16": (0.0, 10.0, 50.0, 1000.0)}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def errors_for(shape, dtype_name, impl_names, torch_layouts):
  """name -> [std error per mean in MEANS[dtype_name]]."""
  dtype = DTYPES[dtype_name]
  noise = jax.random.normal(jax.random.key(0), shape)
  ct = jnp.zeros(shape, dtype)
  rows = {}
  impls = _impls.jax_implementations(impl_names)
  forwards = [jax.jit(_impls.train_forward(impl)) for impl in impls]
  for mean in MEANS[dtype_name]:
    x = (mean + noise).astype(dtype)
    for impl, forward in zip(impls, forwards):
      xl = impl.to_layout(x)
      params, state = impl.init(xl)
      y = forward(params, state, xl)[0]
      rows.setdefault(impl.name, []).append(_impls.std_error(impl.from_layout(y), x))
    for layout in (torch_layouts if len(shape) == 4 else torch_layouts[:1]):
      case = _impls.torch_case(x, ct, layout)
      rows.setdefault(case.name, []).append(_impls.std_error(case.forward_nhwc(), x))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true", help="small shapes")
  parser.add_argument("--impls", help="comma-separated JAX implementation names")
  parser.add_argument("--torch-layouts", default=",".join(_impls.TORCH_LAYOUTS))
  args = parser.parse_args(argv)
  shapes = ((64, 8),) if args.tiny else ((64, 8, 8, 32), (512, 64))
  impl_names = tuple(args.impls.split(",")) if args.impls else None
  torch_layouts = tuple(t for t in args.torch_layouts.split(",") if t)

  _harness.print_header("Batch-norm output accuracy")
  for dtype_name in DTYPES:
    headers = ["shape", "implementation"] + [f"mean {m:g}" for m in MEANS[dtype_name]]
    rows = []
    for shape in shapes:
      for name, errors in errors_for(shape, dtype_name, impl_names,
                                     torch_layouts).items():
        rows.append(["(" + ",".join(map(str, shape)) + ")", name]
                    + [f"{e:.1e}" for e in errors])
    _harness.print_table(
        f"{dtype_name} input, std 1: largest per-channel |std(y) - exact|", headers, rows)


if __name__ == "__main__":
  main()
